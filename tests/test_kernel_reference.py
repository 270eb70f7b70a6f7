"""The kernels (``method="auto"`` and ``"reference"``) equal a naive per-sample
autograd loop, in float64.

The naive truth puts the model in eval mode and loops over samples and outputs with
``torch.autograd.grad``: ``J[i, a] = ∂f_a(x_i)/∂w`` over the trainable parameters, then
``Θ[i, a, j, b] = J[i, a] · diag(P) · J[j, b]`` and ``G[i, j] = ∇ℓ_i · diag(P) · ∇ℓ_j``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gramhook
from gramhook.optim import read_optimizer
from gramhook.zoo import MODELS, make
from naive import naive_gradients, naive_jacobian

pytestmark = [
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),  # vmap over SDPA
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning"),  # forward-AD decomps
]

RTOL = {torch.float64: 1e-10}
M1, M2, K = 4, 3, 3
METHODS = ["auto", "reference"]  # "fast" raises where a layer has no handler; "auto" falls back

LOSSES = {
    "mse": lambda out, y: F.mse_loss(out, y, reduction="none").mean(dim=1),
    "cross_entropy": lambda out, y: F.cross_entropy(out, y, reduction="none"),
}


# -- naive truth (naive.naive_jacobian / naive_gradients) ---------------------------------------
def _trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def flat_precond(model: nn.Module, pre) -> torch.Tensor:
    return torch.cat([pre[n].reshape(-1) for n, _ in _trainable(model)])


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL[torch.float64]):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = expected.abs().max().clamp(min=1e-300)
    err = float((actual - expected).abs().max() / scale)
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.0e}"


def _inputs(x_fn, m, seed):
    return x_fn(m, torch.Generator().manual_seed(seed))


def _targets(loss_name, m, k, seed):
    g = torch.Generator().manual_seed(100 + seed)
    if loss_name == "cross_entropy":
        return torch.randint(0, k, (m,), generator=g)
    return torch.randn(m, k, generator=g, dtype=torch.float64)


def _adam_after_three_steps(model, x_fn, k):
    """A real Adam with three real steps on MSE, run reproducibly (dropout uses a forked RNG)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-6)
    gen = torch.Generator().manual_seed(7)
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for _ in range(3):
            x = x_fn(8, gen)
            y = torch.randn(8, k, generator=gen, dtype=torch.float64)
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
    return opt


def explicit_adam_precond(opt: torch.optim.Adam, model: nn.Module) -> dict:
    """``1/(sqrt(v/(1−β₂^t)) + eps)`` from the optimizer state, by name."""
    group = opt.param_groups[0]
    beta2, eps = group["betas"][1], group["eps"]
    out = {}
    for name, p in _trainable(model):
        state = opt.state[p]
        t = float(state["step"])
        assert t == 3.0
        out[name] = 1.0 / ((state["exp_avg_sq"] / (1.0 - beta2**t)).sqrt() + eps)
    return out


# -- NTK and Gram against the naive loop ------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(MODELS))
def test_empirical_ntk_matches_naive_loop(name, method):
    model, x_fn = make(name, k=K)
    x = _inputs(x_fn, M1, 0)
    theta = gramhook.empirical_ntk(model, x, method=method)
    jac = naive_jacobian(model, x)
    assert theta.shape == (M1, K, M1, K)
    assert_rel_close(theta, torch.einsum("iap,jbp->iajb", jac, jac))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(MODELS))
def test_cross_kernel_shape_and_values(name, method):
    model, x_fn = make(name, k=K)
    x1, x2 = _inputs(x_fn, M1, 0), _inputs(x_fn, M2, 1)
    theta = gramhook.empirical_ntk(model, x1, x2, method=method)
    assert theta.shape == (M1, K, M2, K)
    expected = torch.einsum("iap,jbp->iajb", naive_jacobian(model, x1), naive_jacobian(model, x2))
    assert_rel_close(theta, expected)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("name", list(MODELS))
def test_gradient_gram_matches_naive_loop(name, loss_name, method):
    model, x_fn = make(name, k=K)
    x, y = _inputs(x_fn, M1, 0), _targets(loss_name, M1, K, 0)
    gram = gramhook.gradient_gram(model, loss_name, x, y, method=method)
    grads = naive_gradients(model, LOSSES[loss_name], x, y)
    assert gram.shape == (M1, M1)
    assert_rel_close(gram, grads @ grads.T)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(MODELS))
def test_adam_preconditioner_formula_and_kernels(name, method):
    model, x_fn = make(name, k=K)
    opt = _adam_after_three_steps(model, x_fn, K)
    metric = read_optimizer(opt, model)
    explicit = explicit_adam_precond(opt, model)
    assert metric.dt == pytest.approx(1e-2)
    assert metric.preconditioner is not None and set(metric.preconditioner) == set(explicit)
    for n, pre in explicit.items():
        assert_rel_close(metric.preconditioner[n], pre)
        assert not torch.allclose(pre, torch.ones_like(pre))  # P is really not the identity

    x, y = _inputs(x_fn, M1, 0), _targets("mse", M1, K, 0)
    pdiag = flat_precond(model, explicit)
    jac = naive_jacobian(model, x)
    theta = gramhook.empirical_ntk(model, x, preconditioner=metric.preconditioner, method=method)
    assert_rel_close(theta, torch.einsum("iap,p,jbp->iajb", jac, pdiag, jac))

    grads = naive_gradients(model, LOSSES["mse"], x, y)
    gram = gramhook.gradient_gram(model, "mse", x, y, preconditioner=metric.preconditioner, method=method)
    assert_rel_close(gram, (grads * pdiag) @ grads.T)


# -- module state, frozen parameters, output shapes, chunking ---------------------------------------
def _hook_counts(model):
    return [
        (len(mod._forward_hooks), len(mod._forward_pre_hooks), len(mod._backward_hooks),
         len(getattr(mod, "_backward_pre_hooks", {})))
        for mod in model.modules()
    ]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["resnet_bn", "transformer"])
def test_train_eval_flags_restored_per_submodule(name, method):
    model, x_fn = make(name, k=K)
    model.train()
    odd_one = [mod for mod in model.modules() if mod is not model][1]
    odd_one.eval()
    flags = {id(mod): mod.training for mod in model.modules()}
    assert any(flags.values()) and not all(flags.values())
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    hooks = _hook_counts(model)
    x, y = _inputs(x_fn, M1, 0), _targets("cross_entropy", M1, K, 0)

    gramhook.empirical_ntk(model, x, method=method)
    gramhook.empirical_ntk(model, x, _inputs(x_fn, M2, 1), method=method)
    gramhook.gradient_gram(model, "cross_entropy", x, y, method=method)

    assert {id(mod): mod.training for mod in model.modules()} == flags
    assert not odd_one.training and model.training
    for n, b in model.named_buffers():  # eval mode: BatchNorm running stats untouched
        assert torch.equal(b, buffers[n]), n
    assert _hook_counts(model) == hooks  # every hook handle removed
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(MODELS))
def test_frozen_parameters_are_excluded(name, method):
    model, x_fn = make(name, k=K)
    params = list(model.parameters())
    for p in params[: len(params) // 2]:
        p.requires_grad_(False)
    x, y = _inputs(x_fn, M1, 0), _targets("mse", M1, K, 0)
    jac = naive_jacobian(model, x)
    n_trainable = sum(p.numel() for p in params if p.requires_grad)
    assert jac.shape[2] == n_trainable < sum(p.numel() for p in params)
    theta = gramhook.empirical_ntk(model, x, method=method)
    assert_rel_close(theta, torch.einsum("iap,jbp->iajb", jac, jac))
    grads = naive_gradients(model, LOSSES["mse"], x, y)
    assert_rel_close(gramhook.gradient_gram(model, "mse", x, y, method=method), grads @ grads.T)

    full, _ = make(name, k=K)
    assert not torch.allclose(gramhook.empirical_ntk(full, x, method=method), theta)


class _Reshaped(nn.Module):
    """Wraps a model with 6 outputs so that it returns ``(batch, 2, 3)``."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).reshape(x.shape[0], 2, 3)


def _mse_any_shape(out, t):
    return F.mse_loss(out, t.reshape(out.shape), reduction="none").mean(1)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_outputs_beyond_batch_k_are_flattened(name, method):
    inner, x_fn = make(name, k=6)
    model = _Reshaped(inner)
    x = _inputs(x_fn, M1, 0)
    theta = gramhook.empirical_ntk(model, x, method=method)
    assert theta.shape == (M1, 6, M1, 6)
    jac = naive_jacobian(model, x)
    assert_rel_close(theta, torch.einsum("iap,jbp->iajb", jac, jac))
    assert_rel_close(theta, gramhook.empirical_ntk(inner, x, method=method))  # same as (batch, 6)

    y = torch.randn(M1, 2, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    gram = gramhook.gradient_gram(model, "mse", x, y, method=method)
    grads = naive_gradients(model, _mse_any_shape, x, y)
    assert_rel_close(gram, grads @ grads.T)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["mlp", "resnet_bn", "transformer"])
def test_memory_budget_chunking_gives_same_result(name, method):
    """A 1-byte budget forces one sample per chunk; results must still equal the naive loop."""
    model, x_fn = make(name, k=K)
    x1, x2 = _inputs(x_fn, M1, 0), _inputs(x_fn, M2, 1)
    y = _targets("cross_entropy", M1, K, 0)
    gen = torch.Generator().manual_seed(5)
    pre = {n: torch.rand(p.shape, generator=gen, dtype=p.dtype) + 0.5 for n, p in _trainable(model)}
    pdiag = flat_precond(model, pre)
    j1, j2 = naive_jacobian(model, x1), naive_jacobian(model, x2)
    grads = naive_gradients(model, LOSSES["cross_entropy"], x1, y)
    for kw, p in (({}, torch.ones_like(pdiag)), ({"preconditioner": pre}, pdiag)):
        assert_rel_close(
            gramhook.empirical_ntk(model, x1, x2, memory_budget=1, method=method, **kw),
            torch.einsum("iap,p,jbp->iajb", j1, p, j2),
        )
        assert_rel_close(
            gramhook.gradient_gram(model, "cross_entropy", x1, y, memory_budget=1, method=method, **kw),
            (grads * p) @ grads.T,
        )
