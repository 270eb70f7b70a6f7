"""Fast kernels (per-layer handlers) against the torch.func reference."""
from __future__ import annotations

import math
import time
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from gramhook.kernel import empirical_ntk, flat_jacobian, gradient_gram, gram, jacobian, per_sample, sketched_jacobian, sketch
from gramhook.kernel import torchfunc as ref
from gramhook.kernel.plan import choose_forms, make_plan
from gramhook.kernel.layers import Outer
from gramhook.zoo import TinyResNet, TokenEncoder, resnet18

# Relative Frobenius tolerances by dtype (neural-tangents style table).
TOL = {torch.float64: 1e-6, torch.float32: 1e-4}
BF16_TOL = 5e-2  # bf16 autocast (8-bit mantissa activations) vs float32, Gram accumulated in fp32


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        yield


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _randomize_bn(model):
    g = torch.Generator().manual_seed(1)
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g))
            mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)
    return model


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 3)), (torch.randn(4, 3, 4), torch.randn(3, 3, 4))


def cnn():
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(4, 6, 3, groups=2, dilation=2, padding=1, padding_mode="circular"), nn.GroupNorm(2, 6),
        nn.ReLU(inplace=True),
        nn.Conv2d(6, 4, 3, padding="same", padding_mode="reflect"), nn.BatchNorm2d(4),
        nn.Flatten(), nn.Linear(16, 3),
    )
    return _randomize_bn(net), (torch.randn(4, 2, 7, 7), torch.randn(3, 2, 7, 7))


def conv1d():
    net = nn.Sequential(nn.Conv1d(3, 4, 3, stride=2, padding=1), nn.LayerNorm(5), nn.Tanh(), nn.Flatten(), nn.Linear(20, 2))
    return net, (torch.randn(4, 3, 9), torch.randn(2, 3, 9))


def resnet():
    return _randomize_bn(TinyResNet(3, widths=(4, 8))), (torch.randn(3, 3, 8, 8), torch.randn(2, 3, 8, 8))


def transformer():
    g = torch.Generator().manual_seed(2)
    return TokenEncoder(17, 8, 2, 3, heads=2, ff=16, padding_idx=0), (torch.randint(0, 17, (3, 5), generator=g), torch.randint(0, 17, (2, 5), generator=g))


class TokenMLP(nn.Module):
    """Embedding, a Linear over positions, LayerNorm, and a raw Parameter (reference path)."""

    def __init__(self, vocab=11, d=6, k=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.lin = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.scale = nn.Parameter(torch.ones(d))
        self.head = nn.Linear(d, k)

    def forward(self, x):
        h = self.norm(torch.tanh(self.lin(self.emb(x)))) * self.scale
        return self.head(h.mean(dim=1))


def tokens():
    g = torch.Generator().manual_seed(4)
    return TokenMLP(), (torch.randint(0, 11, (4, 5), generator=g), torch.randint(0, 11, (3, 5), generator=g))


MODELS = {"mlp": mlp, "cnn": cnn, "conv1d": conv1d, "resnet": resnet, "transformer": transformer, "tokens": tokens}


def _build(name, dtype=torch.float64):
    torch.manual_seed(0)
    net, (x1, x2) = MODELS[name]()
    net = net.to(dtype)
    if x1.is_floating_point():
        x1, x2 = x1.to(dtype), x2.to(dtype)
    return net, x1, x2


def _adam_like(net):
    g = torch.Generator().manual_seed(3)
    return {n: torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.1 for n, p in net.named_parameters()}


@pytest.mark.parametrize("precond", [False, True], ids=["P=I", "adam"])
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("name", list(MODELS))
def test_ntk_fast_matches_reference(name, cross, precond):
    net, x1, x2 = _build(name)
    net.train()
    pre = _adam_like(net) if precond else None
    x2 = x2 if cross else None
    want = ref.empirical_ntk(net, x1, x2, preconditioner=pre)
    got = empirical_ntk(net, x1, x2, preconditioner=pre, method="auto")
    assert got.shape == want.shape
    assert rel(got, want) < TOL[torch.float64]
    assert net.training and all(m.training for m in net.modules())  # flags restored
    assert not any(m._forward_hooks for m in net.modules())  # hooks removed


@pytest.mark.parametrize("precond", [False, True], ids=["P=I", "adam"])
def test_resnet18_layout_at_32x32(precond):
    torch.manual_seed(0)
    net = _randomize_bn(resnet18(2, 2)).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    pre = _adam_like(net) if precond else None
    assert make_plan(net, x).fallback == ()
    got = empirical_ntk(net, x, preconditioner=pre, method="fast")
    assert rel(got, ref.empirical_ntk(net, x, preconditioner=pre)) < TOL[torch.float64]


@pytest.mark.parametrize(
    "name,loss,precond",
    [("mlp", "mse", False), ("cnn", "cross_entropy", True), ("resnet", "cross_entropy", False),
     ("transformer", "mse", True), ("tokens", "cross_entropy", True)],
)
def test_gradient_gram_fast_matches_reference(name, loss, precond):
    net, x, _ = _build(name)
    k = ref.output_size(net, x)
    y = torch.randn(x.shape[0], k, dtype=torch.float64) if loss == "mse" else torch.arange(x.shape[0]) % k
    pre = _adam_like(net) if precond else None
    want = ref.gradient_gram(net, loss, x, y, preconditioner=pre)
    got = gradient_gram(net, loss, x, y, preconditioner=pre, method="auto")
    assert rel(got, want) < TOL[torch.float64]


def test_fast_covers_everything_except_raw_parameters():
    net, x, _ = _build("resnet")
    assert make_plan(net, x).fallback == ()
    net, x, _ = _build("transformer")
    fallback = make_plan(net, x).fallback
    # MultiheadAttention uses in_proj_weight (a raw Parameter) and out_proj.weight without calling
    # out_proj: both take the reference path.
    assert "enc.layers.0.self_attn.in_proj_weight" in fallback
    assert "enc.layers.0.self_attn.out_proj.weight" in fallback
    assert "enc.layers.0.linear1.weight" not in fallback and "emb.weight" not in fallback
    with pytest.raises(ValueError, match="in_proj_weight"):
        empirical_ntk(net, x, method="fast")


def test_reused_and_tied_layers_fall_back():
    lin = nn.Linear(4, 4)
    net = nn.Sequential(lin, nn.Tanh(), lin, nn.Linear(4, 2)).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    assert set(make_plan(net, x).fallback) == {"0.weight", "0.bias"}
    assert rel(empirical_ntk(net, x), ref.empirical_ntk(net, x)) < 1e-6

    emb = nn.Embedding(7, 4)
    head = nn.Linear(4, 7, bias=False)
    head.weight = emb.weight
    tied = nn.Sequential(emb, nn.Tanh(), head).double()
    xi = torch.randint(0, 7, (3, 2))
    assert "0.weight" in make_plan(tied, xi).fallback
    assert rel(empirical_ntk(tied, xi), ref.empirical_ntk(tied, xi)) < 1e-6


@settings(max_examples=8, deadline=None)
@given(
    d_in=st.integers(1, 5), d_out=st.integers(1, 5), seq=st.integers(0, 3), bias=st.booleans(),
)
def test_linear_shapes(d_in, d_out, seq, bias):
    torch.manual_seed(0)
    net = nn.Linear(d_in, d_out, bias=bias).double()
    shape = (3,) + ((seq,) if seq else ()) + (d_in,)
    x = torch.randn(shape, dtype=torch.float64)
    assert rel(empirical_ntk(net, x, method="fast"), ref.empirical_ntk(net, x)) < 1e-6


@settings(max_examples=8, deadline=None)
@given(
    groups=st.sampled_from([1, 2]), kernel=st.integers(1, 3), stride=st.integers(1, 2),
    padding=st.integers(0, 1), dilation=st.integers(1, 2), one_d=st.booleans(),
    mode=st.sampled_from(["zeros", "reflect", "circular"]),
)
def test_conv_shapes(groups, kernel, stride, padding, dilation, one_d, mode):
    torch.manual_seed(0)
    cls = nn.Conv1d if one_d else nn.Conv2d
    conv = cls(2, 4, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, padding_mode=mode)
    net = nn.Sequential(conv, nn.Flatten()).double()
    x = torch.randn((2, 2, 6) if one_d else (2, 2, 6, 5), dtype=torch.float64)
    assert rel(empirical_ntk(net, x, method="fast"), ref.empirical_ntk(net, x)) < 1e-6


def test_ghost_and_dense_forms_agree():
    net, x, _ = _build("mlp")
    plan = make_plan(net, x)
    forms = choose_forms(plan, 4, 4, 3, None)
    assert "ghost" in forms.values()  # flat Linear layers go ghost
    fg = gram.capture_factors(net, x, plan=plan)
    # ghost weights with their biases folded in: no (m, k, D) per-sample gradient is stored
    assert all(isinstance(r, Outer) for r in fg.chunks[0].values())
    ghost = gram.cross_kernel(fg)
    f = gram.capture_factors(net, x, plan=plan, preconditioner={n: torch.ones_like(p) for n, p in net.named_parameters()})
    assert set(f.forms.values()) == {"dense"}
    assert rel(gram.cross_kernel(f), ghost) < 1e-12


def test_chunking_and_recompute_match():
    net, x1, x2 = _build("cnn")
    want = ref.empirical_ntk(net, x1, x2)
    f1 = gram.capture_factors(net, x1, chunk=3, store=False, other_size=3)
    f2 = gram.capture_factors(net, x2, plan=f1.plan, chunk=2, store=True, other_size=4)
    assert rel(gram.cross_kernel(f1, f2), want) < 1e-6
    # A tiny budget forces chunks of one sample, recomputed for every block.
    assert rel(empirical_ntk(net, x1[:2], x2[:2], memory_budget=1), want[:2, :, :2]) < 1e-6


def test_oom_retry_halves_chunk(monkeypatch):
    net, x, _ = _build("cnn")
    want = ref.empirical_ntk(net, x)
    real = per_sample.chunk_contributions
    seen = []

    def flaky(model, plan, xs, cot, **kw):
        if not kw.get("preflight"):
            seen.append(xs.shape[0])
            if len(seen) == 1:
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(model, plan, xs, cot, **kw)

    monkeypatch.setattr(per_sample, "chunk_contributions", flaky)
    got = empirical_ntk(net, x)
    assert seen[0] == 4 and max(seen[1:]) == 2
    assert rel(got, want) < 1e-6

    def always(model, plan, xs, cot, **kw):
        raise RuntimeError("some other failure")

    monkeypatch.setattr(per_sample, "chunk_contributions", always)
    with pytest.raises(RuntimeError, match="other failure"):
        empirical_ntk(net, x)


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_autocast_bf16(name):
    net, x, _ = _build(name, dtype=torch.float32)
    want = ref.empirical_ntk(net, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = empirical_ntk(net, x)
    assert got.dtype == torch.float32
    assert rel(got, want) < BF16_TOL


@pytest.mark.parametrize("precond", [False, True], ids=["P=I", "adam"])
def test_sketch_is_unbiased_with_error_one_over_sqrt_s(precond):
    net, x, _ = _build("tokens")  # Embedding, Linear over positions, LayerNorm, a raw Parameter
    pre = _adam_like(net) if precond else None
    theta = ref.empirical_ntk(net, x, preconditioner=pre)
    m, k = theta.shape[:2]
    theta = theta.reshape(m * k, m * k)
    scale = torch.sqrt(torch.outer(theta.diagonal(), theta.diagonal()))

    def normalized_err(s, seed):
        j = sketched_jacobian(net, x, s, seed=seed, preconditioner=pre).reshape(m * k, s)
        return (j @ j.T - theta) / scale, j

    errs = {}
    for s in (64, 1024):
        e = [normalized_err(s, seed)[0] for seed in range(4)]
        errs[s] = torch.stack(e)
        mse = errs[s].pow(2).mean().item()
        # JL: Var ≈ (1 + ρ²)/s per entry, so s·MSE lies in about [1, 2].
        assert 0.3 < s * mse < 4.0, (s, s * mse)
    # unbiased: the mean over seeds has a small error relative to the spread of one sketch
    bias = errs[1024].mean(0).abs().mean().item()
    assert bias < 2.5 / math.sqrt(1024 * 4)
    # deterministic for a fixed seed
    a = sketched_jacobian(net, x, 32, seed=5, preconditioner=pre)
    b = sketched_jacobian(net, x, 32, seed=5, preconditioner=pre, memory_budget=1)
    assert torch.allclose(a, b)


def test_fft_and_dense_sketch_routes_are_the_same_sketch():
    torch.manual_seed(0)
    a = torch.randn(3, 2, 4, 5, dtype=torch.float64)  # (c, G, T, d_in)
    b = torch.randn(3, 2, 2, 4, 3, dtype=torch.float64)  # (c, q, G, T, d_out)
    o = Outer(a, b, 5, (6, 5))
    h, flat = sketch._hashes("w", (6, 5), 16, 0, "cpu"), sketch._flat_hash("w", (6, 5), 16, 0, "cpu")
    dense = sketch._count_sketch_dense(o.dense().reshape(3, 2, -1), flat, 16)
    assert torch.allclose(sketch._tensor_sketch(o, h, 16), dense, atol=1e-10)
    signed = sketch._count_sketch_dense(sketch._signed(o, h).dense().reshape(3, 2, -1), flat, 16, signed=True)
    assert torch.allclose(signed, dense, atol=1e-10)
    idx = torch.randint(0, 7, (3, 1, 4))
    o = Outer(idx, torch.randn(3, 2, 1, 4, 3, dtype=torch.float64), 7, (7, 3), a_is_row=True)
    h, flat = sketch._hashes("e", (7, 3), 16, 0, "cpu"), sketch._flat_hash("e", (7, 3), 16, 0, "cpu")
    dense = sketch._count_sketch_dense(o.dense().reshape(3, 2, -1), flat, 16)
    assert torch.allclose(sketch._tensor_sketch(o, h, 16), dense, atol=1e-10)


def test_reference_method_dispatch():
    net, x, _ = _build("mlp")
    assert torch.equal(empirical_ntk(net, x, method="reference"), ref.empirical_ntk(net, x))
    with pytest.raises(ValueError, match="method must be one of"):
        empirical_ntk(net, x, method="slow")
    assert sketched_jacobian(net, x, 8, method="reference").shape == (4, 3, 8)


# ---------------------------------------------------------------------------------------------
# Flat Jacobian (m, k, P): the fast path against the torch.func reference, in float64.

JAC_ATOL = 1e-10


def _assert_jac_equal(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype
    scale = max(1.0, want.abs().max().item())
    assert (got - want).abs().max().item() <= JAC_ATOL * scale


def wide_cnn():
    """First conv with a narrow input (d_in = 9, T = 64: the transposed GEMM), grouped/strided next."""
    net = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.Tanh(),
        nn.Conv2d(6, 4, 3, stride=2, groups=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(36, 3),
    )
    return net, (torch.randn(5, 1, 8, 8), None)


def relu_mlp():
    """Every op of its batched backward has a batching rule: the single batched backward is used."""
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3)), (torch.randn(4, 3, 4), None)


JAC_MODELS = {**MODELS, "wide_cnn": wide_cnn, "relu_mlp": relu_mlp}


def _build_jac(name):
    torch.manual_seed(0)
    net, (x, _) = JAC_MODELS[name]()
    net = net.double()
    return net, (x.double() if x.is_floating_point() else x)


@pytest.mark.parametrize("name", ["mlp", "relu_mlp", "cnn", "wide_cnn", "resnet", "transformer", "tokens"])
def test_flat_jacobian_fast_matches_reference(name):
    net, x = _build_jac(name)
    net.train()  # eval semantics inside, flags restored
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    want = ref.flat_jacobian(net, x)
    got = flat_jacobian(net, x, method="auto")
    _assert_jac_equal(got, want)
    assert net.training and all(m.training for m in net.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in net.modules())
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(b, buffers[n]) for n, b in net.named_buffers())  # BatchNorm stats untouched
    assert not got.requires_grad


@pytest.mark.parametrize("power", [0.5, 1.0])
@pytest.mark.parametrize("name", ["cnn", "transformer"])
def test_flat_jacobian_preconditioned(name, power):
    net, x = _build_jac(name)
    pre = _adam_like(net)
    want = ref.flat_jacobian(net, x, preconditioner=pre, power=power)
    _assert_jac_equal(flat_jacobian(net, x, preconditioner=pre, power=power), want)
    # power 0 ignores the preconditioner
    _assert_jac_equal(flat_jacobian(net, x, preconditioner=pre), ref.flat_jacobian(net, x))


def test_flat_jacobian_names_subset():
    net, x = _build_jac("transformer")
    # handled and fallback parameters, out of named_parameters() order: the given order is kept
    names = ["head.weight", "enc.layers.1.self_attn.in_proj_weight", "emb.weight", "enc.layers.0.norm1.bias"]
    pre = _adam_like(net)
    want = ref.flat_jacobian(net, x, names=names, preconditioner=pre, power=0.5)
    _assert_jac_equal(flat_jacobian(net, x, names=names, preconditioner=pre, power=0.5), want)
    # a parameter with requires_grad=False is still differentiated when named (reference path)
    net, x = _build_jac("cnn")
    net[0].weight.requires_grad_(False)
    names = ["0.weight", "2.weight", "8.bias"]
    _assert_jac_equal(flat_jacobian(net, x, names=names), ref.flat_jacobian(net, x, names=names))
    default = flat_jacobian(net, x)
    assert default.shape[2] == sum(p.numel() for p in net.parameters() if p.requires_grad)
    _assert_jac_equal(default, ref.flat_jacobian(net, x))


@pytest.mark.parametrize("block", [None, 1, 200], ids=["default", "per-output", "small-blocks"])
@pytest.mark.parametrize("name", ["cnn", "wide_cnn", "resnet"])
def test_flat_jacobian_chunks_and_write_blocks(name, block, monkeypatch):
    net, x = _build_jac(name)
    want = ref.flat_jacobian(net, x)
    if block is not None:  # the per-output GEMM route (huge layers) and blocks of one or two samples
        monkeypatch.setattr(jacobian, "_WRITE_BLOCK_ELEMS", block)
    _assert_jac_equal(flat_jacobian(net, x, memory_budget=1), want)  # chunks of one sample
    _assert_jac_equal(flat_jacobian(net, x), want)


def test_flat_jacobian_oom_retry_and_dispatch(monkeypatch):
    net, x = _build_jac("cnn")
    want = ref.flat_jacobian(net, x)
    assert torch.equal(flat_jacobian(net, x, method="reference"), want)
    with pytest.raises(ValueError, match="method must be one of"):
        flat_jacobian(net, x, method="slow")
    real = per_sample.chunk_contributions
    seen = []

    def flaky(model, plan, xs, cot, **kw):
        seen.append(xs.shape[0])
        if len(seen) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(model, plan, xs, cot, **kw)

    monkeypatch.setattr(per_sample, "chunk_contributions", flaky)
    _assert_jac_equal(flat_jacobian(net, x), want)
    assert seen[0] == 4 and max(seen[1:]) == 2


def test_flat_jacobian_strict_and_autocast():
    net, x = _build_jac("transformer")
    with pytest.raises(ValueError, match="in_proj_weight"):
        flat_jacobian(net, x, method="fast")
    names = ["emb.weight", "head.weight", "head.bias"]  # all handled: "fast" is fine
    _assert_jac_equal(flat_jacobian(net, x, names=names, method="fast"), ref.flat_jacobian(net, x, names=names))
    net, x, _ = _build("cnn", dtype=torch.float32)
    want = ref.flat_jacobian(net, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = flat_jacobian(net, x)
        theta = empirical_ntk(net, x)
    assert got.dtype == torch.float32
    # Single Jacobian entries carry the bf16 activation error (~7% here; the NTK averages it down),
    # and J Jᵀ is the fast NTK under the same autocast.
    assert rel(got, want) < 3 * BF16_TOL
    assert rel(torch.einsum("iap,jbp->iajb", got, got), theta) < 1e-5


@pytest.mark.parametrize("name,loop", [("relu_mlp", False), ("cnn", True)])
def test_flat_jacobian_backward_mode(name, loop, monkeypatch):
    """One batched backward of the k cotangents, or a loop over them where vmap would loop op by op."""
    net, x = _build_jac(name)
    real = per_sample.chunk_contributions
    modes = []

    def spy(model, plan, xs, cot, **kw):
        modes.append(kw.get("loop", False))
        return real(model, plan, xs, cot, **kw)

    monkeypatch.setattr(per_sample, "chunk_contributions", spy)
    _assert_jac_equal(flat_jacobian(net, x), ref.flat_jacobian(net, x))
    assert modes == [loop]
    assert not torch._C._debug_only_are_vmap_fallback_warnings_enabled()  # global flag restored


def test_flat_jacobian_large_output_buffer():
    """Outputs of 32 MiB or more are advised as huge pages on Linux: still an ordinary tensor."""
    n = (40 << 20) // 4
    t = jacobian._empty_output((n // 8, 8), torch.float32, torch.device("cpu"))
    assert t.shape == (n // 8, 8) and t.is_contiguous() and t.storage_offset() == 0
    t.fill_(2.0)
    assert t.sum().item() == 2.0 * n


def test_auto_autotunes_on_listed_devices(monkeypatch):
    """On an autotuned device, ``auto`` times both exact paths once per signature and keeps the faster."""
    import gramhook.kernel as K

    net, x, _ = _build("mlp", dtype=torch.float64)
    monkeypatch.setattr(K, "AUTOTUNE_DEVICES", {"cpu"})
    monkeypatch.setattr(K, "_choices", __import__("weakref").WeakKeyDictionary())
    want = ref.empirical_ntk(net, x)
    calls = []
    for name in ("empirical_ntk", "flat_jacobian"):
        for module, tag in ((K._gram if name == "empirical_ntk" else K._jacobian, "fast"), (K._reference, "reference")):
            real = getattr(module, name)

            def spy(*a, _real=real, _tag=tag, _name=name, **kw):
                calls.append((_name, _tag))
                if _tag == "reference":
                    time.sleep(0.05)  # make the reference the slower one
                return _real(*a, **kw)

            monkeypatch.setattr(module, name, spy)
    for _ in range(3):
        assert rel(K.empirical_ntk(net, x), want) < TOL[torch.float64]
    assert [c for c in calls if c[0] == "empirical_ntk"] == [("empirical_ntk", "fast"), ("empirical_ntk", "reference")] + [("empirical_ntk", "fast")] * 2
    assert list(K._choices[net].values()) == ["fast"]
    # A new shape is a new signature; a failing reference keeps the fast path.
    monkeypatch.setattr(K._reference, "flat_jacobian", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("no rule")))
    assert K.flat_jacobian(net, x[:3]).shape[0] == 3
    assert K._choices[net][("jacobian",) + K._signature(x[:3], None, 0.0, None, K.DEFAULT_MEMORY_BUDGET)] == "fast"


def test_auto_keeps_the_fast_path_on_cpu_by_default(monkeypatch):
    """On CPU ``auto`` takes the fast path without timing the reference against it."""
    import gramhook.kernel as K

    net, x, _ = _build("mlp", dtype=torch.float64)
    want = ref.empirical_ntk(net, x)
    monkeypatch.setattr(K, "_choices", __import__("weakref").WeakKeyDictionary())
    for name in ("empirical_ntk", "flat_jacobian"):
        monkeypatch.setattr(K._reference, name, lambda *a, _name=name, **kw: pytest.fail(f"reference {_name} ran"))
    assert rel(K.empirical_ntk(net, x), want) < TOL[torch.float64]
    assert K.flat_jacobian(net, x).shape[0] == x.shape[0]


def test_kernels_work_under_no_grad():
    """Users call diagnostics inside ``torch.no_grad()`` (an eval loop, an optimizer-step hook): the
    public kernels switch grad mode on for themselves and return the same values, without a graph."""
    net, x = _build_jac("cnn")
    want = [flat_jacobian(net, x), empirical_ntk(net, x), sketched_jacobian(net, x, 32, seed=1)]
    with torch.no_grad():
        got = [flat_jacobian(net, x), empirical_ntk(net, x), sketched_jacobian(net, x, 32, seed=1)]
        assert not torch.is_grad_enabled()
    for a, b in zip(got, want):
        assert torch.equal(a, b) and not a.requires_grad
