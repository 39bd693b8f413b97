"""Small-image model presets, registered in timm so ``timm.create_model(name, **overrides)`` builds them.

The defaults fit 28-32 px single-channel images with 10 classes (Fashion-MNIST) and train on a 2-core
CPU; every constructor argument can be overridden (``img_size``, ``in_chans``, ``num_classes``,
``embed_dim``, ``depth``, ``num_heads``, ``channels``, ...). None of them has pretrained weights:
``pretrained=True`` is refused by :func:`vitdistill.models.create_model` with a pointer to
``checkpoint:``.

=============================  =====================================================================
name                           architecture (defaults)
=============================  =====================================================================
vitd_tiny_patch4_28            ViT, patch 4 (7x7 tokens), embed 128, depth 6, 4 heads; the student
vitd_tiny_patch4_28_distilled  the same with DeiT's distillation token and ``head_dist``
vitd_small_patch4_28           ViT, embed 256, depth 6, 8 heads (about 4x the student); a teacher
caitd_small_patch4_28          CaiT, embed 192, depth 8 + 2 class-attention blocks; a teacher
resnetd_small_28               ResNet (BasicBlock, BatchNorm), 3x3 stride-1 stem, no max-pool; CNN teacher
resnetd_tiny_28                the same at half the width (about 1/4 of the parameters); a CNN student
swind_tiny_28 / swind_tiny_32  Swin, patch 2, embed 48, depths (2, 2, 2), window 7 (28 px) / 4 (32 px)
=============================  =====================================================================
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.cait import Cait
from timm.models.deit import VisionTransformerDistilled
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

__all__ = [
    "SmallStemResNet",
    "PRESET_NAMES",
    "vitd_tiny_patch4_28",
    "vitd_tiny_patch4_28_distilled",
    "vitd_small_patch4_28",
    "caitd_small_patch4_28",
    "resnetd_small_28",
    "resnetd_tiny_28",
    "swind_tiny_28",
    "swind_tiny_32",
]

FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)


def _cfg(size: int = 28, **kwargs: Any) -> dict[str, Any]:
    """A pretrained cfg without weights: it only records input size, normalisation and head names."""
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (1, size, size),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": FASHION_MNIST_MEAN,
        "std": FASHION_MNIST_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


# register_model() looks up this module-level name to attach the cfgs to each entrypoint.
default_cfgs = generate_default_cfgs(
    {
        "vitd_tiny_patch4_28": _cfg(fixed_input_size=True),
        "vitd_tiny_patch4_28_distilled": _cfg(fixed_input_size=True, classifier=("head", "head_dist")),
        "vitd_small_patch4_28": _cfg(fixed_input_size=True),
        "caitd_small_patch4_28": _cfg(fixed_input_size=True),
        "resnetd_small_28": _cfg(first_conv="conv1", classifier="fc"),
        "resnetd_tiny_28": _cfg(first_conv="conv1", classifier="fc"),
        "swind_tiny_28": _cfg(fixed_input_size=True, first_conv="patch_embed.proj", classifier="head.fc"),
        "swind_tiny_32": _cfg(32, fixed_input_size=True, first_conv="patch_embed.proj", classifier="head.fc"),
    }
)

PRESET_NAMES: tuple[str, ...] = tuple(default_cfgs)


class SmallStemResNet(ResNet):
    """timm ``ResNet`` with a small-image stem: one 3x3 stride-1 conv + BN + ReLU and no max-pool.

    timm's ImageNet stem (7x7 stride 2 + max-pool) shrinks a 28 px image to 7x7 before stage 1;
    here stage 1 runs at full resolution (28 -> 28, 14, 7, 4 for layer1..layer4). ``stem_width``
    (default ``channels[0]``) sets the stem's output channels. ``feature_info`` reductions are
    corrected (stem 1, layer1 1, layer2 2, layer3 4, layer4 8), and all of timm's ResNet API
    (``forward_intermediates``, ``forward_head``, ``prune_intermediate_layers``, ``features_only``)
    works unchanged, with timm's indexing: 0 = stem, 1..4 = layer1..layer4.
    """

    def __init__(
        self,
        block: type[nn.Module] = BasicBlock,
        layers: tuple[int, ...] = (2, 2, 2, 2),
        *,
        in_chans: int = 3,
        channels: tuple[int, ...] = (32, 64, 128, 256),
        stem_width: int | None = None,
        **kwargs: Any,
    ) -> None:
        for bad in ("stem_type", "replace_stem_pool"):
            if bad in kwargs:
                raise TypeError(f"SmallStemResNet() got an unexpected keyword argument '{bad}'")
        stem_width = int(stem_width or channels[0])
        if stem_width < 2 or stem_width % 2:
            raise ValueError(f"stem_width={stem_width} must be an even number >= 2")
        # timm's 'deep' stem is the only one whose output width follows stem_width (2 * stem_width);
        # it is replaced right below, so only its width matters.
        super().__init__(
            block,
            layers,
            in_chans=in_chans,
            channels=channels,
            stem_type="deep",
            stem_width=stem_width // 2,
            **kwargs,
        )
        self.conv1 = nn.Conv2d(in_chans, stem_width, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.maxpool = nn.Identity()
        # timm assumes the stem reduces by 4 (stride-2 conv + stride-2 pool); ours reduces by 1.
        self.feature_info[0]["reduction"] = 1
        for info in self.feature_info[1:]:
            info["reduction"] = max(1, info["reduction"] // 4)


def _vit(
    variant: str, pretrained: bool, defaults: dict[str, Any], kwargs: dict[str, Any], distilled: bool = False
):
    out_indices = kwargs.pop("out_indices", 3)
    model_cls = VisionTransformerDistilled if distilled else VisionTransformer
    return build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **{**defaults, **kwargs},
    )


_VIT_TINY = dict(
    img_size=28,
    patch_size=4,
    in_chans=1,
    num_classes=10,
    embed_dim=128,
    depth=6,
    num_heads=4,
    mlp_ratio=4.0,
    class_token=True,
    global_pool="token",
)


@register_model
def vitd_tiny_patch4_28(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT student for 28 px images: patch 4 (7x7 tokens), embed 128, depth 6, 4 heads (~1.2M params)."""
    return _vit("vitd_tiny_patch4_28", pretrained, _VIT_TINY, kwargs)


@register_model
def vitd_tiny_patch4_28_distilled(pretrained: bool = False, **kwargs: Any) -> VisionTransformerDistilled:
    """``vitd_tiny_patch4_28`` with DeiT's distillation token (``dist_token``) and second head (``head_dist``).

    In eval mode (or with ``distilled_training`` off) the forward returns the mean of both heads; with
    ``model.set_distilled_training(True)`` in train mode it returns ``(cls_logits, dist_logits)``.
    """
    return _vit("vitd_tiny_patch4_28_distilled", pretrained, _VIT_TINY, kwargs, distilled=True)


@register_model
def vitd_small_patch4_28(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT teacher for 28 px images: patch 4, embed 256, depth 6, 8 heads (~4.8M params, ~4x the student)."""
    defaults = {**_VIT_TINY, "embed_dim": 256, "depth": 6, "num_heads": 8}
    return _vit("vitd_small_patch4_28", pretrained, defaults, kwargs)


@register_model
def caitd_small_patch4_28(pretrained: bool = False, **kwargs: Any) -> Cait:
    """CaiT teacher for 28 px images: patch 4, embed 192, depth 8 + 2 class-attention blocks, 4 heads.

    LayerScale starts at 0.1, the CaiT paper's value for networks of depth <= 18.
    """
    out_indices = kwargs.pop("out_indices", 3)
    defaults = dict(
        img_size=28,
        patch_size=4,
        in_chans=1,
        num_classes=10,
        embed_dim=192,
        depth=8,
        num_heads=4,
        mlp_ratio=4.0,
        init_values=0.1,
        depth_token_only=2,
    )
    return build_model_with_cfg(
        Cait,
        "caitd_small_patch4_28",
        pretrained,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **{**defaults, **kwargs},
    )


@register_model
def resnetd_small_28(pretrained: bool = False, **kwargs: Any) -> SmallStemResNet:
    """CNN teacher for 28-32 px images: ResNet, BasicBlock x (1, 1, 1, 1), channels (16, 32, 64, 128)
    (0.31M parameters), BatchNorm, 3x3 stride-1 stem without max-pool. Stage grids at 28 px: 28, 14, 7, 4.
    Narrow on purpose: it reaches 92% on Fashion-MNIST, and a distilling student pays for its
    forward pass at every step.

    ``block='bottleneck'`` selects timm's Bottleneck instead of BasicBlock.
    """
    block = kwargs.pop("block", BasicBlock)
    if isinstance(block, str):
        blocks = {"basic": BasicBlock, "basicblock": BasicBlock, "bottleneck": Bottleneck}
        if block.lower() not in blocks:
            raise ValueError(f"block='{block}' must be one of {sorted(blocks)}")
        block = blocks[block.lower()]
    defaults = dict(layers=(1, 1, 1, 1), channels=(16, 32, 64, 128), in_chans=1, num_classes=10)
    return build_model_with_cfg(
        SmallStemResNet, "resnetd_small_28", pretrained, block=block, **{**defaults, **kwargs}
    )


@register_model
def resnetd_tiny_28(pretrained: bool = False, **kwargs: Any) -> SmallStemResNet:
    """CNN student for 28-32 px images: ``resnetd_small_28`` at half the width, channels (8, 16, 32, 64)
    (about 0.08M parameters), so that data-free results can be set beside the CNN-student literature."""
    defaults = dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), in_chans=1, num_classes=10, block=BasicBlock)
    return build_model_with_cfg(SmallStemResNet, "resnetd_tiny_28", pretrained, **{**defaults, **kwargs})


def _swin(
    variant: str, pretrained: bool, defaults: dict[str, Any], kwargs: dict[str, Any]
) -> SwinTransformer:
    merged = {**defaults, **kwargs}
    out_indices = merged.pop("out_indices", tuple(range(len(merged["depths"]))))
    return build_model_with_cfg(
        SwinTransformer,
        variant,
        pretrained,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **merged,
    )


_SWIN_TINY = dict(
    img_size=28,
    patch_size=2,
    in_chans=1,
    num_classes=10,
    embed_dim=48,
    depths=(2, 2, 2),
    num_heads=(2, 4, 8),
    window_size=7,
    mlp_ratio=4.0,
    drop_path_rate=0.0,
)


@register_model
def swind_tiny_28(pretrained: bool = False, **kwargs: Any) -> SwinTransformer:
    """Swin for 28 px images: patch 2 (14x14 tokens), embed 48, depths (2, 2, 2), window 7.

    Stage grids 14, 7, 4 (timm pads the odd 7x7 grid before merging); channels 48, 96, 192.
    """
    return _swin("swind_tiny_28", pretrained, _SWIN_TINY, kwargs)


@register_model
def swind_tiny_32(pretrained: bool = False, **kwargs: Any) -> SwinTransformer:
    """Swin for 32 px images: patch 2 (16x16 tokens), embed 48, depths (2, 2, 2), window 4.

    Stage grids 16, 8, 4; channels 48, 96, 192; every stage uses shifted windows.
    """
    return _swin("swind_tiny_32", pretrained, {**_SWIN_TINY, "img_size": 32, "window_size": 4}, kwargs)
