"""BackPACK 1.7 behind the curvlab interface (DESIGN.md section 5).

BackPACK's ``extend()`` installs hooks that cannot be undone publicly, so the adapter never
touches the user's module: it works on two private hook-free copies (the user's own hooks,
kfac-pytorch's or another BackPACK's, are not carried over) that share one set of weight
tensors, refreshed by name from the user's parameters, buffers and train/eval flags
whenever those change, and it keeps the hook handles out of BackPACK's global list so
another BackPACK user calling ``CTX.remove_hooks()`` cannot break it (laplace-torch #122).
Batch ``i`` runs under ``torch.manual_seed(seed + i)`` in a forked RNG, as on every backend.
Products need no extension and work for any model; the extensions refuse what BackPACK
cannot do (train-mode BatchNorm, modules called twice in one forward, unsupported layers).

- ``_net``: plain copy for matrix-free products with ``backpack.hessianfree``
  (``hessian_vector_product``, ``ggn_vector_product_from_plist``) on a graph cached per batch.
- ``_ext``: extended copy (through BackPACK's converter for non-``Sequential`` models) for
  the extensions: per-sample gradients (BatchGrad), diagonals (DiagHessian, DiagGGNExact,
  DiagGGNMC and their Batch* variants), symmetric GGN factors (SqrtGGNExact/MC) and
  Kronecker factors (KFAC, KFLR, KFRA).

Conventions match the autograd reference: for a mean loss L = N^-1 sum_n l_n (batch b holds
n_b samples), BackPACK's individual quantities of a batch are those of l_n / n_b, so they
are scaled by n_b; products, diagonals and factors average over all batches with weights
n_b / N. The type-2 Fisher equals the GGN for MSE/CE/BCE; ``fisher_type="mc"`` uses
BackPACK's Monte-Carlo square root with labels drawn from the seeded RNG (the user's
global RNG state is left as found), so matvec, diagonal and per-sample products describe
one fixed matrix.

Per-sample products (``group_matvecs``) come from BackPACK's symmetric factorisation
GGN_n = n_b sum_c s_cn s_cn^T (SqrtGGNExact; SqrtGGNMC for the MC Fisher; per-sample
gradients for the empirical Fisher), cached as a [C, N, P] tensor, as are the MC Fisher's
products; BackPACK has no per-sample Hessian products, so curvature "hessian" has none.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager

import backpack as bp
import torch
from backpack import extensions as bpx
from backpack.context import CTX
from backpack.custom_module.graph_utils import BackpackTracer
from backpack.hessianfree.ggnvp import ggn_vector_product_from_plist
from backpack.hessianfree.hvp import hessian_vector_product
from backpack.utils.module_classification import is_no_op
from torch import nn

from curvlab import distributed as dist
from curvlab._params import flatten, unflatten
from curvlab._random import Seed
from curvlab.errors import (
    UnsupportedCapabilityError,
    UnsupportedModelError,
)
from curvlab.estimator import CurvatureEstimator, graph_bytes
from curvlab.losses import LIKELIHOOD_LOSSES
from curvlab.model_view import hook_free_copy, no_global_hooks, seeded_rng
from curvlab.validation import check_choice, check_int

_ALTERNATIVE = "use backend 'autograd', which handles any differentiable model and loss"
_DIAGONAL_KINDS = {
    "ggn": bpx.BatchDiagGGNExact,
    "ggn_mc": bpx.BatchDiagGGNMC,
    "hessian": bpx.BatchDiagHessian,
}
_KRONECKER_KINDS = {"kfac": bpx.KFAC, "kflr": bpx.KFLR, "kfra": bpx.KFRA}


def _is_plain_sequential(model: nn.Module) -> bool:
    """A leaf module, or a Sequential tree of leaf modules: BackPACK's hooks see every
    operation."""
    if not list(model.children()):
        return True
    return isinstance(model, nn.Sequential) and all(
        isinstance(m, nn.Sequential) or not list(m.children()) for m in model.modules()
    )


def _strip_backpack_hooks(module: nn.Module) -> None:
    """Remove hooks a user's own ``backpack.extend`` left on (a copy of) the model."""
    for m in module.modules():
        for hooks, fn in ((m._forward_hooks, bp.hook_store_io),
                          (m._backward_hooks, bp.hook_run_extensions)):
            for key in [k for k, h in hooks.items() if h is fn]:
                del hooks[key]
        m.__dict__.pop("_backpack_extend", None)


def _op_name(target) -> str:
    return getattr(target, "__name__", str(target))


def _graph_problem(ext: nn.Module, model: nn.Module) -> str | None:
    """After conversion every operation must be a module call BackPACK can see."""
    graph = BackpackTracer().trace(ext)
    bad = [
        f"{n.op} {_op_name(n.target)}"
        for n in graph.nodes
        if n.op not in ("call_module", "placeholder", "output")
    ]
    if not bad:
        return None
    return (
        f"BackPACK cannot see the operations {', '.join(bad)} in the forward of "
        f"{type(model).__name__} (only module calls, additions and scalings pass its "
        f"converter): write them as modules (e.g. nn.Tanh); products work, or {_ALTERNATIVE}"
    )


@contextmanager
def _quiet():
    """Silence the warning every BackPACK backward emits when the input needs no gradient."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


class BackpackEstimator(CurvatureEstimator):
    """Curvature through BackPACK (see module docstring).

    Parameters
    ----------
    model : nn.Module
        See :class:`curvlab.CurvatureEstimator` (also for the next four parameters).
    loss_fn : nn.Module
        MSELoss, CrossEntropyLoss or BCEWithLogitsLoss (BackPACK's second-order losses;
        mean reduction, no class weights, label smoothing or ignored labels).
    data : (x, y) or iterable of (x, y)
        One batch or an iterable of batches.
    curvature : {"hessian", "ggn", "fisher", "ef"}, default "hessian"
        The curvature.
    params : iterable of torch.Tensor, optional
        The parameters to differentiate (default: those with ``requires_grad``).
    fisher_type : {"type-2", "mc"}, default "type-2"
        For ``curvature="fisher"``: the type-2 Fisher (the GGN) or BackPACK's Monte-Carlo
        one.
    mc_samples : int, default 1
        Labels drawn per sample for the Monte-Carlo quantities.
    use_converter : bool or None, default None
        None: BackPACK's converter for every model that is not a plain ``nn.Sequential``;
        True: always convert; False: extend the copy's leaf modules as they are, which is
        right when every operation that curvature flows through is a module call, e.g. a
        custom container whose only functional operation scales the input.
    mode : {None, "train", "eval"}, default None
        The train/eval mode of the copies (None: the model's own flags).
    seed : int or torch.Generator, default 0
        Dropout masks and the Monte-Carlo labels.
    cache : {True, False, "auto"}, default "auto"
        Keep per-batch graphs between products.
    distributed : bool, optional
        Reduce over ``torch.distributed`` ranks (default: when initialised).

    Raises
    ------
    UnsupportedModelError
        For a loss BackPACK's extensions do not support, or BCEWithLogitsLoss with more
        than one output per sample.

    References
    ----------
    F. Dangel, F. Kunstner and P. Hennig, "BackPACK: packing more into backprop", ICLR
    (2020). F. Dangel, S. Harmeling and P. Hennig, "Modular block-diagonal curvature
    approximations for feedforward architectures", AISTATS (2020).

    Examples
    --------
    >>> import torch, curvlab
    >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    >>> model = torch.nn.Linear(2, 1, bias=False).double()
    >>> est = curvlab.estimator("backpack", model, torch.nn.MSELoss(),
    ...                         (x, torch.zeros(2, 1, dtype=torch.float64)), curvature="ggn")
    >>> est.diagonal()  # BackPACK's own exact diagonal, 2 E[x_i^2]
    tensor([1., 4.], dtype=torch.float64)
    """

    backend = "backpack"
    supported_curvatures = frozenset({"hessian", "ggn", "fisher", "ef"})
    base_capabilities = frozenset(
        {
            "matvec",
            "group_matvecs",
            "diagonal",
            "per_sample_gradients",
            "per_sample_diagonal",
            "kronecker_factors",
        }
    )

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
        use_converter: bool | None = None,
        mode: str | None = None,
        seed: Seed = 0,
        cache: bool | str = "auto",
        distributed: bool | None = None,
    ):
        super().__init__(
            model, loss_fn, data, curvature, params,
            mode=mode, seed=seed, cache=cache, distributed=distributed,
        )
        check_choice("fisher_type", fisher_type, ("type-2", "mc"))
        mc_samples = check_int("mc_samples", mc_samples, minimum=1)
        if self.loss.kind is None or self.sample_scale != 1.0:
            raise UnsupportedModelError(
                f"BackPACK's extensions support only {LIKELIHOOD_LOSSES} modules with [N, C] "
                "outputs (no class weights, label smoothing or ignored labels), got "
                f"{type(loss_fn).__name__}; " + _ALTERNATIVE
            )
        self.kind = self.loss.kind
        self.fisher_type = fisher_type if curvature == "fisher" else None
        self.mc_samples = mc_samples
        self.use_converter = (
            not _is_plain_sequential(self.model) if use_converter is None else bool(use_converter)
        )
        self._ext_problem: str | None = None
        with self._backend_errors("building BackPACK's private copies"):
            self._build_copies(self.model, loss_fn)
        self.release()
        self._reused = self._modules_called_twice() + self._shared_parameters()
        if self.kind == "bce" and self._output_size() != 1:
            raise UnsupportedModelError(
                "BackPACK supports BCEWithLogitsLoss only with one output per sample, got "
                f"{self._output_size()}; {_ALTERNATIVE}"
            )

    # ------------------------------------------------------------------ private copies
    def _build_copies(self, model: nn.Module, loss_fn) -> None:
        """Two private copies without the user's hooks that share one set of weights: a
        plain one for products and a BackPACK-extended one for the extensions."""
        chosen = {id(p) for p in self.params}
        net, _ = hook_free_copy(
            model,
            parameter=lambda p: nn.Parameter(p.detach().clone(), requires_grad=id(p) in chosen),
            buffer=lambda b: b.detach().clone(),
            functional_layers=False,
        )
        _strip_backpack_hooks(net)
        loss = copy.deepcopy(loss_fn)
        _strip_backpack_hooks(loss)
        shared = {id(t): t for t in (*net.parameters(), *net.buffers())}
        try:
            ext = copy.deepcopy(net, shared)
        except Exception as exc:
            raise UnsupportedModelError(
                f"BackPACK needs a private copy of the model, but copy.deepcopy failed ({exc}); "
                + _ALTERNATIVE
            ) from exc
        ext_loss = copy.deepcopy(loss)
        n_handles = len(CTX.hook_handles)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Encountered node that may break")
            if self.use_converter:
                try:
                    ext = bp.extend(ext, use_converter=True)
                except Exception as exc:
                    self._ext_problem = (
                        f"BackPACK's converter cannot translate {type(model).__name__} into "
                        f"modules ({type(exc).__name__}: {exc}); products work, or {_ALTERNATIVE}"
                    )
                    ext = None
            else:
                for m in ext.modules():
                    if not list(m.children()):
                        bp.extend(m)
            bp.extend(ext_loss)
        del CTX.hook_handles[n_handles:]  # our hooks live and die with our private copies
        self._net, self._loss, self._ext, self._ext_loss = net, loss, ext, ext_loss
        self._copies = [net.get_parameter(n) for n in self.param_names]
        if ext is None:
            ext = net
        elif self.use_converter:
            self._ext_problem = _graph_problem(ext, model)
        ext_ids = {id(p) for p in ext.parameters()}
        lost = [n for n, p in zip(self.param_names, self._copies) if id(p) not in ext_ids]
        if lost and self._ext_problem is None:
            self._ext_problem = (
                f"BackPACK's converter dropped {', '.join(lost)} (parameters the forward does "
                f"not use are removed); pass params= without them, or {_ALTERNATIVE}"
            )
        # the deepcopy memo maps each module of the plain copy to its extended twin (the
        # converter keeps those module objects), so both follow the user's flags
        self._copy_modules = [
            (n, [m] + ([shared[id(m)]] if id(m) in shared else []))
            for n, m in net.named_modules()
        ]

    def _modules_called_twice(self) -> list[str]:
        """Modules with parameters called more than once in one forward: BackPACK's
        extensions cannot handle them (products can)."""
        counts: dict[str, int] = {}
        handles = [
            m.register_forward_pre_hook(
                lambda mod, args, name=name: counts.__setitem__(name, counts.get(name, 0) + 1)
            )
            for name, m in self._net.named_modules()
            if any(True for _ in m.parameters(recurse=False))
        ]
        try:
            self._sync()
            x = self.batches[0][0]
            with torch.no_grad(), seeded_rng(self.batch_seed(0), self.device), no_global_hooks():
                self._net(x)
        finally:
            for h in handles:
                h.remove()
        return sorted(name for name, c in counts.items() if c > 1)

    def _shared_parameters(self) -> list[str]:
        """Parameters held by more than one module (tied weights): BackPACK's extensions
        would treat each use as its own parameter."""
        owners: dict[int, dict[int, str]] = {}  # parameter -> module -> its first name
        for name, m in self._net.named_modules(remove_duplicate=False):
            for p in m._parameters.values():
                if p is not None:
                    owners.setdefault(id(p), {}).setdefault(id(m), name or type(m).__name__)
        return sorted({" and ".join(by_module.values()) for by_module in owners.values()
                       if len(by_module) > 1})

    def _output_size(self) -> int:
        x, _ = self.batches[0]
        with torch.no_grad(), seeded_rng(self.batch_seed(0), self.device), no_global_hooks():
            return self._net(x[:1])[0].numel()

    def _sync(self) -> None:
        """Copy the user's weights, buffers and train/eval flags into the private copies
        (by name: parameter objects may have been replaced) when they changed."""
        if self._synced:
            return
        with torch.no_grad():
            mine = dict(self._net.named_parameters())
            for name, p in self.model.named_parameters():
                mine[name].copy_(p)
            mine = dict(self._net.named_buffers())
            for name, b in self.model.named_buffers():
                mine[name].copy_(b)
        modules = dict(self.model.named_modules())
        for name, copies in self._copy_modules:
            flag = modules[name].training if self.mode is None else self.mode == "train"
            for c in copies:
                c.training = flag
        self._synced = True

    def _extension_problem(self, extension) -> str | None:
        """Why BackPACK's ``extension`` cannot run on this model now (None if it can):
        conversion failures, modules called twice in one forward, train-mode BatchNorm and
        modules the extension has no rule for."""
        if self._ext_problem is not None:
            return self._ext_problem
        name = type(extension).__name__
        if self._reused:
            return (
                f"BackPACK's {name} cannot handle modules called more than once in a forward "
                f"pass or weights shared by several modules ({', '.join(self._reused)}); "
                f"products work, or {_ALTERNATIVE}"
            )
        self._sync()
        table = extension._BackpropExtension__module_extensions
        second_order = extension.expects_backpropagation_quantities()
        chosen = {id(p) for p in self._copies}
        for path, m in [*self._ext.named_modules(), ("loss", self._ext_loss)]:
            if is_no_op(m) or list(m.children()):  # containers carry no hooks
                continue
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                return (
                    f"BackPACK's {name} cannot handle BatchNorm in training mode ('{path}' mixes "
                    "the samples of a batch): call model.eval() first, build the estimator with "
                    "mode='eval', or " + _ALTERNATIVE
                )
            has_params = any(id(p) in chosen for p in m.parameters(recurse=False))
            if (second_order or has_params) and type(m) not in table:
                return (
                    f"BackPACK's {name} does not support module '{path}' "
                    f"({type(m).__name__}); {_ALTERNATIVE}"
                )
        return None

    def _check_supported(self, extension) -> None:
        problem = self._extension_problem(extension)
        if problem is not None:
            raise UnsupportedModelError(problem)

    # ------------------------------------------------------------------ extension passes
    def _run(self, make_extension) -> list[tuple[int, list[torch.Tensor | None]]]:
        """One backward pass per batch with a fresh extension: [(n_b, per-parameter values)]."""
        self._current()
        self._sync()
        self._check_supported(make_extension())
        results = []
        with _quiet(), no_global_hooks():
            for i, (x, y) in enumerate(self.batches):
                extension = make_extension()
                try:
                    with bp.backpack(extension), seeded_rng(self.batch_seed(i), self.device):
                        self._ext_loss(self._ext(x), y).backward()
                except (NotImplementedError, AssertionError) as exc:
                    raise UnsupportedModelError(
                        f"BackPACK's {type(extension).__name__} failed on this model ({exc}); "
                        + _ALTERNATIVE
                    ) from exc
                finally:
                    values = [p.__dict__.pop(extension.savefield, None) for p in self._copies]
                    for p in self._copies:
                        p.grad = None
                results.append((x.shape[0], values))
        return results

    def _flat(self, values: list[torch.Tensor | None], lead: tuple[int, ...]) -> torch.Tensor:
        """Per-parameter values with leading dims ``lead`` -> [*lead, P] (zeros where unused)."""
        parts = [
            torch.zeros(*lead, p.numel(), dtype=self.dtype, device=self.device)
            if v is None
            else v.reshape(*lead, -1)
            for v, p in zip(values, self.params)
        ]
        return torch.cat(parts, dim=-1)

    def _average(self, parts: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """sum_b (n_b / N) t_b over batches (and ranks)."""
        total = sum(n * t for n, t in parts)
        if self.distributed:
            return dist.all_reduce_sum(total) / self.num_samples
        return total / self.local_num_samples

    def _per_sample(self, make_extension) -> torch.Tensor:
        """[N_local, P]: BackPACK's individual quantity of l_n / n_b, scaled by n_b."""
        return torch.cat(
            [n * self._flat(values, (n,)) for n, values in self._run(make_extension)]
        )

    def _sqrt_factors(self) -> list[tuple[int, torch.Tensor]]:
        """Cached [(n_b, S_b [M, n_b, P])] with batch-mean curvature sum_{m,n} s s^T."""
        self._sync()
        if "sqrt" not in self._cache:
            mc = self.fisher_type == "mc"
            make = (lambda: bpx.SqrtGGNMC(self.mc_samples)) if mc else bpx.SqrtGGNExact
            factors = []
            for n, values in self._run(make):
                m = next(v.shape[0] for v in values if v is not None)
                factors.append((n, self._flat(values, (m, n))))
            self._cache["sqrt"] = factors
        return self._cache["sqrt"]

    def _gradients(self) -> torch.Tensor:
        self._sync()
        if "grads" not in self._cache:
            self._cache["grads"] = self.per_sample_gradients()
        return self._cache["grads"]

    # ------------------------------------------------------------------ public extras
    def per_sample_gradients(self) -> torch.Tensor:
        """[N_local, P]: gradients of each sample's loss l_n (their mean is the gradient).

        Returns
        -------
        torch.Tensor
            [N_local, P] from BackPACK's BatchGrad, in data order.
        """
        return self._per_sample(bpx.BatchGrad)

    def per_sample_sqrt_ggn(self) -> torch.Tensor:
        """[N_local, M, P]: factors F_n with GGN_n = F_n^T F_n for each sample's loss l_n.

        SqrtGGNExact (M = outputs), or SqrtGGNMC (M = mc_samples) for the MC Fisher.

        Returns
        -------
        torch.Tensor
            [N_local, M, P].

        Raises
        ------
        UnsupportedCapabilityError
            For curvatures other than "ggn" and "fisher".
        """
        if self.curvature not in ("ggn", "fisher"):
            raise UnsupportedCapabilityError(
                f"GGN square roots need curvature 'ggn' or 'fisher', not {self.curvature!r}"
            )
        return torch.cat([n**0.5 * s.transpose(0, 1) for n, s in self._sqrt_factors()])

    def per_sample_diagonal(self, kind: str = "ggn") -> torch.Tensor:
        """[N_local, P]: diagonal of each sample's "ggn", "ggn_mc" or "hessian" of l_n.

        Their mean is the diagonal of the mean loss's curvature. "ggn_mc" draws
        ``mc_samples`` labels per sample from the seeded predictive.

        Parameters
        ----------
        kind : {"ggn", "ggn_mc", "hessian"}, default "ggn"
            Which curvature's diagonal.

        Returns
        -------
        torch.Tensor
            [N_local, P].

        Examples
        --------
        >>> import torch, curvlab
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> est = curvlab.estimator("backpack", model, torch.nn.MSELoss(),
        ...                         (x, torch.zeros(2, 1, dtype=torch.float64)), curvature="ggn")
        >>> est.per_sample_diagonal("ggn")  # 2 x_n^2 per sample; their mean is the diagonal
        tensor([[2., 0.],
                [0., 8.]], dtype=torch.float64)
        """
        check_choice("kind", kind, _DIAGONAL_KINDS)
        cls = _DIAGONAL_KINDS[kind]
        make = (lambda: cls(self.mc_samples)) if kind == "ggn_mc" else cls
        return self._per_sample(make)

    def kronecker_factors(self, kind: str = "kfac") -> dict[str, list[torch.Tensor]]:
        """Per-parameter Kronecker factors from BackPACK's KFAC (MC), KFLR or KFRA.

        ``{name: [G, A]}`` for weights (kron(G, A) approximates the curvature block of the
        row-major flattened weight) and ``{name: [G]}`` for biases. With several batches each
        factor is the n_b/N-weighted average of the batches' factors (the usual KFAC
        expectation approximation; Kronecker products themselves do not add up).
        BackPACK builds MSELoss's summed output Hessian (KFLR, KFRA) in float32, so those
        factors carry float32 rounding; they are returned in the parameters' dtype.

        Parameters
        ----------
        kind : {"kfac", "kflr", "kfra"}, default "kfac"
            KFAC (Monte-Carlo, ``mc_samples`` labels), KFLR (exact) or KFRA.

        Returns
        -------
        dict of str to list of torch.Tensor
            ``[G, A]`` per weight and ``[G]`` per bias, by parameter name.

        References
        ----------
        J. Martens and R. Grosse, "Optimizing neural networks with Kronecker-factored
        approximate curvature", ICML (2015) (KFAC). A. Botev, H. Ritter and D. Barber,
        "Practical Gauss-Newton optimisation for deep learning", ICML (2017) (KFLR, KFRA).
        """
        check_choice("kind", kind, _KRONECKER_KINDS)
        cls = _KRONECKER_KINDS[kind]
        make = (lambda: cls(self.mc_samples)) if kind == "kfac" else cls
        runs = self._run(make)
        out = {}
        for i, name in enumerate(self.param_names):
            if runs[0][1][i] is None:
                continue
            n_factors = len(runs[0][1][i])
            out[name] = [
                self._average([(n, values[i][j].to(self.dtype)) for n, values in runs])
                for j in range(n_factors)
            ]
        return out

    # ------------------------------------------------------------------ contract
    @property
    def capabilities(self) -> frozenset[str]:
        """What this estimator can do for the model as it is now (BackPACK's extensions
        depend on the layers and on train/eval mode)."""
        self._current()
        caps = set(self.base_capabilities)
        if self.curvature == "hessian":
            caps.discard("group_matvecs")
        needs = {
            "diagonal": self._diagonal_extension(),
            "per_sample_gradients": bpx.BatchGrad(),
            "per_sample_diagonal": bpx.DiagGGNExact(),
            "kronecker_factors": bpx.KFLR(),
            "group_matvecs": bpx.BatchGrad() if self.curvature == "ef" else bpx.SqrtGGNExact(),
        }
        for cap, extension in needs.items():
            if cap in caps and self._extension_problem(extension) is not None:
                caps.discard(cap)
        return frozenset(caps)

    def _diagonal_extension(self):
        if self.curvature == "ef":
            return bpx.SumGradSquared()
        if self.curvature == "hessian":
            return bpx.DiagHessian()
        return bpx.DiagGGNMC(self.mc_samples) if self.fisher_type == "mc" else bpx.DiagGGNExact()

    def release(self) -> None:
        self._cache: dict = {}
        self._synced = False
        self._keep: bool | None = getattr(self, "_keep", None)

    def _graph(self, i: int) -> tuple[float, torch.Tensor, torch.Tensor, tuple | None]:
        """(weight n_b / N, loss, output, gradients) of batch ``i`` on the plain copy."""
        x, y = self.batches[i]
        with seeded_rng(self.batch_seed(i), self.device), no_global_hooks():
            out = self._net(x)
            loss = self._loss(out, y)
        grads = None
        if self.curvature == "hessian":
            grads = torch.autograd.grad(
                loss, self._copies, create_graph=True, materialize_grads=True
            )
        return x.shape[0] / self.num_samples, loss, out, grads

    def _iter_graphs(self):
        """Per-batch graphs: cached, or built one at a time (``cache``)."""
        self._sync()
        if "graphs" in self._cache:
            yield from self._cache["graphs"]
            return
        kept = []
        for i, (x, _) in enumerate(self.batches):
            if self._keep is None:
                g, nbytes = graph_bytes(self._graph, i)
                self._keep = self.keep_graphs(nbytes / x.shape[0])
            else:
                g = self._graph(i)
            if self._keep:
                kept.append(g)
            yield g
        if self._keep:
            self._cache["graphs"] = kept

    def _local_matvec(self, V: torch.Tensor) -> torch.Tensor:
        if self.curvature == "ef":
            g = self._gradients()
            return g.T @ (g @ V) / self.num_samples
        if self.fisher_type == "mc":
            return sum(
                (n / self.num_samples) * s.reshape(-1, s.shape[-1]).T
                @ (s.reshape(-1, s.shape[-1]) @ V)
                for n, s in self._sqrt_factors()
            )
        total = None
        for w, loss, out, grads in self._iter_graphs():
            cols = []
            for j in range(V.shape[1]):
                vs = unflatten(V[:, j], self.params)
                if grads is None:
                    prod = ggn_vector_product_from_plist(loss, out, self._copies, vs)
                else:
                    prod = hessian_vector_product(loss, self._copies, vs, grad_params=grads)
                cols.append(flatten(prod))
            block = torch.stack(cols, dim=1).mul_(w)
            total = block if total is None else total.add_(block)
        return total

    def _group_matvecs(self, V: torch.Tensor, group_size: int) -> torch.Tensor:
        return torch.stack([self._group_rows(v, group_size) for v in V])

    def _group_rows(self, v: torch.Tensor, group_size: int) -> torch.Tensor:
        if self.curvature == "hessian":
            raise UnsupportedCapabilityError(
                "BackPACK has no per-sample Hessian products (only per-sample Hessian "
                "diagonals); use backend 'autograd', or curvature='ggn'"
            )
        if self.curvature == "ef":
            g = self._gradients()
            rows = g * (g @ v)[:, None]
        else:
            rows = torch.cat(
                [n * torch.einsum("mnp,mn->np", s, s @ v) for n, s in self._sqrt_factors()]
            )
        n_groups = self.local_num_samples // group_size
        used = rows[: n_groups * group_size]
        return used.reshape(n_groups, group_size, -1).mean(dim=1)

    def _diagonal(self) -> torch.Tensor:
        if self.curvature == "ef":
            runs = self._run(bpx.SumGradSquared)
            return self._average([(n, n * self._flat(values, ())) for n, values in runs])
        if self.curvature == "hessian":
            make = bpx.DiagHessian
        elif self.fisher_type == "mc":
            def make():
                return bpx.DiagGGNMC(self.mc_samples)
        else:
            make = bpx.DiagGGNExact
        return self._average([(n, self._flat(values, ())) for n, values in self._run(make)])


__all__ = ["BackpackEstimator"]
