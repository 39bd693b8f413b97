"""MHCA: the convolutional prior at initialisation, prefix tokens, exactness and timm integration."""

import copy

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

from vitdistill.models.mhca import MHCAttention, apply_mhca, attention_probs, head_offsets


def _tiny_vit(cls=VisionTransformer, **kw) -> VisionTransformer:
    args = dict(img_size=28, patch_size=4, in_chans=1, num_classes=5, embed_dim=32, depth=3, num_heads=4)
    args.update(kw)
    torch.manual_seed(0)
    return cls(**args).eval()


def _content_only(layer: MHCAttention) -> None:
    """Zero the query/key projections and make the output projection the identity."""
    d = layer.attn_dim
    with torch.no_grad():
        layer.qkv.weight[: 2 * d].zero_()
        layer.qkv.bias[: 2 * d].zero_()
        layer.proj.weight.copy_(torch.eye(d))
        layer.proj.bias.zero_()


def test_head_offsets_cover_the_kernel():
    assert set(head_offsets(9)) == {(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1)}
    assert set(head_offsets(4)) == {(0, 0), (1, 0), (0, 1), (1, 1)}
    assert head_offsets(3) == [(0, 0), (1, 0), (0, 1)]
    for n in (1, 2, 5, 6, 8, 12, 16):
        offs = head_offsets(n)
        assert len(offs) == n and len(set(offs)) == n and offs[0] == (0, 0)


@pytest.mark.parametrize("num_heads", [4, 9])
def test_strong_locality_is_a_shifted_pixel_convolution(num_heads):
    gh = gw = 7
    head_dim = 4
    dim = num_heads * head_dim
    torch.manual_seed(1)
    layer = MHCAttention(dim, num_heads, qkv_bias=True, num_prefix_tokens=0, locality_strength=50.0).eval()
    _content_only(layer)
    x = torch.randn(2, gh * gw, dim)
    probs = layer.attention_map(x)
    with torch.no_grad():
        out = layer(x)
        v = layer.qkv(x)[..., 2 * dim :]  # (B, N, dim), heads contiguous
    v_grid = v.reshape(2, gh, gw, num_heads, head_dim)
    out_grid = out.reshape(2, gh, gw, num_heads, head_dim)
    for h, (dx, dy) in enumerate(head_offsets(num_heads)):
        # reference: out[y, x] = v[y + dy, x + dx] (a one-tap convolution), valid where the tap is inside
        shifted = torch.roll(v_grid[..., h, :], shifts=(-dy, -dx), dims=(1, 2))
        ys = range(max(0, -dy), gh - max(0, dy))
        xs = range(max(0, -dx), gw - max(0, dx))
        for y in ys:
            for xq in xs:
                i, j = y * gw + xq, (y + dy) * gw + (xq + dx)
                assert probs[:, h, i, j].min() > 0.99
                torch.testing.assert_close(out_grid[:, y, xq, h], shifted[:, y, xq], atol=1e-5, rtol=1e-5)


def test_prefix_tokens_and_strong_locality():
    """With a cls token, off-centre heads still pick their tap; the centre head shares with the cls token."""
    layer = MHCAttention(36, 9, qkv_bias=True, num_prefix_tokens=1, locality_strength=50.0).eval()
    _content_only(layer)
    x = torch.randn(2, 1 + 49, 36)
    probs = layer.attention_map(x)
    y = xq = 3
    i = 1 + y * 7 + xq
    for h, (dx, dy) in enumerate(head_offsets(9)):
        j = 1 + (y + dy) * 7 + (xq + dx)
        if (dx, dy) == (0, 0):  # positional logit 0 for both the cls column and the query itself
            torch.testing.assert_close(probs[:, h, i, 0], torch.full((2,), 0.5))
            torch.testing.assert_close(probs[:, h, i, i], torch.full((2,), 0.5))
        else:
            assert probs[:, h, i, j].min() > 0.99
    # the cls row has no positional term: with zero content logits it is uniform
    torch.testing.assert_close(probs[:, :, 0], torch.full((2, 9, 50), 1 / 50))


def test_prefix_rows_and_columns_have_no_positional_term():
    torch.manual_seed(2)
    heads, hd, p, gh, gw = 3, 8, 2, 4, 5
    dim = heads * hd
    layer = MHCAttention(dim, heads, qkv_bias=True, num_prefix_tokens=p, locality_strength=2.0, grid_size=(gh, gw))
    layer.eval()
    with torch.no_grad():
        layer.rel_pos_weight.add_(0.3 * torch.randn_like(layer.rel_pos_weight))
    n = p + gh * gw
    x = torch.randn(2, n, dim)

    # independent reference: content logits from the weights, positional logits from the formula
    w, b = layer.qkv.weight, layer.qkv.bias
    q = (x @ w[:dim].T + b[:dim]).reshape(2, n, heads, hd).transpose(1, 2)
    k = (x @ w[dim : 2 * dim].T + b[dim : 2 * dim]).reshape(2, n, heads, hd).transpose(1, 2)
    content = q @ k.transpose(-1, -2) / hd**0.5
    pos = torch.zeros(heads, n, n)
    vh = layer.rel_pos_weight.detach()
    for i in range(gh * gw):
        for j in range(gh * gw):
            ddx = j % gw - i % gw
            ddy = j // gw - i // gw
            r = torch.tensor([ddx, ddy, ddx * ddx + ddy * ddy], dtype=torch.float32)
            pos[:, p + i, p + j] = vh @ r

    torch.testing.assert_close(layer.positional_logits(n).detach(), pos)
    assert torch.count_nonzero(layer.positional_logits(n)[:, :p]) == 0
    assert torch.count_nonzero(layer.positional_logits(n)[:, :, :p]) == 0
    probs = layer.attention_map(x).detach()
    torch.testing.assert_close(probs, (content + pos).softmax(-1))
    # prefix rows: exactly the content-only attention
    torch.testing.assert_close(probs[:, :, :p], content.softmax(-1)[:, :, :p])
    # the forward pass uses the same attention
    v = (x @ w[2 * dim :].T + b[2 * dim :]).reshape(2, n, heads, hd).transpose(1, 2)
    ref_out = layer.proj((probs @ v).transpose(1, 2).reshape(2, n, dim))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref_out)
        layer.fused_attn = not layer.fused_attn
        torch.testing.assert_close(layer(x), ref_out)


def test_no_blocks_is_the_original_model():
    model = _tiny_vit()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
    same = apply_mhca(copy.deepcopy(model), [])
    assert all(type(b.attn) is Attention for b in same.blocks)
    with torch.no_grad():
        assert torch.equal(same(x), ref)


@pytest.mark.parametrize("fused", [True, False])
def test_from_attention_with_zero_locality_is_exact(fused):
    torch.manual_seed(3)
    attn = Attention(32, num_heads=4, qkv_bias=True, qk_norm=True, norm_layer=torch.nn.LayerNorm).eval()
    attn.fused_attn = fused
    mhca = MHCAttention.from_attention(attn, num_prefix_tokens=1, locality_strength=0.0, pos_drop=0.0)
    assert torch.count_nonzero(mhca.rel_pos_weight) == 0
    x = torch.randn(2, 1 + 36, 32)
    with torch.no_grad():
        assert torch.equal(mhca(x), attn(x))
    if not fused:  # the manual path is exact with autograd on too
        assert torch.equal(mhca(x), attn(x))
    # weights are copies, not shared
    with torch.no_grad():
        attn.qkv.weight.add_(1.0)
    assert not torch.equal(mhca.qkv.weight, attn.qkv.weight)


def test_whole_model_zero_locality_is_exact_and_locality_changes_it():
    model = _tiny_vit()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
        zero = apply_mhca(copy.deepcopy(model), [0, 1, 2], locality_strength=0.0)
        assert all(isinstance(b.attn, MHCAttention) for b in zero.blocks)
        assert torch.equal(zero(x), ref)
        local = apply_mhca(copy.deepcopy(model), [0, 1], locality_strength=1.0)
        assert not torch.allclose(local(x), ref)
        assert isinstance(local.blocks[2].attn, Attention)


@pytest.mark.parametrize("bad", [3, -1, 7])
def test_bad_block_index(bad):
    model = _tiny_vit()
    with pytest.raises(ValueError, match=rf"index {bad} .*valid indices are 0\.\.2"):
        apply_mhca(model, [0, bad])
    assert all(type(b.attn) is Attention for b in model.blocks)  # nothing replaced


def test_applying_twice_is_refused():
    model = apply_mhca(_tiny_vit(), [0])
    with pytest.raises(ValueError, match="block 0 already uses MHCAttention"):
        apply_mhca(model, [0])


def test_gradients_reach_the_positional_weights():
    model = apply_mhca(_tiny_vit(), [0, 1], locality_strength=1.0, pos_drop=0.1).train()
    x = torch.randn(4, 1, 28, 28)
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    for b in (0, 1):
        g = model.blocks[b].attn.rel_pos_weight.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_positional_dropout_only_touches_patch_queries():
    torch.manual_seed(4)
    layer = MHCAttention(32, 4, num_prefix_tokens=1, locality_strength=1.0, pos_drop=0.5).train()
    x = torch.randn(2, 1 + 49, 32)
    with torch.no_grad():
        a, b = layer(x), layer(x)
        layer.eval()
        e1, e2 = layer(x), layer(x)
    assert not torch.allclose(a[:, 1:], b[:, 1:])  # dropout on the positional logits of patch rows
    assert torch.equal(e1, e2)  # off in eval mode
    torch.testing.assert_close(a[:, 0], e1[:, 0])  # the cls row has no positional term to drop


def test_forward_intermediates_and_distilled_model():
    model = apply_mhca(_tiny_vit(), [0, 1], locality_strength=1.0)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, indices=[0, 2])
        assert [t.shape for t in inter] == [torch.Size([2, 32, 7, 7])] * 2
        torch.testing.assert_close(final, model.forward_features(x))
        only = model.forward_intermediates(x, indices=[1], intermediates_only=True, stop_early=True)
        assert only[0].shape == (2, 32, 7, 7)

    distilled = apply_mhca(_tiny_vit(VisionTransformerDistilled), [0], locality_strength=1.0)
    assert distilled.blocks[0].attn.num_prefix_tokens == 2
    with torch.no_grad():
        assert distilled(x).shape == (2, 5)
    n = 2 + 49
    assert torch.count_nonzero(distilled.blocks[0].attn.positional_logits(n)[:, :2]) == 0


def test_dynamic_image_size_follows_the_grid_also_in_copies():
    model = apply_mhca(_tiny_vit(dynamic_img_size=True), [0], locality_strength=1.0)
    with torch.no_grad():
        assert model(torch.randn(1, 1, 28, 32)).shape == (1, 5)
        assert model.blocks[0].attn.grid_size == (7, 8)
        twin = copy.deepcopy(model)
        twin(torch.randn(1, 1, 32, 24))
    assert twin.blocks[0].attn.grid_size == (8, 6)
    assert model.blocks[0].attn.grid_size == (7, 8)


def test_grid_errors():
    layer = MHCAttention(16, 2, num_prefix_tokens=1)
    with pytest.raises(ValueError, match="cannot place 10 patch tokens"):
        layer(torch.randn(1, 11, 16))
    with pytest.raises(ValueError, match="no patch tokens"):
        layer(torch.randn(1, 1, 16))


def test_attention_probs_for_plain_and_mhca():
    torch.manual_seed(5)
    attn = Attention(32, num_heads=4, qkv_bias=True).eval()
    x = torch.randn(2, 50, 32)
    q, k, _ = attn.qkv(x).reshape(2, 50, 3, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)
    ref = (q @ k.transpose(-1, -2) * 8**-0.5).softmax(-1)
    torch.testing.assert_close(attention_probs(attn, x), ref)
    zero = MHCAttention.from_attention(attn, num_prefix_tokens=1, locality_strength=0.0)
    torch.testing.assert_close(attention_probs(zero, x), ref)
    local = MHCAttention.from_attention(attn, num_prefix_tokens=1, locality_strength=1.0)
    probs = attention_probs(local, x)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 50))
    assert not torch.allclose(probs, ref)
    with pytest.raises(TypeError, match="Linear"):
        attention_probs(torch.nn.Linear(2, 2), x)
