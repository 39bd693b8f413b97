"""Multi-head convolutional attention (MHCA) for DearKD's early ViT blocks (docs/methods.md §1.3).

Each head adds a learned relative-position logit ``v_h . r(p_j - p_i)``, with
``r(dx, dy) = (dx, dy, dx^2 + dy^2)``, to its content logits inside the same softmax; ConViT-style local
initialisation, no positional term for prefix tokens, optional dropout on the positional logits.
``locality_strength = 0`` gives exactly timm's ``Attention``, whose content part
:meth:`MHCAttention.from_attention` copies unchanged.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention, use_fused_attn

from .taps import TapError, place_tokens

__all__ = ["MHCAttention", "apply_mhca", "attention_probs", "head_offsets", "relative_position_features"]


def head_offsets(num_heads: int) -> list[tuple[int, int]]:
    """The centre offset ``(dx, dy)`` each head starts at, spread over a small convolution kernel.

    The kernel side is ``k = ceil(sqrt(num_heads))`` and its taps run from ``-((k - 1) // 2)`` to
    ``k // 2`` on each axis (PyTorch's ``padding='same'`` placement: 3x3 -> -1..1, 2x2 -> 0..1,
    4x4 -> -1..2). Taps are ordered by distance from the query, then by row (dy), then by column (dx),
    and the first ``num_heads`` are used. So 9 heads cover a full 3x3 kernel (centre first), 4 heads
    the 2x2 kernel {(0,0), (1,0), (0,1), (1,1)}, 3 heads (DeiT-Ti) the centre, right and down taps,
    and 6 heads (DeiT-S) the centre, its 4 neighbours and the up-left diagonal.
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    k = math.isqrt(num_heads - 1) + 1  # ceil(sqrt(num_heads))
    lo = -((k - 1) // 2)
    taps = [(dx, dy) for dy in range(lo, lo + k) for dx in range(lo, lo + k)]
    taps.sort(key=lambda t: (t[0] ** 2 + t[1] ** 2, t[1], t[0]))
    return taps[:num_heads]


def relative_position_features(
    grid_size: tuple[int, int], device: torch.device | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``r(p_j - p_i) = (dx, dy, dx^2 + dy^2)`` for every pair of patches, shape (H*W, H*W, 3).

    Patches are numbered row-major (index ``y * W + x``), as timm's patch embedding flattens them.
    """
    gh, gw = grid_size
    ys, xs = torch.meshgrid(
        torch.arange(gh, device=device, dtype=dtype or torch.float32),
        torch.arange(gw, device=device, dtype=dtype or torch.float32),
        indexing="ij",
    )
    xs, ys = xs.reshape(-1), ys.reshape(-1)
    dx = xs[None, :] - xs[:, None]  # key minus query
    dy = ys[None, :] - ys[:, None]
    return torch.stack((dx, dy, dx * dx + dy * dy), dim=-1)


def _check_grid(grid_size: Sequence[int] | None) -> tuple[int, int] | None:
    if grid_size is None:
        return None
    if isinstance(grid_size, int):
        grid_size = (grid_size, grid_size)
    grid = tuple(int(g) for g in grid_size)
    if len(grid) != 2 or min(grid) < 1:
        raise ValueError(f"grid_size must be two positive integers (rows, cols), got {grid_size!r}")
    return grid  # type: ignore[return-value]


def _resolve_mask(
    attn_mask: torch.Tensor | None, is_causal: bool, n: int, like: torch.Tensor
) -> torch.Tensor | None:
    """An additive float mask with SDPA's semantics (bool: True = may attend), or None."""
    if is_causal:
        if attn_mask is not None:
            raise ValueError("pass either attn_mask or is_causal=True, not both")
        return like.new_full((n, n), float("-inf")).triu_(1)
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        return torch.zeros_like(attn_mask, dtype=like.dtype).masked_fill_(~attn_mask, float("-inf"))
    return attn_mask.to(like.dtype)


def _qkv(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of shape (B, heads, N, head_dim) for timm ``Attention`` and :class:`MHCAttention`."""
    b, n, _ = x.shape
    qkv = module.qkv(x).reshape(b, n, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return module.q_norm(q), module.k_norm(k), v


class MHCAttention(nn.Module):
    """Self-attention plus a learned relative-position logit per head (a drop-in for timm's ``Attention``).

    ``num_prefix_tokens`` leading tokens (cls, dist, registers) get no positional term. The patch grid
    is ``grid_size`` when given and it matches the token count, otherwise the square grid of
    ``N - num_prefix_tokens`` tokens. ``locality_strength`` is ConViT's ``alpha``; ``pos_drop`` the
    dropout rate on the positional logits. The remaining arguments mean what they mean in timm's
    ``Attention``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        num_prefix_tokens: int = 1,
        locality_strength: float = 1.0,
        pos_drop: float = 0.0,
        grid_size: Sequence[int] | None = None,
        *,
        attn_head_dim: int | None = None,
        dim_out: int | None = None,
        scale_norm: bool = False,
        proj_bias: bool = True,
        gated: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
        if not 0.0 <= pos_drop < 1.0:
            raise ValueError(f"pos_drop must be in [0, 1), got {pos_drop}")
        head_dim = attn_head_dim
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
            head_dim = dim // num_heads
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.scale = head_dim**-0.5
        self.fused_attn = use_fused_attn()
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.grid_size = _check_grid(grid_size)
        self.locality_strength = float(locality_strength)

        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out or dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

        # v_h for (dx, dy, dx^2 + dy^2), one row per head; the offsets are kept for inspection.
        self.rel_pos_weight = nn.Parameter(torch.zeros(num_heads, 3, **dd))
        self.register_buffer(
            "head_offsets",
            torch.tensor(head_offsets(num_heads), dtype=torch.float32, device=device),
            persistent=False,
        )
        self.pos_logit_drop = nn.Dropout(pos_drop)
        self.reset_locality(self.locality_strength)

    @torch.no_grad()
    def reset_locality(self, locality_strength: float) -> None:
        """Re-initialise ``v_h = -alpha * (-2 Delta_x, -2 Delta_y, 1)``; ``alpha = 0`` gives ``v = 0``."""
        alpha = float(locality_strength)
        if alpha < 0:
            raise ValueError(f"locality_strength must be >= 0, got {alpha}")
        self.locality_strength = alpha
        w = torch.zeros_like(self.rel_pos_weight)
        if alpha != 0.0:
            offsets = self.head_offsets.to(w)
            w[:, 0] = 2.0 * alpha * offsets[:, 0]
            w[:, 1] = 2.0 * alpha * offsets[:, 1]
            w[:, 2] = -alpha
        self.rel_pos_weight.copy_(w)

    @classmethod
    def from_attention(
        cls,
        attn: Attention,
        num_prefix_tokens: int = 1,
        locality_strength: float = 1.0,
        pos_drop: float = 0.0,
        grid_size: Sequence[int] | None = None,
    ) -> MHCAttention:
        """An MHCA layer whose content part is a copy of ``attn`` (same weights, norms and dropouts)."""
        if not isinstance(attn, Attention):
            raise TypeError(f"from_attention expects a timm.layers.Attention, got {type(attn).__name__}")
        ref = attn.qkv.weight
        new = cls(
            attn.qkv.in_features,
            num_heads=attn.num_heads,
            qkv_bias=attn.qkv.bias is not None,
            num_prefix_tokens=num_prefix_tokens,
            locality_strength=locality_strength,
            pos_drop=pos_drop,
            grid_size=grid_size,
            attn_head_dim=attn.head_dim,
            dim_out=attn.proj.out_features,
            proj_bias=attn.proj.bias is not None,
            device=ref.device,
            dtype=ref.dtype,
        )
        # Copy the content modules as they are (whatever norm layers they use) so nothing changes.
        for name in ("qkv", "q_norm", "k_norm", "norm", "proj", "attn_drop", "proj_drop"):
            setattr(new, name, copy.deepcopy(getattr(attn, name, nn.Identity())))
        gate = getattr(attn, "gate", None)
        new.gate = copy.deepcopy(gate) if gate is not None else None
        new.scale = attn.scale
        new.fused_attn = attn.fused_attn
        return new.train(attn.training)

    def patch_grid(self, num_tokens: int) -> tuple[int, int]:
        """The (rows, cols) patch grid for a sequence of ``num_tokens`` tokens (prefix included)."""
        n = num_tokens - self.num_prefix_tokens
        if n < 1:
            raise ValueError(
                f"{num_tokens} tokens leave no patch tokens after {self.num_prefix_tokens} prefix tokens"
            )
        try:
            return place_tokens(n, 0, self.grid_size, square_fallback=True)[0]
        except TapError:
            raise ValueError(
                f"cannot place {n} patch tokens ({num_tokens} tokens minus {self.num_prefix_tokens} prefix "
                f"tokens) on a grid: not a square and grid_size={self.grid_size} does not match; "
                "set grid_size or num_prefix_tokens correctly"
            ) from None

    def positional_logits(self, num_tokens: int) -> torch.Tensor:
        """The positional logits ``v_h . r(p_j - p_i)`` of shape (heads, N, N), zero on prefix rows/cols."""
        grid = self.patch_grid(num_tokens)
        w = self.rel_pos_weight
        rel = relative_position_features(grid, device=w.device, dtype=w.dtype)
        pos = torch.einsum("ijc,hc->hij", rel, w)
        p = self.num_prefix_tokens
        return F.pad(pos, (p, 0, p, 0)) if p else pos

    def _bias(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        dropout: bool,
    ) -> torch.Tensor:
        b, n, _ = x.shape
        bias = self.positional_logits(n).unsqueeze(0)
        if dropout and self.pos_logit_drop.p > 0:
            bias = self.pos_logit_drop(bias.expand(b, -1, -1, -1))
        bias = bias.to(x.dtype)
        mask = _resolve_mask(attn_mask, is_causal, n, bias)
        return bias if mask is None else bias + mask

    def attention_logits(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        """Pre-softmax scores (B, heads, N, N): content + positional (+ mask), without any dropout."""
        q, k, _ = _qkv(self, x)
        return (q * self.scale) @ k.transpose(-2, -1) + self._bias(x, attn_mask, is_causal, dropout=False)

    def attention_map(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        """Attention probabilities (B, heads, N, N), deterministic (no dropout), for analysis."""
        return self.attention_logits(x, attn_mask, is_causal).softmax(dim=-1)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = _qkv(self, x)
        bias = self._bias(x, attn_mask, is_causal, dropout=self.training)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias.to(q.dtype), dropout_p=self.attn_drop.p if self.training else 0.0
            )
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1) + bias
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        x = x.transpose(1, 2).reshape(b, n, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))

    def grid_from_image(self, patch_embed: nn.Module, args: tuple) -> None:
        """Forward pre-hook for a dynamic-size patch embedding: take the patch grid from the image size.

        A bound method (not a closure), so a deep-copied model's hook updates the copy's layer.
        """
        self.grid_size = tuple(int(g) for g in patch_embed.dynamic_feat_size(tuple(args[0].shape[-2:])))

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, num_prefix_tokens={self.num_prefix_tokens}, "
            f"locality_strength={self.locality_strength}, pos_drop={self.pos_logit_drop.p}, "
            f"grid_size={self.grid_size}"
        )


def attention_probs(
    attn_module: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
) -> torch.Tensor:
    """Attention probabilities (B, heads, N, N) of a timm ``Attention`` or an :class:`MHCAttention` on ``x``.

    ``x`` is the block's attention input (after ``norm1``). No dropout is applied. Used by the
    average-attention-distance analysis, which needs the same maps for plain and MHCA blocks.
    """
    if isinstance(attn_module, MHCAttention):
        return attn_module.attention_map(x, attn_mask, is_causal)
    if not isinstance(attn_module, Attention):
        raise TypeError(
            f"attention_probs supports timm.layers.Attention and MHCAttention, got {type(attn_module).__name__}"
        )
    q, k, _ = _qkv(attn_module, x)
    logits = (q * attn_module.scale) @ k.transpose(-2, -1)
    mask = _resolve_mask(attn_mask, is_causal, x.shape[1], logits)
    if mask is not None:
        logits = logits + mask
    return logits.softmax(dim=-1)


def apply_mhca(
    model: nn.Module, blocks: Sequence[int], locality_strength: float = 1.0, pos_drop: float = 0.0
) -> nn.Module:
    """Replace ``model.blocks[i].attn`` with an :class:`MHCAttention` (weights copied) for each ``i``, in place.

    ``model`` is a timm ``VisionTransformer`` (or a subclass such as DeiT's distilled ViT); the prefix
    token count and patch grid are taken from it. Returns ``model``.
    """
    if not hasattr(model, "blocks") or not hasattr(model, "num_prefix_tokens"):
        raise TypeError(f"apply_mhca expects a timm VisionTransformer, got {type(model).__name__}")
    depth = len(model.blocks)
    indices: list[int] = []
    for b in blocks:
        if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < depth:
            raise ValueError(
                f"MHCA block index {b!r} is out of range: valid indices are 0..{depth - 1} "
                f"(the model has {depth} blocks)"
            )
        if b not in indices:
            indices.append(b)
    if not indices:
        return model
    patch_drop = getattr(model, "patch_drop", None)
    if patch_drop is not None and getattr(patch_drop, "prob", 0.0) > 0:
        raise ValueError(
            "MHCA needs the full patch grid; disable the model's patch dropout (patch_drop_rate=0)"
        )
    dynamic = bool(getattr(model, "dynamic_img_size", False))
    grid = None if dynamic else tuple(model.patch_embed.grid_size)
    for b in indices:
        attn = model.blocks[b].attn
        if isinstance(attn, MHCAttention):
            raise ValueError(f"block {b} already uses MHCAttention")
        if not isinstance(attn, Attention):
            raise TypeError(f"block {b}'s attention is a {type(attn).__name__}, not a timm.layers.Attention")
        new = MHCAttention.from_attention(
            attn,
            num_prefix_tokens=model.num_prefix_tokens,
            locality_strength=locality_strength,
            pos_drop=pos_drop,
            grid_size=grid,
        )
        if dynamic:  # the grid follows each input's size
            model.patch_embed.register_forward_pre_hook(new.grid_from_image)
        model.blocks[b].attn = new
    return model
