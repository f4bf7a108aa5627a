"""PyHessian 0.1 behind the curvlab interface, shielded from its defects (DESIGN.md section 5).

Products use PyHessian's fast path: one ``pyhessian.hessian`` object per batch (its
single-batch mode caches ``gradsH`` with a graph) and its ``hessian_vector_product``, the
batches summed with the loss normaliser of :mod:`curvlab.losses`. With ``cache=False`` (or
``"auto"`` above the memory budget) the graph is rebuilt for every product instead of kept.

PyHessian never sees the user's model: it gets a small module around the estimator's
hook-free view (:mod:`curvlab.model_view`) whose parameters are aliases of the user's. So:

- its constructor's ``model.eval()`` cannot switch modes: the curvature is that of the model
  in the mode the user holds it (curvlab's convention for every backend; pass
  ``mode="eval"`` for PyHessian's own eval-mode convention);
- its ``loss.backward(create_graph=True)`` writes ``.grad`` on the aliases only (cleared at
  once; the graph lives in the cached ``gradsH`` and goes with :meth:`release`);
- the user's hooks do not fire, and dropout masks come from the estimator's seed;
- ``cuda=True`` default that moves only the data: the flag follows the parameters' device;
- ``trace()`` stopping after 2 samples when the trace is negative and returning a list:
  :meth:`native_trace` runs its Hutchinson loop with a symmetric stopping rule and returns
  an :class:`~curvlab.Estimate` with a standard error;
- ``density()`` crashing on the removed ``torch.eig``: :meth:`native_density` runs its
  Lanczos iteration with its own helpers and diagonalises the tridiagonal matrix with
  ``torch.linalg.eigh``, returning a :class:`~curvlab.SpectralDensity` comparable with
  curvlab's stochastic Lanczos quadrature;
- unseeded ``torch.randn`` probes: every random routine takes ``seed``.

:meth:`power_eigenvalues` is PyHessian's deflated power iteration, counted in matvecs.
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext

import torch
from pyhessian import hessian as PyHessian
from pyhessian.utils import (
    group_add,
    group_product,
    hessian_vector_product,
    normalization,
    orthnormal,
)
from torch import nn

from curvlab._params import flatten, unflatten
from curvlab._random import Seed, gaussian, make_generator, rademacher
from curvlab.errors import UnsupportedModelError
from curvlab.estimator import CurvatureEstimator, graph_bytes
from curvlab.model_view import no_global_hooks
from curvlab.results import Eigenpairs, Estimate, SpectralDensity
from curvlab.validation import check_int, check_positive


class _PyHessianModel(nn.Module):
    """What PyHessian is given: the estimator's view on one batch. Its parameters are the
    view's aliases; ``train()``/``eval()`` are no-ops, so PyHessian cannot switch modes."""

    def __init__(self, est: CurvatureEstimator, batch: int):
        super().__init__()
        self.inner = est.view.module
        self._est, self._batch = est, batch

    def train(self, mode: bool = True) -> _PyHessianModel:
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._est.forward_batch(self._batch, {}, x)


class PyHessianEstimator(CurvatureEstimator):
    """Hessian products through PyHessian's cached graph (see module docstring).

    Parameters
    ----------
    model : nn.Module
        See :class:`curvlab.CurvatureEstimator` (also for the next parameters).
    loss_fn : callable
        ``loss_fn(model(x), y)``, mean-reduced.
    data : (x, y) or iterable of (x, y)
        One batch or an iterable of batches.
    curvature : {"hessian"}, default "hessian"
        PyHessian computes Hessian products only.
    params : iterable of torch.Tensor, optional
        The parameters (default: those with ``requires_grad``); all must reach the
        second-order graph.
    mode : {None, "train", "eval"}, default None
        The train/eval mode of the view (PyHessian's own switch to eval mode is disabled).
    seed : int or torch.Generator, default 0
        Dropout masks (batch i under ``seed + i``).
    cache : {True, False, "auto"}, default "auto"
        Keep PyHessian's per-batch graphs between products.
    distributed : bool, optional
        Reduce over ``torch.distributed`` ranks (default: when initialised).

    References
    ----------
    Z. Yao, A. Gholami, K. Keutzer and M. W. Mahoney, "PyHessian: neural networks through
    the lens of the Hessian", IEEE BigData (2020).

    Examples
    --------
    >>> import torch, curvlab
    >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    >>> model = torch.nn.Linear(2, 1, bias=False).double()
    >>> est = curvlab.estimator("pyhessian", model, torch.nn.MSELoss(),
    ...                         (x, torch.zeros(2, 1, dtype=torch.float64)))
    >>> pairs = est.power_eigenvalues(top_n=2, tol=1e-8)  # PyHessian's own algorithm
    >>> [round(v, 4) for v in pairs.values.tolist()], pairs.converged
    ([4.0, 1.0], True)
    """

    backend = "pyhessian"
    supported_curvatures = frozenset({"hessian"})
    base_capabilities = frozenset({"matvec", "power_iteration", "native_trace", "native_density"})

    def __init__(
        self,
        model,
        loss_fn,
        data,
        curvature="hessian",
        params=None,
        *,
        mode: str | None = None,
        seed: Seed = 0,
        cache: bool | str = "auto",
        distributed: bool | None = None,
    ):
        super().__init__(
            model, loss_fn, data, curvature, params,
            mode=mode, seed=seed, cache=cache, distributed=distributed,
        )
        self._keep: bool | None = None
        self.release()

    def release(self) -> None:
        self._graphs: list[tuple[list[torch.Tensor], tuple]] | None = None

    def _build(self, i: int) -> tuple[list[torch.Tensor], tuple]:
        """PyHessian's object for batch ``i``: (its params, its gradsH) in our order."""
        x, y = self.batches[i]
        aliases = self.view.parameters
        for p in self.view.module.parameters():
            p.grad = None
        device = torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext()
        try:
            with warnings.catch_warnings(), device, no_global_hooks():
                warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph")
                h = PyHessian(
                    _PyHessianModel(self, i),
                    lambda out, target: self.loss.summed(out, target) / self.normaliser,
                    data=(x, y),
                    cuda=self.device.type == "cuda",
                )
        finally:
            for p in self.view.module.parameters():
                p.grad = None
        index = {id(p): j for j, p in enumerate(h.params)}
        order = [index[id(p)] for p in aliases]
        grads = tuple(h.gradsH[j] for j in order)
        unused = [
            name
            for name, g in zip(self.param_names, grads)
            if not (isinstance(g, torch.Tensor) and g.requires_grad)
        ]
        if unused:
            raise UnsupportedModelError(
                f"PyHessian needs every parameter in the second-order graph, but "
                f"{', '.join(unused)} do not reach it; pass params= without them, or use "
                "backend 'autograd'"
            )
        return [h.params[j] for j in order], grads

    def _iter_graphs(self):
        if self._graphs is not None:
            yield from self._graphs
            return
        kept = []
        for i, (x, _) in enumerate(self.batches):
            if self._keep is None:
                g, nbytes = graph_bytes(self._build, i)
                self._keep = self.keep_graphs(nbytes / x.shape[0])
            else:
                g = self._build(i)
            if self._keep:
                kept.append(g)
            yield g
        if self._keep:
            self._graphs = kept

    # ------------------------------------------------------------------ products
    def _hv(self, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        """PyHessian's Hessian-vector product, summed over batches (parameter shapes)."""
        total = None
        for params, grads in self._iter_graphs():
            prod = hessian_vector_product(grads, params, vs)
            total = list(prod) if total is None else [a.add_(t) for a, t in zip(total, prod)]
        return total

    def _local_matvec(self, V: torch.Tensor) -> torch.Tensor:
        cols = [flatten(self._hv(unflatten(V[:, j], self.params))) for j in range(V.shape[1])]
        return torch.stack(cols, dim=1)

    def _counted_hv(self, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        """A product for PyHessian's own algorithms (parameter shapes), through ``matvec``:
        counted, checked and averaged over ranks like every other product."""
        return unflatten(self.matvec(flatten(vs)), self.params)

    def _probe(self, draw, gen: torch.Generator) -> list[torch.Tensor]:
        v = draw((self.num_params,), generator=gen, dtype=self.dtype, device=self.device)
        return unflatten(v, self.params)

    # ------------------------------------------------------------------ PyHessian's algorithms
    def power_eigenvalues(
        self, top_n: int = 1, maxIter: int = 100, tol: float = 1e-3, seed: Seed = 0
    ) -> Eigenpairs:
        """PyHessian's ``eigenvalues()``: deflated power iteration, largest |lambda| first.

        Stops each eigenvalue when |lambda_t - lambda_{t-1}| / (|lambda_{t-1}| + 1e-6) < tol
        (PyHessian's rule). Vectors are PyHessian's (the normalised last product); residuals
        are ||H v - lambda v|| of the last Rayleigh pair (no extra products).

        Parameters
        ----------
        top_n : int, default 1
            Eigenvalues to compute (at most P).
        maxIter : int, default 100
            Power iterations per eigenvalue.
        tol : float, default 1e-3
            PyHessian's relative stopping tolerance.
        seed : int or torch.Generator, default 0
            The start vectors.

        Returns
        -------
        Eigenpairs
            Sorted descending; ``converged`` False when an eigenvalue hit ``maxIter``.
        """
        top_n = check_int("top_n", top_n, minimum=1, maximum=self.num_params)
        maxIter = check_int("maxIter", maxIter, minimum=1)
        tol = check_positive("tol", tol)
        gen = make_generator(seed, self.device)
        start = self.n_matvecs
        values, vectors, residuals, converged = [], [], [], True
        while len(values) < top_n:
            eigenvalue, done = None, False
            v = normalization(self._probe(gaussian, gen))
            for _ in range(maxIter):
                v = orthnormal(v, vectors)
                hv = self._counted_hv(v)
                current = group_product(hv, v).item()
                residual = flatten(hv) - current * flatten(v)
                v = normalization(hv)
                if eigenvalue is not None:
                    if abs(eigenvalue - current) / (abs(eigenvalue) + 1e-6) < tol:
                        done = True
                        break
                eigenvalue = current
            values.append(current)
            vectors.append(v)
            residuals.append(residual.norm().item())
            converged &= done
        order = sorted(range(top_n), key=lambda i: -values[i])
        return Eigenpairs(
            values=torch.tensor([values[i] for i in order], dtype=self.dtype),
            vectors=torch.stack([flatten(vectors[i]) for i in order], dim=1),
            residuals=torch.tensor([residuals[i] for i in order], dtype=self.dtype),
            n_matvecs=self.n_matvecs - start,
            converged=converged,
        )

    def native_trace(self, maxIter: int = 100, tol: float = 1e-3, seed: Seed = 0) -> Estimate:
        """PyHessian's Hutchinson trace with Rademacher probes, as an estimate with stderr.

        Stops once |mean_t - mean_{t-1}| / (|mean_{t-1}| + 1e-6) < tol after at least two
        samples (PyHessian divides by the signed trace and so stops at once when it is
        negative). stderr = sample std / sqrt(n).

        Parameters
        ----------
        maxIter : int, default 100
            Most probes (at least 2).
        tol : float, default 1e-3
            The relative stopping tolerance (> 0).
        seed : int or torch.Generator, default 0
            The probes.

        Returns
        -------
        Estimate
            ``value``, ``stderr``, ``n_matvecs`` and the ``samples``.

        Raises
        ------
        InvalidInputError
            For ``maxIter < 2`` or ``tol <= 0``.

        References
        ----------
        M. F. Hutchinson, "A stochastic estimator of the trace of the influence matrix for
        Laplacian smoothing splines", Commun. Stat. Simul. Comput. 18 (1989).
        """
        maxIter = check_int("maxIter", maxIter, minimum=2, fix="a standard error needs two samples")
        check_positive("tol", tol)
        gen = make_generator(seed, self.device)
        samples: list[float] = []
        previous = 0.0
        for _ in range(maxIter):
            v = self._probe(rademacher, gen)
            samples.append(group_product(self._counted_hv(v), v).item())
            mean = sum(samples) / len(samples)
            if len(samples) >= 2 and abs(mean - previous) / (abs(previous) + 1e-6) < tol:
                break
            previous = mean
        values = torch.tensor(samples, dtype=self.dtype)
        return Estimate(
            value=float(values.mean()),
            stderr=float(values.std() / math.sqrt(len(samples))),
            n_matvecs=len(samples),
            samples=values,
        )

    def native_density(
        self,
        iter: int = 100,
        n_v: int = 1,
        seed: Seed = 0,
        num_bins: int = 10000,
        sigma_squared: float = 1e-5,
        overhead: float = 0.01,
    ) -> SpectralDensity:
        """PyHessian's ``density()``: Lanczos with full reorthogonalisation from Rademacher
        probes, Ritz values as nodes and squared first eigenvector entries as weights.

        The probes are those :func:`curvlab.spectral.slq.spectral_density` draws for the same
        ``seed``, so the two quadratures can be compared probe by probe.

        The broadened density follows PyHessian's companion ``density_generate``: Gaussians
        of variance sigma_squared * max(1, range) on ``num_bins`` points spanning the mean
        extreme nodes +- ``overhead``, normalised to integrate to one.

        Parameters
        ----------
        iter : int, default 100
            Lanczos steps per probe (at most P).
        n_v : int, default 1
            Probes.
        seed : int or torch.Generator, default 0
            The probes and breakdown restarts.
        num_bins : int, default 10000
            Grid points of the broadened density.
        sigma_squared : float, default 1e-5
            Relative variance of each node's Gaussian.
        overhead : float, default 0.01
            Margin of the grid beyond the extreme nodes.

        Returns
        -------
        SpectralDensity
            Nodes and weights [n_v, iter], the grid and density (no log grid).

        References
        ----------
        Z. Yao, A. Gholami, K. Keutzer and M. W. Mahoney, "PyHessian: neural networks
        through the lens of the Hessian", IEEE BigData (2020). S. Ubaru, J. Chen and Y.
        Saad, "Fast estimation of tr(f(A)) via stochastic Lanczos quadrature", SIAM J.
        Matrix Anal. Appl. 38 (2017).
        """
        iter = check_int("iter", iter, minimum=1, maximum=self.num_params,
                         fix="Lanczos cannot take more steps than the dimension num_params")
        n_v = check_int("n_v", n_v, minimum=1)
        gen = make_generator(seed, self.device)
        starts = rademacher(
            (self.num_params, n_v), generator=gen, dtype=self.dtype, device=self.device
        )
        nodes, weights = [], []
        for j in range(n_v):
            alphas, betas = self._lanczos(unflatten(starts[:, j], self.params), iter, gen)
            T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
            off = torch.tensor(betas, dtype=torch.float64)
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
            evals, evecs = torch.linalg.eigh(T)
            nodes.append(evals)
            weights.append(evecs[0, :] ** 2)
        nodes_t, weights_t = torch.stack(nodes), torch.stack(weights)
        grid, density, sigma = _broaden(nodes_t, weights_t, num_bins, sigma_squared, overhead)
        return SpectralDensity(
            nodes=nodes_t,
            weights=weights_t,
            grid=grid,
            density=density,
            log_grid=None,
            log_density=None,
            sigma=sigma,
            n_matvecs=iter * n_v,
        )

    def _lanczos(
        self, start: list[torch.Tensor], steps: int, gen: torch.Generator
    ) -> tuple[list[float], list[float]]:
        """The iteration inside PyHessian's ``density()``, with its helpers, seeded."""
        v = normalization(start)
        v_list = [v]
        alphas: list[float] = []
        betas: list[float] = []
        w = None
        for i in range(steps):
            if i > 0:
                beta = torch.sqrt(group_product(w, w))
                betas.append(beta.item())
                if betas[-1] == 0.0:
                    w = self._probe(gaussian, gen)
                v = orthnormal(w, v_list)
                v_list.append(v)
            w_prime = self._counted_hv(v)
            alpha = group_product(w_prime, v)
            alphas.append(alpha.item())
            w = group_add(w_prime, v, alpha=-alpha)
            if i > 0:
                w = group_add(w, v_list[-2], alpha=-beta)
        return alphas, betas


def _broaden(nodes, weights, num_bins: int, sigma_squared: float, overhead: float):
    """PyHessian's ``density_generate`` on torch tensors: (grid, density, sigma)."""
    lam_max = nodes.max(dim=1).values.mean().item() + overhead
    lam_min = nodes.min(dim=1).values.mean().item() - overhead
    grid = torch.linspace(lam_min, lam_max, num_bins, dtype=torch.float64)
    var = sigma_squared * max(1.0, lam_max - lam_min)
    diff = grid[None, None, :] - nodes[:, :, None]
    kernel = torch.exp(-(diff**2) / (2 * var)) / math.sqrt(2 * math.pi * var)
    density = (weights[:, :, None] * kernel).sum(dim=1).mean(dim=0)
    density = density / (density.sum() * (grid[1] - grid[0]))
    return grid, density, math.sqrt(var)


__all__ = ["PyHessianEstimator"]
