"""TRD (MPQ-DM.md §8.2): window averaging, relation KL vs a direct computation, gradient semantics per mode."""
import pytest
import torch
from torch import nn

from ldm.util import UserError
from quant.methods.trd import TRD, feature_block, relation_kl


class _ToyUNet(nn.Module):
    """Just enough UNet: ``output_blocks[-1]`` is a 1x1 conv whose output is the TRD feature."""

    def __init__(self, channels=4, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.output_blocks = nn.ModuleList([nn.Identity(), nn.Conv2d(channels, channels, 1)])
        with torch.no_grad():
            self.output_blocks[1].weight.copy_(torch.randn(channels, channels, 1, 1, generator=gen) * 0.5)
            self.output_blocks[1].bias.zero_()
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        for block in self.output_blocks:
            x = block(x)
        return self.out(x)


class _IdentityUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.output_blocks = nn.ModuleList([nn.Identity()])

    def forward(self, x):
        return self.output_blocks[-1](x)


def _direct_kl(feat_q, feat_fp, tau=1.0):
    """Unchunked reference: cosine relations, softmax rows, KL(P_fp‖P_q) summed over samples and rows."""
    def relations(f):
        flat = f.flatten(2)
        flat = flat / flat.norm(dim=1, keepdim=True)
        return torch.einsum("nci,ncj->nij", flat, flat) / tau
    p = torch.softmax(relations(feat_fp), dim=-1)
    log_q = torch.log_softmax(relations(feat_q), dim=-1)
    return (p * (p.log() - log_q)).sum()


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_relation_kl_matches_direct_and_is_chunk_invariant(dtype, tol):
    """Value and gradient (the analytic chunked backward) against autograd through the unchunked formula."""
    gen = torch.Generator().manual_seed(1)
    fq = torch.randn(3, 5, 6, 7, generator=gen, dtype=dtype, requires_grad=True)
    ffp = torch.randn(3, 5, 6, 7, generator=gen, dtype=dtype)
    for tau in (1.0, 0.5):
        want = _direct_kl(fq, ffp, tau)
        (g_want,) = torch.autograd.grad(want, fq)
        for chunk in (1 << 22, 3 * 42 * 5, 3 * 42):  # one chunk, several chunks, single-row chunks
            got = relation_kl(fq, ffp, tau=tau, max_chunk_elems=chunk)
            (g_got,) = torch.autograd.grad(got, fq)
            assert got.dtype == dtype
            assert torch.allclose(got, want, rtol=tol, atol=tol)
            assert torch.allclose(g_got, g_want, rtol=tol, atol=tol * g_want.abs().max().item())
    assert relation_kl(ffp, ffp).abs().item() < 1e-4  # identical features -> zero divergence


def test_relation_kl_gradcheck():
    gen = torch.Generator().manual_seed(7)
    fq = torch.randn(2, 3, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    ffp = torch.randn(2, 3, 2, 3, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: relation_kl(f, ffp, tau=0.7, max_chunk_elems=2 * 6 * 2), (fq,))


def _run_trajectory(trd, teacher, student, xs_fp, xs_q):
    losses = []
    trd.reset()
    for p, (x_fp, x_q) in enumerate(zip(xs_fp, xs_q)):
        with trd.capture():
            teacher(x_fp)
            student(x_q)
        losses.append(trd.step_loss(p))
    return losses


@pytest.mark.parametrize("cadence", ["aligned", "sliding"])
def test_window_average_matches_hand_computation(cadence):
    gen = torch.Generator().manual_seed(2)
    teacher, student = _IdentityUNet(), _IdentityUNet()
    xs_fp = [torch.randn(2, 3, 4, 4, generator=gen) for _ in range(7)]
    xs_q = [torch.randn(2, 3, 4, 4, generator=gen) for _ in range(7)]
    trd = TRD(teacher, student, mode="released", window=3, lam=100.0, tau=1.0, cadence=cadence)
    losses = _run_trajectory(trd, teacher, student, xs_fp, xs_q)
    due = [2, 5] if cadence == "aligned" else [2, 3, 4, 5, 6]
    assert [p for p, loss in enumerate(losses) if loss is not None] == due
    for p in due:
        mean_q = (xs_q[p] + xs_q[p - 1] + xs_q[p - 2]) / 3
        mean_fp = (xs_fp[p] + xs_fp[p - 1] + xs_fp[p - 2]) / 3
        assert torch.allclose(losses[p], 100.0 * _direct_kl(mean_q, mean_fp), rtol=1e-5)
    # a new trajectory starts with an empty window: nothing is due before p = N-1 again
    again = _run_trajectory(trd, teacher, student, xs_fp[:2], xs_q[:2])
    assert again == [None, None]


def test_uncaptured_forwards_never_touch_the_buffers():
    gen = torch.Generator().manual_seed(3)
    teacher, student = _IdentityUNet(), _IdentityUNet()
    xs = [torch.randn(1, 2, 3, 3, generator=gen) for _ in range(2)]
    trd = TRD(teacher, student, mode="released", window=2)
    trd.reset()
    with trd.capture():
        teacher(xs[0]), student(xs[0])
    trd.step_loss(0)
    student(torch.full_like(xs[1], 7.0))  # a "preview" forward outside capture()
    teacher(torch.full_like(xs[1], 7.0))
    with trd.capture():
        teacher(xs[1]), student(xs[1])
    loss = trd.step_loss(1)
    assert loss.abs().item() < 1e-4  # identical teacher/student windows; the 7.0 preview never got in


def _student_params_grad(mode):
    gen = torch.Generator().manual_seed(4)
    teacher, student = _ToyUNet(seed=0), _ToyUNet(seed=1)
    trd = TRD(teacher, student, mode=mode, window=2, lam=100.0)
    xs = [torch.randn(2, 4, 5, 5, generator=gen) for _ in range(2)]
    trd.reset()
    x_prev = xs[0].clone().requires_grad_(True)
    outs = []
    for p, x in enumerate([x_prev, xs[1]]):
        with trd.capture():
            with torch.no_grad():
                teacher(x)
            outs.append(student(x))
        loss = trd.step_loss(p)
    weight = student.output_blocks[1].weight
    if not loss.requires_grad:
        return loss, torch.zeros_like(weight), None
    grad_w, grad_prev = torch.autograd.grad(loss, [weight, x_prev], allow_unused=True)
    return loss, grad_w, grad_prev


def test_paper_mode_gives_gradient_only_through_current_step():
    loss, grad_w, grad_prev = _student_params_grad("paper")
    assert loss.item() > 0
    assert grad_w.abs().sum().item() > 0
    assert grad_prev is None  # the earlier step's student feature entered the window detached


def test_released_mode_is_logged_but_gradient_free():
    loss_p, _, _ = _student_params_grad("paper")
    loss_r, grad_w, _ = _student_params_grad("released")
    assert not loss_r.requires_grad
    assert torch.allclose(loss_r, loss_p.detach())  # same value, logged
    assert torch.equal(grad_w, torch.zeros_like(grad_w))


def test_off_mode_and_validation():
    teacher, student = _IdentityUNet(), _IdentityUNet()
    trd = TRD(teacher, student, mode="off")
    assert not trd.enabled and trd.step_loss(3) is None and not trd.due(5)
    with pytest.raises(UserError):
        TRD(teacher, student, mode="detached")
    with pytest.raises(UserError):
        TRD(teacher, student, window=0)
    with pytest.raises(UserError):
        feature_block(nn.Linear(2, 2))
