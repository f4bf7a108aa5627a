"""Issue 13's KFAC case at a tiny size: curvlab's KFAC on a digits CNN at lr 0.03 with the
eq. 12 schedule keeps training with the default damper (and its guard), for two seeds, where
a damper that follows the noise below a stable delta* (the paper's moving average) diverges.
The measured run at full size is in BENCHMARKS.md (damping section)."""

import warnings

import pytest
import torch
from torch import nn

from curvlab.damping import LinearShrinkageDamper, PaperUpdate, RMTNoise
from curvlab.optim import KFAC, paper_schedule

CE = nn.CrossEntropyLoss()
STEPS, EVERY, LR, INIT = 300, 25, 0.03, 1e-2


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data[:512] / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    return x, torch.tensor(data.target[:512])


def cnn(c=8):
    return nn.Sequential(
        nn.Conv2d(1, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * c * 4, 10),
    )


def final_loss(x, y, seed, **damper_options):
    torch.manual_seed(seed)
    model = cnn()
    opt = KFAC(model, CE, lr=LR, damping=INIT)
    damper = LinearShrinkageDamper(init=INIT, update_every=EVERY, **damper_options)
    damper.attach(opt, key="damping")
    scheduler = paper_schedule(opt, STEPS)
    gen = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(STEPS):
            idx = torch.randint(0, x.shape[0], (64,), generator=gen)
            loss = opt.step((x[idx], y[idx]))
            damper.step(model, CE, (x[idx], y[idx]), loss=loss)
            scheduler.step()
    with torch.no_grad():
        return float(CE(model(x), y)), damper


@pytest.mark.parametrize("seed", [0, 1])
def test_the_default_damper_keeps_kfac_training(digits, seed):
    loss, damper = final_loss(*digits, seed)
    assert loss < 0.1
    assert len(damper.history) == STEPS // EVERY
    assert damper.damping > INIT  # delta* plus the learned noise


def test_a_damper_following_the_noise_below_delta_star_diverges(digits):
    # two probes on groups of 8: the estimates that took the paper's rule below delta* here
    rule = RMTNoise(n_probes=2, group_size=8)
    loss, damper = final_loss(*digits, 0, update_rule=PaperUpdate(), rule=rule)
    assert not loss < 0.1  # NaN included
    assert min(r.damping for r in damper.history) < INIT / 2
