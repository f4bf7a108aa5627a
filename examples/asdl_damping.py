"""Learned damping for ASDL's KfacGradientMaker (``curvlab.adapters.asdl.attach_damper``).

An MLP on scikit-learn's digits trained with SGD on gradients preconditioned by ASDL's K-FAC.
ASDL reads ``config.damping`` whenever it inverts its factors (every step here) and applies
it as pi damping (Martens & Grosse 2015, sec. 6.3); ``attach_damper`` keeps it equal to the
damper's value.

    pip install 'curvlab[asdl,sklearn]'
    python examples/asdl_damping.py            # 300 steps
    python examples/asdl_damping.py --tiny     # 40 steps
"""

from __future__ import annotations

import torch
from _digits import arguments, digits_batches, tiny
from asdl.precondition import KfacGradientMaker, PreconditioningConfig
from torch import nn

import curvlab
from curvlab.adapters.asdl import attach_damper

BATCH, LR = 64, 0.03


def main(argv=None) -> None:
    args = tiny(arguments(__doc__.splitlines()[0], steps=300, update_every=25).parse_args(argv))
    batches = digits_batches(BATCH)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)

    damper = curvlab.LinearShrinkageDamper(init=1e-3, update_every=args.update_every)
    config = PreconditioningConfig(data_size=BATCH, damping=damper.damping)
    grad_maker = attach_damper(damper, KfacGradientMaker(model, config, seed=0))

    losses, used, follows = [], set(), True
    for step in range(args.steps):
        x, y = batches[step % len(batches)]
        delta = damper.damping
        optimizer.zero_grad()
        dummy_y = grad_maker.setup_model_call(model, x)
        grad_maker.setup_loss_call(loss_fn, dummy_y, y)
        _, loss = grad_maker.forward_and_backward()  # preconditioned with the damper's delta
        follows &= grad_maker.config.damping == delta
        used.add(delta)
        optimizer.step()
        damper.step(model, loss_fn, (x, y))          # re-estimates delta every update_every
        losses.append(loss.item())

    recent = losses[-len(batches) :]
    print(f"steps {args.steps}, mean loss of the last {len(recent)} steps "
          f"{sum(recent) / len(recent):.4f}")
    print(f"damper updates {len(damper.history)}, distinct dampings used {len(used)}")
    print(f"ASDL applied the damper's value at every step: {follows}")


if __name__ == "__main__":
    main()
