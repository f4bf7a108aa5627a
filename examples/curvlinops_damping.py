"""Learned damping for curvlinops' KFAC inverse (``DampedKFACInverse``).

Natural-gradient descent on scikit-learn's digits with curvlinops' KFAC of the whole
training set, refreshed every ``--refresh`` steps, inverted with exact damping
(K + delta I)^-1, with KL clipping (Ba et al. 2017, as kfac-pytorch does). curvlinops fixes
the damping of a ``KFACInverseLinearOperator`` when it is built; ``DampedKFACInverse``
rebuilds it whenever its ``damping`` is set, so ``damper.attach(inverse, key="damping")``
keeps it equal to the damper's value.

    pip install 'curvlab[kfac,sklearn]'
    python examples/curvlinops_damping.py            # 300 steps
    python examples/curvlinops_damping.py --tiny     # 40 steps
"""

from __future__ import annotations

import math

import curvlinops
import torch
from _digits import arguments, digits_batches, tiny
from torch import nn

import curvlab
from curvlab.adapters.kfac import DampedKFACInverse

LR, KL_CLIP = 0.1, 1e-3


def main(argv=None) -> None:
    parser = arguments(__doc__.splitlines()[0], steps=300, update_every=25)
    parser.add_argument("--refresh", type=int, default=20, help="steps between KFAC refreshes")
    args = tiny(parser.parse_args(argv))

    batches = digits_batches(64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    loss_fn = nn.CrossEntropyLoss()
    params = list(model.parameters())
    kfac = curvlinops.KFACLinearOperator(  # the Fisher's KFAC on all the training batches
        model, loss_fn, params, batches, fisher_type="type-2", check_deterministic=False
    )
    damper = curvlab.LinearShrinkageDamper(init=1e-3, update_every=args.update_every)
    inverse = DampedKFACInverse(kfac, damping=damper.damping)  # exact damping
    damper.attach(inverse, key="damping")                       # follows every update

    losses, used, follows = [], set(), True
    for step in range(args.steps):
        x, y = batches[step % len(batches)]
        delta = damper.damping
        if step % args.refresh == 0:
            kfac.compute_kronecker_factors()  # the factors at the current parameters
            inverse.refresh()
        loss = loss_fn(model(x), y)
        grads = torch.autograd.grad(loss, params)
        directions = inverse @ list(grads)  # (K + delta I)^-1 g
        follows &= inverse.operator.state_dict()["damping"] == delta
        used.add(delta)
        dg = sum(float((d * g).sum()) for d, g in zip(directions, grads)) * LR**2
        nu = min(1.0, math.sqrt(KL_CLIP / abs(dg))) if dg else 1.0
        with torch.no_grad():
            for p, d in zip(params, directions):
                p.sub_(LR * nu * d)
        damper.step(model, loss_fn, (x, y))
        losses.append(loss.item())

    recent = losses[-len(batches) :]
    print(f"steps {args.steps}, mean loss of the last {len(recent)} steps "
          f"{sum(recent) / len(recent):.4f}")
    print(f"damper updates {len(damper.history)}, distinct dampings used {len(used)}, "
          f"inverses built {inverse.n_rebuilds + 1}")
    print(f"curvlinops applied the damper's value at every step: {follows}")


if __name__ == "__main__":
    main()
