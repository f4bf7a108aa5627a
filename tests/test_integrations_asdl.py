"""ASDL's KfacGradientMaker driven by a LinearShrinkageDamper (issue 12, item 3).

The damping is checked where ASDL applies it: the preconditioned gradients ASDL writes to
``.grad`` equal the pi-damped Kronecker inverse of its own factors with the damper's value
(accumulating mode, where ASDL keeps A and B), and in its default mode the damping its
operations invert the factors with is the damper's at every step.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import curvlab
from curvlab.adapters.asdl import attach_damper
from curvlab.errors import InvalidInputError

pytest.importorskip("asdl", reason="ASDL is not installed: pip install 'curvlab[asdl]'")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script in asdl

N = 32


def setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    gen = torch.Generator().manual_seed(seed + 1)
    batches = [
        (torch.randn(N, 5, generator=gen, dtype=torch.float64),
         torch.randint(0, 3, (N,), generator=gen))
        for _ in range(4)
    ]
    return model, nn.CrossEntropyLoss(), batches


def pi_damped(A, B, delta, eps=1e-7):
    """ASDL's Kron.update_inv: (A + pi sqrt(d) I)^-1 and (B + sqrt(d)/pi I)^-1."""
    pi = math.sqrt(float((A.trace() / A.shape[0]) / (B.trace() / B.shape[0])))
    eye_a, eye_b = torch.eye(A.shape[0], dtype=A.dtype), torch.eye(B.shape[0], dtype=B.dtype)
    inv_a = torch.linalg.inv(A + max(pi * math.sqrt(delta), eps) * eye_a)
    inv_b = torch.linalg.inv(B + max(math.sqrt(delta) / pi, eps) * eye_b)
    return inv_a, inv_b


def asdl_step(grad_maker, model, loss_fn, x, y):
    dummy_y = grad_maker.setup_model_call(model, x)
    grad_maker.setup_loss_call(loss_fn, dummy_y, y)
    return grad_maker.forward_and_backward()


def test_asdl_preconditions_with_the_damper_value():
    from asdl.precondition import KfacGradientMaker, PreconditioningConfig

    model, loss_fn, batches = setup()
    damper = curvlab.LinearShrinkageDamper(init=1e-2, update_every=2)
    config = PreconditioningConfig(data_size=N, damping=1.0, ema_decay=0.5)
    grad_maker = attach_damper(damper, KfacGradientMaker(model, config, fisher_type="fisher_emp"))
    assert config.damping == damper.damping  # attached: written now
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    layers = [m for m in model if isinstance(m, nn.Linear)]
    used = []
    for step in range(8):
        x, y = batches[step % len(batches)]
        delta = damper.damping
        grads = torch.autograd.grad(loss_fn(model(x), y), list(model.parameters()))
        optimizer.zero_grad()
        asdl_step(grad_maker, model, loss_fn, x, y)
        for i, layer in enumerate(layers):
            kron = layer.fisher.kron  # ASDL's running factors A (inputs) and B (gradients)
            inv_a, inv_b = pi_damped(kron.A, kron.B, delta)
            g_w, g_b = grads[2 * i], grads[2 * i + 1]
            assert torch.allclose(layer.weight.grad, inv_b @ g_w @ inv_a, rtol=1e-10, atol=1e-14)
            assert torch.allclose(layer.bias.grad, inv_b @ g_b, rtol=1e-10, atol=1e-14)
            if used and used[-1] != delta:  # the previous damping would not match
                stale_a, stale_b = pi_damped(kron.A, kron.B, used[-1])
                assert not torch.allclose(layer.weight.grad, stale_b @ g_w @ stale_a,
                                          rtol=1e-6, atol=0)
        used.append(delta)
        optimizer.step()
        damper.step(model, loss_fn, (x, y))
        assert config.damping == damper.damping
    assert len(set(used)) >= 3  # the damper moved and ASDL followed every value


def test_default_mode_inverts_with_the_damper_value(monkeypatch):
    # without ema_decay ASDL inverts each batch's factors inside its operations and keeps
    # only the inverses: record the damping those operations use
    from asdl.operations.operation import Operation
    from asdl.precondition import KfacGradientMaker, PreconditioningConfig

    original = Operation.cov_kron_damping
    seen = []

    def recording(self, A, B, *args, **kwargs):
        seen.append(self._damping)
        return original(self, A, B, *args, **kwargs)

    monkeypatch.setattr(Operation, "cov_kron_damping", recording)
    model, loss_fn, batches = setup()
    damper = curvlab.LinearShrinkageDamper(init=1e-2, update_every=1)
    config = PreconditioningConfig(data_size=N)
    grad_maker = attach_damper(damper, KfacGradientMaker(model, config, fisher_type="fisher_emp"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = []
    for step in range(5):
        x, y = batches[step % len(batches)]
        expected += [damper.damping] * 2  # one inversion per Linear layer
        optimizer.zero_grad()
        asdl_step(grad_maker, model, loss_fn, x, y)
        optimizer.step()
        damper.step(model, loss_fn, (x, y))
    assert seen == expected
    assert len(set(expected)) >= 3


def test_refuses_objects_without_a_damping_config():
    damper = curvlab.LinearShrinkageDamper(init=1e-2)
    with pytest.raises(InvalidInputError, match=r"config\.damping"):
        attach_damper(damper, nn.Linear(2, 2))
