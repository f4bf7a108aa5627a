"""The reference backend: exact curvature products with plain autograd and torch.func.

- Hessian: double backward on a graph cached per batch (repeated products on fixed data
  reuse the forward pass and the first backward).
- GGN J^T H_out J, Fisher (type-2 = GGN for MSE/CE/BCE; Monte-Carlo with labels drawn once
  from the model's predictive) and empirical Fisher (1/N) sum_n g_n g_n^T, from cached
  output graphs: J v by the double-vjp trick, H_out w and J^T w by vjp.
- Per-group products with one shared probe through ``torch.func.vmap`` over groups, and a
  loop over the same function when the model cannot be vmapped (same numbers).

Parameters are differentiated through ``torch.func.functional_call`` on detached aliases,
and buffers are passed as clones, so the user's model keeps its mode, hooks, buffers and
``.grad``. A cached graph is rebuilt when the parameters change in place (an optimizer step).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from curvlab._params import flatten, unflatten
from curvlab._random import Seed, make_generator
from curvlab.errors import CurvlabWarning, InvalidInputError, NumericalError, UnsupportedModelError
from curvlab.estimator import CurvatureEstimator

from ._losses import SUPPORTED, check_scalar_mean_loss, loss_kind, sample_residuals


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


class AutogradEstimator(CurvatureEstimator):
    """Exact curvature products by autograd (see module docstring).

    Extra options: ``fisher_type`` ("type-2" or "mc"), ``mc_samples`` and ``seed`` for the
    Monte-Carlo Fisher, ``vectorize`` (None: try vmap, fall back to a loop; True; False),
    ``chunk_size`` (groups per vmap call).
    """

    backend = "autograd"
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
        seed: Seed = 0,
        vectorize: bool | None = None,
        chunk_size: int = 512,
        distributed: bool | None = None,
    ):
        super().__init__(model, loss_fn, data, curvature, params, distributed=distributed)
        if fisher_type not in ("type-2", "mc"):
            raise InvalidInputError(f"fisher_type must be 'type-2' or 'mc', got {fisher_type!r}")
        if mc_samples < 1:
            raise InvalidInputError(f"mc_samples must be >= 1, got {mc_samples}")
        self.kind = loss_kind(loss_fn)
        if curvature == "fisher" and self.kind is None:
            raise UnsupportedModelError(
                f"the Fisher needs a likelihood: use {SUPPORTED} (mean reduction, no weights), "
                "or curvature='ggn' for any loss"
            )
        self.fisher_type = fisher_type if curvature == "fisher" else None
        self.mc_samples = mc_samples
        self.seed = seed
        self.vectorize = vectorize
        self.chunk_size = chunk_size
        self._cache: list[dict] | None = None
        self._versions: tuple[int, ...] | None = None
        self._residuals: list[torch.Tensor] | None = None  # MC labels of the cached graphs
        self._check_loss()

    # ------------------------------------------------------------------ model access
    def _aliases(self) -> list[torch.Tensor]:
        return [p.detach().requires_grad_() for p in self.params]

    def _forward(self, params, x):
        state = {name: b.clone() for name, b in self.model.named_buffers()}
        state.update(zip(self.param_names, params))
        return functional_call(self.model, state, (x,), strict=False)

    def _check_loss(self) -> None:
        x, y = self.batches[0]
        with torch.no_grad(), self._preserve_rng():
            out = self._forward([p.detach() for p in self.params], x)
            check_scalar_mean_loss(self.loss_fn, out, y)

    # ------------------------------------------------------------------ cached graphs
    def release(self) -> None:
        self._cache = None
        self._residuals = None
        self._versions = None

    def _graphs(self) -> list[dict]:
        """Per-batch graphs for the current weights; MC labels are drawn anew (same seed)
        whenever the weights change, so the MC Fisher follows the model's predictive."""
        if self._cache is None or self._versions != self._model_version():
            gen = make_generator(self.seed, self.device)
            self._residuals = []
            with self._preserve_rng():
                self._cache = [self._build(i, x, y, gen) for i, (x, y) in enumerate(self.batches)]
            self._versions = self._model_version()
        return self._cache

    def _build(self, i: int, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> dict:
        ps = self._aliases()
        weight = x.shape[0] / self.local_num_samples
        if self.curvature == "hessian":
            loss = self.loss_fn(self._forward(ps, x), y)
            self._check_finite(loss, i)
            return {"ps": ps, "w": weight, "grads": _grad(loss, ps, create_graph=True)}
        out = self._forward(ps, x)
        out_d = out.detach().requires_grad_()
        loss = self.loss_fn(out_d, y)
        self._check_finite(loss, i)
        g_out = _grad(loss, out_d, create_graph=True)[0]
        u = torch.zeros_like(out, requires_grad=True)
        entry = {
            "ps": ps,
            "w": weight,
            "out": out,
            "out_d": out_d,
            "g_out": g_out,
            "u": u,
            "jtu": _grad(out, ps, grad_outputs=u, create_graph=True),
        }
        if self.curvature == "ef":  # true-label output gradients of each sample's loss
            entry["res"] = (out.shape[0] * g_out.detach()).reshape(1, out.shape[0], -1)
        elif self.fisher_type == "mc":
            entry["res"] = sample_residuals(self.kind, out_d, self.mc_samples, gen)
            self._residuals.append(entry["res"])
        return entry

    def _preserve_rng(self):
        """The forward passes (dropout) must not advance the user's global RNG."""
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])

    @staticmethod
    def _check_finite(loss: torch.Tensor, i: int) -> None:
        if not torch.isfinite(loss):
            raise NumericalError(f"the loss is {loss.item()} on batch {i}; check data and model")

    # ------------------------------------------------------------------ products
    def _matvec(self, V: torch.Tensor) -> torch.Tensor:
        graphs = self._graphs()
        cols = []
        for j in range(V.shape[1]):
            vs = unflatten(V[:, j], self.params)
            if len(graphs) == 1:  # one batch: its mean is the whole product (weight 1)
                cols.append(flatten(self._graph_product(graphs[0], vs)))
            else:
                cols.append(sum(g["w"] * flatten(self._graph_product(g, vs)) for g in graphs))
        return torch.stack(cols, dim=1)

    def _graph_product(self, g: dict, vs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if self.curvature == "hessian":
            return _grad(g["grads"], g["ps"], grad_outputs=vs)
        jv = _grad(g["jtu"], g["u"], grad_outputs=vs)[0]
        if "res" in g:
            z = _factor_product(g["res"], jv)
        else:
            z = _grad(g["g_out"], g["out_d"], grad_outputs=jv)[0]
        return _grad(g["out"], g["ps"], grad_outputs=z)

    # ------------------------------------------------------------------ groups
    def _all_data(self):
        """All samples concatenated, with MC residuals as [M, N, D] when they apply."""
        x = torch.cat([b[0] for b in self.batches])
        y = torch.cat([b[1] for b in self.batches])
        res = None
        if self.fisher_type == "mc":
            self._graphs()  # draws the labels for the current weights
            res = torch.cat(self._residuals, dim=1)
        return x, y, res

    def _group_fn(self):
        """f(x_g, y_g, r_g, v) -> curvature of the group's mean loss times v (flat).

        Second derivatives are reverse-over-reverse: forward-over-reverse hits immutable
        ZeroTensors in some losses' double backward (MSELoss) under torch.func.
        """
        primals = tuple(p.detach() for p in self.params)

        def product(x, y, r, v):
            vs = tuple(unflatten(v, self.params))
            if self.curvature == "hessian":

                def directional(ps):  # v^T grad L(ps); its gradient is H v
                    g = grad(lambda q: self.loss_fn(self._forward(q, x), y))(ps)
                    return sum((gi * vi).sum() for gi, vi in zip(g, vs))

                return flatten(grad(directional)(primals))
            out, jv = jvp(lambda ps: self._forward(ps, x), (primals,), (vs,))
            n = out.shape[0]
            if self.curvature == "ef":
                r = (n * grad(lambda o: self.loss_fn(o, y))(out)).reshape(1, n, -1)
            if r is None:  # GGN, type-2 Fisher: H_out (J v)
                z = grad(lambda o: (grad(lambda q: self.loss_fn(q, y))(o) * jv).sum())(out)
            else:
                z = _factor_product(r, jv)
            _, pullback = vjp(lambda ps: self._forward(ps, x), primals)
            return flatten(pullback(z)[0])

        return product

    def _group_matvecs(self, v: torch.Tensor, group_size: int) -> torch.Tensor:
        x, y, res = self._all_data()
        n_groups = self.local_num_samples // group_size
        used = n_groups * group_size
        xg = x[:used].reshape(n_groups, group_size, *x.shape[1:])
        yg = y[:used].reshape(n_groups, group_size, *y.shape[1:])
        rg = None
        if res is not None:  # [M, N, D] -> [G, M, B, D]
            rg = res[:, :used].reshape(res.shape[0], n_groups, group_size, -1).transpose(0, 1)
        fn = self._group_fn()
        in_dims = (0, 0, None if rg is None else 0, None)
        return self._vectorized(fn, in_dims, (xg, yg, rg, v), n_groups)

    def per_sample_gradients(self) -> torch.Tensor:
        """[N, P]: gradients of each sample's loss (their mean is the full gradient)."""
        x, y, _ = self._all_data()
        primals = tuple(p.detach() for p in self.params)

        def sample_grad(xi, yi):
            def loss_of(ps):
                return self.loss_fn(self._forward(ps, xi[None]), yi[None])

            return flatten(grad(loss_of)(primals))

        return self._vectorized(sample_grad, (0, 0), (x, y), x.shape[0])

    def _vectorized(self, fn, in_dims, args, n: int) -> torch.Tensor:
        """``fn`` mapped over the leading dimension of the args with ``in_dims`` 0: vmap, or
        a loop over the same function when the model cannot be vmapped (BatchNorm in train
        mode, dropout, ...); the first failure warns once and switches to the loop."""
        if self.vectorize is not False:
            try:
                with self._preserve_rng():
                    return vmap(fn, in_dims=in_dims, chunk_size=self.chunk_size)(*args)
            except Exception as exc:
                if self.vectorize:
                    raise UnsupportedModelError(
                        f"torch.func.vmap cannot vectorize this model ({exc}); use vectorize=False"
                    ) from exc
                warnings.warn(
                    f"vmap failed ({type(exc).__name__}: {exc}); looping over samples/groups "
                    "from now on",
                    CurvlabWarning,
                    stacklevel=4,
                )
                self.vectorize = False
        with self._preserve_rng():
            rows = [
                fn(*(a if d is None else a[i] for a, d in zip(args, in_dims))) for i in range(n)
            ]
        return torch.stack(rows)


def _factor_product(r: torch.Tensor, jv: torch.Tensor) -> torch.Tensor:
    """Output-space product of the factor form (1/n) sum_n mean_m r_mn r_mn^T with J v.

    r: [M, n, D] per-sample gradient factors (sampled labels or true labels); jv: J v.
    """
    n = jv.shape[0]
    coeff = (r * jv.reshape(1, n, -1)).sum(-1, keepdim=True)
    return ((r * coeff).mean(0) / n).reshape(jv.shape)
