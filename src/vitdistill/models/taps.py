"""Layer outputs of any timm model as NCHW feature maps ("taps").

Integer layers follow timm's ``forward_intermediates`` indexing for the model (see
:class:`LayerTap`); string layers are dotted module paths read with forward hooks, the fallback for
models without ``forward_intermediates`` and for sub-block outputs. Maps are un-normalised
(``norm=False``) and prefix tokens (class, distillation, register) are split off.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch.nn as nn
from torch import Tensor

from ..errors import VitdistillError

__all__ = ["TapError", "LayerTap", "layer_module_name", "model_patch_grid", "num_tappable_layers", "place_tokens",
           "tokens_to_map"]

Logits = Tensor | tuple[Tensor, ...]


class TapError(VitdistillError, ValueError):
    """A user-facing layer-tap problem; the message names the bad layer and the valid ones."""


class _StopForward(Exception):
    """Raised by a hook once every requested output is captured, to end the forward early."""


def num_tappable_layers(model: nn.Module) -> int:
    """How many integer-indexable layers ``model`` has: ``len(model.feature_info)``.

    That is the index space of timm's ``forward_intermediates``: transformer blocks for
    ViT/DeiT/CaiT (CaiT's class-attention blocks excluded), stages for Swin, and stem + 4 stages
    for ResNet. Models without ``feature_info`` have 0 (tap them by module path).
    """
    info = getattr(model, "feature_info", None)
    if info is None:
        return 0
    try:
        return len(info)
    except TypeError:
        return 0


def tokens_to_map(tokens: Tensor, num_prefix_tokens: int = 0, grid: tuple[int, int] | None = None) -> Tensor:
    """Turn a layer output into an NCHW map.

    ``(B, N, C)`` tokens: the first ``num_prefix_tokens`` are dropped and the rest reshaped to
    ``grid`` (default: a square grid). ``(B, H, W, C)`` (channels-last, e.g. Swin) is permuted to
    ``(B, C, H, W)``.
    """
    if tokens.ndim == 4:
        return tokens.permute(0, 3, 1, 2)
    if tokens.ndim != 3:
        raise TapError(
            f"expected tokens (B, N, C) or channels-last maps (B, H, W, C), got shape {tuple(tokens.shape)}"
        )
    b, n, c = tokens.shape
    patches = n - num_prefix_tokens
    if grid is None:
        side = math.isqrt(max(patches, 0))
        if patches <= 0 or side * side != patches:
            raise TapError(
                f"cannot reshape {n} tokens minus {num_prefix_tokens} prefix tokens ({patches}) to a square grid; "
                "pass grid=(H, W)"
            )
        grid = (side, side)
    h, w = grid
    if patches != h * w:
        raise TapError(
            f"{n} tokens minus {num_prefix_tokens} prefix tokens ({patches}) do not fill a {h}x{w} grid"
        )
    return tokens[:, num_prefix_tokens:].transpose(1, 2).reshape(b, c, h, w)


def model_patch_grid(model: nn.Module, image_hw: Sequence[int]) -> tuple[int, int] | None:
    """The patch grid of ``model``'s patch embedding for images of ``image_hw`` (None without one)."""
    pe = getattr(model, "patch_embed", None)
    if pe is None:
        return None
    if hasattr(pe, "dynamic_feat_size"):
        try:
            h, w = pe.dynamic_feat_size(tuple(image_hw))
            return int(h), int(w)
        except (TypeError, ValueError):
            pass
    grid = getattr(pe, "grid_size", None)
    return (int(grid[0]), int(grid[1])) if grid is not None else None


def place_tokens(n_tokens: int, prefix: int, grid: tuple[int, int] | None, square_fallback: bool = False
                 ) -> tuple[tuple[int, int], int]:
    """``(grid, prefix tokens)`` for a sequence of ``n_tokens``: the patch ``grid`` with or without the model's
    ``prefix`` tokens (CaiT's self-attention blocks carry none). Without a grid (or, with ``square_fallback``,
    when the tokens do not fill it) a square grid, with or without the prefix tokens."""
    if grid is not None:
        patches = grid[0] * grid[1]
        if n_tokens == patches:
            return grid, 0
        if n_tokens == patches + prefix:
            return grid, prefix
    if grid is None or square_fallback:
        for p in (prefix, 0):
            side = math.isqrt(max(n_tokens - p, 0))
            if side > 0 and side * side == n_tokens - p:
                return (side, side), p
    raise TapError(f"cannot place {n_tokens} tokens on a patch grid (grid {grid}, {prefix} prefix tokens)")


def layer_module_name(model: nn.Module, index: int) -> str:
    """The module path behind integer layer ``index`` (from ``feature_info``; the index itself if none)."""
    info = model.feature_info[index]
    return str(info.get("module", index)) if isinstance(info, dict) else str(index)


class LayerTap:
    """Read the outputs of chosen layers of a timm model as NCHW maps, with the logits of the same forward.

    Integer layers use timm's ``forward_intermediates`` index space (``num_layers`` entries):

    - ViT / DeiT (incl. distilled) / CaiT: index ``i`` is the residual output of block ``i``
      (``blocks.i``), before the final norm; prefix tokens are dropped and the patch tokens reshaped
      to ``(B, C, H/patch, W/patch)``. CaiT's class-attention blocks are not indexed.
    - Swin: index ``i`` is the output of stage ``i`` (``layers.i``), permuted from NHWC to NCHW.
    - ResNet (timm convention): 0 = stem (``act1``, before the max-pool), 1..4 = ``layer1``..``layer4``.
    - Negative indices count from the end, as in Python.

    String layers are dotted module paths (``"blocks.3"``, ``"layer2"``, ``"blocks.3.attn"``) read
    with forward hooks: ``(B, N, C)`` outputs lose ``model.num_prefix_tokens`` tokens (none when the
    count already matches the patch grid, as in CaiT's blocks) and are reshaped to the patch grid
    (or a square); 4-D outputs are taken as NCHW, or permuted when the model declares
    ``output_fmt == 'NHWC'`` (Swin). A module called more than once per forward yields its first
    output. When any string layer is asked for, integer layers are also read by hooks, on
    ``feature_info[i]['module']``.

    ``tap(x)`` returns ``(logits, maps)`` with ``maps`` keyed by the layers exactly as given.
    With ``need_logits=True`` the logits come from the same forward (``forward_head`` on
    ``forward_intermediates``' final features, or the model's own output on the hook path), so they
    equal ``model(x)``; for a distilled DeiT in train mode with ``distilled_training`` on they are
    the ``(cls, dist)`` pair, as from the model. With ``need_logits=False`` the forward stops after
    the last needed layer and ``None`` is returned for the logits. The model is used in place (never
    copied or modified); works with autograd (students) and under ``torch.inference_mode()``
    (teachers). Pass the bare model, not a DDP wrapper: wrap the module whose forward calls the tap
    (the Distiller) in DDP instead, so that DDP's own forward runs and gradients are synchronised.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int | str]) -> None:
        if isinstance(layers, int | str):
            layers = [layers]
        self.model = model
        self.layers: list[int | str] = list(layers)
        if not self.layers:
            raise TapError("no layers to tap: give at least one layer index or module path")
        self.num_layers = num_tappable_layers(model)
        self._index: dict[int | str, int] = {}  # int key -> absolute index
        modules = dict(model.named_modules())
        for layer in self.layers:
            if isinstance(layer, bool) or not isinstance(layer, int | str):
                raise TapError(f"layer {layer!r} must be an integer index or a dotted module path string")
            if isinstance(layer, int):
                self._index[layer] = self._resolve_index(layer)
            elif layer not in modules or layer == "":
                raise TapError(self._unknown_path_message(layer, modules))
        fi = getattr(model, "forward_intermediates", None)
        self._use_intermediates = callable(fi) and all(isinstance(layer, int) for layer in self.layers)
        self._fi_kwargs: dict[str, Any] = {}
        if self._use_intermediates:
            params = inspect.signature(fi).parameters
            self._fi_kwargs = {k: v for k, v in (("norm", False), ("output_fmt", "NCHW")) if k in params}
            self._can_stop_early = "stop_early" in params
            self._take = sorted(set(self._index.values()))
        else:
            # hook path: every layer becomes a module path
            self._paths: dict[int | str, str] = {
                layer: (layer_module_name(model, self._index[layer]) if isinstance(layer, int) else layer)
                for layer in self.layers
            }
            for layer, path in self._paths.items():
                if path not in modules:
                    raise TapError(
                        f"layer {layer!r} maps to module '{path}', which {type(model).__name__} does not have; "
                        "tap it by dotted module path instead"
                    )
            self._modules = {path: modules[path] for path in set(self._paths.values())}

    # ----------------------------------------------------------------------------------------------
    def _resolve_index(self, index: int) -> int:
        n = self.num_layers
        name = type(self.model).__name__
        if n == 0:
            raise TapError(
                f"layer index {index} cannot be used: {name} has no feature_info/forward_intermediates; "
                "tap it by dotted module path, e.g. one of "
                f"{[k for k, _ in self.model.named_children()][:6]}"
            )
        if not -n <= index < n:
            raise TapError(
                f"layer index {index} is out of range for {name}: valid indices are 0..{n - 1} "
                f"(or -{n}..-1 from the end); {name} has {n} tappable layers"
            )
        return index % n

    def _unknown_path_message(self, path: str, modules: dict[str, nn.Module]) -> str:
        names = [k for k in modules if k]
        close = difflib.get_close_matches(path, names, n=5, cutoff=0.5)
        examples = close or [k for k, _ in self.model.named_children()][:8]
        return (
            f"layer '{path}' is not a module of {type(self.model).__name__}; "
            f"{'did you mean' if close else 'valid paths include'}: {', '.join(repr(e) for e in examples)}"
            + (f" (or an index 0..{self.num_layers - 1})" if self.num_layers else "")
        )

    def describe(self) -> list[str]:
        """One line per tappable (integer-indexable) layer: index, module, channels, reduction."""
        lines = []
        n = self.num_layers
        for i in range(n):
            info = self.model.feature_info[i]
            info = info if isinstance(info, dict) else {}
            lines.append(
                f"{i} (or {i - n}): {info.get('module', '?')}  channels={info.get('num_chs', '?')}  "
                f"reduction={info.get('reduction', '?')}"
            )
        return lines

    # ----------------------------------------------------------------------------------------------
    def __call__(self, x: Tensor, need_logits: bool = True) -> tuple[Logits | None, dict[int | str, Tensor]]:
        """Run the model on ``x``: ``(logits or None, {layer: (B, C, H, W) map})``."""
        if self._use_intermediates:
            return self._call_intermediates(x, need_logits)
        return self._call_hooks(x, need_logits)

    def _call_intermediates(
        self, x: Tensor, need_logits: bool
    ) -> tuple[Logits | None, dict[int | str, Tensor]]:
        model = self.model
        logits: Logits | None = None
        if need_logits:
            final, feats = model.forward_intermediates(x, indices=self._take, **self._fi_kwargs)
            logits = model.forward_head(final)
        else:
            extra = {"stop_early": True} if self._can_stop_early else {}
            feats = model.forward_intermediates(
                x, indices=self._take, intermediates_only=True, **self._fi_kwargs, **extra
            )
        by_index = dict(zip(self._take, feats))
        maps = {layer: self._as_nchw(by_index[idx], x) for layer, idx in self._index.items()}
        return logits, maps

    def _as_nchw(self, y: Tensor, x: Tensor) -> Tensor:
        if y.ndim == 3:  # a model that ignores output_fmt and returns tokens
            return self._tokens_to_map(y, x)
        return y

    def _call_hooks(self, x: Tensor, need_logits: bool) -> tuple[Logits | None, dict[int | str, Tensor]]:
        store: dict[str, Any] = {}
        wanted = len(self._modules)

        def make_hook(path: str):
            def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
                if path not in store:
                    store[path] = output
                    if not need_logits and len(store) == wanted:
                        raise _StopForward

            return hook

        handles = [m.register_forward_hook(make_hook(p)) for p, m in self._modules.items()]
        logits: Logits | None = None
        try:
            if need_logits:
                logits = self.model(x)
            else:
                try:
                    self.model(x)
                except _StopForward:
                    pass
        finally:
            for h in handles:
                h.remove()
        maps = {}
        for layer, path in self._paths.items():
            if path not in store:
                raise TapError(f"layer {layer!r} (module '{path}') did not run in the forward pass")
            maps[layer] = self._output_to_map(layer, store[path], x)
        return logits, maps

    def _output_to_map(self, layer: int | str, out: Any, x: Tensor) -> Tensor:
        if isinstance(out, tuple | list) and out and isinstance(out[0], Tensor):
            out = out[0]
        if not isinstance(out, Tensor):
            raise TapError(f"layer {layer!r} returns {type(out).__name__}, not a tensor")
        if out.ndim == 4:
            return out.permute(0, 3, 1, 2) if getattr(self.model, "output_fmt", "NCHW") == "NHWC" else out
        if out.ndim == 3:
            try:
                return self._tokens_to_map(out, x)
            except TapError as e:
                raise TapError(f"layer {layer!r} output cannot be turned into a map: {e}") from None
        raise TapError(
            f"layer {layer!r} outputs shape {tuple(out.shape)}, which is neither tokens (B, N, C) nor a map (B, C, H, W)"
        )

    def _tokens_to_map(self, tokens: Tensor, x: Tensor) -> Tensor:
        prefix = int(getattr(self.model, "num_prefix_tokens", 0) or 0)
        grid, prefix = place_tokens(tokens.shape[1], prefix, model_patch_grid(self.model, x.shape[-2:]))
        return tokens_to_map(tokens, prefix, grid)

    def __repr__(self) -> str:
        path = "forward_intermediates" if self._use_intermediates else "hooks"
        return f"LayerTap({type(self.model).__name__}, layers={self.layers}, via={path})"
