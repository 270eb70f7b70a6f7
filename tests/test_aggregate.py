"""The regression estimator that turns per-sample probe gaps into a predicted test loss."""
import math

import pytest
import torch

from gramhook.dynamics.aggregate import MAX_SLOPE, effective_samples, regression_estimate


def _population(n=2000, seed=0):
    """Heavy-tailed train losses, gaps that grow with them (as leave-one-out gaps do) plus noise."""
    g = torch.Generator().manual_seed(seed)
    loss = torch.distributions.Pareto(torch.tensor(0.05), torch.tensor(1.6)).sample((n,)) - 0.05
    loss = loss[torch.randperm(n, generator=g)]
    gap = 0.8 * loss + 0.02 * torch.rand(n, generator=g)
    return loss.double(), gap.double()


def test_without_a_sample_it_is_the_probe_mean():
    loss, gap = _population()
    est = regression_estimate(loss[:64], gap[:64])
    assert est.train_loss == float(loss[:64].mean()) and est.gap == float(gap[:64].mean())
    assert math.isclose(est.se, float(gap[:64].std()) / 8) and est.slope == 0.0


def test_slope_is_least_squares_and_clipped():
    torch.manual_seed(1)
    lp = torch.rand(50, dtype=torch.float64)
    g = 0.3 * lp + 0.01 * torch.randn(50, dtype=torch.float64)
    sample = torch.rand(500, dtype=torch.float64)
    design = torch.stack([lp, torch.ones_like(lp)], 1)
    want = torch.linalg.lstsq(design, g.unsqueeze(1)).solution[0, 0].item()
    est = regression_estimate(lp, g, sample)
    assert math.isclose(est.slope, want, rel_tol=1e-9)
    assert math.isclose(est.gap, float(g.mean()) + want * (float(sample.mean()) - float(lp.mean())), rel_tol=1e-9)
    assert est.train_loss == float(sample.mean())
    assert regression_estimate(lp, -g, sample).slope == 0.0
    assert regression_estimate(lp, 100 * g, sample).slope == MAX_SLOPE
    assert regression_estimate(torch.ones(5, dtype=torch.float64), g[:5], sample).slope == 0.0  # constant ℓ


def test_regression_estimator_beats_the_probe_mean_on_heavy_tails():
    """Over many random probes (m = 64) nested in train samples (L = 512), the predicted test loss
    ℓ̄ + ḡ errs less against the population value with the regression estimator, without bias, and its
    ±2 SE intervals cover most of the time."""
    loss, gap = _population()
    truth = float(loss.mean() + gap.mean())
    g = torch.Generator().manual_seed(2)
    plain, reg, covered = [], [], 0
    trials = 2000
    for _ in range(trials):
        idx = torch.randperm(loss.shape[0], generator=g)
        p, big = idx[:64], idx[:512]
        a = regression_estimate(loss[p], gap[p])
        b = regression_estimate(loss[p], gap[p], loss[big])
        plain.append(a.train_loss + a.gap - truth)
        reg.append(b.train_loss + b.gap - truth)
        covered += abs(b.train_loss + b.gap - truth) <= 2 * math.hypot(b.se, float(loss[big].std()) / math.sqrt(512))
    rmse = lambda v: math.sqrt(sum(x * x for x in v) / len(v))  # noqa: E731
    assert rmse(reg) < 0.5 * rmse(plain), (rmse(reg), rmse(plain))
    assert abs(sum(reg) / trials) < 0.1 * rmse(plain)
    assert covered / trials > 0.8  # 0.854: heavy tails make ±2 SE a little short


def test_second_covariate_loss_history():
    """Gaps driven by a loss history that the current loss misses: the two-covariate estimator finds
    the history slope, drops a covariate whose slope would be negative, and errs less than ℓ alone."""
    g = torch.Generator().manual_seed(3)
    n = 4000
    now = torch.rand(n, generator=g, dtype=torch.float64) * 0.1
    hist = torch.distributions.Exponential(torch.tensor(1.0, dtype=torch.float64)).sample((n,))
    gap = 0.5 * hist + 0.05 * torch.rand(n, generator=g, dtype=torch.float64)
    est = regression_estimate(now[:200], gap[:200], now, hist[:200], hist)
    assert abs(est.history_slope - 0.5) < 0.02 and est.slope < 0.2
    # a history that anti-correlates with the gap is dropped, leaving the loss-only estimator
    flipped = regression_estimate(now[:200], gap[:200], now, -hist[:200], -hist)
    assert flipped.history_slope == 0.0
    assert math.isclose(flipped.gap, regression_estimate(now[:200], gap[:200], now).gap, rel_tol=1e-12)
    truth = float(gap.mean())
    errs_one, errs_two = [], []
    for _ in range(300):
        idx = torch.randperm(n, generator=g)
        p, big = idx[:64], idx[:1024]
        errs_one.append(regression_estimate(now[p], gap[p], now[big]).gap - truth)
        errs_two.append(regression_estimate(now[p], gap[p], now[big], hist[p], hist[big]).gap - truth)
    rmse = lambda v: math.sqrt(sum(x * x for x in v) / len(v))  # noqa: E731
    assert rmse(errs_two) < 0.5 * rmse(errs_one), (rmse(errs_two), rmse(errs_one))


def test_effective_samples_of_the_gap():
    assert effective_samples(torch.full((64,), 0.3)) == pytest.approx(64)
    assert effective_samples(torch.tensor([0.0, 5.0, 0.0, -0.1])) == pytest.approx(1)
    assert math.isnan(effective_samples(torch.zeros(8)))
    # Its link to the standard error: rel. SE² of the mean = (1/ESS − 1/m)·m/(m − 1) for g ≥ 0.
    g = torch.rand(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64) ** 6
    m, ess = g.numel(), effective_samples(g)
    rel_se2 = float(g.var(unbiased=True) / m / g.mean() ** 2)
    assert rel_se2 == pytest.approx((1 / ess - 1 / m) * m / (m - 1), rel=1e-9)
