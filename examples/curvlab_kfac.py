"""curvlab's own KFAC optimizer in the usual training loop, with learned damping.

``curvlab.optim.KFAC`` drops into ``zero_grad(); loss.backward(); step()`` unchanged (one
line differs from SGD) and reads the damper's value at every step; it applies it exactly,
(G (x) A + delta I)^-1, through the factors' eigendecompositions, so a new delta costs no
refactorization.

    pip install 'curvlab[kfac,sklearn]'
    python examples/curvlab_kfac.py            # 300 steps
    python examples/curvlab_kfac.py --tiny     # 40 steps
"""

from __future__ import annotations

import torch
from _digits import arguments, digits_batches, tiny
from torch import nn

import curvlab
from curvlab.optim import KFAC


def main(argv=None) -> None:
    args = tiny(arguments(__doc__.splitlines()[0], steps=300, update_every=25).parse_args(argv))
    batches = digits_batches(64, images=True)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)
    )
    loss_fn = nn.CrossEntropyLoss()
    damper = curvlab.LinearShrinkageDamper(init=1e-3, update_every=args.update_every)
    # was: optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer = KFAC(model, loss_fn, lr=0.1, damping=damper, kl_clip=1e-3)

    losses, used, follows = [], set(), True
    for step in range(args.steps):
        x, y = batches[step % len(batches)]
        delta = damper.damping
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()                       # reads the damper's current delta
        follows &= optimizer.param_groups[0]["damping"] == delta
        used.add(delta)
        damper.step(model, loss_fn, (x, y))    # re-estimates delta every update_every steps
        losses.append(loss.item())

    recent = losses[-len(batches) :]
    print(f"steps {args.steps}, mean loss of the last {len(recent)} steps "
          f"{sum(recent) / len(recent):.4f}")
    print(f"damper updates {len(damper.history)}, distinct dampings used {len(used)}, "
          f"eigendecompositions {optimizer.n_factorizations}")
    print(f"KFAC applied the damper's value at every step: {follows}")


if __name__ == "__main__":
    main()
