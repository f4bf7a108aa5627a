"""Learned damping in kfac-pytorch's KFACPreconditioner (the README recipe), with checkpoints.

An MLP on scikit-learn's digits trained with SGD preconditioned by kfac-pytorch 0.4.2, whose
damping is a LinearShrinkageDamper's (``damping_schedule``). The damper re-estimates the
damping every ``--update-every`` steps on the training batch; its estimates run on
curvlab's hook-free view of the model, so kfac-pytorch's hooks neither fire nor break them.

    pip install 'curvlab[kfac-pytorch,sklearn]'
    python examples/kfac_pytorch_damping.py                 # 300 steps
    python examples/kfac_pytorch_damping.py --tiny          # 40 steps

Checkpoint halfway, then resume in a fresh process (same result, bitwise):

    python examples/kfac_pytorch_damping.py --save-at 150 --checkpoint run.pt
    python examples/kfac_pytorch_damping.py --resume run.pt

kfac-pytorch does not save a callable damping in its state_dict, so the damper's state is
saved beside it and loaded first (the preconditioner recomputes its inverses with the
damping when it loads).
"""

from __future__ import annotations

import torch
from _digits import arguments, digits_batches, tiny
from kfac.preconditioner import KFACPreconditioner
from torch import nn

import curvlab
from curvlab.adapters.kfac_pytorch import damping_schedule

LR = 0.1


def build(update_every: int):
    """Model, optimizer, preconditioner and damper, freshly initialised (seed 0)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    damper = curvlab.LinearShrinkageDamper(init=1e-3, update_every=update_every)
    preconditioner = KFACPreconditioner(model, damping=damping_schedule(damper), lr=LR)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    return model, optimizer, preconditioner, damper


def state(step, model, optimizer, preconditioner, damper) -> dict:
    return {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "preconditioner": preconditioner.state_dict(),
        "damper": damper.state_dict(),
    }


def restore(saved, model, optimizer, preconditioner, damper) -> int:
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    damper.load_state_dict(saved["damper"])  # first: the preconditioner reads its damping
    preconditioner.load_state_dict(saved["preconditioner"])
    return saved["step"]


def main(argv=None) -> dict:
    parser = arguments(__doc__.splitlines()[0], steps=300, update_every=25)
    parser.add_argument("--save-at", type=int, help="save a checkpoint after this step")
    parser.add_argument("--checkpoint", help="where --save-at writes the checkpoint")
    parser.add_argument("--resume", help="continue from a checkpoint")
    parser.add_argument("--out", help="save the final state here (torch.save)")
    args = tiny(parser.parse_args(argv))
    if (args.save_at is None) != (args.checkpoint is None):
        parser.error("--save-at and --checkpoint go together")

    batches = digits_batches(64)
    loss_fn = nn.CrossEntropyLoss()
    model, optimizer, preconditioner, damper = build(args.update_every)
    start = 0
    if args.resume:
        start = restore(torch.load(args.resume), model, optimizer, preconditioner, damper)

    losses, dampings, follows = [], [], True
    for step in range(start, args.steps):
        x, y = batches[step % len(batches)]
        delta = damper.damping
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        preconditioner.step()                  # reads the damper's current delta
        follows &= preconditioner.damping == delta
        optimizer.step()
        damper.step(model, loss_fn, (x, y))    # re-estimates delta every update_every steps
        losses.append(loss.item())
        dampings.append(delta)
        if args.save_at is not None and step + 1 == args.save_at:
            torch.save(state(step + 1, model, optimizer, preconditioner, damper), args.checkpoint)

    final = state(args.steps, model, optimizer, preconditioner, damper)
    final["dampings"] = dampings  # used at each step run by this process
    if args.out:
        torch.save(final, args.out)
    recent = losses[-len(batches) :]
    mean = sum(recent) / max(len(recent), 1)
    print(f"steps {args.steps}, mean loss of the last {len(recent)} steps {mean:.4f}")
    print(f"damper updates {len(damper.history)}, distinct dampings used {len(set(dampings))}")
    print(f"kfac-pytorch applied the damper's value at every step: {follows}")
    return final


if __name__ == "__main__":
    main()
