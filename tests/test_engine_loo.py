"""Gap engines against brute-force leave-one-out retraining (float64; docs/theory.md §7).

Each test prints the measured agreement so the numbers in the README and the closing notes can
be checked with ``pytest -s``.
"""
import pytest
import torch

import bruteforce as bf
from engine_runs import run_engine


def _rel(a, b):
    return a / b - 1.0


@pytest.fixture(scope="module")
def linear():
    problem = bf.linear_regression_problem(n=60, d=80, noise=0.5, seed=0)
    checkpoints = [25, 50, 100, 200, 300, 400]
    loo = bf.loo_gaps(problem, 0.5, 400, checkpoints)
    repl = bf.replace_one_gaps(problem, 0.5, 400, checkpoints, problem.x_fresh, problem.y_fresh)
    return problem, checkpoints, loo, repl


@pytest.mark.parametrize("integrator", ["discrete", "exponential"])
@pytest.mark.parametrize("engine", ["param", "function"])
def test_linear_full_probe_matches_loo(linear, engine, integrator):
    """Probe = training set, full-batch GD: both engines against brute-force LOO.

    The discrete optimizer map is exact here (1e-6); the continuous flow (the monitor's
    integrator) lags gradient descent by O(lr), within 1.6% from t = 100 on.
    """
    problem, checkpoints, loo, _ = linear
    run = run_engine(problem, 0.5, 400, checkpoints, engine=engine, integrator=integrator)
    for t in checkpoints:
        truth, est = loo[t].mean().item(), run.gaps[t].mean().item()
        print(f"[{engine}, {integrator}] t={t}: LOO {truth:.4f} engine {est:.4f} ({_rel(est, truth):+.2%})")
        # The flow differs from gradient descent by O(lr): −3.3% at t=25, −1.5% at t=100, −0.8% at t=400.
        bound = 0.01 if integrator == "discrete" else (0.04 if t < 100 else 0.016)
        assert abs(_rel(est, truth)) < bound
        if integrator == "discrete":
            torch.testing.assert_close(run.gaps[t], loo[t], rtol=1e-6, atol=1e-9)
        else:
            assert torch.corrcoef(torch.stack([run.gaps[t], loo[t]]))[0, 1] > 0.99


def test_linear_discrete_integrator_is_exact_for_gradient_descent(linear):
    """Engine (a) with the discrete optimizer map reproduces brute-force LOO to 1e-6."""
    problem, checkpoints, loo, _ = linear
    run = run_engine(problem, 0.5, 400, checkpoints, engine="param", integrator="discrete")
    for t in checkpoints:
        torch.testing.assert_close(run.gaps[t], loo[t], rtol=1e-6, atol=1e-9)


def test_linear_replace_one_matches_brute_force(linear):
    """Replace-one with paired holdout stand-ins z'_i (the brute force's fresh samples), within 1%."""
    problem, checkpoints, _, repl = linear
    holdout = (problem.x_fresh, problem.y_fresh)
    run = run_engine(problem, 0.5, 400, checkpoints, engine="param", mode="replace", standin="holdout",
                     holdout=holdout, integrator="discrete")
    for t in checkpoints:
        truth, est = repl[t].mean().item(), run.gaps[t].mean().item()
        print(f"replace-one t={t}: brute {truth:.4f} engine {est:.4f} ({_rel(est, truth):+.2%})")
        assert abs(_rel(est, truth)) < 0.01


def test_linear_replace_one_probe_standin(linear):
    """Replace-one with the other probe samples as stand-in: the estimator docs/theory.md §2 uses by default."""
    problem, checkpoints, _, repl = linear
    run = run_engine(problem, 0.5, 400, checkpoints, engine="function", mode="replace", standin="probe",
                     integrator="discrete")
    for t in checkpoints[2:]:
        truth, est = repl[t].mean().item(), run.gaps[t].mean().item()
        print(f"replace-one (probe stand-in) t={t}: brute {truth:.4f} engine {est:.4f} ({_rel(est, truth):+.2%})")
        assert abs(_rel(est, truth)) < 0.10


def test_linear_cadence_function_engine(linear):
    """Measurement cadence: engine (b) measured every 5 and 25 steps against every step.

    Measured (continuous flow): every=5 within 0.4% of every=1; every=25 is +9.5% at t=100 and
    +4.0% at t=400 — the injection rate is interpolated linearly across the interval while the
    residual decays exponentially. The bounds are the measured errors with a margin.
    """
    problem, _, _, _ = linear
    checkpoints = [100, 200, 300, 400]
    dense = run_engine(problem, 0.5, 400, checkpoints, engine="function", every=1)
    for every, bound in ((5, 0.02), (25, 0.10)):
        sparse = run_engine(problem, 0.5, 400, checkpoints, engine="function", every=every)
        for t in checkpoints:
            a, b = dense.gaps[t].mean().item(), sparse.gaps[t].mean().item()
            print(f"cadence t={t}: every=1 {a:.4f} every={every} {b:.4f} ({_rel(b, a):+.2%})")
            assert abs(_rel(b, a)) < bound


@pytest.mark.slow
def test_tanh_mlp_cross_entropy():
    """Tanh MLP, n=64, full-batch GD, CE, lr 2: engine (a) within 3% of brute-force LOO at t=300.

    Measured with the continuous flow: +0.5% (the discrete map gives +9.3%).

    Engine (b) misses the kernel velocity J̇δ; its error is printed, not asserted (docs/theory.md §7: −29%).
    """
    problem = bf.tanh_mlp_problem()
    loo = bf.loo_gaps(problem, 2.0, 300, [300])[300].mean().item()
    param = run_engine(problem, 2.0, 300, [300], engine="param").gaps[300].mean().item()
    print(f"tanh MLP t=300: LOO {loo:.4f} engine (a) {param:.4f} ({_rel(param, loo):+.1%})")
    assert abs(_rel(param, loo)) < 0.03
    function = run_engine(problem, 2.0, 300, [300], engine="function").gaps[300].mean().item()
    print(f"tanh MLP t=300: engine (b) {function:.4f} ({_rel(function, loo):+.1%}) [known failure, not asserted]")


@pytest.fixture(scope="module")
def sgd_run():
    """docs/theory.md §7's SGD problem: tanh MLP 2×128, n=256, batch 32, lr 0.5, probe m=48, t=300."""
    problem = bf.sgd_mlp_problem()
    batches = bf.make_batches(256, 32, 600, problem.generator)
    probe = torch.randperm(256, generator=problem.generator)[:48]
    loo = bf.loo_gaps(problem, 0.5, 300, [300], samples=probe, batches=batches)[300]
    exact = run_engine(problem, 0.5, 300, [300], probe=probe, batches=batches)
    return problem, batches, probe, loo, exact


@pytest.mark.slow
def test_sgd_minibatch_probe_subset_matches_coupled_loo(sgd_run):
    """SGD minibatches, probe m < n, one fresh reference batch per step, against coupled LOO.

    Measured: −11.1% against coupled LOO at t=300 (per-sample correlation 0.985). The bound is the
    measured error plus a margin.
    """
    _, _, _, loo, exact = sgd_run
    truth, est = loo.mean().item(), exact.gaps[300].mean().item()
    corr = torch.corrcoef(torch.stack([loo, exact.gaps[300]]))[0, 1].item()
    print(f"SGD t=300: coupled LOO {truth:.4f} engine {est:.4f} ({_rel(est, truth):+.1%}), corr {corr:.3f}")
    assert abs(_rel(est, truth)) < 0.12
    assert corr > 0.95


@pytest.mark.slow
def test_sgd_sketched_coordinates_match_exact(sgd_run):
    """Sketched coordinates (count-sketch, s = 4096, P ≈ 18k) within 5% of exact coordinates."""
    problem, batches, probe, _, exact = sgd_run
    sketched = run_engine(problem, 0.5, 300, [300], probe=probe, batches=batches, coordinates=4096)
    a, b = exact.gaps[300].mean().item(), sketched.gaps[300].mean().item()
    print(f"SGD t=300: exact {a:.4f} sketched s=4096 {b:.4f} ({_rel(b, a):+.1%})")
    assert abs(_rel(b, a)) < 0.05


@pytest.mark.slow
def test_sparse_contraction_more_samples_at_the_same_cost(sgd_run):
    """One measurement per 10 steps drifts above the every-step engine (docs/theory.md §7: contraction from
    one reference batch per interval is too weak). Sampled reference rows (one output direction
    per sample from Λ, :func:`gramhook.measure.sampled_half_hessian`) let 3× the samples in for
    the same Jacobian cost (k = 3), and stacked earlier batches (``reference_history``) smooth
    the estimate of H; both bring the sparse engine back towards the every-step one.

    Measured (drift from the every-step engine, seeds 0/1): plain +12%/+22%, sampled rows
    (96 samples, q = 1) +7%/+7%, history 3 +6%/+9%.
    """
    problem, batches, probe, _, exact = sgd_run
    dense = exact.gaps[300].mean().item()

    def drift(**kw):
        out = []
        for seed in (0, 1):
            run = run_engine(problem, 0.5, 300, [300], probe=probe, batches=batches, every=10, seed=seed, **kw)
            out.append(_rel(run.gaps[300].mean().item(), dense))
        return sum(out) / len(out)

    plain, sampled, history = drift(), drift(ref_size=96, ref_outputs=1), drift(reference_history=3)
    print(f"SGD t=300, every 10 steps, drift from every-step engine: plain {plain:+.1%}, "
          f"sampled rows {sampled:+.1%}, history 3 {history:+.1%}")
    assert plain > 0.10
    assert abs(sampled) < 0.6 * plain and abs(sampled) < 0.10
    assert abs(history) < 0.6 * plain and abs(history) < 0.10


@pytest.mark.slow
def test_sketch_bias_is_one_over_s_and_extrapolation_removes_it(sgd_run):
    """Sketched coordinates under-predict the exact engine, more as training goes on, by an amount
    ∝ 1/s (the count-sketch aliases the uncontracted part of δ onto the rows' directions, where the
    contraction removes it). ``sketch_extrapolation`` also runs the engine on the sketch folded to
    s/2 and s/4 and extrapolates the three mean gaps to s = ∞. Measured at t=300 (one measurement
    per 10 steps, 96 sampled reference rows), sketched/exact: s = 256: 0.735 → 0.928 extrapolated
    (0.957 with a plain Richardson step ḡ_s²/ḡ_{s/2}), s = 1024: 0.931 → 1.010, s = 4096: 0.985 →
    0.985. (A first-order analytic correction, exp(Σ_k (1 − e^{−dt·e_k})/s) per
    interval from E[S Sᵀ K S Sᵀ] = K(1 + 1/s) + tr(K) I/s, over-corrected about 13×.)
    """
    problem, batches, probe, _, _ = sgd_run
    kw = dict(probe=probe, batches=batches, every=10, ref_size=96, ref_outputs=1)
    exact = run_engine(problem, 0.5, 300, [300], **kw).gaps[300].mean().item()

    def ratio(s, extrapolate):
        return run_engine(problem, 0.5, 300, [300], coordinates=s, sketch_extrapolation=extrapolate,
                          **kw).gaps[300].mean().item() / exact

    plain = {s: ratio(s, False) for s in (256, 1024)}
    fixed = {s: ratio(s, True) for s in (256, 1024)}
    print(f"SGD t=300, every 10: sketched/exact s=256 {plain[256]:.3f} → {fixed[256]:.3f} extrapolated, "
          f"s=1024 {plain[1024]:.3f} → {fixed[1024]:.3f}")
    assert 0.6 < plain[256] < 0.85
    assert 0.88 < plain[1024] < 0.97
    assert 2.5 < (1 - plain[256]) / (1 - plain[1024]) < 6
    assert abs(fixed[256] - 1) < 0.08 and abs(fixed[256] - 1) < 0.35 * (1 - plain[256])
    assert abs(fixed[1024] - 1) < 0.03


@pytest.mark.slow
def test_sketch_extrapolation_under_adam(sgd_run):
    """The same under Adam (lr 1e-3; the preconditioner is inside the sketched Jacobians).
    Measured at t=300, sketched/exact: s = 1024: 0.960 → 0.989 extrapolated (s = 256: 0.881 → 0.951)."""
    problem, batches, probe, _, _ = sgd_run
    kw = dict(probe=probe, batches=batches, every=10, ref_size=96, ref_outputs=1, adam=True)
    exact = run_engine(problem, 1e-3, 300, [300], **kw).gaps[300].mean().item()
    plain, fixed = (run_engine(problem, 1e-3, 300, [300], coordinates=1024, sketch_extrapolation=e, **kw)
                    .gaps[300].mean().item() / exact for e in (False, True))
    print(f"Adam t=300, every 10: sketched/exact s=1024 {plain:.3f} → {fixed:.3f} extrapolated")
    assert 0.9 < plain < 0.99
    assert abs(fixed - 1) < 0.02 and abs(fixed - 1) < 0.5 * abs(plain - 1)
