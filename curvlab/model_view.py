"""A private, hook-free view of the user's model: what every backend differentiates.

The curvature curvlab reports is that of the loss of the model as the user holds it: its
parameters, buffers and train/eval mode (DESIGN.md section 5b). Backends never run the
user's module itself. They run a :class:`ModelView`, a structural copy that

- unwraps ``DistributedDataParallel``, ``DataParallel`` and ``torch.compile`` wrappers;
- carries none of the user's hooks (kfac-pytorch, ASDL, BackPACK, DDP or the user's own
  forward, backward and state-dict hooks, and the global module hooks, neither fire nor
  break ``torch.func``); the forward-pre-hooks that compute weights (``weight_norm``,
  ``spectral_norm``, pruning) are kept, since they are part of the forward; weight
  normalisation (hook or parametrization) is computed by its formula, because torch's fused
  kernel has a wrong double backward;
- holds *alias* parameters: new ``nn.Parameter`` objects on the same storage as the user's,
  so values are always current while ``.grad``, ``requires_grad`` and tensor hooks of the
  user's parameters are never touched; buffers are private copies, refreshed on change;
- follows the user's train/eval flags module by module (or a forced ``mode``);
- replaces, in its copy only, the layers that cannot be differentiated or vectorised as they
  are: BatchNorm normalises with the batch statistics (train mode) or the running ones
  (eval) without updating anything, so ``torch.func.vmap`` works and the user's running
  statistics stay as they were; Dropout draws its masks through a replayable tape; multi-head
  attention in train mode with dropout > 0 routes its attention-weight dropout through the
  same tape; scaled-dot-product attention runs on its math kernel (the fused CPU kernels have
  no double backward).

Randomness: batch ``i`` of an estimator runs under ``torch.manual_seed(seed + i)`` in a
forked RNG, so the masks of a stochastic layer are those of
``torch.manual_seed(seed + i); model(x_i)`` and the user's global RNG is neither read nor
advanced. The masks drawn on a whole batch are replayed when a subset of its samples is
evaluated (per-sample and per-group products), so those products average to the full one.

Example
-------
>>> import torch
>>> from torch import nn
>>> from curvlab.model_view import ModelView
>>> model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
>>> calls = []
>>> _ = model.register_forward_hook(lambda *args: calls.append(1))
>>> view = ModelView(model)
>>> out = view.forward({}, torch.randn(5, 3))
>>> calls, model[1].num_batches_tracked.item()
([], 0)
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.modules import module as _module_globals

from curvlab.errors import InvalidInputError, UnsupportedModelError

MODES = (None, "train", "eval")

_HOOK_ATTRS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_hooks_with_kwargs",
    "_global_forward_hooks_always_called",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def _weight_hooks() -> tuple[type, ...]:
    """Forward-pre-hook classes that compute weights: part of the model, not observers."""
    from torch.nn.utils import prune
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return (WeightNorm, SpectralNorm, prune.BasePruningMethod)


# ---------------------------------------------------------------------- unwrapping
def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel, DataParallel and torch.compile wrappers.

    Parameters
    ----------
    model : nn.Module
        The user's model, possibly wrapped (several times).

    Returns
    -------
    nn.Module
        The innermost module (``model`` itself when unwrapped).

    Raises
    ------
    InvalidInputError
        For objects that are not modules.
    UnsupportedModelError
        For FullyShardedDataParallel (each rank holds only a shard of the parameters).

    Examples
    --------
    >>> from torch import nn
    >>> from curvlab.model_view import unwrap
    >>> inner = nn.Linear(2, 1)
    >>> unwrap(nn.DataParallel(inner)) is inner
    True
    """
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
            model = model._orig_mod
        else:
            break
    if type(model).__name__ == "FullyShardedDataParallel":
        raise UnsupportedModelError(
            "FullyShardedDataParallel shards the parameters across ranks, so no rank holds "
            "the model; use DistributedDataParallel (each rank holds the whole model)"
        )
    return model


# ---------------------------------------------------------------------- masks
class MaskTape:
    """The masks of the stochastic layers of one forward pass, in call order.

    ``record`` draws each mask from the current RNG (as the layer itself would) and keeps
    it; ``replay`` hands out given masks in the same order (the masks of a subset of the
    samples, sliced along the batch dimension).

    Parameters
    ----------
    replay : sequence of torch.Tensor, optional
        Masks to hand out in order (replay mode); None records new ones.

    Examples
    --------
    >>> import torch
    >>> from curvlab.model_view import MaskTape
    >>> tape = MaskTape()
    >>> drawn = tape.mask("drop", torch.ones(4, 2), lambda x: torch.bernoulli(0.5 * x))
    >>> replay = MaskTape([m[:2] for m in tape.masks])  # the first two samples' masks
    >>> torch.equal(replay.mask("drop", torch.ones(2, 2), None), drawn[:2])
    True
    """

    def __init__(self, replay: Sequence[torch.Tensor] | None = None):
        self.masks: list[torch.Tensor] = [] if replay is None else list(replay)
        self.replaying = replay is not None
        self._next = 0

    def mask(self, name: str, x: torch.Tensor, draw) -> torch.Tensor:
        """The next mask for input ``x``: drawn (and kept) when recording, else replayed.

        Parameters
        ----------
        name : str
            The layer's name, for messages.
        x : torch.Tensor
            The layer's input; a replayed mask must have its shape.
        draw : callable
            ``draw(x)`` draws a new mask from the current RNG (recording only).

        Returns
        -------
        torch.Tensor
            The mask.

        Raises
        ------
        UnsupportedModelError
            When replaying runs out of masks or a mask does not match ``x``'s shape (the
            layer's masks do not follow the batch dimension).
        """
        if not self.replaying:
            m = draw(x)
            self.masks.append(m.detach())
            return m
        if self._next >= len(self.masks):
            raise UnsupportedModelError(
                f"the stochastic layer {name!r} was called more often on part of a batch than "
                "on the whole batch, so its masks cannot be replayed; call model.eval() or use "
                "group_size equal to the batch"
            )
        m = self.masks[self._next]
        self._next += 1
        if m.shape != x.shape:
            raise UnsupportedModelError(
                f"the dropout masks of layer {name!r} do not follow the batch dimension (mask "
                f"{tuple(m.shape)} for input {tuple(x.shape)}): per-sample and per-group "
                "products replay the masks of the whole batch along dimension 0; use "
                "batch-first layers (e.g. batch_first=True) or call model.eval()"
            )
        return m


_TAPE: contextvars.ContextVar[MaskTape | None] = contextvars.ContextVar("tape", default=None)


def _dropout_mask(module: nn.Module, x: torch.Tensor, draw) -> torch.Tensor:
    tape = _TAPE.get()
    name = getattr(module, "_curvlab_name", type(module).__name__)
    return draw(x) if tape is None else tape.mask(name, x, draw)


_FEATURE_DROPOUT = {
    nn.Dropout1d: F.dropout1d,
    nn.Dropout2d: F.dropout2d,
    nn.Dropout3d: F.dropout3d,
}


def _dropout_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """nn.Dropout* as ``x * mask``: the mask is F.dropout of ones (the same RNG draws as
    the layer's own kernel), recorded or replayed through the tape."""
    if not self.training or self.p == 0.0:
        return x
    fn = next((f for cls, f in _FEATURE_DROPOUT.items() if isinstance(self, cls)), F.dropout)
    return x * _dropout_mask(self, x, lambda t: fn(torch.ones_like(t), self.p, True))


def _alpha_dropout_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if not self.training or self.p == 0.0:
        return x
    raise UnsupportedModelError(
        f"{type(self).__name__} in train mode is not supported (its masks are not a "
        "multiplicative factor curvlab can replay); call model.eval() or use nn.Dropout"
    )


def _batch_norm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm that never updates running statistics: batch statistics in train mode
    (or without running statistics), running statistics in eval mode."""
    self._check_input_dim(x)
    if self.training or self.running_mean is None:
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
    return F.batch_norm(
        x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
    )


def _attention_forward(
    self: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
):
    """nn.MultiheadAttention with its attention-weight dropout on the replayable tape (train
    mode, dropout > 0); otherwise the module's own forward."""
    if not (self.training and self.dropout > 0.0):
        return nn.MultiheadAttention.forward(
            self, query, key, value, key_padding_mask=key_padding_mask,
            need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal,
        )
    if self.bias_k is not None or self.add_zero_attn or not self._qkv_same_embed_dim:
        raise UnsupportedModelError(
            "MultiheadAttention with bias_k/bias_v, add_zero_attn or kdim/vdim != embed_dim "
            "in train mode with dropout > 0 is not supported; call model.eval() or set "
            "dropout=0"
        )
    if query.dim() != 3:
        raise UnsupportedModelError("MultiheadAttention needs batched 3-D inputs here")
    if not self.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    n, length, embed = query.shape
    heads, head_dim = self.num_heads, self.head_dim
    w_q, w_k, w_v = self.in_proj_weight.chunk(3)
    b_q, b_k, b_v = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)

    def split(t, w, b):
        return F.linear(t, w, b).reshape(n, t.shape[1], heads, head_dim).transpose(1, 2)

    q, k, v = split(query, w_q, b_q), split(key, w_k, b_k), split(value, w_v, b_v)
    scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(length, k.shape[2], dtype=torch.bool, device=q.device).triu(1)
    for mask in (attn_mask, key_padding_mask):
        if mask is None:
            continue
        if mask is key_padding_mask:
            mask = mask[:, None, None, :]
        elif mask.dim() == 3:
            mask = mask.reshape(n, heads, *mask.shape[1:])
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(mask, float("-inf"))
        else:
            scores = scores + mask
    weights = torch.softmax(scores, dim=-1)
    weights = weights * _dropout_mask(
        self, weights, lambda t: F.dropout(torch.ones_like(t), self.dropout, True)
    )
    out = (weights @ v).transpose(1, 2).reshape(n, length, embed)
    out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
    if not self.batch_first:
        out = out.transpose(0, 1)
    if not need_weights:
        return out, None
    return out, weights.mean(1) if average_attn_weights else weights


def explicit_weight_norm(v: torch.Tensor, g: torch.Tensor, dim: int) -> torch.Tensor:
    """g * v / ||v|| with the norm over every dimension but ``dim`` (all of them for -1):
    ``torch._weight_norm`` by its formula. torch's fused kernel has a wrong double backward
    (0.36 relative error in the Hessian on CPU, torch 2.14), so the view never calls it."""
    if dim == -1:
        return v * (g / torch.linalg.vector_norm(v))
    dim = dim % v.dim()
    axes = [d for d in range(v.dim()) if d != dim]
    return v * (g / torch.linalg.vector_norm(v, dim=axes, keepdim=True))


def _weight_norm_forward(self: nn.Module, weight_g: torch.Tensor, weight_v: torch.Tensor):
    return explicit_weight_norm(weight_v, weight_g, self.dim)


class _WeightNormHook:
    """The forward-pre-hook of the deprecated ``torch.nn.utils.weight_norm``, computing the
    weight by :func:`explicit_weight_norm`."""

    def __init__(self, hook: Any):
        self.name, self.dim = hook.name, hook.dim

    def __call__(self, module: nn.Module, inputs: Any) -> None:
        v, g = getattr(module, self.name + "_v"), getattr(module, self.name + "_g")
        setattr(module, self.name, explicit_weight_norm(v, g, self.dim))


def _weight_norm_class() -> type:
    from torch.nn.utils.parametrizations import _WeightNorm

    return _WeightNorm


_ALWAYS: list[tuple[type, dict[str, Any]]] = [
    (_weight_norm_class(), {"forward": _weight_norm_forward}),
]
_REPLACEMENTS: list[tuple[type, dict[str, Any]]] = [
    (nn.modules.batchnorm._BatchNorm, {"forward": _batch_norm_forward}),
    (nn.AlphaDropout, {"forward": _alpha_dropout_forward}),
    (nn.FeatureAlphaDropout, {"forward": _alpha_dropout_forward}),
    (nn.modules.dropout._DropoutNd, {"forward": _dropout_forward}),
    (nn.MultiheadAttention, {"forward": _attention_forward}),
]
_VIEW_CLASSES: dict[tuple[type, bool], type | None] = {}


def _view_class(cls: type, functional_layers: bool) -> type | None:
    """The view's subclass of a layer class that needs another forward (cached): weight
    normalisation always, BatchNorm, dropout and attention with ``functional_layers``."""
    key = (cls, functional_layers)
    if key not in _VIEW_CLASSES:
        _VIEW_CLASSES[key] = None
        for base, namespace in _ALWAYS + (_REPLACEMENTS if functional_layers else []):
            if issubclass(cls, base):
                _VIEW_CLASSES[key] = type(
                    f"View{cls.__name__}", (cls,), {**namespace, "__module__": __name__}
                )
                break
    return _VIEW_CLASSES[key]


# ---------------------------------------------------------------------- the copy
def hook_free_copy(
    model: nn.Module,
    *,
    parameter: Any = None,
    buffer: Any = None,
    functional_layers: bool = True,
) -> tuple[nn.Module, dict[int, nn.Module]]:
    """A structural copy of ``model`` without hooks.

    Parameters
    ----------
    model : nn.Module
        The module to copy (left unchanged).
    parameter : callable, optional
        Maps each (distinct) parameter of ``model`` to the copy's (default: the same
        tensor). Tied parameters stay tied.
    buffer : callable, optional
        The same for buffers.
    functional_layers : bool, default True
        Swap BatchNorm, Dropout and MultiheadAttention for their view versions (see module
        docstring); False keeps every class as it is (for backends that dispatch on it).

    Returns
    -------
    copy : nn.Module
        The copy, without forward, backward or state-dict hooks (weight-computing
        forward-pre-hooks such as ``weight_norm`` are kept).
    modules : dict of int to nn.Module
        ``{id(original submodule): copied submodule}``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from curvlab.model_view import hook_free_copy
    >>> model = nn.Linear(2, 1)
    >>> _ = model.register_forward_hook(lambda *args: print("hook fired"))
    >>> copy, _ = hook_free_copy(model)
    >>> _ = copy(torch.ones(1, 2))  # prints nothing
    >>> copy.weight is model.weight
    True
    """
    keep = _weight_hooks()
    from torch.nn.utils.weight_norm import WeightNorm

    memo: dict[int, nn.Module] = {}
    tensors: dict[int, torch.Tensor] = {}

    def mapped(t, fn):
        if t is None or fn is None:
            return t
        if id(t) not in tensors:
            tensors[id(t)] = fn(t)
        return tensors[id(t)]

    def visit(m: nn.Module) -> nn.Module:
        if id(m) in memo:
            return memo[id(m)]
        new = type(m).__new__(type(m))  # not copy.copy: parametrized modules refuse it
        new.__dict__.update(m.__dict__)
        memo[id(m)] = new
        new._parameters = {k: mapped(p, parameter) for k, p in m._parameters.items()}
        new._buffers = {k: mapped(b, buffer) for k, b in m._buffers.items()}
        new._non_persistent_buffers_set = set(m._non_persistent_buffers_set)
        for attr in _HOOK_ATTRS:
            setattr(new, attr, OrderedDict())
        new._forward_pre_hooks.update(
            (k, _WeightNormHook(h) if isinstance(h, WeightNorm) else h)
            for k, h in m._forward_pre_hooks.items()
            if isinstance(h, keep)
        )
        new._is_full_backward_hook = None
        new._modules = {k: None if c is None else visit(c) for k, c in m._modules.items()}
        cls = _view_class(type(m), functional_layers)
        if cls is not None:
            new.__class__ = cls
        return new

    return visit(model), memo


@contextlib.contextmanager
def no_global_hooks() -> Iterator[None]:
    """Disable the global module hooks (``register_module_forward_hook`` and friends) inside
    the block; they are restored afterwards, even on error.

    Yields
    ------
    None
        Inside the block no global module hook fires.
    """
    saved = {name: getattr(_module_globals, name) for name in _GLOBAL_HOOKS}
    if not any(saved.values()):
        yield
        return
    try:
        for name in _GLOBAL_HOOKS:
            setattr(_module_globals, name, OrderedDict())
        yield
    finally:
        for name, value in saved.items():
            setattr(_module_globals, name, value)


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block as after ``torch.manual_seed(seed)`` (CPU and ``device``'s CUDA
    generator), restoring both generators' states afterwards: the user's RNG is neither
    read nor advanced.

    Parameters
    ----------
    seed : int
        The seed.
    device : torch.device
        Also seeds this device's CUDA generator when it is a CUDA device.

    Yields
    ------
    None

    Examples
    --------
    >>> import torch
    >>> from curvlab.model_view import seeded_rng
    >>> before = torch.random.get_rng_state()
    >>> with seeded_rng(3, torch.device("cpu")):
    ...     a = torch.rand(2)
    >>> torch.equal(a, torch.rand(2, generator=torch.Generator().manual_seed(3)))
    True
    >>> torch.equal(torch.random.get_rng_state(), before)  # the global RNG is untouched
    True
    """
    cpu = torch.random.get_rng_state()
    cuda_index = None
    if device.type == "cuda":
        cuda_index = device.index if device.index is not None else torch.cuda.current_device()
        cuda = torch.cuda.get_rng_state(cuda_index)
    try:
        torch.random.default_generator.manual_seed(seed)
        if cuda_index is not None:
            torch.cuda.default_generators[cuda_index].manual_seed(seed)
        yield
    finally:
        torch.random.set_rng_state(cpu)
        if cuda_index is not None:
            torch.cuda.set_rng_state(cuda, cuda_index)


def _math_attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


# ---------------------------------------------------------------------- fingerprints
_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def fingerprint(tensors: Sequence[torch.Tensor]) -> tuple[int, ...]:
    """Exact content checksums of ``tensors``: any practical write changes them, including
    writes through ``.data`` that bypass version counters, values moved between tensors and
    permutations within one.

    The bit patterns of each group of tensors with one bit width and device are concatenated
    (b_1, ..., b_m) and summarised, in wrapping int64 arithmetic, by each tensor's own sum of
    bit patterns and the position-weighted sum_i (m - i + 1) b_i (the sum of the cumulative
    sums). A change is missed only when its bit-pattern differences sum to zero within every
    tensor and, weighted by position, over the group (modulo 2^64): never a permutation or
    an exchange of distinct values, nor a change of one value.

    Parameters
    ----------
    tensors : sequence of torch.Tensor
        The tensors to fingerprint.

    Returns
    -------
    tuple of int
        One integer per tensor and one per group (empty for no tensors).

    Examples
    --------
    >>> import torch
    >>> from curvlab.model_view import fingerprint
    >>> w = torch.tensor([1.0, 2.0, 3.0])
    >>> before = fingerprint([w])
    >>> w.data.copy_(w.data.flip(0))  # .data bypasses the version counter, not the fingerprint
    tensor([3., 2., 1.])
    >>> fingerprint([w]) == before
    False
    """
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        bits = t.detach()
        if bits.is_complex():
            bits = torch.view_as_real(bits)
        if bits.is_floating_point():
            bits = bits.reshape(-1).view(_INT_VIEW[bits.element_size()])
        groups.setdefault((bits.dtype, bits.device), []).append(bits.reshape(-1))
    sums = []
    for parts in groups.values():
        bits = (parts[0] if len(parts) == 1 else torch.cat(parts)).to(torch.int64)
        sums += [part.sum() for part in bits.split([p.numel() for p in parts])]
        sums.append(bits.cumsum(0).sum())
    return tuple(torch.stack(sums).tolist()) if sums else ()


def batch_coupled(module: nn.Module) -> list[str]:
    """Names of the modules whose output mixes the samples of a batch: BatchNorm using
    batch statistics (train mode, or no running statistics).

    Examples
    --------
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    >>> batch_coupled(net), batch_coupled(net.eval())
    (['1'], [])
    """
    return [
        name or type(m).__name__
        for name, m in module.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and (m.training or m.running_mean is None)
    ]


# ---------------------------------------------------------------------- the view
class ModelView:
    """The hook-free view of a model that backends differentiate (see module docstring).

    Parameters
    ----------
    model : nn.Module
        The user's model (wrappers are unwrapped); never modified.
    trainable : sequence of str, optional
        Names of the parameters the curvature is taken with respect to: their aliases
        require grad, all others do not (default: those with ``requires_grad``).
    mode : {None, "train", "eval"}, default None
        None follows the user's train/eval flags module by module; "train"/"eval" set every
        module of the view to that mode (the user's model is never switched).
    functional_layers : bool, default True
        See :func:`hook_free_copy`.

    Raises
    ------
    InvalidInputError
        For an unknown ``mode`` or a model that is not a module.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from curvlab.model_view import ModelView
    >>> model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train()
    >>> view = ModelView(model, mode="eval")
    >>> view.stochastic(), model.training  # the view is in eval mode, the model is not
    ([], True)
    """

    def __init__(
        self,
        model: nn.Module,
        trainable: Sequence[str] | None = None,
        *,
        mode: str | None = None,
        functional_layers: bool = True,
    ):
        if mode not in MODES:
            raise InvalidInputError(f"mode must be None, 'train' or 'eval', got {mode!r}")
        self.source = unwrap(model)
        self.mode = mode
        self.functional_layers = functional_layers
        if trainable is None:
            trainable = [n for n, p in self.source.named_parameters() if p.requires_grad]
        self.trainable = list(trainable)
        self._key: tuple | None = None
        self._build()

    # ------------------------------------------------------------------ building
    def _build(self) -> None:
        chosen = {id(self.source.get_parameter(n)) for n in self.trainable}
        self.module, modules = hook_free_copy(
            self.source,
            parameter=lambda p: nn.Parameter(p.detach(), requires_grad=id(p) in chosen),
            buffer=lambda b: b.detach().clone(),
            functional_layers=self.functional_layers,
        )
        self._pairs = [(m, modules[id(m)]) for m in self.source.modules()]
        for name, m in self.module.named_modules():
            m._curvlab_name = name or type(m).__name__
        self._buffer_pairs = list(zip(self.source.buffers(), self.module.buffers()))
        self._alias_ptrs = self._pointers()
        self.sync_modes()

    def _pointers(self) -> tuple:
        return tuple((id(p), p.data_ptr()) for p in self.source.parameters())

    @property
    def parameters(self) -> list[nn.Parameter]:
        """The view's aliases of the trainable parameters, in ``trainable`` order.

        A list of ``nn.Parameter`` on the same storage as the user's parameters.
        """
        return [self.module.get_parameter(n) for n in self.trainable]

    def source_parameters(self) -> list[nn.Parameter]:
        """The user's current trainable parameters (re-read by name: ``load_state_dict(...,
        assign=True)`` replaces parameter objects)."""
        try:
            return [self.source.get_parameter(n) for n in self.trainable]
        except AttributeError as exc:
            raise InvalidInputError(
                f"the model no longer has the parameters the estimator was built for ({exc})"
            ) from exc

    def sync_modes(self) -> None:
        """Copy the user's train/eval flags into the view (or apply the forced mode).

        Module by module, so a model with some submodules in eval mode is mirrored
        exactly; with ``mode`` set every module of the view gets that mode.
        """
        for src, view in self._pairs:
            view.training = src.training if self.mode is None else self.mode == "train"

    def state_key(self) -> tuple:
        """Identifies the user's model state: every module's train/eval flag, the storage
        and version counter of every parameter and buffer (a replaced tensor or ``.data``,
        any in-place write through the tensor itself: optimizer steps, ``copy_``,
        ``load_state_dict``) and their contents (:func:`fingerprint`: writes through
        ``.data`` or ``vector_to_parameters``, which bypass version counters, values moved
        between tensors or permuted within one). The aliases are rebuilt when they no longer
        share storage with the parameters."""
        tensors = [*self.source.parameters(), *self.source.buffers()]
        return (
            tuple(m.training for m, _ in self._pairs),
            tuple((t.data_ptr(), t._version) for t in tensors),
            fingerprint(tensors),
        )

    def sync(self) -> bool:
        """Bring the view up to date with the user's model; True if anything changed.

        Returns
        -------
        bool
            Whether parameters, buffers, modes or the module structure changed since the
            last sync (the view is rebuilt when parameters were replaced or modules added).
        """
        key = self.state_key()
        if key == self._key:
            return False
        if self._pointers() != self._alias_ptrs or len(self._pairs) != len(
            list(self.source.modules())
        ):
            self._build()  # parameters replaced (assign=True, .data = ...) or modules added
        else:
            self.sync_modes()
            with torch.no_grad():
                for src, dst in self._buffer_pairs:
                    dst.copy_(src)
        self._key = key
        return True

    # ------------------------------------------------------------------ reading the view
    def modules_in(self, kind: type, *, training: bool | None = None) -> list[str]:
        """Names of the view's modules of ``kind`` (optionally only those in that mode).

        Parameters
        ----------
        kind : type
            A module class (or tuple of classes).
        training : bool, optional
            Only modules in train (True) or eval (False) mode; default both.

        Returns
        -------
        list of str
            Their qualified names (the class name for the root).
        """
        return [
            name or type(m).__name__
            for name, m in self.module.named_modules()
            if isinstance(m, kind) and (training is None or m.training == training)
        ]

    def batch_coupled(self) -> list[str]:
        """Modules of the view whose output mixes the samples of a batch
        (:func:`batch_coupled`)."""
        return batch_coupled(self.module)

    def stochastic(self) -> list[str]:
        """Modules that draw random masks in their current mode.

        Returns
        -------
        list of str
            Names of the Dropout layers with p > 0 and MultiheadAttention layers with
            dropout > 0 that are in train mode in the view.
        """
        return [
            name or type(m).__name__
            for name, m in self.module.named_modules()
            if m.training
            and (
                (isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0)
                or (isinstance(m, nn.MultiheadAttention) and m.dropout > 0)
            )
        ]

    # ------------------------------------------------------------------ running it
    def forward(
        self,
        params: Mapping[str, torch.Tensor],
        x: torch.Tensor,
        *,
        tape: MaskTape | None = None,
    ) -> torch.Tensor:
        """``model(x)`` on the view with ``params`` (name -> tensor) substituted; the masks
        of stochastic layers are recorded on, or replayed from, ``tape``.

        Parameters
        ----------
        params : mapping of str to torch.Tensor
            Parameters substituted by name (``{}``: the view's aliases).
        x : torch.Tensor
            The input.
        tape : MaskTape, optional
            Records or replays the masks of stochastic layers (default: fresh draws from
            the current RNG).

        Returns
        -------
        torch.Tensor
            The output; no hook of the user's (global ones included) fires.
        """
        token = _TAPE.set(tape)
        try:
            with no_global_hooks(), _math_attention():
                return functional_call(self.module, dict(params), (x,), strict=False)
        finally:
            _TAPE.reset(token)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The view with its own (alias) parameters: for backends that call a module."""
        return self.forward({}, x)


__all__ = [
    "MODES",
    "MaskTape",
    "ModelView",
    "batch_coupled",
    "fingerprint",
    "hook_free_copy",
    "no_global_hooks",
    "seeded_rng",
    "unwrap",
]
