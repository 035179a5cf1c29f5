import pytest
import torch

from sae.optim import Signum


def test_signum_moves_every_parameter_by_lr_along_the_sign_of_its_gradient_momentum() -> None:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 3))
    start = p.detach().clone()
    grads = [torch.randn(5, 3), torch.randn(5, 3)]
    grads[0][0, 0] = 0.0  # a zero momentum does not move
    opt = Signum([p], lr=0.1, momentum=0.9)
    m = torch.zeros(5, 3)
    expected = start.clone()
    for g in grads:  # the eager reference, written out
        p.grad = g.clone()
        opt.step()
        m = 0.9 * m + 0.1 * g
        expected = expected - 0.1 * torch.sign(m)
        torch.testing.assert_close(p.detach(), expected)
    assert p.detach()[0, 0] != start[0, 0]  # moved at step 2, once the momentum held a gradient
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], m)


def test_signum_refuses_a_bad_lr_or_momentum() -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="lr > 0"):
        Signum([p], lr=0.0)
    with pytest.raises(ValueError, match="momentum < 1"):
        Signum([p], lr=0.1, momentum=1.0)
