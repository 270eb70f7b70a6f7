"""Tests for the effective Gram matrix K_n (docs/theory.md §4): its gap against the scalar ODE and gradient descent."""

import math

import pytest
import torch

from gramhook import empirical_ntk
from gramhook.dynamics.effective_gram import (
    EffectiveGram,
    benign_fraction,
    gap_operator,
    kernel_alignment,
    kernel_fidelity,
    residual_propagator,
)
from gramhook.dynamics.engine import perturbation_factor

DT = torch.float64


def _random_theta(m, k, *, scale=1.0, seed=0):
    """A random PSD probe kernel ``(m, k, m, k)`` = J Jᵀ with J ``(m, k, D)``."""
    g = torch.Generator().manual_seed(seed)
    jac = torch.randn(m, k, 3 * m * k, generator=g, dtype=DT) * math.sqrt(scale / (3 * m * k))
    return torch.einsum("iad,jbd->iajb", jac, jac), jac


def _identity_hessian(m, k):
    return torch.eye(k, dtype=DT).expand(m, k, k).clone()


def _ce_hessian(m, k, seed=0):
    p = torch.softmax(torch.randn(m, k, generator=torch.Generator().manual_seed(seed), dtype=DT), 1)
    return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]


def _scalar_gap(times, eps, contraction):
    """ḡ from dḡ/dt = −c̄ ḡ + ε̄ with the same left-endpoint exponential/trapezoid quadrature."""
    g, out = 0.0, [0.0]
    for s in range(1, len(times)):
        dt = times[s] - times[s - 1]
        c = contraction[s - 1]
        c = 0.0 if math.isnan(c) else c
        decay = math.exp(-c * dt)
        g = decay * g + 0.5 * dt * (decay * eps[s - 1] + eps[s])
        out.append(g)
    return out


# -- gap operator ---------------------------------------------------------------------------------

@pytest.mark.parametrize("m,k", [(2, 1), (5, 3), (9, 2)])
def test_gap_operator_is_the_perturbation_factor(m, k):
    n = 40
    theta, jac = _random_theta(m, k, seed=m + k)
    r = torch.randn(m, k, generator=torch.Generator().manual_seed(1), dtype=DT)
    a = gap_operator(theta, n)
    assert a.shape == (m * k, m * k)
    assert torch.allclose(a, a.T)
    quad = float(r.reshape(-1) @ a @ r.reshape(-1))
    gram = torch.einsum("ia,iajb,jb->ij", r, theta, r)                 # G_ij = r_iᵀ Θ_ij r_j
    off = ~torch.eye(m, dtype=torch.bool)
    expected = float(gram.diagonal().mean() - gram[off].mean()) / n
    assert quad == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # The engine's independent estimator from explicit per-sample gradients J_iᵀ r_i.
    grads = torch.einsum("iad,ia->id", jac, r)
    assert quad == pytest.approx(perturbation_factor(grads, None, n), rel=1e-10)


def test_gap_operator_needs_two_samples():
    with pytest.raises(ValueError, match="m ≥ 2"):
        gap_operator(torch.ones(1, 2, 1, 2), 10)


# -- propagator -----------------------------------------------------------------------------------

@pytest.mark.parametrize("hessian", ["mse", "ce"])
def test_residual_propagator_matches_matrix_exp(hessian):
    m, k, dt = 6, 3, 0.7
    theta, _ = _random_theta(m, k, scale=5.0, seed=3)
    lam = _identity_hessian(m, k) if hessian == "mse" else _ce_hessian(m, k)
    big = torch.block_diag(*lam)
    expected = torch.linalg.matrix_exp(-(dt / m) * big @ theta.reshape(m * k, m * k))
    assert torch.allclose(residual_propagator(theta, lam, dt), expected, atol=1e-12)


def test_residual_propagator_stays_bounded_for_stiff_steps():
    m, k = 4, 2
    theta, _ = _random_theta(m, k, scale=1e6, seed=4)
    phi = residual_propagator(theta, _identity_hessian(m, k), dt=1e3)
    assert torch.isfinite(phi).all()
    assert torch.linalg.matrix_norm(phi, ord=2) <= 1 + 1e-6


# -- K_n identity: rᵀ K_n r is the gap -------------------------------------------------------------

def test_constant_kernel_mse_gap_equals_scalar_ode():
    """Constant Θ, MSE (Λ = I), probe = training set: r(0)ᵀ K_n r(0) is the scalar ODE's ḡ."""
    m, k = 10, 2
    n = m
    theta, _ = _random_theta(m, k, scale=3.0 * m, seed=7)
    mat = theta.reshape(m * k, m * k)
    lam = _identity_hessian(m, k)
    r0 = torch.randn(m, k, generator=torch.Generator().manual_seed(8), dtype=DT)
    dts = [0.0, 0.3, 0.05, 1.0, 0.5, 0.0, 2.0, 0.25, 0.8, 1.5]
    contraction = [0.0, 0.4, float("nan"), 1.3, 0.0, 0.2, 2.5, 0.0, 0.7, 0.1]
    times = list(torch.cumsum(torch.tensor(dts, dtype=DT), 0).tolist())
    a = gap_operator(theta, n)
    rs = [(torch.linalg.matrix_exp(-(s / m) * mat) @ r0.reshape(-1)).reshape(m, k) for s in times]
    eps = [float(r.reshape(-1) @ a @ r.reshape(-1)) for r in rs]
    expected = _scalar_gap(times, eps, contraction)

    eg = EffectiveGram(n, dtype=DT)
    for s, (dt, c) in enumerate(zip(dts, contraction)):
        stats = eg.update(dt, theta, rs[s], lam, c)
        assert stats.gap == pytest.approx(expected[s], rel=1e-6, abs=1e-14)
        assert stats.kernel_fidelity == pytest.approx(1.0, abs=1e-10)
    assert expected[-1] > 1e-3                                        # the check is not vacuous
    assert eg.time == pytest.approx(times[-1])
    assert torch.allclose(eg.matrix, eg.matrix.T)


def test_linear_model_gradient_descent_matches_flow():
    """A linear model trained by small-lr gradient descent: K_n vs the scalar ODE with measured ε̄."""
    torch.manual_seed(0)
    n, d, k, lr, steps, every = 20, 8, 2, 0.005, 400, 20
    x = torch.randn(n, d, dtype=DT)
    y = torch.randn(n, k, dtype=DT)
    model = torch.nn.Linear(d, k).double()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    lam = _identity_hessian(n, k)
    eg = EffectiveGram(n, dtype=DT)
    times, eps, contraction, stats = [], [], [], None
    for step in range(steps + 1):
        if step % every == 0:
            theta = empirical_ntk(model, x)
            with torch.no_grad():
                r = model(x) - y                                          # ∂(½‖f − y‖²)/∂f
            c = 0.5 if step < steps // 2 else 0.0
            stats = eg.update(0.0 if step == 0 else every * lr, theta, r, lam, c)
            times.append(step * lr)
            eps.append(float(r.reshape(-1) @ gap_operator(theta, n) @ r.reshape(-1)))
            contraction.append(c)
        if step < steps:
            opt.zero_grad()
            (0.5 * ((model(x) - y) ** 2).sum(1).mean()).backward()
            opt.step()
    scalar = _scalar_gap(times, eps, contraction)[-1]
    # Measured: gap 1.17150 against 1.17062 (+0.08%), fidelity 0.99916; GD ≠ flow at O(lr).
    assert stats.gap == pytest.approx(scalar, rel=5e-3)
    assert stats.kernel_fidelity > 0.99
    assert 0.0 <= stats.benign_fraction <= 1.0


# -- readouts ---------------------------------------------------------------------------------------

def test_alignment_is_one_for_isotropic_k():
    m, k, n = 4, 3, 12
    theta = torch.eye(m * k, dtype=DT).reshape(m, k, m, k)              # A ∝ I and Φ ∝ I, so K ∝ I
    lam = _identity_hessian(m, k)
    g = torch.Generator().manual_seed(0)
    eg = EffectiveGram(n, dtype=DT)
    first = eg.update(0.0, theta, torch.randn(m, k, generator=g, dtype=DT), lam, 0.0)
    assert first.gap == 0.0 and math.isnan(first.alignment) and math.isnan(first.benign_fraction)
    stats = eg.update(0.4, theta, torch.randn(m, k, generator=g, dtype=DT), lam, 0.3)
    assert stats.alignment == pytest.approx(1.0, rel=1e-12)
    assert kernel_alignment(3.0 * torch.eye(5, dtype=DT), torch.randn(5, dtype=DT)) == pytest.approx(1.0)
    assert math.isnan(kernel_alignment(torch.eye(5, dtype=DT), torch.zeros(5, dtype=DT)))


def test_alignment_below_one_when_residual_avoids_top():
    mat = torch.diag(torch.tensor([10.0, 1.0, 1.0, 0.0], dtype=DT))
    assert kernel_alignment(mat, torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=DT)) == pytest.approx(0.5 / 3)


@pytest.mark.parametrize(
    "residual,expected",
    [
        ([1.0, 1.0, 1.0, 1.0], 0.5),      # benign = eigenvalues {1, 2} (sum 3 ≤ 5 = tr/2)
        ([1.0, 0.0, 0.0, 0.0], 1.0),
        ([0.0, 0.0, 0.0, 2.0], 0.0),
        ([0.0, 3.0, 4.0, 0.0], 9.0 / 25.0),
    ],
)
def test_benign_fraction_on_diagonal_k(residual, expected):
    mat = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=DT))
    r = torch.tensor(residual, dtype=DT)
    assert benign_fraction(mat, r) == pytest.approx(expected, abs=1e-12)
    # Invariant under a rotation of both K and r.
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(2), dtype=DT))
    assert benign_fraction(q @ mat @ q.T, q @ r) == pytest.approx(expected, abs=1e-10)


def test_benign_fraction_exact_half_is_included():
    mat = torch.diag(torch.tensor([1.0, 1.0, 2.0], dtype=DT))         # smallest two carry exactly tr/2
    assert benign_fraction(mat, torch.tensor([0.0, 0.0, 1.0], dtype=DT)) == 0.0
    assert benign_fraction(mat, torch.tensor([1.0, 1.0, 0.0], dtype=DT)) == pytest.approx(1.0)
    assert math.isnan(benign_fraction(torch.zeros(3, 3, dtype=DT), torch.ones(3, dtype=DT)))


def test_kernel_fidelity_guards_zero_residual():
    assert math.isnan(kernel_fidelity(torch.zeros(3), torch.ones(3)))
    assert kernel_fidelity(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.0])) == 1.0
    assert kernel_fidelity(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 4.0])) == pytest.approx(0.4)


def test_nan_contraction_is_zero():
    m, k = 5, 2
    theta, _ = _random_theta(m, k, seed=5)
    lam, r = _ce_hessian(m, k), torch.randn(m, k, generator=torch.Generator().manual_seed(1), dtype=DT)
    a, b = EffectiveGram(30, dtype=DT), EffectiveGram(30, dtype=DT)
    for dt in (0.0, 0.5, 0.5):
        sa = a.update(dt, theta, r, lam, float("nan"))
        sb = b.update(dt, theta, r, lam, 0.0)
    assert sa == sb


# -- state ------------------------------------------------------------------------------------------

def test_state_dict_round_trip_gives_identical_results():
    m, k, n = 6, 3, 50
    g = torch.Generator().manual_seed(11)
    inputs = []
    for s in range(7):
        theta, _ = _random_theta(m, k, scale=2.0 + s, seed=20 + s)
        inputs.append((0.0 if s == 0 else 0.3 + 0.1 * s, theta, torch.randn(m, k, generator=g, dtype=DT), _ce_hessian(m, k, seed=s), 0.2 * s))
    eg = EffectiveGram(n, dtype=DT)
    for args in inputs[:4]:
        eg.update(*args)
    state = eg.state_dict()
    eg2 = EffectiveGram(n, dtype=DT)
    eg2.load_state_dict(state)
    for t in state.values():
        if isinstance(t, torch.Tensor):
            t.mul_(0)                                                   # the copies are independent
    for args in inputs[4:]:
        assert eg.update(*args) == eg2.update(*args)
    assert torch.equal(eg.matrix, eg2.matrix)
    with pytest.raises(ValueError, match="n_train"):
        EffectiveGram(n + 1, dtype=DT).load_state_dict(eg.state_dict())


def test_shape_errors_are_explained():
    m, k = 3, 2
    theta, _ = _random_theta(m, k)
    eg = EffectiveGram(10, dtype=DT)
    with pytest.raises(ValueError, match="Expected residual"):
        eg.update(0.0, theta, torch.zeros(m, k + 1, dtype=DT), _identity_hessian(m, k), 0.0)
    with pytest.raises(RuntimeError, match="update"):
        eg.matrix
    eg.update(0.0, theta, torch.ones(m, k, dtype=DT), _identity_hessian(m, k), 0.0)
    with pytest.raises(ValueError, match="sub-probe"):
        theta2, _ = _random_theta(m + 1, k)
        eg.update(0.1, theta2, torch.ones(m + 1, k, dtype=DT), _identity_hessian(m + 1, k), 0.0)


def test_float32_default_state():
    m, k = 4, 2
    theta, _ = _random_theta(m, k)
    eg = EffectiveGram(10)
    eg.update(0.0, theta, torch.ones(m, k, dtype=DT), _identity_hessian(m, k), 0.0)
    eg.update(0.1, theta, torch.ones(m, k, dtype=DT), _identity_hessian(m, k), 0.0)
    assert eg.matrix.dtype == torch.float32
