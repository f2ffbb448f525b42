import json

import pytest
import torch

from fewstep.errors import CheckpointError, ConfigError
from fewstep.models.analytic import ring_mixture
from fewstep.models.denoiser import ConsistencyDenoiser, EDMDenoiser, PathDenoiser
from fewstep.models.io import load_model, save_model
from fewstep.nets import MLP, SmallUNet
from fewstep.outputs import sibling
from fewstep.paths import VPCosine

METADATA = {"role": "student", "dataset": "ring8", "data_shape": [2], "method": "pd",
            "sampling": {"2": {"sampler": "euler", "sigmas": [80.0, 1.0, 0.0]}}}


def mlp_denoiser(width: int = 16, depth: int = 1, num_classes: int = 0) -> EDMDenoiser:
    torch.manual_seed(0)
    return EDMDenoiser(MLP((2,), width=width, depth=depth, emb_dim=8, num_classes=num_classes), sigma_data=1.4)


def assert_same_outputs(a, b, x, s, label=None):
    with torch.no_grad():
        assert torch.equal(a(x, s, label), b(x, s, label))


@pytest.mark.parametrize("kind", ["edm", "consistency", "path"])
def test_round_trip_rebuilds_the_same_function(tmp_path, kind):
    torch.manual_seed(0)
    if kind == "path":
        denoiser = PathDenoiser(SmallUNet((1, 4, 4), channels=8, emb_dim=8, num_classes=3), VPCosine(), "eps",
                                time_scale=1000.0)
        x, label = torch.randn(5, 1, 4, 4), torch.tensor([0, 1, 2, 3, 1])
    else:
        cls = EDMDenoiser if kind == "edm" else ConsistencyDenoiser
        denoiser = cls(MLP((2,), width=16, depth=2, emb_dim=8), sigma_data=0.7)
        x, label = torch.randn(5, 2), None
    s = torch.tensor([0.01, 0.1, 1.0, 10.0, 80.0])
    save_model(tmp_path / "model", denoiser, METADATA)
    loaded, description = load_model(tmp_path / "model")
    assert type(loaded) is type(denoiser) and not loaded.training
    assert_same_outputs(denoiser.eval(), loaded, x, s, label)
    assert description["denoiser"] == json.loads(json.dumps(denoiser.config()))
    assert description["role"] == "student" and description["sampling"]["2"]["sigmas"] == [80.0, 1.0, 0.0]


def test_description_is_human_readable(tmp_path):
    save_model(tmp_path / "edm", mlp_denoiser(), METADATA)
    edm = json.loads((tmp_path / "edm" / "fewstep.json").read_text())
    assert edm["format"] == "fewstep-model" and edm["version"] == 1
    assert edm["backbone"] == {"name": "mlp", "hparams": {"data_shape": [2], "width": 16, "depth": 1, "emb_dim": 8,
                                                          "num_classes": 0, "dropout": 0.0, "extra_conditions": 0,
                                                          "time_frequencies": [0.001, 100.0]}}
    assert (edm["path"], edm["prediction"], edm["time_convention"]) == ("ve", "edm", "c_noise = log(sigma) / 4")
    save_model(tmp_path / "cm", ConsistencyDenoiser(MLP((2,), width=8, depth=1, emb_dim=8)), {})
    assert json.loads((tmp_path / "cm" / "fewstep.json").read_text())["prediction"] == "consistency"
    vp = PathDenoiser(MLP((2,), width=8, depth=1, emb_dim=8), VPCosine(), "v", time_scale=1000.0)
    save_model(tmp_path / "vp", vp, {})
    vp_description = json.loads((tmp_path / "vp" / "fewstep.json").read_text())
    assert (vp_description["path"], vp_description["prediction"]) == ("vp_cosine", "v")
    assert vp_description["time_convention"] == "backbone time = t * 1000"


def test_overwrite_replaces_the_folder_and_leaves_no_temporaries(tmp_path):
    folder = tmp_path / "model"
    save_model(folder, mlp_denoiser(width=16), {"role": "teacher"})
    new = mlp_denoiser(width=32)
    save_model(folder, new, {"role": "teacher"})
    loaded, description = load_model(folder)
    assert description["role"] == "teacher" and loaded.backbone.hparams["width"] == 32
    assert sorted(p.name for p in folder.iterdir()) == ["fewstep.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_save_never_removes_what_fewstep_did_not_write(tmp_path):
    """A folder with a user's file in it, a model of the other role, a file where the folder should be, and the
    user's own ``model.tmp`` / ``model.prev`` beside it: each refused or left alone, nothing deleted."""
    folder = tmp_path / "model"
    save_model(folder, mlp_denoiser(width=16), {"role": "teacher"})
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"notes\.txt"):
        save_model(folder, mlp_denoiser(width=16), {"role": "teacher"})
    (folder / "notes.txt").unlink()
    with pytest.raises(ConfigError, match="holds a fewstep teacher, not a student"):
        save_model(folder, mlp_denoiser(width=16), {"role": "student"})
    (tmp_path / "thesis.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is a file"):
        save_model(tmp_path / "thesis.txt", mlp_denoiser(width=16), {"role": "teacher"})
    for name in ("model.tmp", "model.prev"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "keep.txt").write_text("mine")
    save_model(folder, mlp_denoiser(width=8), {"role": "teacher"})
    assert (tmp_path / "thesis.txt").read_text() == "mine"
    assert all((tmp_path / name / "keep.txt").read_text() == "mine" for name in ("model.tmp", "model.prev"))


def test_failed_save_keeps_the_existing_model(tmp_path):
    folder = tmp_path / "model"
    save_model(folder, mlp_denoiser(), {"role": "teacher"})
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_model(folder, mlp_denoiser(width=32), {"sigmas": torch.ones(3)})
    with pytest.raises(ValueError, match="may not set"):
        save_model(folder, mlp_denoiser(width=32), {"format": "mine"})
    with pytest.raises(ValueError, match="GaussianMixture"):
        save_model(folder, ring_mixture(), {})
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_tied_weights_are_saved(tmp_path):
    denoiser = mlp_denoiser(depth=2)
    denoiser.backbone.blocks[1].fc1.weight = denoiser.backbone.blocks[0].fc1.weight
    save_model(tmp_path / "tied", denoiser, {})
    loaded, _ = load_model(tmp_path / "tied")
    assert torch.equal(loaded.backbone.blocks[1].fc1.weight, denoiser.backbone.blocks[0].fc1.weight)


def test_a_crash_between_the_renames_is_recovered_on_the_next_save(tmp_path):
    folder = tmp_path / "model"
    save_model(folder, mlp_denoiser(width=16), {"role": "teacher"})
    folder.rename(sibling(folder, "prev"))  # as if the process died after moving the old folder aside
    save_model(folder, mlp_denoiser(width=32), {"role": "teacher"})
    assert load_model(folder)[0].backbone.hparams["width"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def corrupt(folder, fault):
    config, weights = folder / "fewstep.json", folder / "model.safetensors"
    description = json.loads(config.read_text())
    if fault == "missing json":
        config.unlink()
    elif fault == "invalid json":
        config.write_text("{not json")
    elif fault == "wrong format":
        config.write_text(json.dumps({**description, "format": "diffusers"}))
    elif fault == "newer version":
        config.write_text(json.dumps({**description, "version": 99}))
    elif fault == "unknown backbone":
        config.write_text(json.dumps({**description, "backbone": {"name": "dit", "hparams": {}}}))
    elif fault == "missing weights":
        weights.unlink()
    elif fault == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif fault == "garbage weights":
        weights.write_bytes(b"\x00" * 64)
    elif fault == "shape mismatch":
        description["backbone"]["hparams"]["width"] = 32
        config.write_text(json.dumps(description))
    elif fault == "missing keys":
        description["backbone"]["hparams"]["depth"] = 2
        config.write_text(json.dumps(description))


@pytest.mark.parametrize("fault, message", [
    ("missing json", "has no fewstep.json"),
    ("invalid json", "fewstep.json is not valid JSON"),
    ("wrong format", "format is 'diffusers', expected 'fewstep-model'"),
    ("newer version", "version 99"),
    ("unknown backbone", "cannot rebuild the model.*unknown backbone 'dit'"),
    ("missing weights", "has no model.safetensors"),
    ("truncated weights", "model.safetensors is unreadable"),
    ("garbage weights", "model.safetensors is unreadable"),
    ("shape mismatch", r"backbone\.input\.weight has shape \(16, 2\) in the file but \(32, 2\)"),
    ("missing keys", r"missing keys \[backbone\.blocks\.1\."),
])
def test_every_fault_is_one_line_naming_the_folder(tmp_path, fault, message):
    folder = tmp_path / "model"
    save_model(folder, mlp_denoiser(), {})
    corrupt(folder, fault)
    with pytest.raises(CheckpointError, match=message) as error:
        load_model(folder)
    text = str(error.value)
    assert "\n" not in text and str(folder) in text


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")
