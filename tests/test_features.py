"""Named intermediate features through forward hooks (fewstep.nets.features): MLP, SmallUNet and tiny diffusers
models built from configs inside a DiffusersBackbone (no downloads)."""

import copy
import itertools

import pytest
import torch
from torch import nn

from fewstep.models.denoiser import EDMDenoiser
from fewstep.nets import MLP, DiffusersBackbone, SmallUNet
from fewstep.nets.features import capture_features, feature_points, pooled
from fewstep.train.memory import enable_gradient_checkpointing


def tiny_mlp() -> MLP:
    torch.manual_seed(0)
    return MLP((2, 3), width=16, depth=3, emb_dim=8)


def tiny_unet() -> SmallUNet:
    torch.manual_seed(0)
    return SmallUNet((1, 8, 8), channels=8, emb_dim=16)


def no_hooks(module: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())


def hidden_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def record_inputs(module: nn.Module, names: list[str]) -> tuple[dict, list]:
    """Each named block's positional and keyword inputs, through separate pre-hooks (removed by the caller)."""
    inputs, handles, blocks = {}, [], dict(module.named_modules())
    for name in names:
        def hook(block, args, kwargs, name=name):
            inputs[name] = (args, kwargs)
        handles.append(blocks[name].register_forward_pre_hook(hook, with_kwargs=True))
    return inputs, handles


def test_feature_points_of_each_backbone():
    assert feature_points(tiny_mlp()) == ["blocks.0", "blocks.1", "blocks.2"]
    assert feature_points(tiny_unet()) == ["down1", "mid1", "mid2", "up1"]
    with pytest.raises(ValueError, match=r"Linear.*MLP, SmallUNet, DiffusersBackbone"):
        feature_points(nn.Linear(2, 2))


@pytest.mark.parametrize("make", [tiny_mlp, tiny_unet], ids=["mlp", "unet"])
def test_features_equal_a_hook_free_rerun_of_each_block(make):
    """Each captured output equals the block re-run (hooks gone) on the input a separate pre-hook recorded, and
    the last block's feature through the output head reproduces the network's output."""
    net = make()
    names = feature_points(net)
    x, c = torch.randn(3, *net.data_shape), torch.randn(3)
    inputs, handles = record_inputs(net, names)
    with torch.no_grad(), capture_features(net) as features:
        out = net(x, c)
    for handle in handles:
        handle.remove()
    assert list(features) == names
    blocks = dict(net.named_modules())
    with torch.no_grad():
        for name in names:
            args, kwargs = inputs[name]
            torch.testing.assert_close(features[name], blocks[name](*args, **kwargs), rtol=0, atol=0)
        torch.testing.assert_close(net.output(features[names[-1]]).reshape(x.shape), out, rtol=0, atol=0)
    if isinstance(net, MLP):
        assert all(f.shape == (3, 16) for f in features.values())
    else:
        shapes = {name: tuple(f.shape) for name, f in features.items()}
        assert shapes == {"down1": (3, 8, 8, 8), "mid1": (3, 16, 4, 4), "mid2": (3, 16, 4, 4), "up1": (3, 8, 8, 8)}


def test_hooks_are_removed_on_exit_and_on_exceptions():
    net = tiny_mlp()
    x, c = torch.randn(2, 2, 3), torch.randn(2)
    with torch.no_grad(), capture_features(net) as features:
        assert not no_hooks(net)
        net(x, c)
    assert no_hooks(net)
    recorded = dict(features)
    with torch.no_grad():
        net(2 * x, c)
    assert features.keys() == recorded.keys()
    assert all(features[name] is recorded[name] for name in recorded)
    with pytest.raises(RuntimeError, match="boom"), capture_features(net):
        raise RuntimeError("boom")
    assert no_hooks(net)
    with pytest.raises(ValueError, match="extra"), capture_features(net, ["blocks.1"]):
        net(x, c, extra=torch.zeros(2, 1))  # the forward itself fails
    assert no_hooks(net)


def test_unknown_names_raise_before_any_hook_is_registered():
    net = tiny_mlp()
    with pytest.raises(ValueError, match=r"\['nope'\].*blocks\.0, blocks\.1"):
        capture_features(net, ["blocks.0", "nope"])  # at the call, not only on entering
    assert no_hooks(net)
    with pytest.raises(ValueError, match="nope"), capture_features(net, "nope"):
        pass
    assert no_hooks(net)


def test_a_loss_on_a_captured_feature_backpropagates_into_the_network():
    net = tiny_mlp()
    with capture_features(net, ["blocks.1"]) as features:
        net(torch.randn(4, 2, 3), torch.randn(4))
    features["blocks.1"].square().mean().backward()
    for module in (net.input, net.blocks[0], net.blocks[1]):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert all(p.grad is None for p in [*net.blocks[2].parameters(), *net.output.parameters()])


def test_capture_goes_through_forward_with_gradient_checkpointing():
    """Blocks whose forward is patched (gradient checkpointing) give the same features and gradients."""
    plain = tiny_unet()
    checkpointed = copy.deepcopy(plain)
    assert enable_gradient_checkpointing(checkpointed) == 4
    x, c = torch.randn(2, 1, 8, 8), torch.randn(2)
    grads = []
    for net in (plain, checkpointed):
        with capture_features(net, ["mid1"]) as features:
            net(x, c)
        features["mid1"].sum().backward()
        grads.append((features["mid1"].detach(), net.down1.conv1.weight.grad.clone()))
        assert net.up1.conv1.weight.grad is None
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_several_calls_inside_the_block_the_last_call_wins():
    net = tiny_mlp()
    x1, x2, c = torch.randn(2, 2, 3), torch.randn(2, 2, 3), torch.randn(2)
    with torch.no_grad(), capture_features(net) as features:
        net(x1, c)
        first = dict(features)
        net(x2, c)
    with torch.no_grad(), capture_features(net) as reference:
        net(x2, c)
    assert features.keys() == reference.keys() == first.keys()
    for name in reference:
        torch.testing.assert_close(features[name], reference[name], rtol=0, atol=0)
        assert not torch.equal(first[name], features[name])


def test_a_denoiser_resolves_to_its_backbone_and_any_module_takes_explicit_names():
    backbone = tiny_mlp()
    denoiser = EDMDenoiser(backbone)
    assert feature_points(denoiser) == feature_points(backbone)
    x, s = torch.randn(2, 2, 3), torch.tensor([0.5, 2.0])
    with torch.no_grad(), capture_features(denoiser) as features:
        denoiser(x, s)
    with torch.no_grad(), capture_features(denoiser, ["backbone.blocks.2"]) as outer:
        denoiser(x, s)
    assert list(features) == ["blocks.0", "blocks.1", "blocks.2"]
    torch.testing.assert_close(outer["backbone.blocks.2"], features["blocks.2"], rtol=0, atol=0)
    sequential = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))
    with pytest.raises(ValueError, match="supported backbones"), capture_features(sequential):
        pass
    with torch.no_grad(), capture_features(sequential, ["1"]) as features:
        y = torch.randn(4, 3)
        sequential(y)
    torch.testing.assert_close(features["1"], torch.tanh(sequential[0](y)))


def test_pooled_averages_each_map_to_channels_and_concatenates():
    net = tiny_unet()
    with torch.no_grad(), capture_features(net) as features:
        net(torch.randn(3, 1, 8, 8), torch.randn(3))
    flat = pooled(features)
    assert flat.shape == (3, 8 + 16 + 16 + 8)
    torch.testing.assert_close(flat[:, 8:24], features["mid1"].mean(dim=(2, 3)))
    tokens, vectors = torch.randn(3, 5, 4), torch.randn(3, 2)
    torch.testing.assert_close(pooled({"t": tokens, "v": vectors}), torch.cat([tokens.mean(1), vectors], dim=1))


# Tiny diffusers models, built by DiffusersBackbone from their configs.

UNET = {"sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": (16, 32),
        "layers_per_block": 1, "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D"), "norm_num_groups": 8, "attention_head_dim": 8}
CONDITION_UNET = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
                  "block_out_channels": (16, 32), "norm_num_groups": 8, "cross_attention_dim": 16,
                  "attention_head_dim": 4, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                  "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")}
FLUX = {"patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 2, "attention_head_dim": 8,
        "num_attention_heads": 2, "joint_attention_dim": 16, "pooled_projection_dim": 8, "axes_dims_rope": (2, 2, 4)}
SD3 = {"sample_size": 8, "patch_size": 2, "in_channels": 4, "num_layers": 2, "attention_head_dim": 8,
       "num_attention_heads": 2, "joint_attention_dim": 16, "caption_projection_dim": 16, "pooled_projection_dim": 8,
       "out_channels": 4, "pos_embed_max_size": 16}


def diffusers_backbone(model_class: str, config: dict, data_shape: list[int], **kwargs) -> DiffusersBackbone:
    pytest.importorskip("diffusers")
    torch.manual_seed(0)
    backbone = DiffusersBackbone(model_class, config, data_shape, **kwargs)
    for name in ("encoder_hidden_states", "pooled_projections"):
        if getattr(backbone, name) is not None:
            getattr(backbone, name).normal_()
    return backbone


def chained_features(backbone: DiffusersBackbone, x: torch.Tensor, t: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Features at the default points; checks that each one is the hidden states the next point is called on."""
    names = feature_points(backbone)
    inputs, handles = record_inputs(backbone, names)
    with torch.no_grad(), capture_features(backbone) as features:
        out = backbone(x, t)
    for handle in handles:
        handle.remove()
    assert no_hooks(backbone) and list(features) == names
    for name, following in itertools.pairwise(names):
        torch.testing.assert_close(features[name], hidden_input(*inputs[following]), rtol=0, atol=0)
    return features, out


def test_diffusers_unet2d_features_at_its_blocks():
    backbone = diffusers_backbone("UNet2DModel", UNET, [1, 8, 8])
    assert feature_points(backbone) == ["model.down_blocks.0", "model.down_blocks.1", "model.mid_block",
                                        "model.up_blocks.0", "model.up_blocks.1"]
    features, out = chained_features(backbone, torch.randn(2, 1, 8, 8), torch.tensor([10.0, 500.0]))
    shapes = [tuple(f.shape) for f in features.values()]
    assert shapes == [(2, 16, 4, 4), (2, 32, 4, 4), (2, 32, 4, 4), (2, 32, 8, 8), (2, 16, 8, 8)]
    model = backbone.model
    with torch.no_grad():
        head = model.conv_out(model.conv_act(model.conv_norm_out(features["model.up_blocks.1"])))
    torch.testing.assert_close(head, out, rtol=0, atol=0)


def test_diffusers_unet2d_condition_features_at_its_blocks():
    backbone = diffusers_backbone("UNet2DConditionModel", CONDITION_UNET, [4, 8, 8],
                                  encoder_hidden_states_shape=[1, 5, 16])
    features, _ = chained_features(backbone, torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]))
    assert list(features) == ["model.down_blocks.0", "model.down_blocks.1", "model.mid_block",
                              "model.up_blocks.0", "model.up_blocks.1"]
    assert [f.shape[1:] for f in features.values()] == [(16, 4, 4), (32, 4, 4), (32, 4, 4), (32, 8, 8), (16, 8, 8)]


@pytest.mark.parametrize("model_class", ["FluxTransformer2DModel", "SD3Transformer2DModel"])
def test_diffusers_joint_transformer_features_are_the_image_tokens(model_class):
    """SD3 and FLUX blocks return ``(encoder_hidden_states, hidden_states)``: the feature is the image tokens
    (16 here) that the next block is called on, not the 5 text tokens."""
    config = FLUX if model_class == "FluxTransformer2DModel" else SD3
    backbone = diffusers_backbone(model_class, config, [4, 8, 8], encoder_hidden_states_shape=[1, 5, 16],
                                  pooled_projections_shape=[1, 8])
    expected = (["model.transformer_blocks.0", "model.single_transformer_blocks.0",
                 "model.single_transformer_blocks.1"] if model_class == "FluxTransformer2DModel"
                else ["model.transformer_blocks.0", "model.transformer_blocks.1"])
    assert feature_points(backbone) == expected
    t = torch.tensor([0.3, 0.9]) if model_class == "FluxTransformer2DModel" else torch.tensor([300.0, 900.0])
    features, _ = chained_features(backbone, torch.randn(2, 4, 8, 8), t)
    assert all(f.shape == (2, 16, 16) for f in features.values())
    assert pooled(features).shape == (2, 16 * len(expected))
