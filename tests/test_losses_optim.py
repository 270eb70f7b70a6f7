"""Losses (r, Λ), the optimizer metric (dt, P, decay) and the perturbation factor ε̄.

Every quantity is compared with a closed form, finite differences, a real ``torch.optim`` step or
a naive per-sample loop, in float64.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gramhook
from gramhook.dynamics.engine import EngineConfig, ParameterSpaceEngine, perturbation_factor
from gramhook.losses import output_hessian, per_sample_losses, residual_and_hessian, resolve_loss
from gramhook.measure import compute_rates
from gramhook.optim import SUPPORTED_OPTIMIZERS, read_optimizer
from gramhook.zoo import MODELS, make
from naive import naive_gradients

pytestmark = [
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),  # vmap over SDPA
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning"),  # forward-AD decomps
]

F64 = torch.float64
M, K = 5, 3


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))


# == losses: residual r = ∂ℓ/∂f and Hessian Λ = ∂²ℓ/∂f² ==========================================
def test_mse_residual_and_hessian_closed_form():
    """torch's mse_loss averages over the k outputs: r = 2(f − y)/k, Λ = 2I/k."""
    out = torch.randn(M, K, generator=_gen(0), dtype=F64)
    y = torch.randn(M, K, generator=_gen(1), dtype=F64)
    loss = resolve_loss("mse")
    assert not loss.hessian_needs_target
    values = per_sample_losses(loss, out, y)
    torch.testing.assert_close(values, F.mse_loss(out, y, reduction="none").mean(1), rtol=1e-14, atol=0)
    r, lam = residual_and_hessian(loss, out, y)
    torch.testing.assert_close(r, 2 * (out - y) / K, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(lam, (2.0 / K) * torch.eye(K, dtype=F64).expand(M, K, K), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(output_hessian(loss, out), lam, rtol=1e-12, atol=1e-15)


def test_cross_entropy_residual_and_hessian_closed_form():
    """r = softmax(f) − onehot(y), Λ = diag(p) − p pᵀ (independent of y)."""
    out = 3 * torch.randn(M, K, generator=_gen(0), dtype=F64)
    y = torch.randint(0, K, (M,), generator=_gen(1))
    loss = resolve_loss("cross_entropy")
    p = out.softmax(1)
    r, lam = residual_and_hessian(loss, out, y)
    torch.testing.assert_close(r, p - F.one_hot(y, K).to(F64), rtol=1e-12, atol=1e-14)
    expected = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    torch.testing.assert_close(lam, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(output_hessian(loss, out), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["mse", "cross_entropy"])
def test_builtin_closed_forms_equal_autograd(name):
    """The built-ins' closed-form r and Λ equal autograd on the same per-sample loss, also in float32."""
    builtin = resolve_loss(name)
    autograd_twin = dataclasses.replace(builtin, name=name + "_by_autograd")
    for dtype in (F64, torch.float32):
        out = 3 * torch.randn(M, K, generator=_gen(2), dtype=dtype)
        y = (torch.randint(0, K, (M,), generator=_gen(3)) if name == "cross_entropy"
             else torch.randn(M, K, generator=_gen(3), dtype=dtype))
        r, lam = residual_and_hessian(builtin, out, y)
        r_ref, lam_ref = residual_and_hessian(autograd_twin, out, y)
        tol = dict(rtol=1e-12, atol=1e-14) if dtype == F64 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r, r_ref, **tol)
        torch.testing.assert_close(lam, lam_ref, **tol)
        assert r.dtype == lam.dtype == dtype


def test_custom_huber_loss_closed_form():
    delta = 0.5

    def huber(out, t):
        return F.huber_loss(out, t, reduction="none", delta=delta).mean(1)

    out = torch.randn(M, K, generator=_gen(0), dtype=F64)
    y = torch.randn(M, K, generator=_gen(1), dtype=F64)
    diff = out - y
    assert ((diff.abs() - delta).abs() > 1e-3).all()  # away from the kink
    loss = resolve_loss(huber)
    assert loss.name == "huber" and loss.hessian_needs_target
    r, lam = residual_and_hessian(loss, out, y)
    torch.testing.assert_close(r, diff.clamp(-delta, delta) / K, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(lam, torch.diag_embed((diff.abs() < delta).to(F64) / K), rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="reference=\\(x, y\\)"):
        output_hessian(loss, out)  # Λ may depend on y: no silent zero targets


def _coupled_loss(out, t):
    """A smooth loss that couples the outputs: log(1 + ‖f − y‖²) + 0.3 (Σ f)² / k."""
    d = out - t
    return torch.log1p((d * d).sum(1)) + 0.3 * out.sum(1) ** 2 / out.shape[1]


def test_custom_loss_against_finite_differences():
    out = torch.randn(M, K, generator=_gen(0), dtype=F64)
    y = torch.randn(M, K, generator=_gen(1), dtype=F64)
    r, lam = residual_and_hessian(resolve_loss(_coupled_loss), out, y)
    h = 1e-4
    eye = torch.eye(K, dtype=F64)
    r_fd = torch.stack(
        [(_coupled_loss(out + h * eye[a], y) - _coupled_loss(out - h * eye[a], y)) / (2 * h) for a in range(K)], 1
    )
    lam_fd = torch.empty(M, K, K, dtype=F64)
    for a in range(K):
        for b in range(K):
            ea, eb = h * eye[a], h * eye[b]
            lam_fd[:, a, b] = (
                _coupled_loss(out + ea + eb, y) - _coupled_loss(out + ea - eb, y)
                - _coupled_loss(out - ea + eb, y) + _coupled_loss(out - ea - eb, y)
            ) / (4 * h * h)
    assert _rel_err(r, r_fd) < 1e-7
    assert _rel_err(lam, lam_fd) < 1e-6
    torch.testing.assert_close(lam, lam.transpose(1, 2), rtol=1e-12, atol=1e-15)


def test_custom_loss_sees_the_models_output_shape():
    seen = []

    def loss_2x3(out, t):
        seen.append(tuple(out.shape[1:]))
        return ((out - t) ** 2).sum((1, 2))

    loss = resolve_loss(loss_2x3).with_out_shape((2, 3))
    out = torch.randn(M, 6, generator=_gen(0), dtype=F64)
    y = torch.randn(M, 2, 3, generator=_gen(1), dtype=F64)
    r, lam = residual_and_hessian(loss, out, y)
    assert set(seen) == {(2, 3)}
    torch.testing.assert_close(r, 2 * (out - y.reshape(M, 6)), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(lam, 2 * torch.eye(6, dtype=F64).expand(M, 6, 6), rtol=1e-12, atol=1e-15)


SCALAR_LOSSES = {
    "mse_mean": lambda out, t: F.mse_loss(out, t),
    "sum": lambda out, t: ((out - t) ** 2).sum(),
    "keepdim": lambda out, t: ((out - t) ** 2).mean(1, keepdim=True),
}


@pytest.mark.parametrize("which", list(SCALAR_LOSSES))
def test_loss_not_per_sample_raises_helpful_error(which):
    """A reduced loss is rejected with a message that says how to fix it."""
    loss = resolve_loss(SCALAR_LOSSES[which])
    out = torch.randn(M, K, generator=_gen(0), dtype=F64)
    y = torch.randn(M, K, generator=_gen(1), dtype=F64)
    fix = "one value per sample.*reduction='none'"
    with pytest.raises(ValueError, match=fix):
        per_sample_losses(loss, out, y)
    with pytest.raises(ValueError, match=fix):
        residual_and_hessian(loss, out, y)
    model, x_fn = make("mlp", k=K)
    with pytest.raises(ValueError, match=fix):
        gramhook.gradient_gram(model, SCALAR_LOSSES[which], x_fn(M, _gen(2)), y)


def test_unknown_loss_name_and_type():
    with pytest.raises(ValueError, match="'mse', 'cross_entropy'"):
        resolve_loss("hinge")
    with pytest.raises(TypeError, match="string or a callable"):
        resolve_loss(3)


# == optimizer metric: dt, P, decay ===============================================================
def _linear_model():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)


def _constant_gradient_steps(model, opt, steps, scale=1.0):
    """Steps on the linear loss Σ c·w (gradient c everywhere); returns c and the last displacement."""
    c = {n: scale * (torch.arange(p.numel(), dtype=F64).reshape(p.shape) % 3 - 0.7) for n, p in model.named_parameters()}
    last = {}
    for _ in range(steps):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        sum((p * c[n]).sum() for n, p in model.named_parameters()).backward()
        opt.step()
        last = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    return c, last


SGD_CASES = {
    # id: (kwargs, dt / lr)
    "plain": (dict(), 1.0),
    "momentum": (dict(momentum=0.9), 1 / (1 - 0.9)),
    "momentum_dampening": (dict(momentum=0.8, dampening=0.3), (1 - 0.3) / (1 - 0.8)),
    "nesterov": (dict(momentum=0.7, nesterov=True), 1 / (1 - 0.7)),
    "dampening_without_momentum": (dict(dampening=0.5), 1.0),  # torch ignores dampening here
}


@pytest.mark.parametrize("case", list(SGD_CASES))
def test_sgd_dt_matches_the_real_steady_step(case):
    kwargs, ratio = SGD_CASES[case]
    model = _linear_model()
    lr = 0.05
    opt = torch.optim.SGD(model.parameters(), lr=lr, **kwargs)
    metric = read_optimizer(opt, model)
    assert metric.dt == pytest.approx(lr * ratio, rel=1e-12)
    assert metric.preconditioner is None and metric.decay is None
    assert metric.names == tuple(n for n, _ in model.named_parameters())
    # On a constant gradient the real per-step displacement tends to −dt·c.
    c, last = _constant_gradient_steps(model, opt, 400)
    for n in c:
        torch.testing.assert_close(last[n], -metric.dt * c[n], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kwargs", [dict(), dict(momentum=0.9), dict(momentum=0.5, nesterov=True)])
def test_sgd_weight_decay_rate(kwargs):
    model = _linear_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-2, **kwargs)
    metric = read_optimizer(opt, model)
    assert set(metric.decay) == set(metric.names)
    assert all(v == pytest.approx(1e-2) for v in metric.decay.values())  # per unit flow time


def test_sgd_param_groups_scale_the_preconditioner():
    model = _linear_model()
    opt = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters(), "lr": 0.025}],
        momentum=0.5,
        weight_decay=1e-3,
    )
    metric = read_optimizer(opt, model)
    assert metric.dt == pytest.approx(0.2)
    assert metric.preconditioner is not None
    for n, p in model.named_parameters():
        expected = 1.0 if n.startswith("0.") else 0.25
        torch.testing.assert_close(metric.preconditioner[n], torch.full_like(p, expected))
        assert metric.decay[n] == pytest.approx(1e-3 * expected)
    opt = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters(), "lr": 0.025}],
        momentum=0.5,
    )
    c, last = _constant_gradient_steps(model, opt, 300)
    for n in c:  # without decay, the steady displacement per step is −dt · P · c
        torch.testing.assert_close(last[n], -metric.dt * metric.preconditioner[n] * c[n], rtol=1e-8, atol=1e-12)


def test_frozen_parameters_not_in_metric():
    model = _linear_model()
    model[0].weight.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    metric = read_optimizer(opt, model)
    assert "0.weight" not in metric.names and "0.weight" not in metric.preconditioner
    assert metric.names == ("0.bias", "2.weight", "2.bias")


def test_lr_scheduler_is_respected():
    model = _linear_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    assert read_optimizer(opt, model).dt == pytest.approx(0.2)
    _constant_gradient_steps(model, opt, 1)
    sched.step()
    assert read_optimizer(opt, model).dt == pytest.approx(0.1)
    _constant_gradient_steps(model, opt, 1)
    sched.step()
    assert read_optimizer(opt, model).dt == pytest.approx(0.05)


def _adam_pre(opt, p, amsgrad=False):
    group = opt.param_groups[0]
    state = opt.state[p]
    v = state["max_exp_avg_sq"] if amsgrad else state["exp_avg_sq"]
    t = float(state["step"])
    return 1.0 / ((v / (1 - group["betas"][1] ** t)).sqrt() + group["eps"])


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("kind", ["Adam", "AdamW"])
def test_adam_preconditioner_and_real_step(kind, amsgrad):
    """After each real step: P = 1/(sqrt(v̂)+eps) and the step was exactly −dt · P · m̂."""
    model = _linear_model()
    lr, betas, eps = 1e-2, (0.9, 0.99), 1e-8
    opt = getattr(torch.optim, kind)(model.parameters(), lr=lr, betas=betas, eps=eps, amsgrad=amsgrad, weight_decay=0.0)
    metric = read_optimizer(opt, model)
    assert all(torch.equal(p, torch.ones_like(p)) for p in metric.preconditioner.values())  # no state yet
    # Decreasing gradients make max_exp_avg_sq differ from exp_avg_sq.
    for step, scale in enumerate([10.0, 1.0, 0.1], start=1):
        _, last = _constant_gradient_steps(model, opt, 1, scale=scale)
        metric = read_optimizer(opt, model)
        assert metric.dt == pytest.approx(lr) and metric.decay is None
        for n, p in model.named_parameters():
            pre = _adam_pre(opt, p, amsgrad)
            torch.testing.assert_close(metric.preconditioner[n], pre, rtol=1e-12, atol=0)
            m_hat = opt.state[p]["exp_avg"] / (1 - betas[0] ** step)
            torch.testing.assert_close(last[n], -metric.dt * pre * m_hat, rtol=1e-9, atol=1e-15)
    if amsgrad:
        p = model[0].weight
        assert not torch.allclose(_adam_pre(opt, p, True), _adam_pre(opt, p, False))


DECAY_CASES = {
    # id: (optimizer class, extra kwargs, decoupled)
    "adam_coupled": (torch.optim.Adam, {}, False),
    "adamw_decoupled": (torch.optim.AdamW, {}, True),
    "adam_decoupled_flag": (torch.optim.Adam, {"decoupled_weight_decay": True}, True),
}


@pytest.mark.parametrize("case", list(DECAY_CASES))
def test_adam_weight_decay_coupled_vs_decoupled(case):
    cls, extra, decoupled = DECAY_CASES[case]
    model = _linear_model()
    wd = 0.05
    opt = cls(model.parameters(), lr=1e-2, weight_decay=wd, **extra)
    _constant_gradient_steps(model, opt, 3)
    metric = read_optimizer(opt, model)
    for n, p in model.named_parameters():
        if decoupled:  # w ← w − lr·λ·w: rate λ per unit time
            assert float(metric.decay[n]) == pytest.approx(wd)
        else:  # λw joins the gradient and is preconditioned: rate λ·P
            torch.testing.assert_close(metric.decay[n], wd * metric.preconditioner[n], rtol=1e-12, atol=0)
    if decoupled:  # the real decoupled step: Δw = −lr·λ·w − lr·P·m̂
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        _, last = _constant_gradient_steps(model, opt, 1)
        metric = read_optimizer(opt, model)
        for n, p in model.named_parameters():
            m_hat = opt.state[p]["exp_avg"] / (1 - 0.9 ** float(opt.state[p]["step"]))
            expected = -metric.dt * (metric.decay[n] * before[n] + metric.preconditioner[n] * m_hat)
            torch.testing.assert_close(last[n], expected, rtol=1e-9, atol=1e-15)


def test_adam_param_groups_scale_the_preconditioner():
    model = _linear_model()
    opt = torch.optim.Adam([{"params": model[0].parameters(), "lr": 1e-2}, {"params": model[2].parameters(), "lr": 5e-3}])
    _constant_gradient_steps(model, opt, 2)
    metric = read_optimizer(opt, model)
    assert metric.dt == pytest.approx(1e-2)
    for n, p in model.named_parameters():
        scale = 1.0 if n.startswith("0.") else 0.5
        torch.testing.assert_close(metric.preconditioner[n], scale * _adam_pre(opt, p), rtol=1e-12, atol=0)


@pytest.mark.parametrize("cls", [torch.optim.Rprop, torch.optim.ASGD, torch.optim.LBFGS])
def test_unsupported_optimizer_raises_listing_supported(cls):
    model = _linear_model()
    with pytest.raises(TypeError, match=cls.__name__) as info:
        read_optimizer(cls(model.parameters(), lr=1e-3), model)
    for name in SUPPORTED_OPTIMIZERS:
        assert name in str(info.value)
    assert SUPPORTED_OPTIMIZERS == ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adadelta", "Adamax", "NAdam", "RAdam")


def test_maximize_and_foreign_optimizer_raise():
    model = _linear_model()
    with pytest.raises(ValueError, match="maximize"):
        read_optimizer(torch.optim.SGD(model.parameters(), lr=0.1, maximize=True), model)
    other = _linear_model()
    with pytest.raises(ValueError, match="model.parameters"):
        read_optimizer(torch.optim.SGD(other.parameters(), lr=0.1), model)


# == ε̄ = (1/n) · unbiased tr Cov of per-sample gradients (in the P metric) ========================
N_TRAIN = 40
EPS_LOSSES = {
    "mse": lambda out, y: F.mse_loss(out, y, reduction="none").mean(1),
    "cross_entropy": lambda out, y: F.cross_entropy(out, y, reduction="none"),
}


def _adam_metric(model, x_fn, loss_name):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-6)
    gen = _gen(11)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model.train()
        for _ in range(3):
            x, y = x_fn(8, gen), _targets(loss_name, 8, gen)
            opt.zero_grad()
            EPS_LOSSES[loss_name](model(x).reshape(8, -1), y).mean().backward()
            opt.step()
    metric = read_optimizer(opt, model)
    pdiag = torch.cat([_adam_pre(opt, p).reshape(-1) for p in model.parameters()])
    return metric, pdiag


def _targets(loss_name, m, gen):
    if loss_name == "cross_entropy":
        return torch.randint(0, K, (m,), generator=gen)
    return torch.randn(m, K, generator=gen, dtype=F64)


@pytest.mark.parametrize("precond", ["identity", "adam"])
@pytest.mark.parametrize("loss_name", list(EPS_LOSSES))
@pytest.mark.parametrize("name", list(MODELS))
def test_perturbation_factor_is_unbiased_covariance_trace(name, loss_name, precond):
    model, x_fn = make(name, k=K)
    if precond == "adam":
        metric, pdiag = _adam_metric(model, x_fn, loss_name)
    else:
        metric = read_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
        pdiag = None
    gen = _gen(3)
    x, y = x_fn(M, gen), _targets(loss_name, M, gen)

    grads = naive_gradients(model, EPS_LOSSES[loss_name], x, y)          # (m, D)
    var = ((grads - grads.mean(0)) ** 2).sum(0) / (M - 1)               # unbiased, per coordinate
    if name == "mlp":  # small D: the same numbers from torch.cov
        torch.testing.assert_close(torch.diagonal(torch.cov(grads.T)), var, rtol=1e-12, atol=0)
    weight = torch.ones_like(var) if pdiag is None else pdiag
    expected = float((weight * var).sum()) / N_TRAIN

    assert perturbation_factor(grads, pdiag, N_TRAIN) == pytest.approx(expected, rel=1e-10)

    loss = resolve_loss(loss_name)
    rates = compute_rates(model, loss, x, y, metric, coordinates="exact")
    assert rates.probe_jac.shape == (M, K, grads.shape[1])
    engine = ParameterSpaceEngine(EngineConfig(n_train=N_TRAIN, m=M), dim=grads.shape[1], loss=loss, dtype=F64)
    assert engine.perturbation(rates) == pytest.approx(expected, rel=1e-10)

    # Replace-one with the probe as stand-in: the measured injection rate is the same U-statistic.
    replace = ParameterSpaceEngine(
        EngineConfig(n_train=N_TRAIN, m=M, mode="replace"), dim=grads.shape[1], loss=loss, dtype=F64
    )
    assert replace.measure(0.0, rates).perturbation == pytest.approx(expected, rel=1e-10)


def test_perturbation_factor_single_sample_is_nan():
    assert math.isnan(perturbation_factor(torch.ones(1, 4, dtype=F64), None, 10))


@pytest.mark.parametrize("kind", ["SGD", "Adam"])
def test_rates_only_cover_parameters_the_optimizer_trains(kind):
    model, x_fn = make("mlp", k=K)
    opt = getattr(torch.optim, kind)(model[2].parameters(), lr=1e-2)  # the first layer is not trained
    _constant_gradient_steps(model, opt, 1)
    metric = read_optimizer(opt, model)
    gen = _gen(3)
    x, y = x_fn(M, gen), _targets("mse", M, gen)
    rates = compute_rates(model, resolve_loss("mse"), x, y, metric, coordinates="exact")
    n_trained = sum(p.numel() for p in model[2].parameters())
    assert rates.probe_jac.shape == (M, K, n_trained)


def test_sketched_engine_coordinates_leave_out_parameters_the_optimizer_does_not_train():
    """A parameter with requires_grad but outside the optimizer does not move: sketches without it."""
    from gramhook.measure import engine_jacobian

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    opt = torch.optim.SGD(list(model[2].parameters()), lr=0.1)  # layer 0 requires grad, untrained
    got = engine_jacobian(model, x, 512, read_optimizer(opt, model), seed=3)
    for p in model[0].parameters():
        p.requires_grad_(False)
    want = engine_jacobian(model, x, 512, read_optimizer(opt, model), seed=3)
    assert torch.allclose(got, want, atol=1e-12)
    for p in model[0].parameters():
        p.requires_grad_(True)
    all_params = engine_jacobian(model, x, 512, read_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), model), seed=3)
    assert not torch.allclose(all_params, want, atol=1e-6)


def test_group_frozen_by_zero_lr_listed_first_does_not_set_the_time_step():
    from gramhook.optim import step_rule, whitening

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.0},
                           {"params": model[2].parameters(), "lr": 0.1}], momentum=0.9)
    metric = read_optimizer(opt, model)
    assert metric.dt == pytest.approx(0.1 / (1 - 0.9))
    assert float(metric.preconditioner["0.weight"].abs().max()) == 0.0
    assert float(metric.preconditioner["2.weight"].min()) == pytest.approx(1.0)
    rule, pre = step_rule(opt, model)
    assert rule.lr == pytest.approx(0.1)
    assert float(pre["0.weight"].abs().max()) == 0.0 and float(pre["2.bias"].min()) == 1.0
    assert whitening(opt, model)["2.weight"].eq(1.0).all()


def test_whitening_keeps_its_shape_when_every_group_reaches_lr_zero():
    """The end of a cosine schedule: lr = 0 everywhere must not zero the readout's P."""
    from gramhook.optim import whitening

    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    pre = whitening(opt, model)
    assert pre is None or all(bool(v.eq(1.0).all()) for v in pre.values())
    adam = torch.optim.AdamW(model.parameters(), lr=0.0)
    pre = whitening(adam, model)
    assert all(bool((v > 0).all()) for v in pre.values())
