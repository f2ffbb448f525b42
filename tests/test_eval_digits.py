import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from fewstep.cache import cache_dir
from fewstep.data.spec import DatasetSpec
from fewstep.errors import DataError
from fewstep.eval import digits


def make_digits_spec() -> DatasetSpec:
    """sklearn digits in [-1, 1], a seeded 1200 / 597 split (built here, independent of fewstep.data)."""
    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32)[:, None] / 8 - 1
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, ref = order[:1200], order[1200:]
    return DatasetSpec(name="digits", data_shape=(1, 8, 8), train_x=x[train], ref_x=x[ref], num_classes=10,
                       train_y=y[train], ref_y=y[ref], kind="images", metric="fd")


@pytest.fixture(scope="module")
def spec() -> DatasetSpec:
    return make_digits_spec()


@pytest.fixture(scope="module")
def classifier(spec, tmp_path_factory):
    # One cache folder for the whole test session, so the classifier trains once across test files.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEWSTEP_CACHE", str(tmp_path_factory.getbasetemp() / "fewstep_cache"))
        yield digits.feature_extractor(spec)


def test_cache_dir_follows_env_and_defaults_to_home(monkeypatch, tmp_path):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "here"))
    assert cache_dir() == tmp_path / "here" and cache_dir().is_dir()
    monkeypatch.delenv("FEWSTEP_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "fewstep" and cache_dir().is_dir()


def test_classifier_reaches_95_percent_on_reference_split(classifier, spec):
    accuracy = float((classifier.predict(spec.ref_x) == spec.ref_y).float().mean())
    print(f"digits classifier accuracy on ref: {accuracy:.4f}")
    assert accuracy >= 0.95
    assert classifier.ref_accuracy == pytest.approx(accuracy)
    assert classifier.features(spec.ref_x[:7]).shape == (7, digits.FEATURE_DIM)


def test_cached_classifier_is_reused_not_retrained(classifier, spec, monkeypatch, tmp_path_factory):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path_factory.getbasetemp() / "fewstep_cache"))
    (weights,) = (cache_dir() / "digits_classifier").glob(f"{classifier.recipe_hash[:16]}.safetensors")
    mtime = weights.stat().st_mtime_ns
    again = digits.feature_extractor(spec)
    assert again.from_cache and again.recipe_hash == classifier.recipe_hash
    assert weights.stat().st_mtime_ns == mtime
    assert torch.equal(again.features(spec.ref_x), classifier.features(spec.ref_x))


def test_corrupt_cache_is_retrained_and_replaced(spec, monkeypatch, tmp_path):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path))
    monkeypatch.setitem(digits.RECIPE, "epochs", 1)  # a different recipe: its own cache file, trained quickly
    first = digits.feature_extractor(spec)
    assert not first.from_cache
    assert digits.feature_extractor(spec).from_cache
    (weights,) = (tmp_path / "digits_classifier").glob("*.safetensors")
    weights.write_bytes(b"not a safetensors file")
    retrained = digits.feature_extractor(spec)
    assert not retrained.from_cache
    assert digits.feature_extractor(spec).from_cache


def test_training_is_deterministic_and_restores_global_state(spec, monkeypatch):
    monkeypatch.setitem(digits.RECIPE, "epochs", 2)
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    first = digits.train_classifier(spec.train_x[:256], spec.train_y[:256], 10)
    second = digits.train_classifier(spec.train_x[:256], spec.train_y[:256], 10)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), rng)
    assert not torch.are_deterministic_algorithms_enabled()


def test_recipe_hash_changes_with_training_data(spec):
    other = make_digits_spec()
    assert digits._recipe_hash(other) == digits._recipe_hash(spec)
    other.train_x = other.train_x.flip(0)
    assert digits._recipe_hash(other) != digits._recipe_hash(spec)


def test_frechet_distance_of_a_set_with_itself_is_zero_and_it_is_symmetric(classifier, spec):
    ref, train = classifier.features(spec.ref_x), classifier.features(spec.train_x)
    assert digits.frechet_distance(ref, ref) == pytest.approx(0.0, abs=1e-6)
    forward, backward = digits.frechet_distance(ref, train), digits.frechet_distance(train, ref)
    assert forward > 0
    assert forward == pytest.approx(backward, rel=1e-6)


def test_frechet_distance_matches_closed_form_and_sqrtm():
    x = torch.randn(500, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) @ torch.randn(
        6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    shift = torch.arange(6, dtype=torch.float64)
    # b = 2a + m: C_b = 4 C_a, so FD = |mu_a - mu_b|^2 + tr C_a (1 + 4 - 2 * 2).
    a, b = x, 2 * x + shift
    expected = float(((a.mean(0) - b.mean(0)) ** 2).sum() + torch.trace(torch.cov(a.T)))
    assert digits.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    # Against the textbook formula with scipy's sqrtm, for two unrelated covariances.
    c = torch.randn(400, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64) ** 3
    cov_a, cov_c = np.cov(a.numpy(), rowvar=False), np.cov(c.numpy(), rowvar=False)
    textbook = (((a.mean(0) - c.mean(0)) ** 2).sum().item()
                + np.trace(cov_a + cov_c - 2 * scipy.linalg.sqrtm(cov_a @ cov_c).real))
    assert digits.frechet_distance(a, c) == pytest.approx(textbook, rel=1e-7)


def test_noise_floor_is_far_below_noise_blurred_and_mean_images(classifier, spec):
    floor = digits.noise_floor_digits(spec, seed=0, classifier=classifier)
    print(f"FD-digits noise floor (n=597, seed 0): {floor['fd']:.3f}")
    generator = torch.Generator().manual_seed(1)
    noise_images = torch.randn(597, 1, 8, 8, generator=generator)
    blurred = F.avg_pool2d(F.pad(spec.train_x[:597], (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mean_images = spec.train_x.mean(0, keepdim=True) + 0.02 * torch.randn(597, 1, 8, 8, generator=generator)
    for fake in (noise_images, blurred, mean_images):
        assert digits.digits_metrics(fake, spec, classifier=classifier)["fd"] > 10 * floor["fd"]
    assert floor["precision"] > 0.9 and floor["recall"] > 0.9 and floor["coverage"] > 0.9
    assert floor["class_accuracy"] == pytest.approx(classifier.ref_accuracy)
    assert digits.noise_floor_digits(spec, seed=0, classifier=classifier) == floor


def test_precision_recall_coverage_see_a_collapsed_generator(classifier, spec):
    one_image = spec.ref_x[3:4].expand(597, -1, -1, -1)
    collapsed = digits.digits_metrics(one_image, spec, classifier=classifier)
    assert collapsed["precision"] == 1.0
    assert collapsed["recall"] < 0.05 and collapsed["coverage"] < 0.05
    feats = classifier.features(spec.ref_x)
    same = digits.precision_recall_coverage(feats, feats)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0


def test_class_accuracy_counts_requested_labels(classifier, spec):
    right = digits.digits_metrics(spec.train_x, spec, labels=spec.train_y, classifier=classifier)
    wrong = digits.digits_metrics(spec.train_x, spec, labels=(spec.train_y + 1) % 10, classifier=classifier)
    assert right["class_accuracy"] > 0.95 and wrong["class_accuracy"] < 0.05


def test_samples_are_clamped_and_nonfinite_ones_dropped(classifier, spec):
    samples = spec.train_x[:600].clone()
    base = digits.digits_metrics(samples, spec, classifier=classifier)
    samples[samples > 0.9] = 5.0  # out of range: clamped back to 1
    samples[:60] = float("nan")
    metrics = digits.digits_metrics(samples, spec, classifier=classifier)
    assert metrics["nonfinite"] == pytest.approx(0.1)
    assert np.isfinite(metrics["fd"]) and metrics["fd"] < 3 * base["fd"] + 5


def test_bad_inputs_raise_data_errors(classifier, spec):
    feats = classifier.features(spec.ref_x)
    with pytest.raises(DataError, match="same dimension"):
        digits.frechet_distance(feats, feats[:, :10])
    with pytest.raises(DataError, match="N >= 2"):
        digits.frechet_distance(feats[:1], feats)
    with pytest.raises(DataError, match="k=5"):
        digits.precision_recall_coverage(feats, feats[:5])
    with pytest.raises(DataError, match=r"\(N, 1, 8, 8\)"):
        digits.digits_metrics(torch.zeros(10, 64), spec, classifier=classifier)
    with pytest.raises(DataError, match="labels"):
        digits.digits_metrics(spec.ref_x, spec, labels=torch.full((597,), 10), classifier=classifier)
    with pytest.raises(DataError, match="noise floor size"):
        digits.noise_floor_digits(spec, n=5000, classifier=classifier)
    toy = DatasetSpec(name="ring", data_shape=(2,), train_x=torch.zeros(10, 2), ref_x=torch.zeros(10, 2))
    with pytest.raises(DataError, match="not a labelled 1x8x8 digits dataset"):
        digits.feature_extractor(toy)
