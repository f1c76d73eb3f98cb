"""The flat-buffer optimizers against torch.optim, on both backends."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from amstream.optim import AdamSlot, SGDSlot, adam_step, sgd_step


def _grads(n: int, steps: int):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, generator=g) * 10.0 ** float(torch.randint(-3, 2, (1,), generator=g)) for _ in range(steps)]


@pytest.mark.parametrize("kind", ["torch fused", "torch", "numpy"])
def test_adam_step_is_torch_optim_adam(kind):
    n, steps = 257, 70  # past FLUSH_EVERY, so the flush runs too
    p0 = torch.randn(n, generator=torch.Generator().manual_seed(1))
    ref = p0.clone().requires_grad_(True)
    opt = torch.optim.Adam([ref], lr=3e-3, betas=(0.8, 0.99), eps=1e-7)
    to = (lambda t: t.numpy()) if kind == "numpy" else (lambda t: t)
    slot = AdamSlot(to(p0.clone()), to(torch.zeros(n)), to(torch.zeros(n)), to(torch.zeros(n)))
    for t, g in enumerate(_grads(n, steps), start=1):
        ref.grad = g.clone()
        opt.step()
        slot.grad[...] = to(g)
        adam_step(slot, t, lr=3e-3, betas=(0.8, 0.99), eps=1e-7, fused=(kind == "torch fused"))
    torch.testing.assert_close(torch.as_tensor(slot.param), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.as_tensor(slot.exp_avg_sq), opt.state[ref]["exp_avg_sq"], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_step_is_torch_optim_sgd(momentum):
    n = 33
    p0 = torch.randn(n)
    ref = p0.clone().requires_grad_(True)
    opt = torch.optim.SGD([ref], lr=0.05, momentum=momentum)
    slot = SGDSlot(p0.clone().numpy(), np.zeros(n, np.float32), np.zeros(n, np.float32))
    for g in _grads(n, 5):
        ref.grad = g.clone()
        opt.step()
        slot.grad[...] = g.numpy()
        sgd_step(slot, lr=0.05, momentum=momentum)
    torch.testing.assert_close(torch.from_numpy(slot.param), ref.detach(), rtol=1e-6, atol=1e-6)
