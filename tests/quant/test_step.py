import pytest
import torch

from ldm.util import UserError
from quant.activation import TemporalActQuantizer
from quant.step import StepTable, current_step, step_scope


def test_table_resolves_timestep_to_index():
    table = StepTable([1, 51, 101, 151])
    assert table.lookup(torch.tensor([101, 101, 101])) == 2
    assert table.lookup(torch.tensor(1)) == 0
    assert table.lookup(151) == 3


def test_unknown_timestep_names_value_and_table():
    table = StepTable([1, 51])
    with pytest.raises(UserError, match=r"timestep 7 .*\[1, 51\]"):
        table.lookup(torch.tensor([7, 7]))


def test_mixed_timesteps_error():
    with pytest.raises(UserError, match="share one timestep"):
        StepTable([1, 51]).lookup(torch.tensor([1, 51]))


def test_scope_nests_and_resets():
    assert current_step() is None
    with step_scope(3):
        assert current_step() == 3
        with step_scope(1):
            assert current_step() == 1
        assert current_step() == 3
    assert current_step() is None


def _temporal():
    q = TemporalActQuantizer(4, 3)
    with torch.no_grad():
        q.delta.copy_(torch.tensor([0.1, 0.2, 0.4]))
        q.zero.copy_(torch.tensor([3.0, 5.0, 8.0]))
    return q


def test_temporal_quantizer_uses_entry_k():
    q = _temporal()
    q.make_temporal()
    x = torch.linspace(-1, 1, 11)
    for k in range(3):
        with step_scope(k):
            out = q(x)
        d, z = q.delta[k].item(), q.zero[k].item()
        exp = (torch.clamp(torch.round(x / d) + z, 0, 15) - z) * d
        assert torch.allclose(out, exp)
    with pytest.raises(RuntimeError, match="step index"):
        q(x)


def test_shared_state_works_without_step():
    q = TemporalActQuantizer(8, 5)
    x = torch.randn(100, generator=torch.Generator().manual_seed(0))
    q.calibrate(x)
    assert torch.equal(q.delta, q.delta[:1].expand(5)) and bool(q.shared)
    with step_scope(4):
        a = q(x)
    assert torch.equal(q(x), a)


def test_checkpoint_replay_sees_forward_step():
    """ldm's checkpoint replays the context captured at forward: backward outside the scope gives the same grads."""
    from ldm.modules.diffusionmodules.util import checkpoint
    q = _temporal()
    q.make_temporal()
    x = torch.linspace(-1, 1, 21)
    grads = []
    for flag in (False, True):
        q.zero_grad()
        with step_scope(1):
            y = checkpoint(lambda inp: q(inp) * inp, (x,), list(q.parameters()), flag)
        with step_scope(2):                      # a different step is current when backward runs
            y.sum().backward()
        grads.append((q.delta.grad.clone(), q.zero.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert grads[0][0][1] != 0 and grads[0][0][0] == 0 and grads[0][0][2] == 0
