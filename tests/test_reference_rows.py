"""Cheaper and smoother contraction rows: sampled output directions and reference history."""
from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
from torch import nn

from gramhook.dynamics.engine import EngineConfig, ParameterSpaceEngine, Rates, fold_rates, sketch_extrapolation_factor
from gramhook.kernel import torchfunc as ref
from gramhook.kernel import sketched_jacobian
from gramhook.losses import resolve_loss
from gramhook.measure import sampled_half_hessian


class _Odd(nn.Module):
    """A handled Linear, a raw Parameter (reference fallback) and a conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 3, 3)
        self.lin = nn.Linear(3 * 6, 8)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.tanh(self.conv(x.unsqueeze(1))).flatten(1)
        return self.out(torch.tanh(self.lin(h)) * self.scale)


@pytest.mark.parametrize("method", ["auto", "reference"])
def test_sketched_vjp_rows_are_the_cotangent_combinations(method):
    torch.manual_seed(0)
    net, x = _Odd().double(), torch.randn(6, 8, dtype=torch.float64)
    cot = torch.randn(6, 2, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        full = sketched_jacobian(net, x, 64, seed=3, method=method)
        rows = sketched_jacobian(net, x, 64, seed=3, method=method, cotangents=cot)
        tiny = sketched_jacobian(net, x, 64, seed=3, method=method, cotangents=cot, memory_budget=1)
    want = torch.einsum("mqk,mks->mqs", cot, full)
    assert rows.shape == (6, 2, 64)
    assert torch.allclose(rows, want, atol=1e-12)
    assert torch.allclose(tiny, want, atol=1e-12)  # chunked: the cotangents follow their samples


def test_sketched_vjp_rows_against_exact_gradients():
    """Without the sketch's randomness: s·E over seeds of ⟨row_i, row_j⟩ is cᵢᵀ Θ_ij cⱼ (torch.func truth)."""
    torch.manual_seed(1)
    net, x = _Odd().double(), torch.randn(4, 8, dtype=torch.float64)
    cot = torch.randn(4, 1, 4, dtype=torch.float64)
    theta = ref.empirical_ntk(net, x)                                        # (m, k, m, k)
    want = torch.einsum("ia,iajb,jb->ij", cot[:, 0], theta, cot[:, 0])
    est = torch.stack([
        (lambda r: r @ r.T)(sketched_jacobian(net, x, 256, seed=s, cotangents=cot)[:, 0]) for s in range(24)
    ]).mean(0)
    scale = want.diagonal().sqrt()
    err = ((est - want) / torch.outer(scale, scale)).abs().max().item()
    assert err < 0.1, err


def test_sampled_half_hessian_is_unbiased_and_exact_for_rank_one():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(5, 6, dtype=torch.float64) * 2, 1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([
        (lambda c: c.transpose(1, 2) @ c)(sampled_half_hessian(lam, 2, gen)) for _ in range(4000)
    ]).mean(0)
    assert ((draws - lam).norm() / lam.norm()).item() < 0.03
    u = torch.randn(3, 4, 1, dtype=torch.float64)
    rank_one = u @ u.transpose(1, 2)
    c = sampled_half_hessian(rank_one, 1, gen)
    assert torch.allclose(c.transpose(1, 2) @ c, rank_one, atol=1e-12)
    # Λ = 0 (a sample the loss no longer sees) gives zero rows, not NaN
    assert torch.equal(sampled_half_hessian(torch.zeros(2, 3, 3, dtype=torch.float64), 2, gen),
                       torch.zeros(2, 2, 3, dtype=torch.float64))


def _rates(gen, m=3, b=4, k=2, d=7):
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    out = r(m, k)
    return Rates(outputs=out, targets=torch.zeros(m, k, dtype=torch.float64), residual=out.clone(),
                 hessian=torch.eye(k, dtype=torch.float64).expand(m, k, k), probe_jac=r(m, k, d),
                 ref_jac=r(b, k, d), ref_hessian=torch.eye(k, dtype=torch.float64).expand(b, k, k), ref_weight=0.9)


def test_reference_history_stacks_weighted_earlier_batches():
    loss = resolve_loss("mse")
    gen = torch.Generator().manual_seed(0)
    cfg = EngineConfig(n_train=50, m=3, reference_history=3, history_decay=0.5)
    eng = ParameterSpaceEngine(cfg, 7, loss, dtype=torch.float64)
    seq = [_rates(gen) for _ in range(4)]
    for j, rates in enumerate(seq):
        eng.measure(0.0 if j == 0 else 0.3, rates)
    blocks = [eng._ref_block(r) for r in seq[1:]]                       # the latest three batches
    w = torch.tensor([0.25, 0.5, 1.0]) / 1.75
    want = torch.cat([b * w[i].sqrt() for i, b in enumerate(blocks)])
    rows = eng._rows(seq[-1])
    assert torch.allclose(rows[: want.shape[0]], want, atol=1e-12)
    assert rows.shape[0] == want.shape[0] + 3 * 2                      # + the probe's own rows

    # Identical batches: the history changes nothing (the weights sum to one).
    def run(history):
        g = torch.Generator().manual_seed(1)
        base = _rates(g)
        e = ParameterSpaceEngine(EngineConfig(n_train=50, m=3, reference_history=history), 7, loss, dtype=torch.float64)
        for j in range(4):
            r = _rates(g)
            r.ref_jac, r.ref_hessian = base.ref_jac, base.ref_hessian
            est = e.measure(0.0 if j == 0 else 0.3, r)
        return est.per_sample

    assert torch.allclose(run(1), run(3), atol=1e-12)


def test_reference_history_survives_state_dict():
    loss = resolve_loss("mse")
    gen = torch.Generator().manual_seed(2)
    seq = [_rates(gen) for _ in range(5)]
    cfg = EngineConfig(n_train=50, m=3, reference_history=3)
    a = ParameterSpaceEngine(cfg, 7, loss, dtype=torch.float64)
    for j, r in enumerate(seq[:3]):
        a.measure(0.0 if j == 0 else 0.2, r)
    b = ParameterSpaceEngine(cfg, 7, loss, dtype=torch.float64)
    b.load_state_dict(a.state_dict())  # the pending rates come back without their cached rows
    for r in seq[3:]:
        ea, eb = a.measure(0.2, r), b.measure(0.2, r)
        assert torch.allclose(ea.per_sample, eb.per_sample, atol=1e-12)


def test_trapezoid_contraction():
    """``contraction="trapezoid"`` averages the interval's start and end operators: with the same rows
    at both ends it is the left rule exactly; with different ones it differs from the left rule."""
    loss = resolve_loss("mse")

    def run(rule, same):
        g = torch.Generator().manual_seed(5)
        base = _rates(g)
        e = ParameterSpaceEngine(EngineConfig(n_train=50, m=3, contraction=rule), 7, loss, dtype=torch.float64)
        for j in range(3):
            r = _rates(g)
            if same:
                r.ref_jac, r.probe_jac = base.ref_jac, base.probe_jac
            est = e.measure(0.0 if j == 0 else 2.0, r)
        return est.per_sample

    assert torch.allclose(run("left", True), run("trapezoid", True), atol=1e-12)
    assert not torch.allclose(run("left", False), run("trapezoid", False), atol=1e-6)
    with pytest.raises(ValueError, match="contraction"):
        EngineConfig(n_train=50, m=3, contraction="midpoint")


def test_folded_sketch_is_a_sketch_of_half_the_size():
    """Folding buckets b → b mod s/2 gives the sketched Jacobians of a smaller count-sketch:
    inner products still estimate the eNTK, with the error of a direct s/2 sketch."""
    torch.manual_seed(0)
    model = _Odd().double()
    x = torch.randn(6, 8, dtype=torch.float64)
    theta = ref.empirical_ntk(model, x).reshape(6 * 4, 6 * 4)
    big = sketched_jacobian(model, x, 512, seed=3)
    rates = Rates(outputs=torch.zeros(6, 4), targets=torch.zeros(6, 4), residual=torch.zeros(6, 4),
                  hessian=torch.eye(4).expand(6, 4, 4), probe_jac=big)
    half = fold_rates(rates, 256).probe_jac
    assert half.shape == (6, 4, 256)
    assert torch.allclose(half, big[..., :256] + big[..., 256:])

    def err(j):
        est = j.reshape(24, -1) @ j.reshape(24, -1).T
        return float((est - theta).norm() / theta.norm())

    direct = [err(sketched_jacobian(model, x, 256, seed=sd)) for sd in range(8)]
    folded = [err(fold_rates(dataclasses.replace(rates, probe_jac=sketched_jacobian(model, x, 512, seed=sd)), 256).probe_jac)
              for sd in range(8)]
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    print(f"eNTK rel. error, s=256 direct {mean(direct):.3f}, folded from 512 {mean(folded):.3f}, s=512 {err(big):.3f}")
    assert 0.5 * mean(direct) < mean(folded) < 1.5 * mean(direct)
    with pytest.raises(ValueError, match="multiple"):
        fold_rates(rates, 300)


def test_sketch_extrapolation_factor():
    # log ḡ = log ḡ_∞ − c/s: r2 = 2·r1, one Richardson step is exact.
    g = lambda s: math.exp(-3.0 / s)  # noqa: E731
    assert sketch_extrapolation_factor(g(64), g(32), g(16)) == pytest.approx(1 / g(64))
    # α = 2: r2 = 4·r1, Aitken's Δ² is exact too.
    g2 = lambda s: math.exp(-300.0 / s ** 2)  # noqa: E731
    assert sketch_extrapolation_factor(g2(64), g2(32), g2(16)) == pytest.approx(1 / g2(64))
    # A noisy r2 < r1 is read as α = 1 (the full first-order step), never more.
    assert sketch_extrapolation_factor(1.0, 0.9, 0.89) == pytest.approx(1 / 0.9)
    assert sketch_extrapolation_factor(1.0, 0.1, 0.01) == 2.0          # clipped
    assert sketch_extrapolation_factor(1.0, -0.2, 0.5) == 1.0          # a non-positive mean


def test_sketch_extrapolation_scales_by_the_folded_factor_and_survives_state_dict():
    loss = resolve_loss("mse")
    gen = torch.Generator().manual_seed(4)
    seq = [_rates(gen, d=8) for _ in range(5)]
    cfg = EngineConfig(n_train=50, m=3, sketch_extrapolation=True)
    a = ParameterSpaceEngine(cfg, 8, loss, dtype=torch.float64)
    plain = ParameterSpaceEngine(EngineConfig(n_train=50, m=3), 8, loss, dtype=torch.float64)
    folds = [ParameterSpaceEngine(EngineConfig(n_train=50, m=3), d, loss, dtype=torch.float64) for d in (4, 2)]
    for j, r in enumerate(seq[:3]):
        dt = 0.0 if j == 0 else 0.4
        est, p = a.measure(dt, r), plain.measure(dt, r)
        means = [f.measure(dt, fold_rates(r, f.delta.shape[1])).mean for f in folds]
    rho = sketch_extrapolation_factor(p.mean, *means)
    assert a.extrapolation == pytest.approx(rho) and rho != 1.0
    assert torch.allclose(est.per_sample, p.per_sample * rho, atol=1e-12)
    assert est.se == pytest.approx(p.se * rho)
    b = ParameterSpaceEngine(cfg, 8, loss, dtype=torch.float64)
    b.load_state_dict(a.state_dict())
    for r in seq[3:]:
        assert torch.allclose(a.measure(0.4, r).per_sample, b.measure(0.4, r).per_sample, atol=1e-12)
    with pytest.raises(ValueError, match="sketch_extrapolation=False"):
        ParameterSpaceEngine(cfg, 6, loss)
    with pytest.raises(ValueError, match="saved with sketch_extrapolation off"):
        ParameterSpaceEngine(cfg, 8, loss, dtype=torch.float64).load_state_dict(plain.state_dict())
