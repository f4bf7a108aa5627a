"""Kronecker-factored curvature algebra: blocks, factor eigendecompositions, damped inverses.

KFAC (Martens & Grosse 2015; Grosse & Martens 2016 for Conv2d) approximates each layer's
block of the GGN/Fisher by a Kronecker product. For a Linear/Conv2d layer with weight W
[d_out, d_in] (Conv2d: d_in = c_in*kh*kw) flattened row-major, as curvlab's flat vectors are,

    K_layer = G (x) A,   A = (1/N) sum_n a_n a_n^T,   G = (1/N) sum_n s_n s_n^T.

By default the bias joins the weight ([W | b] with a~ = [a, 1], Martens & Grosse 2015 sec. 3,
a "joint" block); a bias on its own is the block G ("bias"). This module holds everything
that needs only the factors, whoever computed them (the ``kfac`` backend's curvlinops
factors, :class:`curvlab.optim.KFAC`'s running averages): which parameters form which block,
the factors' eigendecompositions A = Q_A diag(l_A) Q_A^T, G = Q_G diag(l_G) Q_G^T, and the
damped inverses applied through them (DESIGN.md sec. 4)

    exact:     (G (x) A + delta I)^-1 = (Q_G (x) Q_A) diag(1/(l_G l_A^T + delta)) (Q_G (x) Q_A)^T
    heuristic: (G + sqrt(delta)/pi I)^-1 (x) (A + pi sqrt(delta) I)^-1,
               pi = sqrt((tr A / dim A) / (tr G / dim G))   (Martens & Grosse 2015 sec. 6.3)

so a new delta costs no refactorization. A bias block on its own uses (G + delta I)^-1 in
both modes (as curvlinops does). EKFAC (George et al. 2018) keeps the eigenbasis and replaces
the eigenvalues (``LayerEigen.corrected``).

Examples
--------
>>> import torch
>>> from torch import nn
>>> from curvlab.kronecker import eigendecompose, exact_inverse, kronecker_blocks, precondition
>>> layer = nn.Linear(3, 2).double()
>>> blocks = kronecker_blocks(layer, list(layer.parameters()))
>>> [(b.layer, b.kind) for b in blocks]
[('', 'joint')]
>>> A, G = torch.eye(4, dtype=torch.float64), 2 * torch.eye(2, dtype=torch.float64)
>>> eigen = {"": eigendecompose(A, G)}
>>> grads = [torch.ones(1, 2, 3, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64)]
>>> out = precondition(blocks, eigen, grads, exact_inverse(0.5))  # 1 / (2 * 1 + 0.5)
>>> float(out[0][0, 0, 0]), float(out[1][0, 0])
(0.4, 0.4)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from curvlab.errors import UnsupportedCapabilityError, UnsupportedModelError

#: The layer types with Kronecker factors (those curvlinops' KFAC supports).
KRONECKER_LAYERS = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class KroneckerBlock:
    """One Kronecker block: ``kind`` is "joint" ([W | b], factor A of size d_in + 1),
    "weight" (G (x) A) or "bias" (G); ``weight``/``bias`` index the parameter list.

    Attributes
    ----------
    layer : str
        The layer's module name ("" for the root).
    kind : {"joint", "weight", "bias"}
        Which parameters the block covers.
    weight : int or None
        Position of the weight in the parameter list.
    bias : int or None
        Position of the bias.

    References
    ----------
    J. Martens and R. Grosse, "Optimizing neural networks with Kronecker-factored
    approximate curvature", ICML (2015), section 3.

    Examples
    --------
    >>> from torch import nn
    >>> from curvlab.kronecker import kronecker_blocks
    >>> layer = nn.Linear(3, 2)
    >>> blocks = kronecker_blocks(layer, list(layer.parameters()), separate_weight_and_bias=True)
    >>> [(b.kind, b.weight, b.bias) for b in blocks]
    [('weight', 0, None), ('bias', None, 1)]
    """

    layer: str
    kind: str
    weight: int | None
    bias: int | None


@dataclass(frozen=True)
class LayerEigen:
    """Eigendecompositions of one layer's factors (``evals_A``/``evecs_A`` None without a
    weight); ``corrected`` holds EKFAC's eigenvalues per block kind, None for KFAC.

    Attributes
    ----------
    evals_A : torch.Tensor or None
        Eigenvalues of the input factor A (clamped at 0).
    evecs_A : torch.Tensor or None
        Its eigenvectors Q_A (columns).
    evals_G : torch.Tensor
        Eigenvalues of the output-gradient factor G.
    evecs_G : torch.Tensor
        Its eigenvectors Q_G.
    corrected : dict of str to torch.Tensor or None, default None
        EKFAC's [d_out, d_in'] eigenvalues in the basis Q_G (x) Q_A, by block kind.

    References
    ----------
    T. George, C. Laurent, X. Bouthillier, N. Ballas and P. Vincent, "Fast approximate
    natural gradient descent in a Kronecker-factored eigenbasis", NeurIPS (2018) (EKFAC).

    Examples
    --------
    >>> import torch
    >>> from curvlab.kronecker import eigendecompose
    >>> eig = eigendecompose(torch.diag(torch.tensor([1.0, 4.0])), 2 * torch.eye(1))
    >>> eig.evals_A, eig.evals_G, eig.corrected
    (tensor([1., 4.]), tensor([2.]), None)
    """

    evals_A: torch.Tensor | None
    evecs_A: torch.Tensor | None
    evals_G: torch.Tensor
    evecs_G: torch.Tensor
    corrected: dict[str, torch.Tensor] | None = None


# ---------------------------------------------------------------------- layers and blocks
def split_params(model: nn.Module, names: Sequence[str]) -> tuple[list[int], list[str]]:
    """Indices of the parameters that are the weight or bias of a Linear or Conv2d layer,
    and descriptions ("name (Module)") of all others.

    Parameters
    ----------
    model : nn.Module
        The model owning the parameters.
    names : sequence of str
        Parameter names of ``model`` (as ``named_parameters`` gives them).

    Returns
    -------
    kronecker : list of int
        Positions in ``names`` with Kronecker factors.
    other : list of str
        The others, described as "name (Module)".

    Examples
    --------
    >>> from torch import nn
    >>> from curvlab.kronecker import split_params
    >>> model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    >>> split_params(model, [name for name, _ in model.named_parameters()])
    ([0, 1], ['1.weight (LayerNorm)', '1.bias (LayerNorm)'])
    """
    kfac, other = [], []
    for i, name in enumerate(names):
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        if isinstance(module, KRONECKER_LAYERS) and attr in ("weight", "bias"):
            if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
                other.append(f"{name} (Conv2d with padding_mode={module.padding_mode!r})")
                continue
            kfac.append(i)
        else:
            other.append(f"{name} ({type(module).__name__})")
    return kfac, other


def parameter_mapping(
    model: nn.Module, params: Sequence[torch.Tensor]
) -> dict[str, dict[str, int]]:
    """``{layer name: {"weight": i, "bias": j}}`` for every Linear/Conv2d layer holding some
    of ``params`` (i, j their positions), in module order; parameters are matched by
    storage, as curvlinops' ``KFACLinearOperator.compute_parameter_mapping`` does.

    Parameters
    ----------
    model : nn.Module
        The model.
    params : sequence of torch.Tensor
        The parameters, in the order of the flat vectors.

    Returns
    -------
    dict of str to dict of str to int
        The layers and the positions of their weight and bias.

    Raises
    ------
    UnsupportedModelError
        A parameter that is not the weight or bias of such a layer.

    Examples
    --------
    >>> from torch import nn
    >>> from curvlab.kronecker import parameter_mapping
    >>> model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1, bias=False))
    >>> parameter_mapping(model, list(model.parameters()))
    {'0': {'weight': 0, 'bias': 1}, '2': {'weight': 2}}
    """
    position = {p.data_ptr(): i for i, p in enumerate(params)}
    mapping: dict[str, dict[str, int]] = {}
    found: set[int] = set()
    for name, module in model.named_modules():
        if not isinstance(module, KRONECKER_LAYERS):
            continue
        pos = {
            attr: position[p.data_ptr()]
            for attr, p in module.named_parameters(recurse=False)
            if p.data_ptr() in position
        }
        if pos:
            mapping[name] = pos
            found.update(pos.values())
    missing = sorted(set(range(len(params))) - found)
    if missing:
        raise UnsupportedModelError(
            f"parameters at positions {missing} are not weights or biases of Linear or "
            "Conv2d layers, so they have no Kronecker factors"
        )
    return mapping


def refuse_shared(mapping: dict[str, dict[str, int]]) -> None:
    """Raise if a parameter sits in two layers (tied weights): two Kronecker blocks sharing
    a parameter are not a Kronecker-factored matrix.

    Parameters
    ----------
    mapping : dict of str to dict of str to int
        From :func:`parameter_mapping`.

    Raises
    ------
    UnsupportedModelError
        When a position appears under two layers; the message names the alternatives.
    """
    owners: dict[int, list[str]] = {}
    for layer, pos in mapping.items():
        for index in pos.values():
            owners.setdefault(index, []).append(layer)
    shared = {i: layers for i, layers in owners.items() if len(layers) > 1}
    if shared:
        i, layers = next(iter(shared.items()))
        raise UnsupportedModelError(
            f"parameter {i} is shared by the layers {', '.join(layers)} (tied weights): it "
            "would sit in two Kronecker blocks, which is not a Kronecker-factored matrix; untie "
            "the weights, pass params= without it, or use the 'autograd' or 'backpack' backend"
        )


def layer_blocks(mapping: dict[str, dict[str, int]], separate: bool) -> list[KroneckerBlock]:
    """Blocks from a {layer: {"weight": i, "bias": j}} parameter mapping: one joint block
    per layer with both, unless ``separate``.

    Parameters
    ----------
    mapping : dict of str to dict of str to int
        From :func:`parameter_mapping`.
    separate : bool
        Give weight and bias their own blocks ("weight" and "bias") instead of one "joint".

    Returns
    -------
    list of KroneckerBlock
        In the mapping's (module) order.
    """
    blocks = []
    for layer, pos in mapping.items():
        w, b = pos.get("weight"), pos.get("bias")
        if w is not None and b is not None and not separate:
            blocks.append(KroneckerBlock(layer, "joint", w, b))
            continue
        if w is not None:
            blocks.append(KroneckerBlock(layer, "weight", w, None))
        if b is not None:
            blocks.append(KroneckerBlock(layer, "bias", None, b))
    return blocks


def kronecker_blocks(
    model: nn.Module, params: Sequence[torch.Tensor], separate_weight_and_bias: bool = False
) -> list[KroneckerBlock]:
    """The Kronecker blocks of ``params`` (all weights or biases of Linear/Conv2d layers;
    tied weights refused).

    Parameters
    ----------
    model : nn.Module
        The model.
    params : sequence of torch.Tensor
        The parameters, in the order of the flat vectors.
    separate_weight_and_bias : bool, default False
        One block per weight and per bias instead of a joint [W | b] block.

    Returns
    -------
    list of KroneckerBlock
        One or two blocks per layer.

    Raises
    ------
    UnsupportedModelError
        For parameters outside Linear/Conv2d layers, or tied weights.

    References
    ----------
    J. Martens and R. Grosse, "Optimizing neural networks with Kronecker-factored
    approximate curvature", ICML (2015). R. Grosse and J. Martens, "A Kronecker-factored
    approximate Fisher matrix for convolution layers", ICML (2016).
    """
    mapping = parameter_mapping(model, params)
    refuse_shared(mapping)
    return layer_blocks(mapping, separate_weight_and_bias)


# ---------------------------------------------------------------------- eigendecompositions
def _eigh(M: torch.Tensor):
    """eigh of the symmetrized factor, retried in float64 when LAPACK does not converge
    (float32 factors of zero-padded inputs have clusters of equal eigenvalues)."""
    M = (M + M.T) / 2
    try:
        return torch.linalg.eigh(M)
    except torch.linalg.LinAlgError:
        values, vectors = torch.linalg.eigh(M.double())
        return torch.return_types.linalg_eigh((values.to(M.dtype), vectors.to(M.dtype)))


def eigendecompose(A: torch.Tensor | None, G: torch.Tensor) -> LayerEigen:
    """eigh of each factor (A None for a lone bias); eigenvalues clamped at 0 (the factors
    are PSD).

    Parameters
    ----------
    A : torch.Tensor or None
        [d_in', d_in'] input factor (symmetrised before the decomposition).
    G : torch.Tensor
        [d_out, d_out] output-gradient factor.

    Returns
    -------
    LayerEigen
        Eigenvalues (ascending, >= 0) and eigenvectors of both factors.

    Examples
    --------
    >>> import torch
    >>> from curvlab.kronecker import eigendecompose
    >>> eigendecompose(None, torch.eye(2)).evals_A is None
    True
    """
    eA = None if A is None else _eigh(A)
    eG = _eigh(G)
    return LayerEigen(
        evals_A=None if eA is None else eA.eigenvalues.clamp_min(0),
        evecs_A=None if eA is None else eA.eigenvectors,
        evals_G=eG.eigenvalues.clamp_min(0),
        evecs_G=eG.eigenvectors,
    )


def count_factors(factors: dict[str, tuple[torch.Tensor | None, torch.Tensor]]) -> int:
    """How many factor matrices ``{layer: (A or None, G)}`` holds (eigendecompositions of
    all of them).

    Parameters
    ----------
    factors : dict of str to (torch.Tensor or None, torch.Tensor)
        The factors by layer.

    Returns
    -------
    int
        Two per layer with a weight, one per lone bias.

    Examples
    --------
    >>> import torch
    >>> from curvlab.kronecker import count_factors
    >>> count_factors({"a": (torch.eye(2), torch.eye(1)), "b": (None, torch.eye(1))})
    3
    """
    return sum(int(a is not None) + 1 for a, _ in factors.values())


# ---------------------------------------------------------------------- block arithmetic
def _input_evals(block: KroneckerBlock, eig: LayerEigen) -> torch.Tensor:
    return eig.evals_A if block.kind != "bias" else eig.evals_G.new_ones(1)


def block_eigenvalues(block: KroneckerBlock, eig: LayerEigen) -> torch.Tensor:
    """[d_out, d_in'] eigenvalues of the block in the basis Q_G (x) Q_A.

    Parameters
    ----------
    block : KroneckerBlock
        The block.
    eig : LayerEigen
        Its layer's eigendecompositions.

    Returns
    -------
    torch.Tensor
        l_G l_A^T (KFAC), or EKFAC's corrected eigenvalues.

    Examples
    --------
    >>> import torch
    >>> from curvlab.kronecker import KroneckerBlock, block_eigenvalues, eigendecompose
    >>> eig = eigendecompose(torch.diag(torch.tensor([1.0, 4.0])), 2 * torch.eye(1))
    >>> block_eigenvalues(KroneckerBlock("", "weight", 0, None), eig)
    tensor([[2., 8.]])
    """
    if eig.corrected is not None:
        return eig.corrected[block.kind]
    return torch.outer(eig.evals_G, _input_evals(block, eig))


def exact_inverse(delta: float) -> Callable[[KroneckerBlock, LayerEigen], torch.Tensor]:
    """Eigenvalue map of (K + delta I)^-1.

    Parameters
    ----------
    delta : float
        The damping.

    Returns
    -------
    callable
        ``(block, eig) -> 1 / (block_eigenvalues(block, eig) + delta)``, for
        :func:`precondition`.

    References
    ----------
    D. Granziol and N. Baskerville, "A random matrix theory approach to damping in deep
    learning", J. Phys. Complex. 3 (2022) (KFAC with exact damping, section 7).

    Examples
    --------
    >>> import torch
    >>> from curvlab.kronecker import KroneckerBlock, eigendecompose, exact_inverse
    >>> eig = eigendecompose(torch.diag(torch.tensor([1.0, 4.0])), 2 * torch.eye(1))
    >>> exact_inverse(1.0)(KroneckerBlock("", "weight", 0, None), eig)  # 1/(2+1), 1/(8+1)
    tensor([[0.3333, 0.1111]])
    """
    return lambda block, eig: 1.0 / (block_eigenvalues(block, eig) + delta)


def heuristic_inverse(
    delta: float, min_damping: float = 1e-8
) -> Callable[[KroneckerBlock, LayerEigen], torch.Tensor]:
    """Eigenvalue map of (G + sqrt(delta)/pi I)^-1 (x) (A + pi sqrt(delta) I)^-1, each
    damping at least ``min_damping`` (as curvlinops clamps them).

    Parameters
    ----------
    delta : float
        The damping.
    min_damping : float, default 1e-8
        Lower bound of each factor's damping.

    Returns
    -------
    callable
        ``(block, eig) -> [d_out, d_in']`` eigenvalue map, for :func:`precondition`; it
        raises ``UnsupportedCapabilityError`` for EKFAC layers (no separate factors).

    References
    ----------
    J. Martens and R. Grosse, "Optimizing neural networks with Kronecker-factored
    approximate curvature", ICML (2015), section 6.3.

    Examples
    --------
    >>> import torch
    >>> from curvlab.kronecker import KroneckerBlock, eigendecompose, heuristic_inverse
    >>> eig = eigendecompose(torch.eye(2), torch.eye(1))  # pi = 1: (1 + 1)^-1 (1 + 1)^-1
    >>> heuristic_inverse(1.0)(KroneckerBlock("", "weight", 0, None), eig)
    tensor([[0.2500, 0.2500]])
    """

    def scaling(block: KroneckerBlock, eig: LayerEigen) -> torch.Tensor:
        if eig.corrected is not None:
            raise UnsupportedCapabilityError(
                "heuristic (pi) damping needs separate Kronecker factors; EKFAC supports "
                "exact damping only: use heuristic=False"
            )
        lam_A, lam_G = _input_evals(block, eig), eig.evals_G
        d_A = d_G = delta
        mean_A, mean_G = float(lam_A.mean()), float(lam_G.mean())
        if block.kind != "bias" and mean_A >= 0 and mean_G > 0:
            pi = math.sqrt(mean_A / mean_G)
            d_A = max(pi * math.sqrt(delta), min_damping)
            d_G = max(math.sqrt(delta) / pi, min_damping)
        elif block.kind == "bias":
            d_A = 0.0  # a lone bias block: (G + delta I)^-1
        return 1.0 / torch.outer(lam_G + d_G, lam_A + d_A)

    return scaling


def precondition(
    blocks: Sequence[KroneckerBlock],
    eigen: dict[str, LayerEigen],
    tensors: Sequence[torch.Tensor],
    scaling: Callable[[KroneckerBlock, LayerEigen], torch.Tensor],
) -> list[torch.Tensor]:
    """Apply (Q_G (x) Q_A) diag(S) (Q_G (x) Q_A)^T blockwise, S = scaling(block, eigen):
    M -> Q_G (S * (Q_G^T M Q_A)) Q_A^T on the [d_out, d_in'] matrix form M of each block.

    Parameters
    ----------
    blocks : sequence of KroneckerBlock
        The blocks to precondition.
    eigen : dict of str to LayerEigen
        Eigendecompositions by layer name.
    tensors : sequence of torch.Tensor
        ``tensors[i]`` is [k, *shape of parameter i] (k columns).
    scaling : callable
        ``scaling(block, eig)`` -> [d_out, d_in'] eigenvalue map, such as
        :func:`exact_inverse` or :func:`heuristic_inverse`.

    Returns
    -------
    list of torch.Tensor
        The same layout; entries of parameters outside ``blocks`` are returned as given.

    References
    ----------
    J. Martens and R. Grosse, "Optimizing neural networks with Kronecker-factored
    approximate curvature", ICML (2015). T. George et al., "Fast approximate natural
    gradient descent in a Kronecker-factored eigenbasis", NeurIPS (2018).

    Examples
    --------
    See the module docstring.
    """
    out = list(tensors)
    for block in blocks:
        eig = eigen[block.layer]
        parts = []
        if block.weight is not None:
            w = tensors[block.weight]
            parts.append(w.reshape(w.shape[0], w.shape[1], -1))
        if block.bias is not None:
            b = tensors[block.bias]
            parts.append(b.reshape(b.shape[0], b.shape[1], 1))
        M = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)  # [k, d_out, d_in']
        qg = eig.evecs_G
        if block.kind == "bias":
            M = qg @ (scaling(block, eig) * (qg.T @ M))
        else:
            qa = eig.evecs_A
            M = qg @ (scaling(block, eig) * (qg.T @ M @ qa)) @ qa.T
        if block.weight is not None:
            shape = tensors[block.weight].shape
            out[block.weight] = M[:, :, : math.prod(shape[2:])].reshape(shape)
        if block.bias is not None:
            out[block.bias] = M[:, :, -1].reshape(tensors[block.bias].shape)
    return out


__all__ = [
    "KRONECKER_LAYERS",
    "KroneckerBlock",
    "LayerEigen",
    "block_eigenvalues",
    "count_factors",
    "eigendecompose",
    "exact_inverse",
    "heuristic_inverse",
    "kronecker_blocks",
    "layer_blocks",
    "parameter_mapping",
    "precondition",
    "refuse_shared",
    "split_params",
]
