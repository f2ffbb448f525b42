"""Backbones' extra scalar conditions (second time, guidance scale): zero-initialised, shape-checked, saved;
and the time embedding's frequency range."""

import pytest
import torch

from fewstep.models.denoiser import EDMDenoiser
from fewstep.models.io import load_model, save_model
from fewstep.nets import MLP, SmallUNet, add_extra_conditions


@pytest.mark.parametrize("backbone", [MLP((2,), width=32, depth=2, num_classes=3),
                                      SmallUNet((1, 8, 8), channels=8, num_classes=3)])
def test_added_extra_conditions_start_as_no_ops_and_then_train(backbone):
    x = torch.randn(5, *backbone.data_shape)
    c_noise, label = torch.randn(5), torch.tensor([0, 1, 2, 3, 0])
    before = backbone(x, c_noise, label)
    add_extra_conditions(backbone, 2)
    extra = torch.randn(5, 2)
    assert torch.equal(backbone(x, c_noise, label, extra), before)
    with pytest.raises(ValueError, match=r"2 extra condition\(s\): pass extra of shape \(5, 2\), got None"):
        backbone(x, c_noise, label)
    backbone(x, c_noise, label, extra).square().sum().backward()
    assert backbone.extra_embeddings[1].mlp[-1].weight.grad.abs().sum() > 0
    with torch.no_grad():
        backbone.extra_embeddings[1].mlp[-1].bias.add_(1.0)
    assert not torch.allclose(backbone(x, c_noise, label, extra), before)


def test_a_backbone_without_extra_conditions_refuses_them():
    with pytest.raises(ValueError, match="takes no extra conditions"):
        MLP((2,), width=16, depth=1)(torch.randn(3, 2), torch.zeros(3), None, torch.zeros(3, 1))


def test_extra_conditions_survive_save_and_load(tmp_path):
    backbone = add_extra_conditions(MLP((2,), width=16, depth=1), 1)
    with torch.no_grad():
        backbone.extra_embeddings[0].mlp[-1].bias.add_(0.5)
    save_model(tmp_path / "m", EDMDenoiser(backbone, 1.0), {})
    loaded = load_model(tmp_path / "m")[0].backbone
    x, c, e = torch.randn(4, 2), torch.randn(4), torch.randn(4, 1)
    assert loaded.hparams["extra_conditions"] == 1 and torch.equal(loaded(x, c, None, e), backbone(x, c, None, e))


@pytest.mark.parametrize("make", [lambda f: MLP((2,), width=16, depth=1, time_frequencies=f),
                                  lambda f: SmallUNet((1, 8, 8), channels=8, time_frequencies=f)])
def test_the_time_frequency_range_bounds_the_time_derivative_and_survives_save_and_load(make, tmp_path):
    """The highest frequency bounds how fast the time features can change: |d feature / dc| <= high."""
    backbone = make((0.1, 20.0))
    c = torch.linspace(-2.0, 1.5, 401, requires_grad=True)
    features = lambda c: torch.cat([torch.cos(c[:, None] * backbone.time_embedding.freqs),  # noqa: E731
                                    torch.sin(c[:, None] * backbone.time_embedding.freqs)], 1)
    slope = torch.autograd.functional.jacobian(lambda c: features(c).sum(0), c).abs().max()
    assert 15.0 < slope <= 20.0 + 1e-4
    default_slope = torch.autograd.functional.jacobian(
        lambda c: torch.cos(c[:, None] * make((1e-3, 1e2)).time_embedding.freqs).sum(0), c).abs().max()
    assert default_slope > 90.0
    save_model(tmp_path / "m", EDMDenoiser(backbone, 1.0), {})
    loaded = load_model(tmp_path / "m")[0].backbone
    x, c = torch.randn(4, *backbone.data_shape), torch.randn(4)
    assert loaded.hparams["time_frequencies"] == [0.1, 20.0] and torch.equal(loaded(x, c), backbone(x, c))


def test_a_bad_time_frequency_range_is_refused_by_name():
    with pytest.raises(ValueError, match=r"time_frequencies must be \(low, high\) with 0 < low <= high, "
                                         r"got \(20.0, 0.1\)"):
        MLP((2,), width=16, depth=1, time_frequencies=(20.0, 0.1))
    with pytest.raises(ValueError, match=r"time_frequencies must be \(low, high\).*got \(0.1,\)"):
        MLP((2,), width=16, depth=1, time_frequencies=(0.1,))
