"""SpectralKD: spectral alignment loss (against independent numpy references) and the spectral analysis."""

import itertools
import math

import numpy as np
import pytest
import torch

from vitdistill.analysis import (
    SpectrumAccumulator,
    average_attention_distance,
    channel_spectrum,
    curve_closeness,
    layer_intensity,
    normalized_depth,
    select_layer_pairs,
    spatial_spectrum_energy,
)
from vitdistill.analysis.plots import plot_attention_distance, plot_intensity, plot_spectra
from vitdistill.losses.spectral import (
    match_channels,
    match_grids,
    spatial_mse_loss,
    spectral_alignment_loss,
    spectral_features,
)

# ----------------------------------------------------------------------------- independent references


def ref_pool_channels(x: np.ndarray, c_out: int) -> np.ndarray:
    """Divisible case: average groups of consecutive channels by reshaping."""
    b, c, h, w = x.shape
    assert c % c_out == 0
    return x.reshape(b, c_out, c // c_out, h, w).mean(axis=2)


def ref_pool_grid(x: np.ndarray, h_out: int, w_out: int) -> np.ndarray:
    b, c, h, w = x.shape
    assert h % h_out == 0 and w % w_out == 0
    return x.reshape(b, c, h_out, h // h_out, w_out, w // w_out).mean(axis=(3, 5))


def ref_match(s: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c = min(s.shape[1], t.shape[1])
    s, t = ref_pool_channels(s, c), ref_pool_channels(t, c)
    h, w = min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3])
    return ref_pool_grid(s, h, w), ref_pool_grid(t, h, w)


def ref_spectral_mse(s: np.ndarray, t: np.ndarray) -> float:
    s, t = ref_match(s.astype(np.float64), t.astype(np.float64))
    h, w = s.shape[-2:]
    fs = np.fft.rfft2(s, axes=(-2, -1)) / math.sqrt(h * w)
    ft = np.fft.rfft2(t, axes=(-2, -1)) / math.sqrt(h * w)
    diff = fs - ft
    # stacked (real, imag): two real numbers per complex coefficient
    return float((diff.real**2 + diff.imag**2).sum() / (2 * diff.size))


def ref_spatial_mse(s: np.ndarray, t: np.ndarray) -> float:
    s, t = ref_match(s.astype(np.float64), t.astype(np.float64))
    return float(((s - t) ** 2).mean())


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- spectral loss


@pytest.mark.parametrize(
    "s_shape,t_shape",
    [
        ((2, 8, 7, 7), (2, 8, 7, 7)),  # (a) matching shapes
        ((2, 8, 7, 7), (2, 16, 7, 7)),  # (b) wider teacher: channel pairs averaged
        ((2, 8, 7, 7), (2, 8, 14, 14)),  # (c) finer teacher grid: 2x2 average pooling
        ((2, 16, 8, 6), (2, 4, 4, 6)),  # wider and finer student (our extension)
        ((3, 6, 4, 8), (3, 12, 8, 4)),  # finer on different axes
    ],
)
def test_spectral_loss_matches_numpy_reference(s_shape, t_shape):
    s, t = randn(*s_shape, seed=1), randn(*t_shape, seed=2)
    got = spectral_alignment_loss([s], [t])
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(ref_spectral_mse(s.numpy(), t.numpy()), rel=1e-5)
    spatial = spatial_mse_loss([s], [t])
    assert spatial.item() == pytest.approx(ref_spatial_mse(s.numpy(), t.numpy()), rel=1e-5)


def test_mean_over_pairs_and_order_invariance():
    pairs = [
        (randn(2, 8, 7, 7, seed=1), randn(2, 16, 7, 7, seed=2)),
        (randn(2, 8, 7, 7, seed=3), randn(2, 8, 14, 14, seed=4)),
        (randn(2, 8, 4, 4, seed=5), randn(2, 8, 4, 4, seed=6)),
    ]
    ref = np.mean([ref_spectral_mse(s.numpy(), t.numpy()) for s, t in pairs])
    loss = spectral_alignment_loss([s for s, _ in pairs], [t for _, t in pairs])
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    for perm in itertools.permutations(range(3)):
        permuted = spectral_alignment_loss([pairs[i][0] for i in perm], [pairs[i][1] for i in perm])
        assert permuted.item() == pytest.approx(loss.item(), rel=1e-6)


def test_zero_for_identical_features_and_pooled_equivalents():
    x = randn(2, 8, 7, 7)
    assert spectral_alignment_loss([x], [x.clone()]).item() == 0.0
    # a teacher whose channel pairs / 2x2 blocks repeat the student exactly is matched exactly
    wide = x.repeat_interleave(2, dim=1)
    fine = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert spectral_alignment_loss([x, x], [wide, fine]).item() == pytest.approx(0.0, abs=1e-12)
    assert spatial_mse_loss([x, x], [wide, fine]).item() == pytest.approx(0.0, abs=1e-12)


def test_match_channels_non_divisible_uses_adaptive_bins():
    t = torch.arange(10.0).view(1, 10, 1, 1).expand(2, 10, 3, 3)
    s = torch.zeros(2, 4, 3, 3)
    s2, t2 = match_channels(s, t)
    assert s2 is s
    # adaptive bins of 10 -> 4: (0,1,2), (2,3,4), (5,6,7), (7,8,9)
    assert t2[0, :, 0, 0].tolist() == [1.0, 3.0, 6.0, 8.0]
    # the wider side is pooled whichever it is
    t3, s3 = match_channels(t, s)
    assert t3.shape == s3.shape == (2, 4, 3, 3)


def test_match_grids_pools_the_finer_side():
    s, t = randn(1, 2, 6, 4), randn(1, 2, 3, 8, seed=1)
    s2, t2 = match_grids(s, t)
    assert s2.shape == t2.shape == (1, 2, 3, 4)
    assert torch.allclose(s2, torch.from_numpy(ref_pool_grid(s.numpy(), 3, 4)).float())
    assert torch.allclose(t2, torch.from_numpy(ref_pool_grid(t.numpy(), 3, 4)).float())


def test_spectral_features_shape_and_dtype():
    f = spectral_features(randn(2, 3, 8, 7).double())
    assert f.shape == (2, 3, 8, 4, 2) and f.dtype == torch.float32


def _ratio(d: torch.Tensor) -> float:
    return spectral_alignment_loss([d], [torch.zeros_like(d)]).item() / spatial_mse_loss(
        [d], [torch.zeros_like(d)]
    ).item()


@pytest.mark.parametrize("h,w", [(8, 8), (6, 7), (5, 10)])
def test_parseval_identity_exact(h, w):
    """2 * sum|D|^2 = sum d^2 + energy of the self-mirrored columns (v = 0 and, W even, v = W/2)."""
    d = randn(3, 4, h, w, seed=7).double()
    full = np.fft.fft2(d.numpy(), axes=(-2, -1)) / math.sqrt(h * w)
    edge_cols = [0, w // 2] if w % 2 == 0 else [0]
    e_edge = float((np.abs(full[..., edge_cols]) ** 2).sum())
    s_x = float((d.numpy() ** 2).sum())
    n_spec = 2 * d.shape[0] * d.shape[1] * h * (w // 2 + 1)  # real numbers in the stacked features
    spectral = spectral_alignment_loss([d], [torch.zeros_like(d)]).item()
    assert 2 * spectral * n_spec == pytest.approx(s_x + e_edge, rel=1e-5)
    # hence the ratio to the plain spatial MSE is W / (4 (W//2 + 1)) * (1 + E_edge / sum d^2)
    expected_ratio = w / (4 * (w // 2 + 1)) * (1 + e_edge / s_x)
    assert _ratio(d) == pytest.approx(expected_ratio, rel=1e-5)


def test_parseval_ratio_bounds_and_white_noise():
    h, w = 8, 8
    rows = randn(4, 3, h, 1, seed=3)
    dc_only = rows.expand(4, 3, h, w).contiguous()  # constant along W: all energy in column v = 0
    assert _ratio(dc_only) == pytest.approx(w / (2 * (w // 2 + 1)), rel=1e-5)  # 0.8
    cols = torch.cos(2 * math.pi * 2 * torch.arange(w) / w)  # energy only in column v = 2
    interior = rows * cols
    assert _ratio(interior) == pytest.approx(w / (4 * (w // 2 + 1)), rel=1e-5)  # 0.4
    # white noise: expected ratio exactly 1/2, for even and odd W alike
    for shape in [(64, 16, 8, 8), (64, 16, 7, 7), (64, 16, 8, 9)]:
        ratios = [_ratio(randn(*shape, seed=seed)) for seed in range(4)]
        assert np.mean(ratios) == pytest.approx(0.5, abs=0.01)


def test_float32_under_bf16_autocast_and_gradients():
    lin = torch.nn.Linear(8, 8)
    tokens = randn(2, 49, 8)
    teacher = randn(2, 16, 14, 14, seed=1).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = lin(tokens)
        assert feats.dtype == torch.bfloat16
        s = feats.transpose(1, 2).reshape(2, 8, 7, 7)
        loss = spectral_alignment_loss([s], [teacher])
        spatial = spatial_mse_loss([s], [teacher])
    assert loss.dtype == torch.float32 and spatial.dtype == torch.float32
    ref = ref_spectral_mse(s.detach().float().numpy(), teacher.float().numpy())
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    loss.backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()
    assert lin.weight.grad.abs().sum() > 0


def test_teacher_from_inference_mode_is_usable():
    with torch.inference_mode():
        t = randn(2, 8, 7, 7, seed=1)
    s = randn(2, 8, 7, 7).requires_grad_()
    for fn in (spectral_alignment_loss, spatial_mse_loss):
        fn([s], [t]).backward()
        assert s.grad is not None


def test_loss_errors_name_the_problem():
    x = randn(2, 8, 7, 7)
    with pytest.raises(ValueError, match="2 student maps and 1 teacher maps"):
        spectral_alignment_loss([x, x], [x])
    with pytest.raises(ValueError, match="batch sizes differ"):
        spectral_alignment_loss([x], [randn(3, 8, 7, 7)])
    with pytest.raises(ValueError, match="NCHW"):
        spatial_mse_loss([x.flatten(2)], [x])
    with pytest.raises(ValueError, match="empty"):
        spectral_alignment_loss([], [])


# ----------------------------------------------------------------------------- channel / spatial spectra


def test_constant_channel_vector_spectrum_closed_form():
    b, c, h, w = 3, 16, 4, 5
    vals = randn(b, 1, h, w, seed=4)  # token p holds the value c_p in every channel
    x = vals.expand(b, c, h, w)
    spec = channel_spectrum(x)
    expected = torch.zeros(c)
    expected[0] = vals.abs().mean()
    assert spec.shape == (c,)
    assert torch.allclose(spec, expected, atol=1e-6)
    assert layer_intensity(spec) == pytest.approx(vals.abs().mean().item() / c, rel=1e-5)


def test_cosine_over_channels_spectrum_closed_form():
    b, c, h, w, f = 2, 16, 3, 3, 3
    amp = torch.rand(b, 1, h, w, generator=torch.Generator().manual_seed(0)) + 0.5
    x = amp * torch.cos(2 * math.pi * f * torch.arange(c) / c).view(1, c, 1, 1)
    spec = channel_spectrum(x)
    expected = torch.zeros(c)
    expected[f] = expected[c - f] = amp.mean() / 2
    assert torch.allclose(spec, expected, atol=1e-6)
    assert layer_intensity(spec) == pytest.approx(amp.mean().item() / c, rel=1e-5)


def test_spatial_spectrum_energy_reference():
    x = randn(2, 3, 6, 8)
    got = spatial_spectrum_energy(x)
    ref = (np.abs(np.fft.rfft2(x.double().numpy(), axes=(-2, -1)) / math.sqrt(48)) ** 2).mean(axis=(0, 1))
    assert got.shape == (6, 5)
    assert np.allclose(got.numpy(), ref, rtol=1e-5, atol=1e-6)
    const = torch.full((1, 2, 4, 4), 3.0)
    e = spatial_spectrum_energy(const)
    assert e[0, 0].item() == pytest.approx(9.0 * 16) and e.sum().item() == pytest.approx(9.0 * 16)


def test_accumulator_equals_one_big_batch_and_caps_images():
    a, b = randn(5, 8, 4, 4, seed=1), randn(7, 12, 2, 2, seed=2)
    acc = SpectrumAccumulator(max_images=10)
    for lo, hi in [(0, 2), (2, 3), (3, 5)]:
        acc.update({"block0": a[lo:hi]})
    for lo, hi in [(0, 4), (4, 7)]:
        acc.update({"block1": b[lo:hi]})
    res = acc.result()
    assert list(res) == ["block0", "block1"]
    assert res["block0"]["n_images"] == 5 and res["block1"]["n_images"] == 7
    assert torch.allclose(res["block0"]["spectrum"].float(), channel_spectrum(a), atol=1e-6)
    assert torch.allclose(res["block1"]["spatial_energy"].float(), spatial_spectrum_energy(b), atol=1e-5)
    assert res["block0"]["spectrum"].dtype == torch.float64
    assert res["block1"]["intensity"] == pytest.approx(layer_intensity(channel_spectrum(b)), rel=1e-5)
    assert not acc.full

    capped = SpectrumAccumulator(max_images=6)
    for _ in range(3):
        capped.update({0: a[:4]})
    assert capped.full and capped.remaining(0) == 0
    out = capped.result()[0]
    assert out["n_images"] == 6
    assert torch.allclose(out["spectrum"].float(), channel_spectrum(torch.cat([a[:4], a[:2]])), atol=1e-6)
    with pytest.raises(ValueError, match="max_images"):
        SpectrumAccumulator(max_images=0)
    with pytest.raises(ValueError, match="shape changed"):
        acc.update({"block0": randn(1, 4, 4, 4)})


# ----------------------------------------------------------------------------- curves and pairs


def test_normalized_depth():
    assert normalized_depth(5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert normalized_depth(1) == [0.0]
    with pytest.raises(ValueError):
        normalized_depth(0)


def test_curve_closeness():
    a = [3.0, 1.0, 0.5, 0.4, 0.6, 2.0, 4.0]
    same = curve_closeness(a, a)
    assert same["pearson"] == pytest.approx(1.0) and same["mad"] == pytest.approx(0.0)
    lin = curve_closeness(a, [2.5 * v - 7 for v in a])
    assert lin["pearson"] == pytest.approx(1.0) and lin["mad"] == pytest.approx(0.0, abs=1e-12)
    assert curve_closeness(a, [-v for v in a])["pearson"] == pytest.approx(-1.0)
    # different lengths: the same underlying linear curve sampled at 12 and 24 depths
    short = [2 * x + 1 for x in normalized_depth(12)]
    long = [5 * x for x in normalized_depth(24)]
    diff_len = curve_closeness(short, long)
    assert diff_len["n_points"] == 24
    assert diff_len["pearson"] == pytest.approx(1.0) and diff_len["mad"] == pytest.approx(0.0, abs=1e-12)
    # a flat student curve is further from a U-shaped teacher than a U-shaped one
    u = [(i - 11.5) ** 2 for i in range(24)]
    u_student = [(i - 5.5) ** 2 + 3 for i in range(12)]
    flat_ish = [1.0 + 0.01 * i for i in range(12)]
    assert curve_closeness(u_student, u)["mad"] < curve_closeness(flat_ish, u)["mad"]
    assert math.isnan(curve_closeness([1.0, 1.0, 1.0], a)["pearson"])
    with pytest.raises(ValueError):
        curve_closeness([1.0], a)


def test_curve_closeness_log_ratio_measures_scale():
    t = [0.022, 0.020, 0.021, 0.034]
    # same shape, 4x the scale: shape numbers say identical, the log ratio says a factor of 4
    c = curve_closeness(t, [4 * v for v in t])
    assert c["pearson"] == pytest.approx(1.0) and c["mad"] == pytest.approx(0.0, abs=1e-12)
    assert c["log_ratio"] == pytest.approx(math.log(4.0))
    # different lengths: reference computed by hand on the 4-point grid (0, 1/3, 2/3, 1)
    s = [0.03, 0.02, 0.05]  # at depths 0, 0.5, 1; linear interpolation onto the teacher's 4 depths
    s_on_grid = [0.03, 0.03 + (0.02 - 0.03) * (1 / 3) / 0.5, 0.02 + (0.05 - 0.02) * (2 / 3 - 0.5) / 0.5, 0.05]
    expected = sum(abs(math.log(x) - math.log(y)) for x, y in zip(t, s_on_grid)) / 4
    assert curve_closeness(t, s)["log_ratio"] == pytest.approx(expected)
    assert math.isnan(curve_closeness(t, [0.0, 0.1, 0.2])["log_ratio"])


def test_select_layer_pairs_u_shape_reproduces_official_pairs():
    u = [(i - 11.5) ** 2 for i in range(24)]  # CaiT-S24-like U shape
    pairs = select_layer_pairs(u, student_depth=12, n_first=2, n_last=6)
    assert pairs == [(0, 0), (1, 1), (6, 18), (7, 19), (8, 20), (9, 21), (10, 22), (11, 23)]
    assert select_layer_pairs(u, 12) == [(0, 0), (1, 1), (10, 22), (11, 23)]
    # fractions of the student depth: 2/12 and 6/12
    assert select_layer_pairs(u, 12, n_first=1 / 6, n_last=0.5) == pairs


def test_select_layer_pairs_follows_intensity_and_validates():
    t = [0.1, 0.2, 0.9, 0.8, 0.1, 0.1, 0.1, 0.7, 0.1, 0.6]  # peaks at 2, 3 (early), 7, 9 (late)
    assert select_layer_pairs(t, 6, n_first=2, n_last=2) == [(0, 2), (1, 3), (4, 7), (5, 9)]
    # ties are broken toward the edge
    assert select_layer_pairs([1.0] * 8, 4, 1, 1) == [(0, 0), (3, 7)]
    with pytest.raises(ValueError, match="exceeds the student"):
        select_layer_pairs(t, 3, 2, 2)
    with pytest.raises(ValueError, match="early half"):
        select_layer_pairs(t, 12, 6, 1)
    with pytest.raises(ValueError, match="student_depth"):
        select_layer_pairs(t, 0)
    with pytest.raises(ValueError, match="n_last"):
        select_layer_pairs(t, 6, 1, -1)


# ----------------------------------------------------------------------------- attention distance


def _patch_index(r: int, c: int, w: int, prefix: int) -> int:
    return prefix + r * w + c


def test_attention_distance_one_hot_neighbour_self_and_uniform():
    h, w, prefix, heads = 4, 5, 1, 3
    n = prefix + h * w
    neighbour = torch.zeros(2, heads, n, n)
    selfattn = torch.zeros(2, heads, n, n)
    for r, c in itertools.product(range(h), range(w)):
        q = _patch_index(r, c, w, prefix)
        rr = r + 1 if r + 1 < h else r - 1  # neighbour at offset (1, 0) (or (-1, 0) on the last row)
        neighbour[:, :, q, _patch_index(rr, c, w, prefix)] = 0.5
        neighbour[:, :, q, 0] = 0.5  # mass on the cls key is dropped and the rest renormalised
        selfattn[:, :, q, q] = 1.0
    neighbour[:, :, 0, :] = 1.0 / n  # the cls query is ignored
    assert torch.allclose(average_attention_distance(neighbour, (h, w), prefix), torch.ones(heads, dtype=torch.float64))
    assert torch.allclose(average_attention_distance(selfattn, (h, w), prefix), torch.zeros(heads, dtype=torch.float64))

    uniform = torch.full((2, heads, n, n), 1.0 / n)
    cells = list(itertools.product(range(h), range(w)))
    expected = sum(math.hypot(a[0] - b[0], a[1] - b[1]) for a in cells for b in cells) / len(cells) ** 2
    got = average_attention_distance(uniform, (h, w), prefix)
    assert torch.allclose(got, torch.full((heads,), expected, dtype=torch.float64))

    with pytest.raises(ValueError, match="does not match"):
        average_attention_distance(uniform, (4, 4), prefix)


# ----------------------------------------------------------------------------- plots


def _read_png(path):
    import matplotlib.image as mpimg

    img = mpimg.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 0 and img.shape[1] > 0
    return img


def test_plots_write_readable_pngs(tmp_path):
    curves = {"teacher": [(i - 11.5) ** 2 for i in range(24)], "student": [(i - 5.5) ** 2 for i in range(12)]}
    p1 = plot_intensity(curves, tmp_path / "figs" / "intensity.png")
    p1b = plot_intensity(curves, tmp_path / "intensity_idx.png", normalize_depth=False, title="raw")
    p2 = plot_spectra({"block 0": channel_spectrum(randn(2, 16, 3, 3)), "block 5": torch.rand(17)},
                      tmp_path / "spectra.png")
    p3 = plot_attention_distance({"vit": [0.5, 1.0, 2.0], "heads": np.random.rand(3, 4)}, tmp_path / "attn.png")
    p4 = plot_attention_distance(torch.rand(4, 3), tmp_path / "attn_array.png")
    for p in (p1, p1b, p2, p3, p4):
        assert p.exists() and p.stat().st_size > 0
        _read_png(p)
    # atomic write: no temp files left behind, and overwriting works
    plot_intensity(curves, p1)
    assert sorted(f.name for f in (tmp_path / "figs").iterdir()) == ["intensity.png"]
    with pytest.raises(ValueError):
        plot_intensity({}, tmp_path / "empty.png")
