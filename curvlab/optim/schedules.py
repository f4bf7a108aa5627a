"""The paper's learning-rate schedules as ``torch.optim.lr_scheduler.LRScheduler`` subclasses.

With s = t / T (t the scheduler's step count, T = ``total_steps``), each group's rate is
alpha_t = alpha_0 * f(s):

- eq. 12 (:class:`PaperSchedule`): f = 1 for s <= 0.5, 1 - (1 - r)(s - 0.5)/0.4 for
  0.5 < s <= 0.9, and r after.
- eq. 16 (:class:`WarmupSchedule`): f = 1 for s <= 0.1, 1 + (kappa - 1)(s - 0.1)/0.2 for
  0.1 < s <= 0.3, kappa - (kappa - r)(s - 0.3)/0.6 for 0.3 < s <= 0.9, and r after.

The paper sets r = 0.01 and kappa = 5. s is an exact fraction, so the breakpoints are hit
exactly. Call ``scheduler.step()`` once per unit of T (epoch or iteration) after
``optimizer.step()``, as for any torch scheduler.
"""

from __future__ import annotations

from fractions import Fraction

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from curvlab.validation import check_int, check_nonnegative, check_positive

_TENTH, _THREE_TENTHS = Fraction(1, 10), Fraction(3, 10)
_HALF, _NINE_TENTHS = Fraction(1, 2), Fraction(9, 10)


def _check(total_steps: int, r: float, kappa: float = 1.0) -> None:
    check_int("total_steps", total_steps, minimum=1)
    check_nonnegative("r", r, fix="r is the final fraction of the base rate (the paper: 0.01)")
    check_positive("kappa", kappa, fix="kappa is the peak multiple of the base rate (the paper: 5)")


class _FractionSchedule(LRScheduler):
    """alpha_t = alpha_0 * factor(t / T), closed form in t (not chained)."""

    total_steps: int

    def factor(self, s: Fraction) -> Fraction:
        raise NotImplementedError

    def get_lr(self) -> list[float]:
        f = float(self.factor(Fraction(max(self.last_epoch, 0), self.total_steps)))
        return [base_lr * f for base_lr in self.base_lrs]

    _get_closed_form_lr = get_lr


class PaperSchedule(_FractionSchedule):
    """Eq. 12: flat until 50% of training, linear decay to ``r`` by 90%, then ``r``.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        Its groups' ``lr`` are the base rates alpha_0.
    total_steps : int
        T, the scheduler steps of the whole run (epochs or iterations).
    r : float, default 0.01
        The final fraction of the base rate.
    last_epoch : int, default -1
        As for every torch scheduler (resume from a step).

    References
    ----------
    D. Granziol and N. Baskerville, "A random matrix theory approach to damping in deep
    learning", J. Phys. Complex. 3 (2022), eq. 12.

    Examples
    --------
    >>> import torch
    >>> from curvlab.optim import PaperSchedule
    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    >>> schedule = PaperSchedule(opt, total_steps=10)
    >>> rates = []
    >>> for _ in range(10):
    ...     rates.append(round(opt.param_groups[0]["lr"], 4))
    ...     opt.step()
    ...     schedule.step()
    >>> rates
    [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.7525, 0.505, 0.2575, 0.01]
    """

    def __init__(
        self, optimizer: Optimizer, total_steps: int, r: float = 0.01, last_epoch: int = -1
    ):
        _check(total_steps, r)
        self.total_steps, self.r = total_steps, float(r)
        super().__init__(optimizer, last_epoch)

    def factor(self, s: Fraction) -> Fraction:
        """f(s) of eq. 12 at the training fraction s = t / T (exact arithmetic).

        Parameters
        ----------
        s : fractions.Fraction
            The fraction of training done.

        Returns
        -------
        fractions.Fraction
            The multiple of the base rate.
        """
        r = Fraction(self.r)
        if s <= _HALF:
            return Fraction(1)
        if s <= _NINE_TENTHS:
            return 1 - (1 - r) * (s - _HALF) / Fraction(2, 5)
        return r


class WarmupSchedule(_FractionSchedule):
    """Eq. 16: flat until 10%, ramp to ``kappa`` by 30%, decay to ``r`` by 90%, then ``r``.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        Its groups' ``lr`` are the base rates alpha_0.
    total_steps : int
        T, the scheduler steps of the whole run.
    kappa : float, default 5.0
        The peak multiple of the base rate.
    r : float, default 0.01
        The final fraction of the base rate.
    last_epoch : int, default -1
        As for every torch scheduler.

    References
    ----------
    D. Granziol and N. Baskerville, "A random matrix theory approach to damping in deep
    learning", J. Phys. Complex. 3 (2022), eq. 16.

    Examples
    --------
    >>> from fractions import Fraction
    >>> import torch
    >>> from curvlab.optim import WarmupSchedule
    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    >>> schedule = WarmupSchedule(opt, total_steps=10)
    >>> [float(schedule.factor(Fraction(t, 10))) for t in (1, 2, 3, 9)]
    [1.0, 3.0, 5.0, 0.01]
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        kappa: float = 5.0,
        r: float = 0.01,
        last_epoch: int = -1,
    ):
        _check(total_steps, r, kappa)
        self.total_steps, self.kappa, self.r = total_steps, float(kappa), float(r)
        super().__init__(optimizer, last_epoch)

    def factor(self, s: Fraction) -> Fraction:
        """f(s) of eq. 16 at the training fraction s = t / T (exact arithmetic).

        Parameters
        ----------
        s : fractions.Fraction
            The fraction of training done.

        Returns
        -------
        fractions.Fraction
            The multiple of the base rate.
        """
        kappa, r = Fraction(self.kappa), Fraction(self.r)
        if s <= _TENTH:
            return Fraction(1)
        if s <= _THREE_TENTHS:
            return 1 + (kappa - 1) * (s - _TENTH) / Fraction(1, 5)
        if s <= _NINE_TENTHS:
            return kappa - (kappa - r) * (s - _THREE_TENTHS) / Fraction(3, 5)
        return r


def paper_schedule(optimizer: Optimizer, total_steps: int, r: float = 0.01) -> PaperSchedule:
    """The paper's eq. 12 schedule (see :class:`PaperSchedule`).

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        The optimizer to schedule.
    total_steps : int
        T.
    r : float, default 0.01
        The final fraction of the base rate.

    Returns
    -------
    PaperSchedule
        A torch ``LRScheduler``.

    Examples
    --------
    >>> import torch
    >>> from curvlab.optim import paper_schedule
    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    >>> type(paper_schedule(opt, total_steps=100)).__name__
    'PaperSchedule'
    """
    return PaperSchedule(optimizer, total_steps, r=r)


def warmup_schedule(
    optimizer: Optimizer, total_steps: int, kappa: float = 5.0, r: float = 0.01
) -> WarmupSchedule:
    """The paper's eq. 16 warm-up schedule (see :class:`WarmupSchedule`).

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        The optimizer to schedule.
    total_steps : int
        T.
    kappa : float, default 5.0
        The peak multiple of the base rate.
    r : float, default 0.01
        The final fraction of the base rate.

    Returns
    -------
    WarmupSchedule
        A torch ``LRScheduler``.

    Examples
    --------
    >>> import torch
    >>> from curvlab.optim import warmup_schedule
    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    >>> warmup_schedule(opt, total_steps=100, kappa=3.0).kappa
    3.0
    """
    return WarmupSchedule(optimizer, total_steps, kappa=kappa, r=r)
