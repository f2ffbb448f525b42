"""The command line: bad input exits with status 2, one line naming the thing to fix, and writes nothing."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fewstep.cli import main
from fewstep.models.denoiser import EDMDenoiser
from fewstep.models.io import save_model
from fewstep.nets import MLP


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def digits_teacher_folder(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "teacher"
    save_model(folder, EDMDenoiser(MLP((1, 8, 8), width=32, depth=1, num_classes=10), 0.75),
               {"role": "teacher", "dataset": "digits", "data_shape": [1, 8, 8]})
    return folder


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fewstep: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_unknown_config_key(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(["distill", f"out={out}", "train.stepz=10"], capsys)
    assert_one_line_error(code, err, "train.stepz", "valid keys")
    assert not out.exists()


def test_overrides_may_follow_options(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(["distill", f"out={out}", "--quiet", "train.stepz=10"], capsys)
    assert_one_line_error(code, err, "train.stepz", "valid keys")  # read as an override, not refused by argparse
    assert main(["distill", "--quiet", "--nope"]) == 2
    assert "unrecognized arguments: --nope" in capsys.readouterr().err


def test_unknown_key_in_a_recipe_file_and_wrong_type(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"dataset: ring8\nmethod: cd\nout: {tmp_path / 'run'}\ntrain:\n  steps: many\n")
    code, _, err = run_cli(["distill", str(recipe)], capsys)
    assert_one_line_error(code, err, "train.steps", "int")
    recipe.write_text("dataset: ring8\nmethod_args:\n  num_scale: 10\n")
    code, _, err = run_cli(["distill", str(recipe)], capsys)
    assert_one_line_error(code, err, "method_args.num_scale")
    assert not (tmp_path / "run").exists()


def test_a_value_the_method_refuses(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(["distill", "dataset=ring8", "teacher.source=analytic", f"out={out}", "method=cd",
                            "method_args.num_scales=1"], capsys)
    assert_one_line_error(code, err, "method_args.num_scales", "must be >= 2")
    assert not out.exists()


def test_missing_recipe_file(tmp_path, capsys):
    code, _, err = run_cli(["distill", str(tmp_path / "nope.yaml")], capsys)
    assert_one_line_error(code, err, "nope.yaml")


def test_corrupt_checkpoint(tmp_path, capsys, digits_teacher_folder):
    weights = digits_teacher_folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    out = tmp_path / "samples.png"
    code, _, err = run_cli(["sample", "--model", str(digits_teacher_folder), "--out", str(out)], capsys)
    assert_one_line_error(code, err, "model.safetensors")
    assert not out.exists()
    code, _, err = run_cli(["distill", f"out={tmp_path / 'run'}", f"teacher.source={digits_teacher_folder}"],
                           capsys)
    assert_one_line_error(code, err, "model.safetensors")
    assert not (tmp_path / "run").exists()


def test_wrong_data_shape(tmp_path, capsys, digits_teacher_folder):
    out = tmp_path / "run"
    code, _, err = run_cli(["distill", "dataset=ring8", f"teacher.source={digits_teacher_folder}", f"out={out}"],
                           capsys)
    assert_one_line_error(code, err, "[1, 8, 8]", "ring8", "[2]")
    assert not out.exists()


def test_sample_from_a_saved_teacher_writes_a_grid(tmp_path, capsys, digits_teacher_folder):
    out = tmp_path / "grid.png"
    code, stdout, _ = run_cli(["sample", "--model", str(digits_teacher_folder), "--nfe", "3", "-n", "8",
                               "--out", str(out)], capsys)
    assert code == 0 and out.stat().st_size > 0 and "3 NFE" in stdout


def test_methods_lists_the_registry(capsys):
    code, stdout, _ = run_cli(["methods"], capsys)
    assert code == 0 and "cd" in stdout and "pd" in stdout and "Consistency Models" in stdout


def test_console_script_exit_code_is_two():
    done = subprocess.run([sys.executable, "-m", "fewstep.cli", "distill", "train.stepz=1"], capture_output=True,
                          text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1


@pytest.mark.parametrize("recipe", sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml")),
                         ids=lambda path: path.stem)
def test_every_shipped_recipe_is_valid(recipe):
    """Every recipe in configs/ parses, names a registered method, and its method_args fit that method."""
    from fewstep.config import build_dataclass, load_recipe
    from fewstep.methods import METHODS

    loaded = load_recipe(recipe)
    assert loaded.method in METHODS, recipe
    build_dataclass(METHODS[loaded.method].Config, dict(loaded.method_args), "method_args")


def test_yes_no_on_off_are_words_not_booleans_in_recipes(tmp_path):
    """YAML 1.2 booleans: ``train.mixed_precision=no`` (accelerate's word) is the string "no", in an override and in
    a file; ``true`` and ``false`` are booleans, and a bool setting given "yes" is refused by name."""
    from fewstep.config import load_recipe
    from fewstep.errors import ConfigError

    assert load_recipe(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  mixed_precision: no\neval:\n  tune_levels: true\n")
    loaded = load_recipe(recipe)
    assert loaded.train.mixed_precision == "no" and loaded.eval.tune_levels is True
    with pytest.raises(ConfigError, match=r"eval\.tune_levels must be bool, got str 'yes'"):
        load_recipe(None, ["eval.tune_levels=yes"])


def test_a_float_override_in_short_scientific_notation_is_read_as_a_number():
    """PyYAML reads ``2e-4`` as a string (YAML 1.1 wants ``2.0e-4``); a float setting takes it as 0.0002, and a
    word is still refused by name."""
    from fewstep.config import build_dataclass, load_recipe
    from fewstep.errors import ConfigError
    from fewstep.methods.consistency.continuous_consistency import SCMConfig

    assert load_recipe(None, ["train.lr=2e-4", "train.ema_decay=.999"]).train.lr == 2e-4
    assert build_dataclass(SCMConfig, {"p_mean": "-8E-1"}, "method_args").p_mean == -0.8
    with pytest.raises(ConfigError, match=r"train\.lr must be float, got str 'fast'"):
        load_recipe(None, ["train.lr=fast"])


def test_teacher_train_passes_backbone_args_and_refuses_non_objects(tmp_path, capsys):
    out = tmp_path / "teacher"
    code, stdout, _ = run_cli(["teacher", "train", "--backbone-args",
                               '{"width": 16, "depth": 1, "time_frequencies": [0.1, 20]}', "--steps", "2",
                               "--out", str(out), "--quiet"], capsys)
    assert code == 0 and "wrote teacher" in stdout
    hparams = json.loads((out / "fewstep.json").read_text())["backbone"]["hparams"]
    assert (hparams["width"], hparams["depth"], hparams["time_frequencies"]) == (16, 1, [0.1, 20])
    for text, needle in (("[16]", "needs a JSON object"), ("{width: 16}", "not JSON")):
        code = main(["teacher", "train", "--backbone-args", text, "--out", str(tmp_path / "never")])
        err = capsys.readouterr().err
        assert code == 2 and "--backbone-args" in err and needle in err
    assert not (tmp_path / "never").exists()
    code, _, err = run_cli(["teacher", "train", "--backbone-args", '{"widht": 16}', "--steps", "2", "--out",
                            str(tmp_path / "never")], capsys)
    assert_one_line_error(code, err, "--backbone-args", "widht")
    assert not (tmp_path / "never").exists()
