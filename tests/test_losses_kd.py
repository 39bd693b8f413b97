"""Logit KD losses and DearKD's hidden alignment (aligners, normalised MSE) against reference formulas."""

import pytest
import torch
import torch.nn.functional as F

from vitdistill.losses import (
    Aligner,
    aligned_mse_loss,
    hard_kd_loss,
    hidden_alignment_loss,
    normalize_teacher_map,
    soft_kd_loss,
)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_soft_kd_matches_reference(tau):
    torch.manual_seed(0)
    s, t = torch.randn(8, 10), 3 * torch.randn(8, 10)
    p_t = torch.softmax(t / tau, -1)
    ref = (p_t * (torch.log(p_t) - torch.log_softmax(s / tau, -1))).sum() * tau**2 / s.shape[0]
    torch.testing.assert_close(soft_kd_loss(s, t, tau), ref)
    # DeiT's convention divides by B * C instead of B
    deit = F.kl_div(F.log_softmax(s / tau, 1), F.log_softmax(t / tau, 1), reduction="sum", log_target=True)
    torch.testing.assert_close(soft_kd_loss(s, t, tau) / 10, deit * tau**2 / s.numel())


def test_soft_kd_zero_for_identical_logits_and_positive_otherwise():
    s = torch.randn(4, 7)
    assert soft_kd_loss(s, s.clone(), 2.0).abs() < 1e-6
    assert soft_kd_loss(s, s + 5.0, 2.0).abs() < 1e-6  # softmax is shift invariant
    assert soft_kd_loss(s, torch.randn(4, 7), 2.0) > 0


def test_soft_kd_gradient_and_errors():
    s = torch.randn(4, 7, requires_grad=True)
    soft_kd_loss(s, torch.randn(4, 7), 2.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="temperature"):
        soft_kd_loss(torch.randn(2, 3), torch.randn(2, 3), 0.0)
    with pytest.raises(ValueError, match=r"\(2, 3\) and \(2, 4\)"):
        soft_kd_loss(torch.randn(2, 3), torch.randn(2, 4), 1.0)


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_hard_kd_is_ce_to_teacher_argmax(ls):
    torch.manual_seed(1)
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    y = t.argmax(1)
    torch.testing.assert_close(hard_kd_loss(s, t, ls), F.cross_entropy(s, y, label_smoothing=ls))
    logp = torch.log_softmax(s, 1)
    manual = -((1 - ls) * logp.gather(1, y[:, None]).squeeze(1) + ls * logp.mean(1)).mean()
    torch.testing.assert_close(hard_kd_loss(s, t, ls), manual)


@pytest.mark.parametrize(
    ("teacher_grid", "kind"),
    [
        ((7, 7), "conv1x1"),
        ((14, 14), "deconv"),
        ((28, 28), "deconv"),
        ((10, 10), "upsample_conv"),
        ((4, 4), "pool_conv"),
        ((14, 4), "resize_conv"),
    ],
)
def test_aligner_output_matches_teacher_shape(teacher_grid, kind):
    aligner = Aligner(48, 24, (7, 7), teacher_grid)
    assert aligner.kind == kind
    assert aligner.describe().startswith(kind)
    out = aligner(torch.randn(3, 48, 7, 7))
    assert out.shape == (3, 24, *teacher_grid)
    out.sum().backward()
    assert all(p.grad is not None for p in aligner.parameters())


def test_aligner_deconv_is_one_layer_with_kernel_equal_stride():
    aligner = Aligner(16, 8, (7, 7), (28, 28))
    assert isinstance(aligner.proj, torch.nn.ConvTranspose2d)
    assert aligner.proj.kernel_size == aligner.proj.stride == (4, 4)
    assert "kernel=stride=(4, 4)" in aligner.describe()


def test_aligner_errors():
    with pytest.raises(ValueError, match="student_channels"):
        Aligner(0, 8, (7, 7), (7, 7))
    with pytest.raises(ValueError, match="teacher_grid"):
        Aligner(8, 8, (7, 7), (0, 7))
    with pytest.raises(ValueError, match="student_grid"):
        Aligner(8, 8, (7, -1), (7, 7))
    aligner = Aligner(8, 4, (7, 7), (7, 7))
    with pytest.raises(ValueError, match=r"\(B, 8, 7, 7\), got \(2, 8, 6, 6\)"):
        aligner(torch.randn(2, 8, 6, 6))


def _reference_standardise(f: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    mean = f.mean(dim=1, keepdim=True)
    var = ((f - mean) ** 2).mean(dim=1, keepdim=True)  # biased, as LayerNorm
    return (f - mean) / torch.sqrt(var + eps)


def test_normalize_teacher_map():
    torch.manual_seed(2)
    f = 3 * torch.randn(2, 16, 5, 6) + 1
    out = normalize_teacher_map(f)
    torch.testing.assert_close(out, F.layer_norm(f.permute(0, 2, 3, 1), (16,)).permute(0, 3, 1, 2))
    torch.testing.assert_close(out, _reference_standardise(f))
    torch.testing.assert_close(out.mean(1), torch.zeros(2, 5, 6), atol=1e-5, rtol=0)


def test_hidden_alignment_loss():
    torch.manual_seed(3)
    teacher = 2 * torch.randn(2, 16, 14, 14) - 1
    perfect = _reference_standardise(teacher)
    assert hidden_alignment_loss(perfect, teacher) < 1e-10
    aligned = torch.randn(2, 16, 14, 14, requires_grad=True)
    loss = hidden_alignment_loss(aligned, teacher)
    torch.testing.assert_close(loss, ((aligned - _reference_standardise(teacher)) ** 2).mean())
    loss.backward()
    assert aligned.grad is not None
    # end to end: an aligner's output is compared with the teacher map
    aligner = Aligner(32, 16, (7, 7), (14, 14))
    assert hidden_alignment_loss(aligner(torch.randn(2, 32, 7, 7)), teacher).item() > 0
    with pytest.raises(ValueError, match=r"\(2, 16, 7, 7\) and \(2, 16, 14, 14\)"):
        hidden_alignment_loss(torch.randn(2, 16, 7, 7), teacher)


@pytest.mark.parametrize("student_grid, teacher_grid, kind", [
    ((7, 7), (7, 7), "conv1x1"), ((7, 7), (28, 14), "deconv"), ((7, 7), (10, 10), "upsample_conv"),
    ((7, 7), (4, 4), "pool_conv"), ((7, 7), (14, 4), "resize_conv")])
@pytest.mark.parametrize("normalize", [True, False])
def test_aligned_mse_loss_equals_the_direct_formula(student_grid, teacher_grid, kind, normalize):
    """The expanded form of the token-wise aligners gives the loss and gradients of MSE(aligner(x), T)."""
    torch.manual_seed(5)
    aligner = Aligner(12, 6, student_grid, teacher_grid)
    assert aligner.kind == kind
    torch.nn.init.normal_(aligner.proj.bias)
    x = torch.randn(3, 12, *student_grid, requires_grad=True)
    teacher = 2 * torch.randn(3, 6, *teacher_grid) + 1
    target = _reference_standardise(teacher) if normalize else teacher
    params = [x, aligner.proj.weight, aligner.proj.bias]

    def loss_and_grads(fn):
        loss = fn()
        return loss, torch.autograd.grad(loss, params)

    ref, ref_grads = loss_and_grads(lambda: ((aligner(x) - target) ** 2).mean())
    got, got_grads = loss_and_grads(lambda: aligned_mse_loss(aligner, x, teacher, normalize))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    channels_last = teacher.contiguous(memory_format=torch.channels_last)  # as a channels-last run taps it
    torch.testing.assert_close(aligned_mse_loss(aligner, x, channels_last, normalize), ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    with torch.autocast("cpu", torch.bfloat16):  # the large matmul in bfloat16: close, not equal
        low, low_grads = loss_and_grads(lambda: aligned_mse_loss(aligner, x, teacher, normalize))
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, rtol=2e-2, atol=0)
    for g, r in zip(low_grads, ref_grads):
        assert (g - r).norm() <= 3e-2 * r.norm()
    with pytest.raises(ValueError, match=r"teacher map must have shape \(3, 6, "):
        aligned_mse_loss(aligner, x, teacher[:, :5], normalize)
    with pytest.raises(ValueError, match="Aligner expects a student map"):
        aligned_mse_loss(aligner, x[:, :5], teacher, normalize)
