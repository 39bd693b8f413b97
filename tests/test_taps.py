"""LayerTap: layer outputs of timm models as NCHW maps, logits from the same forward, early stop."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from vitdistill.models import LayerTap, TapError, create_model, num_tappable_layers, tokens_to_map

B = 2


def _model(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    size = 32 if name.endswith("_32") else 28
    return create_model(name, num_classes=10, in_chans=1, img_size=size, **kwargs).eval()


def _input(model: nn.Module) -> torch.Tensor:
    torch.manual_seed(1)
    size = model.pretrained_cfg["input_size"][-1]
    return torch.randn(B, 1, size, size)


# name, layers, expected shapes (C, H, W) per layer
SHAPES = [
    ("vitd_tiny_patch4_28", [0, 2, 4, 5], [(128, 7, 7)] * 4),
    ("vitd_tiny_patch4_28_distilled", [0, 5], [(128, 7, 7)] * 2),
    ("caitd_small_patch4_28", [0, 3, 7], [(192, 7, 7)] * 3),
    ("swind_tiny_28", [0, 1, 2], [(48, 14, 14), (96, 7, 7), (192, 4, 4)]),
    ("swind_tiny_32", [0, 1, 2], [(48, 16, 16), (96, 8, 8), (192, 4, 4)]),
    (
        "resnetd_small_28",
        [0, 1, 2, 3, 4],
        [(16, 28, 28), (16, 28, 28), (32, 14, 14), (64, 7, 7), (128, 4, 4)],
    ),
]


@pytest.mark.parametrize("name,layers,shapes", SHAPES)
def test_index_taps_shapes_and_logits_equal_model_output(name, layers, shapes):
    model = _model(name)
    x = _input(model)
    tap = LayerTap(model, layers)
    with torch.no_grad():
        logits, maps = tap(x)
        reference = model(x)
    assert list(maps) == layers
    assert [tuple(maps[k].shape) for k in layers] == [(B, *s) for s in shapes]
    assert torch.equal(logits, reference)  # same forward, exactly
    # the reported channel counts agree with the maps
    for k in layers:
        assert maps[k].shape[1] == model.feature_info[k]["num_chs"]


@pytest.mark.parametrize(
    "name,prefix",
    [("vitd_tiny_patch4_28", 1), ("vitd_tiny_patch4_28_distilled", 2), ("caitd_small_patch4_28", 0)],
)
def test_prefix_tokens_are_split_off(name, prefix):
    """Block maps hold exactly the patch tokens of the block's residual output, in raster order."""
    model = _model(name)
    x = _input(model)
    seen = {}
    handle = model.blocks[3].register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    with torch.no_grad():
        _, maps = LayerTap(model, [3])(x)
    handle.remove()
    tokens = seen["out"]
    assert tokens.shape[1] == prefix + 49
    grid = maps[3]
    for r, c in [(0, 0), (0, 6), (3, 2), (6, 6)]:
        assert torch.equal(grid[:, :, r, c], tokens[:, prefix + 7 * r + c, :])


def test_swin_maps_are_channels_first():
    model = _model("swind_tiny_28")
    x = _input(model)
    seen = {}
    handle = model.layers[1].register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    with torch.no_grad():
        _, maps = LayerTap(model, [1])(x)
    handle.remove()
    nhwc = seen["out"]
    assert nhwc.shape == (B, 7, 7, 96)
    assert torch.equal(maps[1], nhwc.permute(0, 3, 1, 2))


class _Counter:
    def __init__(self, modules: list[nn.Module]) -> None:
        self.calls = [0] * len(modules)
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _hook(self, i: int):
        def hook(*_):
            self.calls[i] += 1

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("layers", [[1], ["blocks.1"]])
def test_need_logits_false_stops_after_last_needed_block(layers):
    model = _model("vitd_tiny_patch4_28")
    x = _input(model)
    counter = _Counter(list(model.blocks))
    tap = LayerTap(model, layers)
    with torch.no_grad():
        logits, maps = tap(x, need_logits=False)
    assert logits is None
    assert counter.calls == [1, 1, 0, 0, 0, 0]
    with torch.no_grad():
        full_logits, full_maps = tap(x, need_logits=True)
    counter.remove()
    assert counter.calls == [2, 2, 1, 1, 1, 1]
    assert torch.equal(maps[layers[0]], full_maps[layers[0]])


def test_need_logits_false_stops_early_in_resnet_and_swin():
    resnet = _model("resnetd_small_28")
    counter = _Counter([resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4])
    with torch.no_grad():
        LayerTap(resnet, [2])(_input(resnet), need_logits=False)
    counter.remove()
    assert counter.calls == [1, 1, 0, 0]

    swin = _model("swind_tiny_28")
    counter = _Counter(list(swin.layers))
    with torch.no_grad():
        LayerTap(swin, [0])(_input(swin), need_logits=False)
    counter.remove()
    assert counter.calls == [1, 0, 0]


@pytest.mark.parametrize(
    "name,path,index",
    [
        ("vitd_tiny_patch4_28", "blocks.3", 3),
        ("vitd_tiny_patch4_28_distilled", "blocks.5", 5),
        ("caitd_small_patch4_28", "blocks.2", 2),
        ("swind_tiny_28", "layers.1", 1),
        ("resnetd_small_28", "layer2", 2),
        ("resnetd_small_28", "act1", 0),
    ],
)
def test_hook_taps_equal_index_taps(name, path, index):
    model = _model(name)
    x = _input(model)
    with torch.no_grad():
        logits_i, by_index = LayerTap(model, [index])(x)
        logits_h, by_path = LayerTap(model, [path])(x)
        _, mixed = LayerTap(model, [path, index])(x)  # mixed -> hooks for both
    assert torch.equal(by_index[index], by_path[path])
    assert torch.equal(mixed[index], mixed[path])
    assert torch.equal(mixed[index], by_index[index])
    assert torch.equal(logits_i, logits_h)


def test_negative_indices_count_from_the_end():
    model = _model("vitd_tiny_patch4_28")
    x = _input(model)
    with torch.no_grad():
        _, maps = LayerTap(model, [-1, 5, -6])(x)
    assert torch.equal(maps[-1], maps[5])
    with torch.no_grad():
        _, first = LayerTap(model, [0])(x)
    assert torch.equal(maps[-6], first[0])


@pytest.mark.parametrize("bad", [6, 100, -7])
def test_out_of_range_index_names_valid_range(bad):
    model = _model("vitd_tiny_patch4_28")
    with pytest.raises(TapError) as e:
        LayerTap(model, [1, bad])
    msg = str(e.value)
    assert str(bad) in msg and "0..5" in msg and "-6..-1" in msg


def test_resnet_range_follows_timm_convention():
    model = _model("resnetd_small_28")
    with pytest.raises(TapError, match=r"0\.\.4"):
        LayerTap(model, [5])


def test_unknown_module_path_suggests_names():
    model = _model("vitd_tiny_patch4_28")
    with pytest.raises(TapError) as e:
        LayerTap(model, ["blocks.9"])
    msg = str(e.value)
    assert "'blocks.9'" in msg and "blocks." in msg.split("'blocks.9'", 1)[1]
    with pytest.raises(TapError, match="layer2"):
        LayerTap(_model("resnetd_small_28"), ["layer_2"])


@pytest.mark.parametrize("bad", [1.5, True, None])
def test_layer_of_wrong_type(bad):
    with pytest.raises(TapError, match="integer index or a dotted module path"):
        LayerTap(_model("vitd_tiny_patch4_28"), [bad])


def test_empty_layers_rejected():
    with pytest.raises(TapError):
        LayerTap(_model("vitd_tiny_patch4_28"), [])


def test_model_without_forward_intermediates_uses_hooks():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.Flatten(),
        nn.Linear(16 * 196, 10),
    ).eval()
    assert num_tappable_layers(model) == 0
    with pytest.raises(TapError, match="module path"):
        LayerTap(model, [0])
    x = torch.randn(B, 1, 28, 28)
    counter = _Counter([model[3], model[4]])
    with torch.no_grad():
        logits, maps = LayerTap(model, ["0", "2"])(x)
        assert torch.equal(logits, model(x))
        _, early = LayerTap(model, ["2"])(x, need_logits=False)
    counter.remove()
    assert maps["0"].shape == (B, 8, 28, 28) and maps["2"].shape == (B, 16, 14, 14)
    assert torch.equal(early["2"], maps["2"])
    assert counter.calls == [2, 2]  # the early-stopped call did not reach Flatten/Linear


def test_non_map_output_raises_clear_error():
    model = _model("caitd_small_patch4_28")
    tap = LayerTap(model, ["blocks_token_only.0"])  # class-token only: (B, 1, C)
    with pytest.raises(TapError, match="blocks_token_only.0"):
        tap(_input(model))


def test_num_tappable_layers_and_describe():
    expected = {
        "vitd_tiny_patch4_28": 6,
        "caitd_small_patch4_28": 8,
        "swind_tiny_28": 3,
        "resnetd_small_28": 5,
    }
    for name, n in expected.items():
        model = _model(name)
        tap = LayerTap(model, [0])
        assert num_tappable_layers(model) == n == tap.num_layers
        lines = tap.describe()
        assert len(lines) == n
        assert all(info["module"] in line for info, line in zip(model.feature_info, lines))


def test_distilled_training_logits_pair():
    model = _model("vitd_tiny_patch4_28_distilled")
    model.train()
    model.set_distilled_training(True)
    x = _input(model)
    logits, maps = LayerTap(model, [2])(x)
    reference = model(x)  # no dropout in the preset, so train mode is deterministic
    assert isinstance(logits, tuple) and len(logits) == 2
    assert torch.equal(logits[0], reference[0]) and torch.equal(logits[1], reference[1])


def test_autograd_and_inference_mode():
    model = _model("vitd_tiny_patch4_28").train()
    x = _input(model)
    logits, maps = LayerTap(model, [1, 3])(x)
    (logits.sum() + maps[1].pow(2).mean() + maps[3].mean()).backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    model.zero_grad()
    _, only_maps = LayerTap(model, [1])(x, need_logits=False)
    only_maps[1].sum().backward()
    assert model.blocks[1].mlp.fc2.weight.grad is not None
    assert model.blocks[2].mlp.fc2.weight.grad is None  # never ran

    teacher = _model("resnetd_small_28")
    with torch.inference_mode():
        logits, maps = LayerTap(teacher, [1, 2])(_input(teacher))
    assert logits.is_inference() and maps[2].is_inference() and not maps[2].requires_grad


def test_tokens_to_map():
    b, h, w, c = 2, 3, 4, 5
    tokens = torch.randn(b, 2 + h * w, c)
    grid = tokens_to_map(tokens, 2, (h, w))
    assert grid.shape == (b, c, h, w)
    assert torch.equal(grid[:, :, 1, 2], tokens[:, 2 + 1 * w + 2])
    square = tokens_to_map(torch.randn(b, 1 + 16, c), 1)
    assert square.shape == (b, c, 4, 4)
    nhwc = torch.randn(b, h, w, c)
    assert torch.equal(tokens_to_map(nhwc, 0), nhwc.permute(0, 3, 1, 2))
    with pytest.raises(TapError, match="square"):
        tokens_to_map(torch.randn(b, 1 + 15, c), 1)
    with pytest.raises(TapError):
        tokens_to_map(torch.randn(b, 13, c), 1, (4, 4))
    with pytest.raises(TapError):
        tokens_to_map(torch.randn(b, c), 0)
