import math

import pytest
import torch

from fewstep.data import DATASETS, load_dataset
from fewstep.data.batch import NEEDS, CompositeBatch
from fewstep.data.digits import split_indices, stratified_counts, to_raw
from fewstep.data.sources import (
    CompositeSource,
    LabelsOnly,
    NoiseOnly,
    RealData,
    TeacherPairs,
    make_source,
    pair_labels,
)
from fewstep.data.toy2d import REF_SIZE, TRAIN_SIZE
from fewstep.errors import ConfigError, DataError
from fewstep.models.denoiser import Denoiser

TOY = ("ring8", "grid25", "grid25_imbalanced", "checkerboard", "moons", "spirals")


@pytest.fixture(scope="module")
def datasets():
    return {name: load_dataset(name) for name in DATASETS}


def overall_std(x):
    return float(((x - x.mean(0)) ** 2).mean().sqrt())


def test_registry_lists_every_dataset():
    assert set(DATASETS) == {*TOY, "digits"}


@pytest.mark.parametrize("name", TOY)
def test_toy_shapes_dtypes_and_scale(datasets, name):
    data = datasets[name]
    assert data.name == name and data.description == DATASETS[name]
    assert data.data_shape == (2,) and data.num_classes == 0
    assert data.train_x.shape == (TRAIN_SIZE, 2) and data.ref_x.shape == (REF_SIZE, 2)
    assert data.train_x.dtype == data.ref_x.dtype == torch.float32
    assert torch.isfinite(data.train_x).all() and torch.isfinite(data.ref_x).all()
    assert data.sigma_data == pytest.approx(overall_std(data.train_x), abs=0.03)


@pytest.mark.parametrize(("name", "num_modes"), [("ring8", 8), ("grid25", 25), ("grid25_imbalanced", 25)])
def test_mixture_datasets_are_exact(datasets, name, num_modes):
    data = datasets[name]
    assert data.analytic is not None and data.log_prob is not None
    assert data.modes.means.shape == (num_modes, 2) and data.modes.stds.shape == (num_modes,)
    assert float(data.modes.weights.sum()) == pytest.approx(1.0)
    assert torch.allclose(data.log_prob(data.ref_x[:5]), data.analytic.log_prob(data.ref_x[:5]))
    assert data.sigma_data == pytest.approx(data.analytic.data_std())


def test_ring_and_imbalanced_grid_parameters(datasets):
    ring = datasets["ring8"].modes
    assert torch.allclose(ring.means.norm(dim=1), torch.full((8,), 2.0, dtype=torch.float64))
    assert torch.allclose(ring.stds, torch.full((8,), 0.1, dtype=torch.float64))
    weights = datasets["grid25_imbalanced"].modes.weights
    assert float(weights.max() / weights.min()) == pytest.approx(20.0)


@pytest.mark.parametrize("name", ["checkerboard", "moons", "spirals"])
def test_non_mixture_datasets_have_no_modes(datasets, name):
    assert datasets[name].analytic is None and datasets[name].modes is None


@pytest.mark.parametrize("name", ["moons", "spirals"])
def test_shapes_without_density_have_unit_scale(datasets, name):
    data = datasets[name]
    assert data.log_prob is None
    assert 0.9 < data.sigma_data < 1.1
    assert data.train_x.mean(0).abs().max() < 0.05


@pytest.mark.parametrize("name", ["ring8", "checkerboard", "moons", "digits"])
def test_same_seed_same_tensors(datasets, name):
    again, other = load_dataset(name, seed=0), load_dataset(name, seed=1)
    assert torch.equal(again.train_x, datasets[name].train_x) and torch.equal(again.ref_x, datasets[name].ref_x)
    assert not torch.equal(other.train_x, again.train_x)


def test_train_and_reference_are_independent_streams(datasets):
    data = datasets["ring8"]
    assert not torch.equal(data.train_x[:REF_SIZE], data.ref_x)


def test_checkerboard_density_normalises():
    data = load_dataset("checkerboard")
    half_width = 2.5  # a box larger than the support
    box = (torch.rand(200_000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1)
    box = box * half_width
    integral = float(data.log_prob(box).exp().mean()) * (2 * half_width) ** 2
    assert integral == pytest.approx(1.0, abs=0.02)


def test_checkerboard_support():
    data = load_dataset("checkerboard")
    assert torch.isfinite(data.log_prob(data.train_x)).all()
    assert torch.allclose(data.log_prob(data.train_x[:10]), torch.full((10,), -math.log(8), dtype=torch.float64))
    off = torch.tensor([[-0.5, 0.5], [0.5, -0.5], [2.5, 0.0], [0.0, -2.01]])
    assert torch.isneginf(data.log_prob(off)).all()
    cells = torch.floor(data.train_x + 2).long()
    counts = torch.bincount(cells[:, 0] * 4 + cells[:, 1], minlength=16).double() / TRAIN_SIZE
    assert int((counts > 0).sum()) == 8
    assert torch.allclose(counts[counts > 0], torch.full((8,), 1 / 8, dtype=torch.float64), atol=0.01)


def test_digits_split_sizes_values_and_labels(datasets):
    data = datasets["digits"]
    assert data.data_shape == (1, 8, 8) and data.num_classes == 10
    assert data.train_x.shape == (1200, 1, 8, 8) and data.ref_x.shape == (597, 1, 8, 8)
    assert data.train_y.shape == (1200,) and data.ref_y.shape == (597,)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.long
    assert data.train_x.min() >= -1 and data.train_x.max() <= 1
    raw = to_raw(torch.cat([data.train_x, data.ref_x]))
    assert torch.equal(raw, raw.round()) and raw.min() == 0 and raw.max() == 16
    norm = data.normalisation
    assert torch.equal((data.train_x - norm["shift"]) * norm["scale"], to_raw(data.train_x))
    assert data.sigma_data == pytest.approx(float(data.train_x.std()), abs=0.005)
    counts = torch.bincount(data.ref_y, minlength=10)
    expected = torch.bincount(torch.cat([data.train_y, data.ref_y])).double() * 597 / 1797
    assert (counts - expected).abs().max() < 1


def test_digits_split_is_disjoint_and_complete():
    labels = torch.arange(1797) % 10
    train, ref = split_indices(labels, 597, torch.Generator().manual_seed(3))
    assert len(train) == 1200 and len(ref) == 597
    assert torch.equal(torch.cat([train, ref]).sort().values, torch.arange(1797))


def test_stratified_counts_sum_to_total():
    sizes = stratified_counts(torch.tensor([178, 182, 177, 183, 181, 182, 181, 179, 174, 180]), 597)
    assert int(sizes.sum()) == 597 and int(sizes.max() - sizes.min()) <= 3


def test_unknown_dataset_names_the_choices():
    with pytest.raises(ConfigError, match="ring8"):
        load_dataset("mnist")
    with pytest.raises(ConfigError, match="seed"):
        load_dataset("ring8", seed=-1)


# --- sources -------------------------------------------------------------------------------------------


def test_real_data_covers_every_example_once_per_epoch():
    x = torch.arange(10.0)[:, None]
    source = RealData(x, y=torch.arange(10) * 2)
    generator = torch.Generator().manual_seed(0)
    batches = [source.batch(3, generator) for _ in range(10)]
    seen = torch.cat([b.x0[:, 0] for b in batches]).long()
    for epoch in range(3):
        assert torch.equal(seen[10 * epoch:10 * (epoch + 1)].sort().values, torch.arange(10))
    assert not torch.equal(seen[:10], seen[10:20])  # reshuffled each epoch
    assert all(torch.equal(b.cond, b.x0[:, 0].long() * 2) for b in batches)
    assert source.kind == "data"


def test_real_data_rejects_bad_input():
    with pytest.raises(DataError, match="labels"):
        RealData(torch.zeros(5, 2), y=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ConfigError, match="batch_size"):
        RealData(torch.zeros(5, 2)).batch(0, torch.Generator())


class ShiftTeacher(Denoiser):
    """A stand-in teacher: ``D(x, s, label) = x / s + shift + label``, so one Euler step from ``s_max z`` ends at
    ``z + shift + label``; counts the samples it denoises."""

    def __init__(self, shift: float = 0.0, num_classes: int = 3, data_shape=(2,)):
        super().__init__()
        self.register_buffer("shift", torch.tensor(shift))
        self.data_shape, self.num_classes, self.samples = tuple(data_shape), num_classes, 0

    def forward(self, x, s, cond=None):
        self.samples += x.shape[0]
        label = 0.0 if cond is None else cond.to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        return x / s.reshape(-1, *[1] * (x.ndim - 1)) + self.shift + label


def pairs(teacher, folder, num_pairs=10, **request):
    return TeacherPairs(teacher, num_pairs, folder, **{"solver": "euler", "nfe": 1, "chunk": 4, "progress": False,
                                                       **request})


def test_teacher_pairs_generate_once_then_reload_and_charge_their_cost(tmp_path):
    teacher = ShiftTeacher(0.5)
    labels = torch.arange(10) % 3
    first = pairs(teacher, tmp_path / "cache", labels=labels)
    assert teacher.samples == 10 and first.teacher_evals == 10 and first.cache_path.is_file()
    assert [p.name for p in first.cache_path.parent.iterdir()] == [first.cache_path.name]  # no temporary left
    second = pairs(teacher, tmp_path / "cache", labels=labels)
    assert teacher.samples == 10 and second.teacher_evals == 10  # nothing solved again, the cost still charged
    assert torch.equal(first.noise, second.noise) and torch.equal(first.endpoint, second.endpoint)
    batch = second.batch(4, torch.Generator().manual_seed(0))
    assert batch.x0 is None and batch.noise.shape == (4, 2)
    assert torch.allclose(batch.endpoint, batch.noise + 0.5 + batch.cond[:, None].float())
    assert second.kind == "teacher_pairs"


@pytest.mark.parametrize("change", [{"solver": "heun", "nfe": 3}, {"solver": "dpmpp_2m"}, {"nfe": 2},
                                    {"num_pairs": 12, "labels": torch.arange(12) % 3}, {"seed": 1},
                                    {"labels": torch.arange(10) % 2}, {"teacher": ShiftTeacher(1.0)}])
def test_a_pair_cache_is_never_reused_for_another_solver_denoiser_or_request(tmp_path, change):
    """The cache is keyed by the denoiser (its weights) and the solver: each request gets its own file, and a
    request met before is answered from its file."""
    teacher = ShiftTeacher(0.5)
    request = {"num_pairs": 10, "labels": torch.arange(10) % 3}
    before = pairs(teacher, tmp_path, **request)
    request.update(change)
    other = request.pop("teacher", teacher)
    after = pairs(other, tmp_path, **request)
    assert after.cache_path != before.cache_path and len(list(tmp_path.iterdir())) == 2
    assert other.samples > 0 and after.noise.shape[0] == request["num_pairs"]
    calls = other.samples
    pairs(other, tmp_path, **request)
    assert other.samples == calls


def test_teacher_pairs_regenerate_a_corrupt_cache(tmp_path):
    teacher = ShiftTeacher()
    first = pairs(teacher, tmp_path, 6)
    first.cache_path.write_bytes(b"not a safetensors file")
    pairs(teacher, tmp_path, 6)
    assert teacher.samples == 12
    pairs(teacher, tmp_path, 6)
    assert teacher.samples == 12


def test_teacher_pairs_refuse_an_unknown_solver_and_write_nothing(tmp_path):
    with pytest.raises(ConfigError, match="solver"):
        pairs(ShiftTeacher(), tmp_path, solver="rk4")
    assert not list(tmp_path.iterdir())


def test_teacher_pairs_from_the_analytic_teacher_land_on_the_modes(tmp_path):
    data = load_dataset("ring8")
    source = make_source({"teacher_pairs"}, data, TeacherPairs(data.analytic, 64, tmp_path, progress=False))
    batch = source.batch(64, torch.Generator().manual_seed(0))
    distance_to_nearest_mode = torch.cdist(batch.endpoint.double(), data.modes.means).min(1).values
    assert distance_to_nearest_mode.mean() < 0.16 and distance_to_nearest_mode.max() < 0.4  # mode std 0.1
    assert batch.cond is None and source.teacher_evals == 64 * 35


def test_noise_and_label_sources():
    generator = torch.Generator().manual_seed(0)
    unconditional = NoiseOnly((1, 8, 8)).batch(5, generator)
    assert unconditional.noise.shape == (5, 1, 8, 8) and unconditional.cond is None
    conditional = NoiseOnly((2,), num_classes=3).batch(200, generator)
    assert set(conditional.cond.tolist()) == {0, 1, 2}
    labels_only = LabelsOnly(10, (1, 8, 8)).batch(7, generator)
    assert labels_only.cond.shape == (7,) and labels_only.noise.shape == (7, 1, 8, 8)
    assert int(labels_only.cond.max()) < 10
    with pytest.raises(ConfigError, match="num_classes"):
        LabelsOnly(0, (2,))


def test_sources_are_deterministic_given_the_generator():
    draws = [NoiseOnly((2,), 4).batch(8, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(draws[0].noise, draws[1].noise) and torch.equal(draws[0].cond, draws[1].cond)


def test_make_source_builds_every_kind(datasets, tmp_path):
    digits = datasets["digits"]
    teacher_pairs = pairs(ShiftTeacher(num_classes=10, data_shape=(1, 8, 8)), tmp_path, 20,
                          labels=pair_labels(digits, 20))
    sources = {kind: make_source({kind}, digits, teacher_pairs) for kind in NEEDS}
    assert {kind: source.kind for kind, source in sources.items()} == {kind: kind for kind in NEEDS}
    assert torch.equal(torch.bincount(sources["teacher_pairs"].label), torch.full((10,), 2))
    data_batch = sources["data"].batch(16, torch.Generator().manual_seed(0))
    assert data_batch.x0.shape == (16, 1, 8, 8) and data_batch.cond.shape == (16,)
    assert [source.teacher_evals for source in sources.values()] == [20 if kind == "teacher_pairs" else 0
                                                                     for kind in sources]


def test_a_composite_source_draws_every_kind_it_needs(datasets):
    """Noise for a generator plus real data for a discriminator: one batch per kind, each of the batch size; the
    composite's state restores every part, and a kind it was not asked for is not in its batches."""
    ring = datasets["ring8"]
    source = make_source({"noise", "data"}, ring)
    assert isinstance(source, CompositeSource) and source.teacher_evals == 0
    generator = torch.Generator().manual_seed(0)
    batch = source.batch(8, generator)
    assert isinstance(batch, CompositeBatch) and sorted(batch.parts) == ["data", "noise"]
    assert batch["data"].x0.shape == (8, 2) and batch["noise"].noise.shape == (8, 2) and batch.size == 8
    assert batch["data"].noise is None and batch["noise"].x0 is None
    assert batch.rows(2, 5)["data"].x0.shape == (3, 2)
    with pytest.raises(KeyError, match="teacher_pairs"):
        batch["teacher_pairs"]
    state = source.state_dict()
    assert set(state) == {"data.order", "data.position"}
    copy, copy_generator = make_source({"noise", "data"}, ring), torch.Generator()
    copy.load_state_dict(state)
    copy_generator.set_state(generator.get_state())
    expected, restored = source.batch(8, generator), copy.batch(8, copy_generator)
    assert torch.equal(expected["data"].x0, restored["data"].x0)
    assert torch.equal(expected["noise"].noise, restored["noise"].noise)


def test_make_source_errors(datasets):
    with pytest.raises(ConfigError, match="pairs"):
        make_source({"pairs"}, datasets["ring8"])
    with pytest.raises(ConfigError, match="class-conditional"):
        make_source({"labels"}, datasets["moons"])
    with pytest.raises(ConfigError, match="TeacherPairs"):
        make_source({"teacher_pairs"}, datasets["ring8"])


def test_a_source_restored_from_its_state_draws_the_batches_the_original_would(tmp_path):
    """Mid-epoch, a real-data or teacher-pairs source's ``state_dict`` carries the epoch's order and position: a
    fresh source loaded with it and a generator in the same state continue exactly as the original does, while a
    fresh source without it starts a new epoch (what a resumed run did before the state was saved)."""
    x = torch.randn(10, 2, generator=torch.Generator().manual_seed(0))

    sources = {"x0": lambda: RealData(x), "noise": lambda: pairs(ShiftTeacher(0.5), tmp_path)}
    for field, new_source in sources.items():
        original, generator = new_source(), torch.Generator().manual_seed(1)
        original.batch(4, generator)  # 4 of the 10 samples of the first epoch
        state = original.state_dict()
        restored, unrestored = new_source(), new_source()
        restored.load_state_dict(state)
        unrestored.load_state_dict({})  # an old checkpoint: no saved order
        copies = [torch.Generator(), torch.Generator()]
        for copy in copies:
            copy.set_state(generator.get_state())
        expected = [getattr(original.batch(4, generator), field) for _ in range(4)]  # across the epoch boundary
        assert all(torch.equal(getattr(restored.batch(4, copies[0]), field), e) for e in expected)
        assert not torch.equal(getattr(unrestored.batch(4, copies[1]), field), expected[0])
    with pytest.raises(DataError, match="saved epoch order covers 10 samples"):
        RealData(x[:5]).load_state_dict(state)
