"""Dense curvature references built without curvlab, for the case zoo (tests/cases.py).

Everything here is plain torch: ``torch.func.functional_call`` on a deep copy of the user's
model (buffers cloned inside every call, since train-mode BatchNorm writes them), double
backward for Hessians, Jacobians by batched backward passes, and curvlinops' own KFAC/EKFAC
operators for the ``kfac`` backend.

The quantities follow the model contract (curvlab/estimator.py, curvlab/losses.py):

- the loss of all data is ``L = sum_n c_n / W`` with c_n sample n's contribution to the
  sum-reduced loss and W the loss's own normaliser (N for per-sample means, the summed class
  weights of the non-ignored positions for CrossEntropyLoss); this decomposition is checked
  against ``loss_fn`` itself on the concatenated outputs;
- batch ``i`` runs its forward as after ``torch.manual_seed(seed + i)`` (dropout masks);
- Hessian: d^2 L; GGN (= type-2 Fisher): J^T (d^2 L / d out^2) J on the concatenated
  outputs; empirical Fisher: (1/N) sum_n g_n g_n^T with g_n = (N / W) grad c_n;
- the row of group g (samples S_g, m of them) is (N / (W m)) times the curvature of
  sum_{n in S_g} c_n (for the empirical Fisher: (1/m) sum_{n in S_g} g_n g_n^T); a model
  with batch-coupled layers (train-mode BatchNorm) runs each group as its own mini-batch,
  otherwise c_n comes from the whole batch's forward (its dropout masks).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call

_CLASS_INDEX = (nn.CrossEntropyLoss, nn.NLLLoss)


# ---------------------------------------------------------------------- the loss
def contributions(loss_fn, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(c [n], W): per-sample contributions to the summed loss and the loss's normaliser,
    with ``loss_fn(out, y) == c.sum() / W``."""
    n = out.shape[0]
    per = copy.copy(loss_fn)
    per.reduction = "none"
    if isinstance(loss_fn, _CLASS_INDEX) and not y.is_floating_point():
        c = per(out, y).reshape(n, -1).sum(1)
        valid = y != loss_fn.ignore_index
        if loss_fn.weight is None:
            W = float(valid.sum())
        else:
            W = float((loss_fn.weight[y.clamp(min=0)] * valid).sum())
        return c, W
    return per(out, y).reshape(n, -1).mean(1), float(n)


def check_decomposition(loss_fn, out, y, tol: float) -> None:
    """The reference's own decomposition of the loss equals the loss."""
    c, W = contributions(loss_fn, out, y)
    mean = loss_fn(out, y)
    assert abs(float(c.sum() / W - mean)) <= tol * max(1.0, abs(float(mean))), (
        "reference decomposition of the loss is wrong"
    )


# ---------------------------------------------------------------------- derivatives
def _rows(outputs: torch.Tensor, theta: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """[M, P]: the Jacobian of the flat ``outputs`` with respect to ``theta``, one batched
    backward pass over the identity (a loop where vmap has no rule)."""
    flat = outputs.reshape(-1)
    eye = torch.eye(flat.numel(), dtype=flat.dtype)
    try:
        (jac,) = torch.autograd.grad(
            flat, theta, eye, retain_graph=True, create_graph=create_graph,
            is_grads_batched=True, allow_unused=True, materialize_grads=True,
        )
        return jac
    except RuntimeError:
        return torch.stack(
            [
                torch.autograd.grad(
                    flat, theta, e, retain_graph=True, create_graph=create_graph,
                    allow_unused=True, materialize_grads=True,
                )[0]
                for e in eye
            ]
        )


def _hessian(scalar: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(scalar, theta, create_graph=True)
    return _rows(g, theta)


def _output_hessian(loss_of_out: Callable[[torch.Tensor], torch.Tensor], out: torch.Tensor):
    o = out.detach().requires_grad_()
    return _hessian(loss_of_out(o), o)


# ---------------------------------------------------------------------- the reference
class DenseReference:
    """Dense curvature matrices of ``loss_fn(model(x), y)`` over ``batches``.

    Parameters
    ----------
    model : nn.Module
        Deep-copied; the copy runs in the model's own train/eval flags.
    loss_fn : callable
        A torch loss module with mean reduction.
    batches : list of (x, y)
    names : list of str
        The parameters to differentiate, in the order of the flat vectors.
    seed : int, default 0
        Batch i runs as after ``torch.manual_seed(seed + i)``.
    """

    def __init__(self, model, loss_fn, batches, names: Sequence[str], seed: int = 0):
        self.model = copy.deepcopy(model)
        self.loss_fn = loss_fn
        self.batches = list(batches)
        self.names = list(names)
        self.seed = seed
        params = [self.model.get_parameter(n) for n in self.names]
        self.shapes = [p.shape for p in params]
        self.sizes = [p.numel() for p in params]
        self.theta = torch.cat([p.detach().reshape(-1) for p in params])
        self.buffers = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        self.y = torch.cat([y for _, y in self.batches])
        self.N = self.y.shape[0]
        self.coupled = any(
            isinstance(m, nn.modules.batchnorm._BatchNorm)
            and (m.training or m.running_mean is None)
            for m in self.model.modules()
        )
        dtype = self.theta.dtype
        self.tol = 1e-12 if dtype == torch.float64 else 1e-5
        with torch.no_grad():
            out = self.outputs(self.theta)
        check_decomposition(loss_fn, out, self.y, self.tol)
        self.W = contributions(loss_fn, out, self.y)[1]

    # ------------------------------------------------------------------ forward
    def forward(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(theta, self.sizes)
        state = {n: c.reshape(s) for n, c, s in zip(self.names, chunks, self.shapes)}
        fresh = {n: b.clone() for n, b in self.buffers.items()}
        return functional_call(self.model, {**fresh, **state}, (x,))

    def outputs(self, theta: torch.Tensor) -> torch.Tensor:
        """Concatenated outputs of every batch, batch i under manual_seed(seed + i)."""
        outs = []
        with torch.random.fork_rng():
            for i, (x, _) in enumerate(self.batches):
                torch.manual_seed(self.seed + i)
                outs.append(self.forward(theta, x))
        return torch.cat(outs)

    def _leaf(self) -> torch.Tensor:
        return self.theta.detach().clone().requires_grad_()

    # ------------------------------------------------------------------ full curvature
    def matrix(self, curvature: str) -> torch.Tensor:
        """[P, P]: the curvature of the loss over all batches."""
        t = self._leaf()
        out = self.outputs(t)
        return self._curvature(curvature, t, out, self.y, 1.0 / self.W, range(self.N))

    def _curvature(self, curvature, t, out, y, scale, members) -> torch.Tensor:
        """scale * curvature of sum_{n in members} c_n, given the outputs ``out`` of all the
        samples ``y`` belongs to (rows of ``out`` outside ``members`` do not enter)."""
        members = list(members)
        idx = torch.tensor(members)

        def summed(o):
            return contributions(self.loss_fn, o, y)[0][idx].sum()

        if curvature == "hessian":
            return scale * _hessian(summed(out), t)
        if curvature in ("ggn", "fisher"):
            J = _rows(out, t)
            H_out = _output_hessian(lambda o: summed(o.reshape(out.shape)), out.reshape(-1))
            return scale * (J.T @ H_out @ J)
        if curvature == "ef":
            c = contributions(self.loss_fn, out, y)[0][idx]
            G = _rows(c, t) * (self.N / self.W)  # rows g_n
            return (scale * self.W / self.N) * (G.T @ G)  # 1/N (all data) or 1/m (a group)
        raise ValueError(curvature)

    # ------------------------------------------------------------------ groups
    def group_matrices(self, curvature: str, group_size: int) -> torch.Tensor:
        """[G, P, P]: the curvature of each group of ``group_size`` consecutive samples,
        scaled per sample by N / W (see module docstring); a remainder is dropped."""
        G = self.N // group_size
        scale = self.N / (self.W * group_size)
        mats = []
        if self.coupled:
            x = torch.cat([x for x, _ in self.batches])
            for g in range(G):
                sl = slice(g * group_size, (g + 1) * group_size)
                t = self._leaf()
                out = self.forward(t, x[sl])
                mats.append(
                    self._curvature(curvature, t, out, self.y[sl], scale, range(group_size))
                )
        else:
            for g in range(G):
                t = self._leaf()
                out = self.outputs(t)
                members = range(g * group_size, (g + 1) * group_size)
                mats.append(self._curvature(curvature, t, out, self.y, scale, members))
        return torch.stack(mats)


# ---------------------------------------------------------------------- curvlinops KFAC
class _SeededBatches:
    """Batches yielded as after ``torch.manual_seed(seed + i)`` (re-iterable)."""

    def __init__(self, batches, seed: int):
        self.batches, self.seed = list(batches), seed

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            torch.manual_seed(self.seed + i)
            yield batch


def kfac_operator(model, loss_fn, batches, names, curvature: str, approximation: str, seed=0):
    """curvlinops' own (E)KFAC operator in curvlab's conventions: joint weight/bias blocks,
    type-2 for "ggn"/"fisher", empirical for "ef" (divided by the output size for MSE/BCE,
    whose empirical Fisher curvlinops scales by it). Returns V -> K V."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import curvlinops

    model = copy.deepcopy(model)
    params = [model.get_parameter(n).requires_grad_() for n in names]
    cls = curvlinops.EKFACLinearOperator if approximation == "ekfac" else (
        curvlinops.KFACLinearOperator
    )
    fisher_type = {"ggn": "type-2", "fisher": "type-2", "ef": "empirical"}[curvature]
    num_data = sum(int(x.shape[0]) for x, _ in batches)
    with torch.random.fork_rng():
        op = cls(
            model, loss_fn, params, _SeededBatches(batches, seed),
            progressbar=False, check_deterministic=False, fisher_type=fisher_type,
            separate_weight_and_bias=False, num_data=num_data, kfac_approx="expand",
        )
        op.compute_kronecker_factors()
        if approximation == "ekfac":
            op.compute_eigenvalue_correction()
    scale = 1.0
    if curvature == "ef" and isinstance(loss_fn, (nn.MSELoss, nn.BCEWithLogitsLoss)):
        scale = 1.0 / int(batches[0][1].shape[-1])

    def apply(V: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return (op @ V) * scale

    return apply
