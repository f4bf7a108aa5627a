"""Adam whose eps is the learned damping (``curvlab.optim.adam_with_learned_eps``).

Adam's step lr m / (sqrt(v) + eps) is a diagonal preconditioner damped by eps (the paper's
section 7.3); ``adam_with_learned_eps`` builds a torch Adam whose eps follows the damper.

    pip install 'curvlab[sklearn]'
    python examples/adam_learned_eps.py            # 300 steps
    python examples/adam_learned_eps.py --tiny     # 40 steps
"""

from __future__ import annotations

import torch
from _digits import arguments, digits_batches, tiny
from torch import nn

import curvlab
from curvlab.optim import adam_with_learned_eps


def main(argv=None) -> None:
    args = tiny(arguments(__doc__.splitlines()[0], steps=300, update_every=25).parse_args(argv))
    batches = digits_batches(64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    loss_fn = nn.CrossEntropyLoss()
    damper = curvlab.LinearShrinkageDamper(init=1e-3, update_every=args.update_every)
    optimizer = adam_with_learned_eps(model.parameters(), damper, lr=1e-2)

    losses, used, follows = [], set(), True
    for step in range(args.steps):
        x, y = batches[step % len(batches)]
        delta = damper.damping
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        follows &= optimizer.param_groups[0]["eps"] == delta
        used.add(delta)
        damper.step(model, loss_fn, (x, y))    # re-estimates eps every update_every steps
        losses.append(loss.item())

    recent = losses[-len(batches) :]
    print(f"steps {args.steps}, mean loss of the last {len(recent)} steps "
          f"{sum(recent) / len(recent):.4f}")
    print(f"damper updates {len(damper.history)}, distinct dampings used {len(used)}")
    print(f"Adam applied the damper's value at every step: {follows}")


if __name__ == "__main__":
    main()
