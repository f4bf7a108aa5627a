"""The reference backend: exact curvature products with plain autograd and torch.func.

- Hessian: double backward on a per-batch graph of ``S_b / W`` (the loss contract of
  :mod:`curvlab.losses`), cached between products or rebuilt per product (``cache``).
- GGN J^T H_out J, Fisher (type-2 = GGN for MSE/CE/BCE; Monte-Carlo with labels drawn from
  the model's predictive, seeded) and empirical Fisher (1/N) sum_n g_n g_n^T from output
  graphs: J v by the double-vjp trick, H_out w and J^T w by vjp.
- Per-group products with shared probes through ``torch.func.vmap`` over probes and groups
  (one decision per model: a model that cannot be vmapped is looped over, with the same
  numbers). Dropout masks of the whole batch are replayed on each group, so rows average to
  the full product; train-mode BatchNorm normalises each group as its own mini-batch.

Everything runs on the hook-free :class:`curvlab.model_view.ModelView` with parameters
substituted by ``torch.func.functional_call``, so the user's model keeps its mode, hooks,
buffers, ``.grad`` and RNG state.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.func import grad, jvp, vjp, vmap

from curvlab._params import flatten, unflatten
from curvlab._random import make_generator
from curvlab.errors import CurvlabWarning, UnsupportedModelError
from curvlab.estimator import CurvatureEstimator, finite_or_raise, graph_bytes
from curvlab.losses import LIKELIHOOD_LOSSES, sample_residuals
from curvlab.model_view import MaskTape
from curvlab.validation import check_bool, check_choice, check_int


def _grad(outputs, inputs, grad_outputs=None, create_graph=False):
    return torch.autograd.grad(
        outputs,
        inputs,
        grad_outputs=grad_outputs,
        retain_graph=True,
        create_graph=create_graph,
        allow_unused=True,
        materialize_grads=True,
    )


#: Above this many (parameters x samples per group), group products loop over groups.
VMAP_WORK = 10_000_000


class VmapDecision:
    """Whether ``torch.func.vmap`` works on a model: decided once, shared by the estimators
    made from one another with ``with_data``/``subset`` (None: not tried yet).

    Parameters
    ----------
    vectorize : bool or None
        The user's ``vectorize=`` option: True or False fixes the decision, None lets the
        first vmapped call decide (a failure falls back to a loop, with the same numbers).

    Examples
    --------
    >>> from curvlab.adapters.autograd import VmapDecision
    >>> VmapDecision(None).ok, VmapDecision(False).ok
    (None, False)
    """

    def __init__(self, vectorize: bool | None):
        self.requested = vectorize
        self.ok: bool | None = None if vectorize is None else bool(vectorize)


class AutogradEstimator(CurvatureEstimator):
    """Exact curvature products by autograd (see module docstring).

    Parameters
    ----------
    model : nn.Module
        See :class:`curvlab.CurvatureEstimator` (also for the next eight parameters).
    loss_fn : callable
        ``loss_fn(model(x), y)``, mean-reduced.
    data : (x, y) or iterable of (x, y)
        One batch or an iterable of batches.
    curvature : {"hessian", "ggn", "fisher", "ef"}, default "hessian"
        The curvature.
    params : iterable of torch.Tensor, optional
        The parameters to differentiate (default: those with ``requires_grad``).
    fisher_type : {"type-2", "mc"}, default "type-2"
        For ``curvature="fisher"``: the exact type-2 Fisher (= GGN) or a Monte-Carlo one
        with ``mc_samples`` labels per sample drawn from the model's predictive (``seed``).
    mc_samples : int, default 1
        Labels drawn per sample for the Monte-Carlo Fisher.
    vectorize : bool or None, default None
        Group products and per-sample gradients with ``torch.func.vmap`` (True), a Python
        loop (False), or vmap with a loop fallback decided once per model (None).
    chunk_size : int, default 512
        Groups per vmap call (bounds memory).
    mode : {None, "train", "eval"}, default None
        The train/eval mode of the view (None: the model's own flags).
    seed : int or torch.Generator, default 0
        Dropout masks (batch i under ``seed + i``) and Monte-Carlo labels.
    cache : {True, False, "auto"}, default "auto"
        Keep per-batch graphs between products.
    distributed : bool, optional
        Reduce over ``torch.distributed`` ranks (default: when initialised).

    Raises
    ------
    UnsupportedModelError
        For the Fisher of a loss without a likelihood (use ``curvature="ggn"``).

    References
    ----------
    B. A. Pearlmutter, "Fast exact multiplication by the Hessian", Neural Comput. 6 (1994).
    N. N. Schraudolph, "Fast curvature matrix-vector products for second-order gradient
    descent", Neural Comput. 14 (2002). J. Martens, "New insights and perspectives on the
    natural gradient method", JMLR 21 (2020).

    Examples
    --------
    For a linear model under MSELoss the Hessian and the GGN are both 2 E[x x^T]:

    >>> import torch, curvlab
    >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    >>> model = torch.nn.Linear(2, 1, bias=False).double()
    >>> est = curvlab.estimator("autograd", model, torch.nn.MSELoss(),
    ...                         (x, torch.zeros(2, 1, dtype=torch.float64)), curvature="ggn")
    >>> est.to_dense()
    tensor([[1., 0.],
            [0., 4.]], dtype=torch.float64)
    """

    backend = "autograd"
    alternative = (
        "check that the model and loss are differentiable functions of the parameters (the "
        "autograd backend is the reference that handles every such model)"
    )
    supported_curvatures = frozenset({"hessian", "ggn", "fisher", "ef"})
    base_capabilities = frozenset({"matvec", "group_matvecs", "per_sample_gradients"})

    def __init__(
        self,
        model: nn.Module,
        loss_fn,
        data,
        curvature: str = "hessian",
        params=None,
        *,
        fisher_type: str = "type-2",
        mc_samples: int = 1,
        vectorize: bool | None = None,
        chunk_size: int = 512,
        mode: str | None = None,
        seed=0,
        cache: bool | str = "auto",
        distributed: bool | None = None,
    ):
        super().__init__(
            model, loss_fn, data, curvature, params,
            mode=mode, seed=seed, cache=cache, distributed=distributed,
        )
        check_choice("fisher_type", fisher_type, ("type-2", "mc"))
        mc_samples = check_int("mc_samples", mc_samples, minimum=1)
        check_bool("vectorize", vectorize, allow_none=True)
        chunk_size = check_int("chunk_size", chunk_size, minimum=1)
        self.kind = self.loss.kind
        if curvature == "fisher" and (self.kind is None or self.sample_scale != 1.0):
            raise UnsupportedModelError(
                f"the Fisher needs a likelihood: use {LIKELIHOOD_LOSSES} (mean reduction, no "
                "class weights, no ignored labels), or curvature='ggn' for any loss"
            )
        self.fisher_type = fisher_type if curvature == "fisher" else None
        self.mc_samples = mc_samples
        self.chunk_size = chunk_size
        self._vmap = VmapDecision(vectorize)
        self._keep: bool | None = None
        self.release()

    @property
    def vectorize(self) -> bool | None:
        """Whether group products are vmapped (None until first tried)."""
        return self._vmap.ok

    # ------------------------------------------------------------------ graphs
    def release(self) -> None:
        self._graphs: list[dict] | None = None
        self._residuals: list[torch.Tensor] | None = None
        self._masks: list[torch.Tensor] | None = None

    def _state(self, ps) -> dict[str, torch.Tensor]:
        return dict(zip(self.param_names, ps))

    def _mc_generator(self) -> torch.Generator:
        return make_generator(self.seed, self.device)

    def _iter_graphs(self):
        """Per-batch graphs for the current weights: cached, or built one at a time. MC
        labels are drawn with the estimator's seed whenever the graphs are (re)built."""
        if self._graphs is not None:
            yield from self._graphs
            return
        gen = self._mc_generator()
        residuals, kept = [], []
        for i, (x, y) in enumerate(self.batches):
            if self._keep is None:
                g, nbytes = graph_bytes(self._batch_graph, i, x, y, gen)
                self._keep = self.keep_graphs(nbytes / x.shape[0])
            else:
                g = self._batch_graph(i, x, y, gen)
            if self.fisher_type == "mc":
                residuals.append(g["res"])
            if self._keep:
                kept.append(g)
            yield g
        self._residuals = residuals
        if self._keep:
            self._graphs = kept

    def _batch_graph(self, i: int, x: torch.Tensor, y: torch.Tensor, gen) -> dict:
        """Batch i's graph of S_b / W (its masks drawn under the batch's seed)."""

        def forward(ps):
            return self.forward_batch(i, self._state(ps), x)

        def residuals(out):
            return sample_residuals(self.kind, out, self.mc_samples, gen)

        return self._graph(forward, y, 1.0 / self.normaliser, residuals, f"batch {i}")

    def _graph(self, forward, y: torch.Tensor, scale: float, residuals, where: str) -> dict:
        """The graph of ``scale * S(forward(params), y)`` that curvature products reuse.

        With s = ``scale``, a per-sample contribution c_n enters as s c_n, so the empirical
        Fisher's per-sample outer products (weight s N / W each) take the factor
        (N / W) / s, and the MC Fisher's sampled ones (likelihood losses, N = W) the factor s.
        ``residuals(out)`` draws the MC Fisher's labels (or is a fixed tensor).
        """
        ps = [p.detach().requires_grad_() for p in self.params]
        out = forward(ps)
        if self.curvature == "hessian":
            loss = scale * self.loss.summed(out, y)
            finite_or_raise(loss, where)
            return {"ps": ps, "grads": _grad(loss, ps, create_graph=True)}
        out_d = out.detach().requires_grad_()
        loss = scale * self.loss.summed(out_d, y)
        finite_or_raise(loss, where)
        g_out = _grad(loss, out_d, create_graph=True)[0]
        u = torch.zeros_like(out, requires_grad=True)
        entry = {
            "ps": ps, "out": out, "out_d": out_d, "g_out": g_out, "u": u,
            "jtu": _grad(out, ps, grad_outputs=u, create_graph=True),
        }
        if self.curvature == "ef":
            entry["res"] = g_out.detach().reshape(1, out.shape[0], -1)
            entry["scale"] = self.sample_scale / scale
        elif self.fisher_type == "mc":
            entry["res"] = residuals(out_d) if callable(residuals) else residuals
            entry["scale"] = scale
        return entry

    # ------------------------------------------------------------------ products
    def _local_matvec(self, V: torch.Tensor) -> torch.Tensor:
        total = None
        for g in self._iter_graphs():
            cols = torch.stack(
                [flatten(self._graph_product(g, unflatten(V[:, j], self.params)))
                 for j in range(V.shape[1])],
                dim=1,
            )
            total = cols if total is None else total.add_(cols)
        return total

    def _graph_product(self, g: dict, vs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if self.curvature == "hessian":
            return _grad(g["grads"], g["ps"], grad_outputs=vs)
        jv = _grad(g["jtu"], g["u"], grad_outputs=vs)[0]
        if "res" in g:
            z = _factor_product(g["res"], jv, g["scale"])
        else:
            z = _grad(g["g_out"], g["out_d"], grad_outputs=jv)[0]
        return _grad(g["out"], g["ps"], grad_outputs=z)

    # ------------------------------------------------------------------ groups
    def _batch_masks(self) -> list[torch.Tensor]:
        """The dropout masks of every batch's forward (replayed on sample subsets), each
        concatenated over batches: [N, ...] per stochastic-layer call."""
        if self._masks is None:
            if not self.view.stochastic():
                self._masks = []
            else:
                per_batch = []
                with torch.no_grad():
                    for i, (x, _) in enumerate(self.batches):
                        tape = MaskTape()
                        self.forward_batch(i, {}, x, tape=tape)
                        per_batch.append(tape.masks)
                self._masks = [torch.cat(ms) for ms in zip(*per_batch)]
        return self._masks

    def _samples(self):
        """All samples, their dropout masks and (MC Fisher) sampled residuals."""
        x, y = self.concatenated()
        res = None
        if self.fisher_type == "mc":
            if self._residuals is None:
                for _ in self._iter_graphs():  # draws the labels for the current weights
                    pass
            res = torch.cat(self._residuals, dim=1)
        return x, y, self._batch_masks(), res

    def _group_fn(self, group_size: int):
        """f(x_g, y_g, masks_g, r_g, V) -> [k, P]: one group's curvature times the probe rows
        of V, scaled so rows average to the full product. Second derivatives are
        reverse-over-reverse (forward-over-reverse hits immutable ZeroTensors in MSELoss):
        the Hessian's forward pass and first backward are shared by the probes (a vjp of
        the gradient), except under batch-coupled layers, whose double backward a vjp of the
        gradient breaks under vmap: there each probe differentiates its own directional
        derivative."""
        primals = tuple(p.detach() for p in self.params)
        scale = self.sample_scale / group_size
        shared = not self.view.batch_coupled()

        def forward(ps, x, masks):
            return self.view.forward(self._state(ps), x, tape=MaskTape(replay=masks))

        def product(x, y, masks, r, V):
            if self.curvature == "hessian" and shared:
                loss = lambda ps: scale * self.loss.summed(forward(ps, x, masks), y)  # noqa: E731
                _, pullback = vjp(grad(loss), primals)
                return vmap(lambda v: flatten(pullback(tuple(unflatten(v, self.params)))[0]))(V)
            if self.curvature == "hessian":

                def hvp(v):
                    vs = tuple(unflatten(v, self.params))

                    def directional(ps):  # v^T grad L(ps): its gradient is H v
                        loss = lambda q: scale * self.loss.summed(forward(q, x, masks), y)  # noqa: E731
                        return sum((gi * vi).sum() for gi, vi in zip(grad(loss)(ps), vs))

                    return flatten(grad(directional)(primals))

                return vmap(hvp)(V)

            def one(v):
                vs = tuple(unflatten(v, self.params))
                out, jv = jvp(lambda ps: forward(ps, x, masks), (primals,), (vs,))
                if self.curvature == "ef":
                    g_out = grad(lambda o: scale * self.loss.summed(o, y))(out)
                    factors = g_out.reshape(1, out.shape[0], -1)
                    z = _factor_product(factors, jv, self.sample_scale / scale)
                elif r is not None:
                    z = _factor_product(r, jv, scale)
                else:

                    def directional(o):  # jv^T grad_o L: its gradient is H_out jv
                        return (grad(lambda q: scale * self.loss.summed(q, y))(o) * jv).sum()

                    z = grad(directional)(out)
                _, pullback = vjp(lambda ps: forward(ps, x, masks), primals)
                return flatten(pullback(z)[0])

            return vmap(one)(V)

        return product

    def _group_graph_rows(self, args, V: torch.Tensor, group_size: int) -> torch.Tensor:
        """[k, G, P] by a loop over groups: one graph per group serves every probe; the
        products are written straight into the output (no flatten/stack copies of P-sized
        vectors, which dominate on large models)."""
        x, y, masks, res = args
        scale = self.sample_scale / group_size
        probes = [unflatten(v, self.params) for v in V.contiguous()]
        out = V.new_empty(V.shape[0], x.shape[0], self.num_params)
        for j in range(x.shape[0]):
            mj = [m[j] for m in masks]

            def forward(ps, xj=x[j], mj=mj):
                return self.view.forward(self._state(ps), xj, tape=MaskTape(replay=mj))

            g = self._graph(forward, y[j], scale, None if res is None else res[j], f"group {j}")
            for i, vs in enumerate(probes):
                _write_flat(out[i, j], self._graph_product(g, vs))
        return out

    def _group_matvecs(self, V: torch.Tensor, group_size: int) -> torch.Tensor:
        x, y, masks, res = self._samples()
        n_groups = self.local_num_samples // group_size
        used = n_groups * group_size

        def grouped(t):
            return t[:used].reshape(n_groups, group_size, *t.shape[1:])

        args = [grouped(x), grouped(y), [grouped(m) for m in masks], None]
        if res is not None:  # [M, N, D] -> [G, M, g, D]
            args[3] = res[:, :used].reshape(res.shape[0], n_groups, group_size, -1).transpose(0, 1)
        in_dims = (0, 0, 0, None if res is None else 0, None)
        fn = self._group_fn(group_size)
        return self._mapped(
            lambda: vmap(fn, in_dims=in_dims, chunk_size=self.chunk_size, randomness="error")(
                *args, V
            ).transpose(0, 1),
            lambda: self._group_graph_rows(args, V, group_size),
            work=self.num_params * group_size,
        )

    def per_sample_gradients(self) -> torch.Tensor:
        """[N, P]: per-sample gradients g_n = (N / W) grad c_n, whose mean is the gradient
        of the loss (for a plain mean loss, the gradient of each sample's loss).

        Returns
        -------
        torch.Tensor
            [N, P] over the samples this process holds, in data order.

        Raises
        ------
        UnsupportedModelError
            Under train-mode BatchNorm (one sample has no batch statistics).

        Examples
        --------
        >>> import torch, curvlab
        >>> x, y = torch.randn(5, 2), torch.randn(5, 1)
        >>> model, loss_fn = torch.nn.Linear(2, 1), torch.nn.MSELoss()
        >>> G = curvlab.estimator("autograd", model, loss_fn, (x, y)).per_sample_gradients()
        >>> full = torch.autograd.grad(loss_fn(model(x), y), list(model.parameters()))
        >>> G.shape, torch.allclose(G.mean(0), torch.cat([g.reshape(-1) for g in full]))
        (torch.Size([5, 3]), True)
        """
        self._current()
        coupled = self.view.batch_coupled()
        if coupled:
            raise UnsupportedModelError(
                f"per-sample gradients are undefined under train-mode BatchNorm "
                f"({', '.join(coupled[:3])}); call model.eval() or use mode='eval'"
            )
        x, y, masks, _ = self._samples()
        primals = tuple(p.detach() for p in self.params)
        scale = self.sample_scale

        def sample_grad(xi, yi, mi):
            def loss_of(ps):
                out = self.view.forward(
                    self._state(ps), xi[None], tape=MaskTape(replay=[m[None] for m in mi])
                )
                return scale * self.loss.summed(out, yi[None])

            return flatten(grad(loss_of)(primals))

        with self._backend_errors("computing per-sample gradients"):
            return self._mapped(
                lambda: vmap(sample_grad, randomness="error")(x, y, masks),
                lambda: torch.stack(
                    [sample_grad(x[i], y[i], [m[i] for m in masks]) for i in range(x.shape[0])]
                ),
                work=self.num_params,
            )

    def _mapped(self, vectorized, looped, work: int):
        """Run ``vectorized()`` (torch.func.vmap) or ``looped()``, with the same numbers.

        The path is decided once per model (shared through ``with_data``): ``vectorize``
        True/False forces it; None vmaps while a group's work (parameters x samples) is at
        most ``VMAP_WORK`` and loops above it (one graph per group then serves all probes,
        and batched convolution weight gradients under vmap cost more than they save), and
        falls back to the loop, once and with a warning, if vmap cannot handle the model.
        """
        if self._vmap.ok is None and work > VMAP_WORK:
            self._vmap.ok = False
        if self._vmap.ok is not False:
            try:
                out = vectorized()
            except UnsupportedModelError:
                raise
            except Exception as exc:
                if "randomness" in str(exc):
                    raise UnsupportedModelError(
                        "the model draws random numbers in train mode outside nn.Dropout "
                        "layers (e.g. a functional dropout or a recurrent layer's dropout), so "
                        "per-sample and per-group products cannot reuse the whole batch's "
                        "masks; call model.eval() or build the estimator with mode='eval'"
                    ) from exc
                if self._vmap.ok:
                    raise UnsupportedModelError(
                        f"torch.func.vmap cannot vectorize this model ({type(exc).__name__}: "
                        f"{exc}); use vectorize=False"
                    ) from exc
                warnings.warn(
                    f"vmap failed ({type(exc).__name__}: {exc}); looping over samples/groups "
                    "for this model from now on",
                    CurvlabWarning,
                    stacklevel=5,
                )
                self._vmap.ok = False
            else:
                self._vmap.ok = True
                return out
        return looped()


def _write_flat(target: torch.Tensor, parts) -> None:
    """Copy per-parameter tensors into the flat [P] ``target`` in order."""
    start = 0
    for t in parts:
        n = t.numel()
        target[start : start + n].view(t.shape).copy_(t)
        start += n


def _factor_product(r: torch.Tensor, jv: torch.Tensor, scale: float) -> torch.Tensor:
    """Output-space product scale * sum_n mean_m r_mn r_mn^T (J v)_n for factors r [M, n, D]."""
    n = jv.shape[0]
    coeff = (r * jv.reshape(1, n, -1)).sum(-1, keepdim=True)
    return (scale * (r * coeff).mean(0)).reshape(jv.shape)


__all__ = ["VMAP_WORK", "AutogradEstimator", "VmapDecision"]
