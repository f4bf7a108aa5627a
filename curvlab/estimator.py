"""The :class:`CurvatureEstimator` base class: one interface over every backend.

Backends implement ``_local_matvec`` (and optionally ``_group_matvecs``, ``_diagonal``); the
core implements validation, the model contract, staleness, distributed reductions and the
spectral algorithms once, on top of ``matvec``.

The model contract (DESIGN.md section 5b), for every backend:

- **What is differentiated.** The loss of the model as the user holds it: its parameters,
  buffers and train/eval mode (``mode=None``), or the mode forced by ``mode="train"`` /
  ``"eval"``, always on a private hook-free view (:mod:`curvlab.model_view`); the user's model,
  hooks, ``.grad``, buffers and global RNG are never touched.
- **Normalisation.** The loss is averaged over all data the way the loss averages one batch
  (:mod:`curvlab.losses`): class weights and ``ignore_index`` included.
- **Randomness.** Batch ``i`` runs as after ``torch.manual_seed(seed + i)`` (dropout masks).
- **Batch coupling.** Train-mode BatchNorm normalises with each batch's own statistics. The
  curvature of one batch is then well defined (and is what ``matvec`` returns), that of
  several batches together is not (refused). A *group* in ``group_matvecs`` is normalised
  as its own mini-batch (what an optimizer with that batch size sees); groups of one sample
  are refused.
- **Staleness.** Cached graphs and factors are rebuilt whenever a parameter, buffer, mode or
  data tensor changed, however it was written (optimizer steps, ``.data``,
  ``vector_to_parameters``, ``load_state_dict(assign=True)``); :meth:`refresh` forces it.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from curvlab import distributed as dist
from curvlab._params import (
    as_batches,
    check_input_dtypes,
    data_key,
    local_selection,
    resolve_params,
)
from curvlab._random import Seed, seed_int
from curvlab.errors import (
    BackendError,
    CurvlabError,
    InvalidInputError,
    NumericalError,
    UnsupportedCapabilityError,
    UnsupportedModelError,
)
from curvlab.losses import LossSpec
from curvlab.model_view import MODES, MaskTape, ModelView, seeded_rng, unwrap
from curvlab.operators import Operator
from curvlab.results import NoiseEstimate
from curvlab.validation import check_choice, check_int

CURVATURES = ("hessian", "ggn", "fisher", "ef")
CACHE_CHOICES = (True, False, "auto")
#: ``cache="auto"`` keeps per-batch graphs while their estimated memory stays below this.
CACHE_BUDGET_BYTES = 2 * 2**30


class CurvatureEstimator(Operator):
    """Curvature of ``loss_fn(model(x), y)`` over ``data`` as a matrix-free operator.

    Parameters
    ----------
    model : nn.Module
        The user's module (DDP / torch.compile wrappers are unwrapped); left as found.
    loss_fn : callable
        ``loss_fn(model(x), y)`` returns a scalar averaged over the samples
        (``reduction="mean"``).
    data : tuple of torch.Tensor, or iterable of them
        One (x, y) batch or an iterable of batches (a DataLoader); products average over
        all samples, normalised as the loss normalises.
    curvature : {"hessian", "ggn", "fisher", "ef"}, default "hessian"
        See ``supported_curvatures`` of each backend.
    params : iterable of torch.Tensor, optional
        Parameters to differentiate, in the order of the flat vectors; default those with
        ``requires_grad``. Frozen parameters may be listed explicitly.
    mode : {None, "train", "eval"}, default None
        None uses each module's own train/eval flag (re-read at every product); otherwise
        the view of the model is put in that mode (the user's model is not switched).
    seed : int or torch.Generator, default 0
        Seeds the masks of stochastic layers (batch i runs under ``manual_seed(seed + i)``)
        and any Monte-Carlo sampling.
    cache : {True, False, "auto"}, default "auto"
        Keep per-batch graphs between products (True), recompute them at every product so
        memory stays flat in the number of batches (False), or cache while their estimated
        memory stays under ``CACHE_BUDGET_BYTES`` (2 GiB). Products are identical either way.
    distributed : bool, optional
        Reduce over ``torch.distributed`` ranks (default: when initialised); each rank holds
        a shard of the data.

    Attributes
    ----------
    backend : str
        The registry name of the backend (``"autograd"``, ``"backpack"``, ...).
    curvature : str
        The curvature computed.
    num_params : int
        P, the length of the flat vectors (the parameters in ``params`` order).
    num_samples : int
        N, samples over all batches (and ranks).
    num_batches : int
        Batches held (over all ranks).
    capabilities : frozenset of str
        What this estimator offers beyond ``matvec`` (e.g. ``"group_matvecs"``,
        ``"diagonal"``, ``"kronecker_factors"``).
    n_matvecs : int
        Products computed so far.

    Notes
    -----
    The model contract (what "the curvature" means for train-mode layers, randomness, the
    loss normaliser and staleness) is in the module docstring of :mod:`curvlab.estimator`
    and in the user guide. Estimators are :class:`~curvlab.Operator` objects: ``+``,
    ``-``, scalar ``*``, ``@``, ``to_scipy()`` and the spectral methods (``eigenpairs``,
    ``trace``, ``spectral_density``, ``diagonal``) come from there.

    References
    ----------
    D. Granziol and N. Baskerville, "A random matrix theory approach to damping in deep
    learning", J. Phys. Complex. 3 (2022). N. N. Schraudolph, "Fast curvature
    matrix-vector products for second-order gradient descent", Neural Comput. 14 (2002)
    (GGN products). J. Martens, "New insights and perspectives on the natural gradient
    method", JMLR 21 (2020) (Fisher, empirical Fisher).

    Examples
    --------
    >>> import torch, curvlab
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    >>> est = curvlab.estimator("autograd", model, nn.CrossEntropyLoss(), (x, y))
    >>> H = est.to_dense()
    >>> bool(torch.allclose(H, H.T)), est.num_params
    (True, 26)
    """

    backend: ClassVar[str] = "abstract"
    supported_curvatures: ClassVar[frozenset[str]] = frozenset()
    base_capabilities: ClassVar[frozenset[str]] = frozenset({"matvec"})
    #: what to try when this backend cannot handle a model or loss
    alternative: ClassVar[str] = "use backend 'autograd', which handles any differentiable model"

    def __init__(
        self,
        model: nn.Module,
        loss_fn,
        data,
        curvature: str = "hessian",
        params: Iterable[torch.Tensor] | None = None,
        *,
        mode: str | None = None,
        seed: Seed = 0,
        cache: bool | str = "auto",
        distributed: bool | None = None,
    ):
        if curvature not in CURVATURES:
            raise InvalidInputError(
                f"unknown curvature {curvature!r}; choose one of {', '.join(CURVATURES)}"
            )
        if curvature not in self.supported_curvatures:
            raise UnsupportedCapabilityError(
                f"backend {self.backend!r} does not provide curvature {curvature!r} "
                f"(it provides {sorted(self.supported_curvatures)}); see curvlab.backends()"
            )
        if mode not in MODES:
            raise InvalidInputError(f"mode must be None, 'train' or 'eval', got {mode!r}")
        check_choice("cache", cache, CACHE_CHOICES)
        self.model = unwrap(model)
        self.loss_fn = loss_fn
        self.loss = LossSpec(loss_fn)
        self.curvature = curvature
        self.params, self.param_names = resolve_params(self.model, params)
        self.num_params = sum(p.numel() for p in self.params)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.mode = mode
        self.seed = seed_int(seed)
        self.cache = cache
        self.distributed = dist.is_distributed() if distributed is None else bool(distributed)
        self.view = ModelView(self.model, self.param_names, mode=mode)
        self.n_matvecs = 0
        self._seen: tuple | None = None
        with self._backend_errors("reading the data"):
            self._bind_data(data)

    # ------------------------------------------------------------------ data
    def _bind_data(self, data) -> None:
        """Hold ``data``: validate it, check every batch's loss, and compute the sample count
        and the loss normaliser over all ranks."""
        self.batches = as_batches(data, self.device)
        check_input_dtypes(self.batches, self.dtype)
        self.local_num_samples = sum(int(x.shape[0]) for x, _ in self.batches)
        counts: list[float] = [self.local_num_samples, len(self.batches)]
        self._batch_offset = 0
        if self.distributed:
            per_rank = [0.0] * dist.world_size()
            per_rank[dist.rank()] = float(len(self.batches))
            totals = dist.all_reduce_scalars(*counts, *per_rank)
            counts = totals[:2]
            self._batch_offset = round(sum(totals[2 : 2 + dist.rank()]))
        self.num_samples = round(counts[0])
        self.num_batches = round(counts[1])
        self.view.sync()
        self._check_batches()
        self.normaliser = self._global_normaliser()
        self._data_key = data_key(self.batches)
        self._seen = None

    def _check_batches(self) -> None:
        """Each batch's targets and loss, on one forward per distinct batch shape."""
        outputs: dict[tuple, torch.Tensor] = {}
        for i, (x, y) in enumerate(self.batches):
            key = (tuple(x.shape), tuple(y.shape))
            if key not in outputs:
                with torch.no_grad():
                    outputs[key] = self.forward_batch(i, {}, x)
                self.loss.check_batch(outputs[key], y, f"batch {i}")
            else:
                self.loss.check_targets(outputs[key], y, f"batch {i}")

    def forward_batch(
        self, i: int, params: dict[str, torch.Tensor], x: torch.Tensor, tape: MaskTape | None = None
    ) -> torch.Tensor:
        """The view's output on batch ``i`` under its seed (see the class docstring).

        For backends: every forward pass of batch ``i`` draws the same dropout masks.

        Parameters
        ----------
        i : int
            Local index of the batch (for its seed, :meth:`batch_seed`).
        params : dict of str to torch.Tensor
            Parameters substituted by name (``{}``: the model's own).
        x : torch.Tensor
            The batch's inputs (a subset of them for group products).
        tape : MaskTape, optional
            Records the masks of stochastic layers, or replays them for a subset.

        Returns
        -------
        torch.Tensor
            ``model(x)`` on the hook-free view, in the estimator's mode.
        """
        with seeded_rng(self.batch_seed(i), self.device):
            return self.view.forward(params, x, tape=tape)

    def batch_seed(self, i: int) -> int:
        """The seed batch ``i`` (local index) runs under: seed + its global batch index.

        Parameters
        ----------
        i : int
            Local index of the batch on this process.

        Returns
        -------
        int
            ``(seed + global batch index) mod 2**63``, the same on every rank layout.
        """
        return (self.seed + self._batch_offset + i) % 2**63

    # ------------------------------------------------------------------ staleness
    def _current(self) -> None:
        """Rebuild caches if the model or the data changed since they were built."""
        self.view.sync()
        key = (self.view._key, data_key(self.batches))
        if key == self._seen:
            return
        if key[1] != self._data_key:  # data written in place: re-check it
            self._check_batches()
            self.normaliser = self._global_normaliser()
            self._data_key = key[1]
        self.params = self.view.source_parameters()
        self.release()
        self._seen = key

    def _global_normaliser(self) -> float:
        local = sum(self.loss.normaliser(y) for _, y in self.batches)
        return dist.all_reduce_scalars(local)[0] if self.distributed else float(local)

    def refresh(self) -> None:
        """Forget every cached graph or factor: the next product recomputes them from the
        model and data as they are now.

        Rarely needed: a change to a parameter, buffer, train/eval mode or data tensor is
        detected at the next product however it was written (optimizer steps, ``.data``,
        ``vector_to_parameters``, ``load_state_dict``).

        Examples
        --------
        >>> import torch, curvlab
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh(),
        ...                           torch.nn.Linear(2, 1)).double()
        >>> data = (torch.randn(4, 2, dtype=torch.float64), torch.zeros(4, 1, dtype=torch.float64))
        >>> est = curvlab.estimator("autograd", mlp, torch.nn.MSELoss(), data)
        >>> v = torch.ones(est.num_params, dtype=torch.float64)
        >>> before = est.matvec(v)
        >>> with torch.no_grad():
        ...     _ = mlp[0].weight.mul_(2)  # an in-place write: the estimator sees it
        >>> fresh = curvlab.estimator("autograd", mlp, torch.nn.MSELoss(), data)
        >>> torch.equal(est.matvec(v), fresh.matvec(v)), torch.equal(est.matvec(v), before)
        (True, False)
        """
        self._seen = None
        self.release()

    def release(self) -> None:
        """Drop cached graphs and factors (assign new containers: estimators made by
        :meth:`with_data` share nothing mutable with this one)."""

    # ------------------------------------------------------------------ new data
    def with_data(self, data) -> CurvatureEstimator:
        """The same estimator (backend, curvature, parameters, options, model view and
        vectorisation decisions) on other data.

        Parameters
        ----------
        data : tuple of torch.Tensor or iterable of them
            One (x, y) batch or an iterable of batches, as for the constructor.

        Returns
        -------
        CurvatureEstimator
            A new estimator; this one is left unchanged.

        Examples
        --------
        >>> import torch, curvlab
        >>> model = torch.nn.Linear(2, 1)
        >>> est = curvlab.estimator("autograd", model, torch.nn.MSELoss(),
        ...                         (torch.randn(8, 2), torch.randn(8, 1)))
        >>> other = est.with_data((torch.randn(3, 2), torch.randn(3, 1)))
        >>> other.num_samples, est.num_samples, other.backend
        (3, 8, 'autograd')
        """
        new = copy.copy(self)
        new.n_matvecs = 0
        new.release()
        with new._backend_errors("reading the data"):
            new._bind_data(data)
        return new

    def subset(self, indices: torch.Tensor) -> CurvatureEstimator:
        """The same estimator on the samples at ``indices``.

        Parameters
        ----------
        indices : torch.Tensor
            1-D distinct global sample indices (over all ranks, in rank order), in the order
            the new estimator holds them; every rank must keep at least one sample.

        Returns
        -------
        CurvatureEstimator
            ``self.with_data`` of those samples, as one batch.

        Raises
        ------
        InvalidInputError
            For indices that are out of range, repeated, or not a non-empty 1-D tensor.

        Examples
        --------
        >>> import torch, curvlab
        >>> x, y = torch.randn(10, 2), torch.randn(10, 1)
        >>> est = curvlab.estimator("autograd", torch.nn.Linear(2, 1), torch.nn.MSELoss(), (x, y))
        >>> est.subset(torch.tensor([0, 3, 7])).num_samples
        3
        """
        local = local_selection(indices, self.local_num_samples, self.distributed)
        x, y = self.concatenated()
        local = local.to(self.device)
        return self.with_data((x[local], y[local]))

    def concatenated(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All samples this process holds, as one (x, y) pair.

        Returns
        -------
        tuple of torch.Tensor
            (x, y) concatenated along the batch dimension, in data order (the batch itself
            when there is one).
        """
        if len(self.batches) == 1:
            return self.batches[0]
        return (
            torch.cat([b[0] for b in self.batches]),
            torch.cat([b[1] for b in self.batches]),
        )

    # ------------------------------------------------------------------ contract
    @property
    def capabilities(self) -> frozenset[str]:
        """What this estimator offers beyond the spectral methods, as a frozenset of str.

        ``"matvec"`` always; backends add ``"group_matvecs"``, ``"per_sample_gradients"``,
        ``"diagonal"`` (an exact diagonal cheaper than P products), ``"kronecker_factors"``,
        ``"damped_inverse"``, ... (``curvlab.backends()`` lists them per backend).
        """
        return self.base_capabilities

    def _local_matvec(self, V: torch.Tensor) -> torch.Tensor:
        """[P, k] -> [P, k]: this process's share sum_b H(S_b) V / W (W over all ranks)."""
        raise NotImplementedError

    def _group_matvecs(self, V: torch.Tensor, group_size: int) -> torch.Tensor:
        """[k, P] probes -> [k, G, P] group products (see :meth:`group_matvecs`)."""
        raise UnsupportedCapabilityError(
            f"backend {self.backend!r} cannot form per-group products; use 'autograd'"
        )

    def _diagonal(self) -> torch.Tensor:
        raise UnsupportedCapabilityError(f"backend {self.backend!r} has no exact diagonal")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(backend={self.backend!r}, curvature={self.curvature!r}, "
            f"num_params={self.num_params}, num_samples={self.num_samples})"
        )

    @contextlib.contextmanager
    def _backend_errors(self, what: str) -> Iterator[None]:
        """Let curvlab's own errors through; wrap anything else a backend raises."""
        try:
            yield
        except CurvlabError:
            raise
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise BackendError(
                f"backend {self.backend!r} failed while {what} ({type(exc).__name__}: {exc}); "
                f"if the model or loss is unusual, {self.alternative}"
            ) from exc

    def _refuse_coupled_batches(self) -> None:
        coupled = self.view.batch_coupled()
        if coupled and (self.num_batches > 1 or self.distributed):
            raise UnsupportedModelError(
                f"train-mode BatchNorm ({', '.join(coupled[:3])}) normalises each batch with "
                f"its own statistics, so the curvature of {self.num_batches} batches "
                f"{'on several ranks ' if self.distributed else ''}together is not defined: "
                "pass one batch, call model.eval(), or build the estimator with mode='eval'"
            )

    # ------------------------------------------------------------------ products
    def _matvec(self, V: torch.Tensor) -> torch.Tensor:
        self._current()
        self._refuse_coupled_batches()
        with self._backend_errors("computing a product"):
            out = self._local_matvec(V)
        if self.distributed:
            out = dist.all_reduce_sum(out)
        # the sum is a cheap finite test; the elementwise one only confirms (overflow)
        if not torch.isfinite(out.sum()) and not torch.isfinite(out).all():
            raise NumericalError(
                f"the {self.curvature} product is not finite; check the loss and the data"
            )
        return out

    def group_matvecs(self, v: torch.Tensor, group_size: int = 1) -> torch.Tensor:
        """[G, P]: the curvature of each group of ``group_size`` samples times ``v``.

        Groups are consecutive samples of this process in data order; a remainder smaller
        than ``group_size`` is dropped (G = N // group_size). Rows are scaled per sample by
        N / W (:mod:`curvlab.losses`), so they average to :meth:`matvec` over the samples
        used; for a plain mean loss a row is the curvature of the group's own mean loss.
        Under train-mode BatchNorm each group is normalised as its own mini-batch, and
        groups of one sample are refused.

        Parameters
        ----------
        v : torch.Tensor
            One [P] probe shared by all groups, or a [P, k] block of k probes.
        group_size : int, default 1
            Samples per group (1: per-sample products).

        Returns
        -------
        torch.Tensor
            [G, P] for one probe, [k, G, P] for a block.

        Raises
        ------
        UnsupportedCapabilityError
            On a backend without per-group products (see ``capabilities``).
        UnsupportedModelError
            For ``group_size=1`` under train-mode BatchNorm.

        Examples
        --------
        >>> import torch, curvlab
        >>> x, y = torch.randn(6, 2, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
        >>> model = torch.nn.Linear(2, 1).double()
        >>> est = curvlab.estimator("autograd", model, torch.nn.MSELoss(), (x, y))
        >>> v = torch.ones(est.num_params, dtype=torch.float64)
        >>> rows = est.group_matvecs(v, group_size=2)
        >>> rows.shape, torch.allclose(rows.mean(0), est.matvec(v))
        (torch.Size([3, 3]), True)
        """
        self.check_vector(v)
        group_size = check_int("group_size", group_size, minimum=1)
        if group_size > self.local_num_samples:
            raise InvalidInputError(
                f"group_size {group_size} exceeds the {self.local_num_samples} samples held"
            )
        self._current()
        coupled = self.view.batch_coupled()
        if coupled and group_size == 1:
            raise UnsupportedModelError(
                f"per-sample products are undefined under train-mode BatchNorm "
                f"({', '.join(coupled[:3])}): one sample has no batch statistics. Use "
                "group_size >= 2 (each group is normalised as its own mini-batch), call "
                "model.eval(), or build the estimator with mode='eval'"
            )
        block = v.T if v.ndim == 2 else v[None]
        with self._backend_errors("computing per-group products"):
            out = self._group_matvecs(block, group_size)
        self.n_matvecs += out.shape[0] * out.shape[1]
        return out if v.ndim == 2 else out[0]

    @property
    def sample_scale(self) -> float:
        """N / W: per-sample rows times this average to the full product.

        N is ``num_samples`` and W the loss normaliser summed over all data (N for a plain
        mean loss; for CrossEntropyLoss/NLLLoss the class weights of the labels that are
        not ``ignore_index``, summed; see :mod:`curvlab.losses`). A float.
        """
        return self.num_samples / self.normaliser

    # ------------------------------------------------------------------ diagonal
    def _exact_diagonal(self, progress: bool | None, callback) -> torch.Tensor | None:
        """The backend's own exact diagonal (BackPACK, KFAC), if it has one now."""
        if "diagonal" not in self.capabilities:
            return None
        self._current()
        self._refuse_coupled_batches()
        with self._backend_errors("computing the diagonal"):
            return self._diagonal()

    # ------------------------------------------------------------------ noise
    def noise_variance(
        self,
        batch_size: int = 128,
        n_probes: int = 10,
        method: str = "unbiased",
        subsample: int | torch.Tensor | None = None,
        seed: Seed = 0,
        *,
        group_size: int = 1,
        source: str = "matvec",
        population: float | None = None,
        progress: bool | None = None,
        callback=None,
    ) -> NoiseEstimate:
        """Hessian noise variance P^-1 E||H_B - H||_F^2 for batches of ``batch_size``.

        The paper's optimal damping (eq. 15): with one shared random unit probe v per round
        and u_i = H_i v for n groups of ``group_size`` samples,
        s2 = 1/(n-1) sum_i ||u_i - u_bar||^2 is unbiased for P^-1 E||H_i - H||_F^2, and a
        batch of B drawn without replacement from N samples has noise
        delta = (1/B - 1/N) * group_size * s2, averaged over the probes. Same as
        :func:`curvlab.noise.noise_variance` (its module docstring has the derivation).

        Parameters
        ----------
        batch_size : int, default 128
            B, the batch whose curvature noise is wanted (the optimizer's batch).
        n_probes : int, default 10
            Probe rounds; each costs one product per group. For ``source="diagonal"`` the
            number of jackknife folds behind the standard error (at least 2).
        method : {"unbiased", "paper"}, default "unbiased"
            ``"paper"`` is the paper's Algorithm 1 as printed, which subtracts
            (v^T H_bar v)^2 instead of ||H_bar v||^2 and is biased upwards by
            P/(P+2) x the spectral variance of H_bar; kept only for comparison.
        subsample : int or torch.Tensor, optional
            An int draws that many samples at random (seeded, in random order); a 1-D
            tensor of global indices picks those samples in that order. The estimate is
            formed on ``self.subset(...)``; S2 of a random subset is unbiased for that of all
            samples. Default: all samples held.
        seed : int or torch.Generator, default 0
            The probes and the subsample.
        group_size : int, default 1
            g; 1 is per-sample, ``batch_size`` is the paper's per-batch route. Groups are
            consecutive samples, so for g > 1 the data order must be random (``subsample``
            draws a random order).
        source : {"matvec", "diagonal"}, default "matvec"
            Probes through :meth:`group_matvecs`, or per-sample diagonals (BackPACK only;
            assumes off-diagonal noise as variable as the diagonal's).
        population : float, optional
            N in the factor 1/B - 1/N (default ``num_samples``); ``math.inf`` for batches
            drawn i.i.d. (factor 1/B).
        progress : bool, optional
            Show a progress bar on stderr (default: only when stderr is a terminal).
        callback : callable, optional
            Called with a :class:`~curvlab.progress.ProgressEvent` after every block of
            probes.

        Returns
        -------
        NoiseEstimate
            ``value`` (delta), ``stderr`` (the probes' spread and the groups' jackknife with
            the finite-population correction), ``per_probe`` values and the counts.

        Raises
        ------
        InvalidInputError
            For a bad option, a population smaller than ``batch_size``, or fewer than two
            groups.
        UnsupportedCapabilityError
            For ``source="diagonal"`` on a backend without per-sample diagonals.

        References
        ----------
        D. Granziol and N. Baskerville, "A random matrix theory approach to damping in deep
        learning", J. Phys. Complex. 3 (2022), eq. 15 and Algorithm 1.

        Examples
        --------
        >>> import torch, curvlab
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = torch.randn(64, 3, generator=g), torch.randn(64, 1, generator=g)
        >>> est = curvlab.estimator("autograd", torch.nn.Linear(3, 1), torch.nn.MSELoss(), (x, y))
        >>> small, large = est.noise_variance(batch_size=8), est.noise_variance(batch_size=32)
        >>> round(small.value / large.value, 6)  # (1/8 - 1/64) / (1/32 - 1/64)
        7.0
        """
        from curvlab.noise import noise_variance

        return noise_variance(
            self,
            batch_size=batch_size,
            n_probes=n_probes,
            method=method,
            subsample=subsample,
            group_size=group_size,
            source=source,
            population=population,
            seed=seed,
            progress=progress,
            callback=callback,
        )

    # ------------------------------------------------------------------ caching
    def keep_graphs(self, bytes_per_sample: float) -> bool:
        """Whether to cache per-batch graphs of ``bytes_per_sample`` each (see ``cache``).

        Parameters
        ----------
        bytes_per_sample : float
            The memory one sample's saved graph holds (measured by the backend).

        Returns
        -------
        bool
            ``cache`` itself when it is a bool; for ``"auto"``, whether the samples held
            fit in ``CACHE_BUDGET_BYTES``.
        """
        if self.cache != "auto":
            return bool(self.cache)
        return bytes_per_sample * self.local_num_samples <= CACHE_BUDGET_BYTES


def graph_bytes(build, *args: Any) -> tuple[Any, int]:
    """Run ``build(*args)`` and count the bytes of the distinct tensors autograd saves for it:
    the memory a cached graph holds. Returns (its result, bytes)."""
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        try:
            storage = t.untyped_storage()
            seen[(storage.data_ptr(), t.device)] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = build(*args)
    return result, sum(seen.values())


def finite_or_raise(loss: torch.Tensor, where: str) -> None:
    if not torch.isfinite(loss):
        raise NumericalError(f"the loss is {loss.item()} on {where}; check data and model")


__all__ = ["CACHE_BUDGET_BYTES", "CURVATURES", "CurvatureEstimator"]
