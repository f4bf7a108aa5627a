"""The ``kfac`` backend: curvlinops' KFAC and EKFAC behind the curvlab interface.

KFAC (Martens & Grosse 2015; Grosse & Martens 2016 for Conv2d) approximates each layer's
block of the GGN/Fisher by a Kronecker product G (x) A of the layer inputs' second moment A
and the backpropagated output-Hessian square roots' (type-2), sampled-label gradients' (MC)
or true-label gradients' (empirical) second moment G. By default the bias joins the weight
([W | b], Martens & Grosse 2015 sec. 3), so KFAC is exact for a single Linear layer under
MSELoss; ``separate_weight_and_bias=True`` gives the bias its own block G. EKFAC (George
et al. 2018) keeps the eigenbasis Q_G (x) Q_A and replaces the eigenvalues by the data's
second moments in that basis.

This module holds what needs curvlinops: computing the factors (:func:`kronecker_factors`),
the estimator (:class:`KFACEstimator`), and :class:`DampedKFACInverse`, curvlinops' own
inverse operator with a damping a LinearShrinkageDamper can drive. The algebra on the
factors (blocks, eigendecompositions, exact and pi damping, preconditioning) is in
:mod:`curvlab.kronecker`, shared with :class:`curvlab.optim.KFAC`; a new damping costs no
refactorization.

Conventions match curvlab's (mean-reduced losses; ``curvature="ggn"``/``"fisher"`` equal
the autograd backend's where KFAC is exact). curvlinops scales the empirical Fisher of
MSELoss/BCEWithLogitsLoss by the output size C relative to (1/N) sum_n g_n g_n^T; this
adapter divides it back out.

The estimator runs curvlinops on its hook-free view of the model (:mod:`curvlab.model_view`):
curvlinops' temporary hooks go on the view, the user's hooks never fire, buffers and
``.grad`` of the user's model are never written, and batch ``i`` runs under the estimator's
seed ``seed + i``. A parameter used by two layers (tied weights) would sit in two Kronecker
blocks and is refused.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from curvlab._params import flatten, unflatten
from curvlab._random import Seed
from curvlab.errors import (
    CurvlabError,
    InvalidInputError,
    NumericalError,
    UnsupportedCapabilityError,
    UnsupportedModelError,
)
from curvlab.estimator import CurvatureEstimator
from curvlab.kronecker import (
    KroneckerBlock,
    LayerEigen,
    block_eigenvalues,
    count_factors,
    eigendecompose,
    exact_inverse,
    heuristic_inverse,
    layer_blocks,
    precondition,
    refuse_shared,
    split_params,
)
from curvlab.losses import LIKELIHOOD_LOSSES, LossSpec
from curvlab.model_view import no_global_hooks, seeded_rng
from curvlab.validation import check_choice, check_int, check_nonnegative

FISHER_TYPES = ("type-2", "mc", "empirical")
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
)


def _curvlinops():
    with warnings.catch_warnings():  # einops' torch.jit.script FutureWarning on import
        warnings.simplefilter("ignore", FutureWarning)
        import curvlinops
    return curvlinops


# ---------------------------------------------------------------------- factor computation
@contextmanager
def leave_model_as_found(model: nn.Module) -> Iterator[None]:
    """Remove hooks added inside the block and restore buffers it changed, even on error.

    Parameters
    ----------
    model : nn.Module
        The module a library (curvlinops) may hook and run inside the block.

    Yields
    ------
    None
        The block runs with gradients enabled.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from curvlab.adapters.kfac import leave_model_as_found
    >>> model = nn.BatchNorm1d(2)
    >>> with leave_model_as_found(model):
    ...     _ = model.register_forward_hook(lambda *args: None)
    ...     _ = model(torch.randn(4, 2))  # updates the running statistics
    >>> len(model._forward_hooks), float(model.running_mean.abs().sum())
    (0, 0.0)
    """
    hooks = [(m, {k: set(getattr(m, k, {})) for k in _HOOK_DICTS}) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with torch.enable_grad():
            yield
    finally:
        for m, saved in hooks:
            for attr, keys in saved.items():
                table = getattr(m, attr, None)
                for key in [k for k in (table or {}) if k not in keys]:
                    del table[key]
        with torch.no_grad():
            for b, value in buffers:  # BatchNorm updates its statistics without a version bump
                if not torch.equal(b, value):
                    b.copy_(value)


@dataclass
class KroneckerFactors:
    """Factors of one computation: ``factors[layer] = (A or None, G)``, already in curvlab's
    convention; ``scale`` multiplies the curvlinops ``operator``'s products to match it.

    Attributes
    ----------
    operator : curvlinops.KFACLinearOperator or curvlinops.EKFACLinearOperator
        The operator the factors came from.
    blocks : list of KroneckerBlock
        The blocks (indices into the parameter list).
    factors : dict of str to (torch.Tensor or None, torch.Tensor)
        (A, G) by layer name.
    scale : float
        Multiplies the operator's products (1, or 1 / C for curvlinops' empirical Fisher of
        MSE/BCE).
    eigen : dict of str to LayerEigen or None, default None
        EKFAC's eigenbasis and corrected eigenvalues (None for KFAC).
    n_factorizations : int, default 0
        Eigendecompositions done for ``eigen``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from curvlab.adapters.kfac import kronecker_factors
    >>> model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 2)).double()
    >>> x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    >>> out = kronecker_factors(model, nn.MSELoss(), list(model.parameters()), [(x, y)])
    >>> {layer: (tuple(A.shape), tuple(G.shape)) for layer, (A, G) in out.factors.items()}
    {'0': ((4, 4), (2, 2)), '2': ((3, 3), (2, 2))}
    >>> [block.kind for block in out.blocks], out.scale, out.eigen
    (['joint', 'joint'], 1.0, None)
    """

    operator: object
    blocks: list[KroneckerBlock]
    factors: dict[str, tuple[torch.Tensor | None, torch.Tensor]]
    scale: float
    eigen: dict[str, LayerEigen] | None = None  # EKFAC only
    n_factorizations: int = 0


class _SeededBatches:
    """The batches, each yielded under ``torch.manual_seed(seed + i)`` (dropout masks as the
    other backends draw them) in a forked RNG; iterable any number of times."""

    def __init__(self, batches, seed: int | None, device: torch.device):
        self.batches, self.seed, self.device = list(batches), seed, device

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            if self.seed is None:
                yield batch
            else:
                with seeded_rng((self.seed + i) % 2**63, self.device):
                    yield batch


def kronecker_factors(
    model: nn.Module,
    loss_fn: nn.Module,
    params: Sequence[torch.Tensor],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    fisher_type: str = "type-2",
    mc_samples: int = 1,
    seed: int = 0,
    kfac_approx: str = "expand",
    separate_weight_and_bias: bool = False,
    ekfac: bool = False,
    batch_seed: int | None = None,
) -> KroneckerFactors:
    """KFAC (or EKFAC) factors of ``loss_fn(model(x), y)`` over ``batches`` via curvlinops.

    ``params`` must all be weights/biases of Linear/Conv2d layers (see :func:`split_params`).
    Block and factor indices refer to positions in ``params``. ``seed`` seeds curvlinops'
    Monte-Carlo labels; with ``batch_seed``, batch i's forward runs under
    ``torch.manual_seed(batch_seed + i)`` and the global RNG is left as found.

    Parameters
    ----------
    model : nn.Module
        The module to run (curvlab passes its hook-free view; hooks curvlinops adds are
        removed and buffers restored afterwards).
    loss_fn : nn.Module
        MSELoss, CrossEntropyLoss or BCEWithLogitsLoss, mean-reduced.
    params : sequence of torch.Tensor
        The parameters.
    batches : sequence of (torch.Tensor, torch.Tensor)
        The data.
    fisher_type : {"type-2", "mc", "empirical"}, default "type-2"
        G from the output Hessian's square roots, sampled labels or the true labels.
    mc_samples : int, default 1
        Labels per sample for ``"mc"``.
    seed : int, default 0
        curvlinops' Monte-Carlo seed.
    kfac_approx : {"expand", "reduce"}, default "expand"
        The weight-sharing approximation (Eschenhagen et al. 2023).
    separate_weight_and_bias : bool, default False
        One block per weight and per bias instead of a joint [W | b] block.
    ekfac : bool, default False
        Also compute EKFAC's eigenvalue correction.
    batch_seed : int or None, default None
        Seeds batch i's forward with ``batch_seed + i`` (dropout masks).

    Returns
    -------
    KroneckerFactors
        The factors in curvlab's convention, the blocks and the operator.

    Raises
    ------
    UnsupportedModelError
        For models or losses curvlinops cannot factor, layers not called through their
        forward, or tied weights.

    References
    ----------
    J. Martens and R. Grosse, "Optimizing neural networks with Kronecker-factored
    approximate curvature", ICML (2015). T. George et al., "Fast approximate natural
    gradient descent in a Kronecker-factored eigenbasis", NeurIPS (2018). R. Eschenhagen et
    al., "Kronecker-factored approximate curvature for modern neural network
    architectures", NeurIPS (2023).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from curvlab.adapters.kfac import kronecker_factors
    >>> layer = nn.Linear(2, 1, bias=False).double()
    >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    >>> out = kronecker_factors(layer, nn.MSELoss(), list(layer.parameters()),
    ...                         [(x, torch.zeros(2, 1, dtype=torch.float64))])
    >>> A, G = out.factors[""]
    >>> truth = torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64))  # 2 E[x x^T]
    >>> torch.allclose(torch.kron(G, A), truth)  # exact for one linear layer under MSE
    True
    """
    cl = _curvlinops()
    cls = cl.EKFACLinearOperator if ekfac else cl.KFACLinearOperator
    num_data = sum(int(x.shape[0]) for x, _ in batches)
    device = params[0].device
    with leave_model_as_found(model), no_global_hooks():
        try:
            mapping = cls.compute_parameter_mapping(list(params), model)
            refuse_shared(mapping)
            op = cls(
                model,
                loss_fn,
                list(params),
                _SeededBatches(batches, batch_seed, device),
                progressbar=False,
                check_deterministic=False,
                seed=int(seed),
                fisher_type=fisher_type,
                mc_samples=mc_samples,
                kfac_approx=kfac_approx,
                separate_weight_and_bias=separate_weight_and_bias,
                num_data=num_data,
            )
            op.compute_kronecker_factors()
            state = op.state_dict()
            A_all, G_all = state["input_covariances"], state["gradient_covariances"]
            raw = {layer: (A_all.get(layer), G_all.get(layer)) for layer in mapping}
            if ekfac:  # EKFAC's eigenvalue correction consumes the factors: keep copies
                raw = {k: tuple(_clone(f) for f in af) for k, af in raw.items()}
                op.compute_eigenvalue_correction()
        except CurvlabError:
            raise
        except (ValueError, NotImplementedError, KeyError) as exc:
            raise UnsupportedModelError(
                f"curvlinops could not compute KFAC factors for this model/loss ({exc}); "
                "KFAC needs Linear/Conv2d layers called through their forward and [N, C] "
                "outputs; use the 'autograd' or 'backpack' backend"
            ) from exc
    blocks = layer_blocks(mapping, separate_weight_and_bias)
    missing = [layer for layer, (a, g) in raw.items() if g is None]
    if missing:
        raise UnsupportedModelError(
            f"layer(s) {', '.join(missing)} were not called through their forward during the "
            "model's forward pass, so KFAC cannot see them; use the 'autograd' backend"
        )
    scale = 1.0
    kind = LossSpec(loss_fn).kind
    if fisher_type == "empirical" and kind in ("mse", "bce"):
        scale = 1.0 / int(batches[0][1].shape[-1])
    factors = {layer: (a, g * scale) for layer, (a, g) in raw.items()}
    result = KroneckerFactors(op, blocks, factors, scale)
    if ekfac:
        result.eigen = _ekfac_eigen(op, blocks, factors, scale)
        result.n_factorizations = count_factors(factors)
    return result


def _clone(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clone()


def _ekfac_eigen(op, blocks, factors, scale) -> dict[str, LayerEigen]:
    """curvlinops' EKFAC eigenbasis with its corrected eigenvalues, per layer."""
    state = op.state_dict()
    vec_A = state["input_covariances_eigenvectors"]
    vec_G = state["gradient_covariances_eigenvectors"]
    corrected = state["corrected_eigenvalues"]
    out = {}
    for layer, (A, G) in factors.items():
        qa, qg = vec_A.get(layer), vec_G[layer]
        per_block = {}
        for block in (b for b in blocks if b.layer == layer):
            c = corrected[layer]
            if block.kind != "joint":
                c = c[block.weight if block.kind == "weight" else block.bias]
            per_block[block.kind] = (c if c.ndim == 2 else c[:, None]) * scale
        out[layer] = LayerEigen(
            evals_A=None if qa is None else torch.einsum("ij,ik,kj->j", qa, A, qa),
            evecs_A=qa,
            evals_G=torch.einsum("ij,ik,kj->j", qg, G, qg),
            evecs_G=qg,
            corrected=per_block,
        )
    return out


# ---------------------------------------------------------------------- the estimator
class KFACEstimator(CurvatureEstimator):
    """KFAC/EKFAC curvature over curvlinops 3 (see module docstring).

    Beyond the base interface: :meth:`factors`, :meth:`eigendecompositions`,
    :meth:`kfac_eigenvalues`, :meth:`kfac_trace`, :meth:`kfac_logdet`, :meth:`solve`,
    and ``n_factorizations`` (eigendecompositions done so far).

    Parameters
    ----------
    model : nn.Module
        See :class:`curvlab.CurvatureEstimator`; only Linear and Conv2d layers may hold
        trainable parameters (or pass ``params`` without the others).
    loss_fn : nn.Module
        MSELoss, CrossEntropyLoss or BCEWithLogitsLoss, mean-reduced.
    data : (x, y) or iterable of (x, y)
        One batch or an iterable of batches.
    curvature : {"ggn", "fisher", "ef"}, default "ggn"
        ``"ggn"`` is type-2, ``"ef"`` the empirical Fisher (``curvlab.estimator``'s own
        default, "hessian", is refused: pass ``curvature="ggn"``).
    params : iterable of torch.Tensor, optional
        The parameters (default: those with ``requires_grad``).
    approximation : {"kfac", "ekfac"}, default "kfac"
        KFAC, or EKFAC's eigenvalue-corrected form.
    fisher_type : {"type-2", "mc"}, default "type-2"
        For ``curvature="fisher"``: the type-2 Fisher (equal to the GGN) or a Monte-Carlo
        one with ``mc_samples`` sampled labels per sample, seeded by ``seed``.
    mc_samples : int, default 1
        Labels per sample for ``fisher_type="mc"``.
    kfac_approx : {"expand", "reduce"}, default "expand"
        The weight-sharing approximation (Eschenhagen et al. 2023).
    separate_weight_and_bias : bool, default False
        One block per weight and per bias instead of one joint block per layer.
    mode : {None, "train", "eval"}, default None
        The train/eval mode of the view (None: the model's own flags).
    seed : int or torch.Generator, default 0
        Dropout masks and Monte-Carlo labels.
    cache : {True, False, "auto"}, default "auto"
        Accepted for a uniform interface (the factors are cached until the model or data
        change).
    distributed : bool, optional
        Must be False (curvlinops has no ``torch.distributed`` support).

    Raises
    ------
    UnsupportedModelError
        For other losses or trainable parameters outside Linear/Conv2d layers.
    UnsupportedCapabilityError
        Under ``torch.distributed``.

    References
    ----------
    J. Martens and R. Grosse, "Optimizing neural networks with Kronecker-factored
    approximate curvature", ICML (2015). R. Grosse and J. Martens, "A Kronecker-factored
    approximate Fisher matrix for convolution layers", ICML (2016). T. George et al., "Fast
    approximate natural gradient descent in a Kronecker-factored eigenbasis", NeurIPS
    (2018).

    Examples
    --------
    >>> import torch, curvlab
    >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    >>> model = torch.nn.Linear(2, 1, bias=False).double()
    >>> est = curvlab.estimator("kfac", model, torch.nn.MSELoss(),
    ...                         (x, torch.zeros(2, 1, dtype=torch.float64)), curvature="ggn")
    >>> [round(v, 6) for v in est.kfac_eigenvalues().tolist()]  # exact here: 2 E[x x^T]
    [1.0, 4.0]
    >>> est.solve(torch.ones(2, dtype=torch.float64), damping=1.0)  # (K + I)^-1 1
    tensor([0.5000, 0.2000], dtype=torch.float64)
    """

    backend = "kfac"
    supported_curvatures = frozenset({"ggn", "fisher", "ef"})
    base_capabilities = frozenset({"matvec", "diagonal", "kronecker_factors", "damped_inverse"})
    #: :func:`kronecker_factors`, for callers in the core that reach this backend through the
    #: registry (``curvlab.registry.resolve("kfac").batch_factors``), such as
    #: :class:`curvlab.optim.KFAC` on its own hook-free view of the model.
    batch_factors = staticmethod(kronecker_factors)

    def __init__(
        self,
        model: nn.Module,
        loss_fn,
        data,
        curvature: str = "ggn",
        params=None,
        *,
        approximation: str = "kfac",
        fisher_type: str = "type-2",
        mc_samples: int = 1,
        kfac_approx: str = "expand",
        separate_weight_and_bias: bool = False,
        mode: str | None = None,
        seed: Seed = 0,
        cache: bool | str = "auto",
        distributed: bool | None = None,
    ):
        super().__init__(
            model, loss_fn, data, curvature, params,
            mode=mode, seed=seed, cache=cache, distributed=distributed,
        )
        if self.distributed:
            raise UnsupportedCapabilityError(
                "the 'kfac' backend computes factors on one process (curvlinops has no "
                "torch.distributed support); pass distributed=False or use 'autograd'"
            )
        check_choice("approximation", approximation, ("kfac", "ekfac"))
        check_choice("kfac_approx", kfac_approx, ("expand", "reduce"))
        check_choice("fisher_type", fisher_type, ("type-2", "mc"))
        if fisher_type == "mc" and curvature != "fisher":
            raise InvalidInputError(
                "fisher_type='mc' is a Monte-Carlo Fisher: use curvature='fisher'"
            )
        mc_samples = check_int("mc_samples", mc_samples, minimum=1)
        if mc_samples != 1 and fisher_type != "mc":
            raise InvalidInputError("mc_samples applies to fisher_type='mc' only")
        if self.loss.kind is None or self.sample_scale != 1.0:
            raise UnsupportedModelError(
                f"the 'kfac' backend supports {LIKELIHOOD_LOSSES} with [N, C] outputs (mean "
                "reduction, no class weights, label smoothing or ignored labels), got "
                f"{type(loss_fn).__name__}; use the 'autograd' backend"
            )
        _, unsupported = split_params(self.model, self.param_names)
        if unsupported:
            raise UnsupportedModelError(
                "KFAC covers the weights and biases of Linear and Conv2d layers only; "
                f"unsupported trainable parameters: {', '.join(unsupported)}. Freeze them, "
                "pass params=[...] without them, or use the 'autograd' or 'backpack' backend"
            )
        self.approximation = approximation
        self.fisher_type = {"ggn": "type-2", "fisher": fisher_type, "ef": "empirical"}[curvature]
        self.mc_samples = mc_samples
        self.kfac_approx = kfac_approx
        self.separate_weight_and_bias = separate_weight_and_bias
        self.n_factorizations = 0
        self.release()
        with self._backend_errors("computing the Kronecker factors"):
            self._computed()  # fail early on unsupported models

    # ------------------------------------------------------------------ caches
    def release(self) -> None:
        self._factors: KroneckerFactors | None = None
        self._eigen: dict[str, LayerEigen] | None = None

    def _computed(self, checked: bool = False) -> KroneckerFactors:
        """Factors for the current model and data (recomputed whenever either changed);
        ``checked``: the caller (a product) has just brought the estimator up to date."""
        if not checked:
            self._current()
            self._refuse_coupled_batches()
        if self._factors is None:
            self._factors = kronecker_factors(
                self.view.module,
                self.loss.loss_fn,
                self.view.parameters,
                self.batches,
                fisher_type=self.fisher_type,
                mc_samples=self.mc_samples,
                seed=self.seed,
                kfac_approx=self.kfac_approx,
                separate_weight_and_bias=self.separate_weight_and_bias,
                ekfac=self.approximation == "ekfac",
                batch_seed=self.seed,
            )
            for A, G in self._factors.factors.values():
                if not torch.isfinite(G).all() or (A is not None and not torch.isfinite(A).all()):
                    raise NumericalError("the Kronecker factors are not finite; check the loss")
            self.n_factorizations += self._factors.n_factorizations
            self._eigen = self._factors.eigen
        return self._factors

    # ------------------------------------------------------------------ products
    def _local_matvec(self, V: torch.Tensor) -> torch.Tensor:
        computed = self._computed(checked=True)
        with torch.no_grad():
            out = computed.operator @ V
        return out if computed.scale == 1.0 else out.mul_(computed.scale)

    def _diagonal(self) -> torch.Tensor:
        computed = self._computed(checked=True)
        if self.approximation == "ekfac":
            eig = self.eigendecompositions()

            def diag_of(block):
                e = eig[block.layer]
                qa = e.evecs_A if block.kind != "bias" else e.evals_G.new_ones(1, 1)
                return (e.evecs_G**2) @ block_eigenvalues(block, e) @ (qa**2).T
        else:

            def diag_of(block):
                A, G = computed.factors[block.layer]
                dA = A.diagonal() if block.kind != "bias" else G.new_ones(1)
                return torch.outer(G.diagonal(), dA)

        out = [torch.zeros_like(p) for p in self.params]
        for block in computed.blocks:
            D = diag_of(block)
            if block.weight is not None:
                w = self.params[block.weight]
                out[block.weight] = D[:, : w[0].numel()].reshape(w.shape)
            if block.bias is not None:
                out[block.bias] = D[:, -1].clone()
        return flatten(out)

    # ------------------------------------------------------------------ factor access
    def factors(self) -> dict[str, tuple[torch.Tensor | None, torch.Tensor]]:
        """Layer name -> (A, G) (A is None for a layer whose weight is not analysed).

        Returns
        -------
        dict of str to (torch.Tensor or None, torch.Tensor)
            Copies of the factors for the current model and data.
        """
        return {
            k: (None if a is None else a.clone(), g.clone())
            for k, (a, g) in self._computed().factors.items()
        }

    def eigendecompositions(self) -> dict[str, LayerEigen]:
        """Layer name -> eigendecompositions of its factors (computed once, then cached).

        Returns
        -------
        dict of str to LayerEigen
            EKFAC's eigenbasis and corrected eigenvalues for ``approximation="ekfac"``.
        """
        computed = self._computed()
        if self._eigen is None:
            self._eigen = {k: eigendecompose(a, g) for k, (a, g) in computed.factors.items()}
            self.n_factorizations += count_factors(computed.factors)
        return self._eigen

    def kfac_eigenvalues(self) -> torch.Tensor:
        """All P eigenvalues of the (E)KFAC matrix, ascending, from the factors.

        Returns
        -------
        torch.Tensor
            [P] the products l_G l_A of the factors' eigenvalues (EKFAC: the corrected
            eigenvalues), ascending.
        """
        eig = self.eigendecompositions()
        blocks = self._computed().blocks
        values = torch.cat([block_eigenvalues(b, eig[b.layer]).reshape(-1) for b in blocks])
        return values.sort().values

    def kfac_trace(self) -> float:
        """tr of the (E)KFAC matrix: sum over blocks of tr(G) tr(A) (EKFAC: sum of its
        eigenvalues). Exact, no probes.

        Returns
        -------
        float
            The trace.
        """
        computed = self._computed()
        if self.approximation == "ekfac":
            return float(self.kfac_eigenvalues().sum())
        total = 0.0
        for block in computed.blocks:
            A, G = computed.factors[block.layer]
            total += float(G.trace()) * (float(A.trace()) if block.kind != "bias" else 1.0)
        return total

    def kfac_logdet(self, damping: float = 0.0) -> float:
        """log det(K + damping I) from the eigenvalues (-inf when singular).

        Parameters
        ----------
        damping : float, default 0.0
            delta >= 0.

        Returns
        -------
        float
            sum_i log(lambda_i + delta).
        """
        damping = _check_damping(damping)
        return float(torch.log(self.kfac_eigenvalues() + damping).sum())

    def solve(self, v: torch.Tensor, damping: float, heuristic: bool = False) -> torch.Tensor:
        """(K + damping I)^-1 v, or with ``heuristic=True`` the pi-damped Kronecker inverse
        (G + sqrt(d)/pi I)^-1 (x) (A + pi sqrt(d) I)^-1 v. v: [P] or [P, k].

        Reuses the cached eigendecompositions: changing ``damping`` refactorizes nothing.

        Parameters
        ----------
        v : torch.Tensor
            [P] or [P, k], in the estimator's dtype and device.
        damping : float
            delta >= 0 (> 0 with ``heuristic``).
        heuristic : bool, default False
            pi-damping instead of exact damping (KFAC only).

        Returns
        -------
        torch.Tensor
            The solution, shaped like ``v``.

        Raises
        ------
        NumericalError
            When the undamped KFAC matrix is singular (use damping > 0).
        UnsupportedCapabilityError
            For ``heuristic=True`` with EKFAC.

        References
        ----------
        J. Martens and R. Grosse, "Optimizing neural networks with Kronecker-factored
        approximate curvature", ICML (2015), section 6.3 (pi-damping).
        """
        self.check_vector(v)
        damping = _check_damping(damping)
        if heuristic and damping == 0:
            raise InvalidInputError("heuristic damping needs damping > 0")
        eig = self.eigendecompositions()
        block = v if v.ndim == 2 else v[:, None]
        scaling = heuristic_inverse(damping) if heuristic else exact_inverse(damping)
        with torch.no_grad():
            parts = unflatten(block, self.params)  # [k, *shape] each
            out = precondition(self._computed().blocks, eig, parts, scaling)
            out = torch.cat([o.reshape(block.shape[1], -1) for o in out], dim=1).T
        if not torch.isfinite(out).all():
            raise NumericalError(
                "the damped inverse is not finite: the KFAC matrix is singular; use damping > 0"
            )
        return out if v.ndim == 2 else out[:, 0]


def _check_damping(damping) -> float:
    return check_nonnegative("damping", damping)


# ---------------------------------------------------------------------- curvlinops' inverse
class DampedKFACInverse:
    """curvlinops' ``KFACInverseLinearOperator`` with a damping that can change.

    curvlinops fixes the damping when the inverse is built: in its default mode the cached
    inverse factors (A + delta I)^-1 and (G + delta I)^-1 have delta folded in, so writing
    the private ``_damping`` afterwards changes nothing. Setting :attr:`damping` here
    rebuilds the inverse with the new value (the factors of ``operator`` are reused; the
    inverse's own factorizations are redone at the next product), so a
    :class:`~curvlab.LinearShrinkageDamper` drives it through ``attach``::

        kfac = curvlinops.KFACLinearOperator(model, loss_fn, params, data)
        inverse = DampedKFACInverse(kfac, damping=damper.damping)   # exact damping
        damper.attach(inverse, key="damping")                       # follows every update
        direction = inverse @ gradient

    For damping changes that cost no refactorization at all, use the ``kfac`` estimator's
    :meth:`KFACEstimator.solve` or :class:`curvlab.optim.KFAC`.

    Parameters
    ----------
    operator : curvlinops.KFACLinearOperator or curvlinops.EKFACLinearOperator
        The Kronecker-factored curvature to invert.
    damping : float
        delta >= 0 (> 0 with ``heuristic``).
    exact : bool, default True
        (K + delta I)^-1 through the factors' eigendecompositions (curvlinops'
        ``use_exact_damping``); with False, curvlinops' Kronecker-factored damping
        (G + delta I)^-1 (x) (A + delta I)^-1 (or ``heuristic``).
    heuristic : bool, default False
        pi-damping (G + sqrt(delta)/pi I)^-1 (x) (A + pi sqrt(delta) I)^-1 (Martens &
        Grosse 2015 sec. 6.3); needs ``exact=False``.
    **options : Any
        Further keyword arguments of ``KFACInverseLinearOperator`` (``min_damping``,
        ``cache``, ``retry_double_precision``).

    Raises
    ------
    InvalidInputError
        For an operator that is not curvlinops' KFAC/EKFAC, ``exact`` with ``heuristic``,
        non-exact damping of EKFAC, or a negative damping.

    Attributes
    ----------
    operator : curvlinops.KFACInverseLinearOperator
        The current inverse (rebuilt at each damping change).
    n_rebuilds : int
        Inverses built after the first one (damping changes and :meth:`refresh`).

    References
    ----------
    J. Martens and R. Grosse, "Optimizing neural networks with Kronecker-factored
    approximate curvature", ICML (2015), section 6.3. D. Granziol and N. Baskerville, "A
    random matrix theory approach to damping in deep learning", J. Phys. Complex. 3 (2022)
    (the damping a LinearShrinkageDamper learns).

    Examples
    --------
    >>> import torch, curvlinops
    >>> from torch import nn
    >>> model = nn.Linear(3, 2).double()
    >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    >>> kfac = curvlinops.KFACLinearOperator(model, nn.MSELoss(), list(model.parameters()),
    ...                                      [(x, y)], fisher_type="type-2")
    >>> inverse = DampedKFACInverse(kfac, damping=1e-2)
    >>> v = torch.ones(8, dtype=torch.float64)
    >>> first = inverse @ v
    >>> inverse.damping = 10.0                      # what damper.attach(inverse) does
    >>> bool(torch.allclose(inverse @ v, first)), inverse.n_rebuilds
    (False, 1)
    """

    def __init__(
        self, operator, damping: float, *, exact: bool = True, heuristic: bool = False, **options
    ):
        cl = _curvlinops()
        if not isinstance(operator, cl.KFACLinearOperator):
            raise InvalidInputError(
                "operator must be a curvlinops KFACLinearOperator or EKFACLinearOperator, got "
                f"{type(operator).__name__}"
            )
        if exact and heuristic:
            raise InvalidInputError("heuristic (pi) damping is not exact: pass exact=False")
        if isinstance(operator, cl.EKFACLinearOperator) and not exact:
            raise InvalidInputError("curvlinops inverts EKFAC with exact damping only")
        self.kfac, self.exact, self.heuristic, self.options = operator, exact, heuristic, options
        self.n_rebuilds = -1
        self._damping = -1.0
        self.damping = damping

    @property
    def damping(self) -> float:
        """delta of the current inverse; setting it rebuilds the inverse."""
        return self._damping

    @damping.setter
    def damping(self, value: float) -> None:
        value = _check_damping(value)
        if self.heuristic and value == 0:
            raise InvalidInputError("heuristic damping needs damping > 0")
        if value != self._damping:
            self._damping = value
            self.refresh()

    def refresh(self) -> None:
        """Rebuild the inverse from the operator's current factors: call it after
        ``operator.compute_kronecker_factors()`` (the old inverse caches the old ones)."""
        self.operator = _curvlinops().KFACInverseLinearOperator(
            self.kfac,
            damping=self._damping,
            use_exact_damping=self.exact,
            use_heuristic_damping=self.heuristic,
            **self.options,
        )
        self.n_rebuilds += 1

    def __matmul__(self, other):
        """The current inverse times ``other`` (a flat vector, a [P, k] matrix or a list of
        parameter-shaped tensors, as curvlinops takes them)."""
        return self.operator @ other

    def __repr__(self) -> str:
        mode = "exact" if self.exact else "pi" if self.heuristic else "factor-wise"
        return f"DampedKFACInverse(damping={self._damping:.4g}, {mode} damping)"


__all__ = [
    "FISHER_TYPES",
    "DampedKFACInverse",
    "KFACEstimator",
    "KroneckerFactors",
    "kronecker_factors",
    "leave_model_as_found",
]
