"""The hook-free model view: what it replaces must compute what the original computes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian
from torch.nn.attention import SDPBackend, sdpa_kernel

import curvlab
from curvlab.model_view import _TAPE, MaskTape, ModelView, fingerprint, unwrap

F64 = torch.float64


def _attention(batch_first: bool) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    return nn.MultiheadAttention(8, 2, dropout=0.3, batch_first=batch_first).to(F64)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masking", ["none", "padding", "causal", "float"])
def test_train_mode_attention_with_all_kept_masks_equals_attention_without_dropout(
    batch_first, masking
):
    attn = _attention(batch_first)
    n, length = 3, 5
    x = torch.randn(n, length, 8, dtype=F64)
    if not batch_first:
        x = x.transpose(0, 1)
    kwargs = {}
    if masking == "padding":
        kwargs["key_padding_mask"] = torch.tensor([[False] * 4 + [True]] * n)
    elif masking == "causal":
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(length, dtype=F64)
        kwargs["is_causal"] = True
    elif masking == "float":
        kwargs["attn_mask"] = torch.randn(length, length, dtype=F64)
    view = ModelView(attn)
    attn.train()
    view.sync()
    ones = [torch.ones(n, 2, length, length, dtype=F64)]
    token = _TAPE.set(MaskTape(replay=ones))
    try:
        out, weights = view.module(x, x, x, need_weights=True, **kwargs)
    finally:
        _TAPE.reset(token)
    attn.eval()  # the original module without dropout
    ref_out, ref_weights = attn(x, x, x, need_weights=True, **kwargs)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-12, atol=1e-13)


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)).mean(1))


def _dense_hessian(model, loss_fn, x, y):
    """Double backward of the functional loss, one row at a time. (Nested torch.func
    transforms, jacrev of jacrev or torch.func.hessian, get LayerNorm's second derivatives
    wrong on torch 2.14: 0.2 relative error against finite differences.)"""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in model.named_parameters() if p.requires_grad]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
    theta.requires_grad_()
    chunks = torch.split(theta, [s.numel() for s in shapes])
    state = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes)}
    with sdpa_kernel([SDPBackend.MATH]):
        g = torch.autograd.grad(loss_fn(functional_call(model, state, (x,)), y), theta,
                                create_graph=True)[0]
    return torch.stack([torch.autograd.grad(g[i], theta, retain_graph=True)[0]
                        for i in range(theta.numel())])


def test_eval_mode_transformer_hessian_runs_through_attention_and_matches_dense():
    """The reference is the same function in train mode without dropout (no fused path)."""
    torch.manual_seed(0)
    model = TinyTransformer().to(F64).eval()
    x, y = torch.randint(0, 20, (6, 4)), torch.randint(0, 3, (6,))
    loss_fn = nn.CrossEntropyLoss()
    est = curvlab.estimator("autograd", model, loss_fn, (x, y))
    reference = copy.deepcopy(model).train()
    for m in reference.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(m, nn.MultiheadAttention):
            m.dropout = 0.0
    H = _dense_hessian(reference, loss_fn, x, y)
    torch.testing.assert_close(est.to_dense(), H, rtol=1e-10, atol=1e-12)
    noise = est.noise_variance(batch_size=2, n_probes=2, group_size=2)
    assert noise.value > 0 and est.vectorize is True


def test_train_mode_transformer_group_rows_average_to_the_full_product():
    torch.manual_seed(0)
    model = TinyTransformer().to(F64).train()
    x, y = torch.randint(0, 20, (6, 4)), torch.randint(0, 3, (6,))
    est = curvlab.estimator("autograd", model, nn.CrossEntropyLoss(), (x, y))
    v = torch.randn(est.num_params, dtype=F64)
    for g in (1, 2, 3):
        torch.testing.assert_close(est.group_matvecs(v, g).mean(0), est.matvec(v), rtol=1e-12,
                                   atol=1e-14)
    assert est.vectorize is True


@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_weight_norm_is_differentiated_by_its_formula_and_other_hooks_do_not_fire(api):
    """torch's fused _weight_norm has a wrong double backward (0.36 off on CPU, torch 2.14):
    the view computes g v / ||v|| instead, under the deprecated hook and the parametrization."""
    torch.manual_seed(0)
    if api == "hook":
        with pytest.warns(FutureWarning):
            layer = torch.nn.utils.weight_norm(nn.Linear(4, 3).to(F64))
    else:
        layer = torch.nn.utils.parametrizations.weight_norm(nn.Linear(4, 3).to(F64))
    model = nn.Sequential(layer)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append("model"))
    handle = nn.modules.module.register_module_forward_hook(lambda *a: calls.append("global"))
    try:
        x, y = torch.randn(5, 4, dtype=F64), torch.randint(0, 3, (5,))
        est = curvlab.estimator("autograd", model, nn.CrossEntropyLoss(), (x, y))
        calls.clear()
        H = est.to_dense()
        assert calls == []
        params = dict(model.named_parameters())
        names = est.param_names
        by_shape = {tuple(params[n].shape): n for n in names}
        order = [by_shape[(3,)], by_shape[(3, 1)], by_shape[(3, 4)]]  # bias, g, v

        def loss(t):
            parts = dict(zip(names, torch.split(t, [params[n].numel() for n in names])))
            b, g, v = (parts[n] for n in order)
            v = v.reshape(3, 4)
            w = g.reshape(3, 1) * v / v.norm(dim=1, keepdim=True)
            return nn.functional.cross_entropy(nn.functional.linear(x, w, b), y)

        theta = torch.cat([params[n].detach().reshape(-1) for n in names])
        torch.testing.assert_close(H, hessian(loss)(theta), rtol=1e-10, atol=1e-12)
    finally:
        handle.remove()


def test_wrappers_are_unwrapped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    assert unwrap(nn.DataParallel(model)) is model
    compiled = torch.compile(model)  # nothing is compiled until it is called
    assert unwrap(compiled) is model
    x, y = torch.randn(6, 4, dtype=F64), torch.randint(0, 3, (6,))
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=F64)
    plain = curvlab.estimator("autograd", model, nn.CrossEntropyLoss(), (x, y)).matvec(v)
    wrapped = curvlab.estimator("autograd", compiled, nn.CrossEntropyLoss(), (x, y)).matvec(v)
    assert torch.equal(plain, wrapped)


def test_fingerprint_sees_writes_that_bypass_version_counters():
    p = nn.Parameter(torch.randn(10, dtype=F64))
    before = fingerprint([p])
    version = p._version
    p.data[3] = torch.nextafter(p.data[3], torch.tensor(1.0, dtype=F64))  # one ulp, via .data
    assert p._version == version
    assert fingerprint([p]) != before


def test_the_view_never_updates_the_user_running_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).to(F64).train()
    stats = [b.clone() for b in model.buffers()]
    x, y = torch.randn(8, 4, dtype=F64), torch.randint(0, 3, (8,))
    est = curvlab.estimator("autograd", model, nn.CrossEntropyLoss(), (x, y))
    est.matvec(torch.randn(est.num_params, dtype=F64))
    est.group_matvecs(torch.randn(est.num_params, dtype=F64), 4)
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers()))
