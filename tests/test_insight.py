"""gramhook.insight: per-sample record and scores, the output-summed nuisance share against the
full one (docs/theory.md §5), and the forecast on curves with a known end."""
import math

import pytest
import torch

from gramhook import insight
from gramhook.dynamics.spectral import alignment, information_space, normalized_margins, nuisance_scores


def test_record_sums_and_scores():
    rec = insight.SampleRecord(3)
    rec.update(torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.0, -1.0, 0.0]))
    rec.update(torch.tensor([0.0, 3.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]), torch.tensor([3.0, -1.0, 0.0]),
               nuisance=torch.tensor([0.25]))
    assert insight.score(rec, "mean_gap").tolist() == [0.0, 2.0, 1.0]
    assert insight.score(rec, "mean_loo_loss").tolist() == [0.5, 3.0, 1.5]
    assert insight.score(rec, "rank_loo_aum").tolist() == [0.0, 2.0, 1.0]
    assert rec.nuisance[0] == 0.25 and math.isnan(rec.nuisance[1])
    for name in insight.SCORES:  # every candidate ranks sample 1 (worst on all counts) first
        assert int(insight.score(rec, name).argmax()) == 1, name
    with pytest.raises(ValueError, match="Unknown score"):
        insight.score(rec, "nope")
    assert torch.isnan(insight.score(insight.SampleRecord(2))).all()


def test_class_nuisance_equals_full_nuisance_on_a_kronecker_kernel():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    k_mat = a @ a.T
    k = 3
    theta = torch.einsum("ij,ab->iajb", k_mat, torch.eye(k, dtype=torch.float64))   # K ⊗ I
    r = torch.randn(6, k, generator=g, dtype=torch.float64)
    # alpha on K's eigenvalues is the same cut as on Θ/m's (the same spectrum, scaled by m and repeated k times).
    full = nuisance_scores(information_space(theta, alpha=0.3), r)
    assert torch.allclose(insight.class_nuisance(theta * k, r, alpha=0.3), full, atol=1e-10)


def test_companion_fields():
    g = torch.Generator().manual_seed(1)
    jac = torch.randn(8, 4, 30, generator=g)
    theta = torch.einsum("iap,jbp->iajb", jac, jac)
    out = torch.randn(8, 4, generator=g)
    y = torch.randint(0, 4, (8,), generator=g)
    params = [("w1", torch.randn(5, 3, generator=g)), ("b1", torch.randn(5)), ("w2", torch.randn(4, 5, generator=g))]
    fields, spectrum, nuisance = insight.companion(theta, out - torch.eye(4)[y], out, y, params)
    assert spectrum.shape == (32,) and nuisance.shape == (8,)
    # Each field is the docs/theory.md §5 readout of its own input: the residual, the one-hot labels, the weights.
    space = information_space(theta, alpha=0.1)
    assert torch.equal(spectrum, space.eigenvalues)
    assert fields["residual_alignment"] == pytest.approx(alignment(space, out - torch.eye(4)[y]))
    assert fields["label_alignment"] == pytest.approx(alignment(space, torch.eye(4)[y]))
    assert fields["residual_alignment"] != pytest.approx(fields["label_alignment"])
    assert fields["effective_rank"] == pytest.approx(space.effective_rank)
    assert fields["information_dim"] == space.info_dim
    margins = normalized_margins([params[0][1], params[2][1]], out, y)
    assert (fields["margin_min"], fields["margin_median"]) == pytest.approx((margins.min, margins.median))
    assert fields["rho"] == pytest.approx(float(params[0][1].norm() * params[2][1].norm()), rel=1e-6)


def test_forecast_follows_log_linear_curves_and_keeps_a_past_minimum():
    steps = list(range(10, 201, 10))
    final, best = insight.forecast(steps, [3.0 - 0.3 * math.log(s) for s in steps], 400)
    assert final == pytest.approx(3.0 - 0.3 * math.log(400), rel=1e-9) and best == 400
    curve = [1.0 + 0.1 * (math.log(s) - math.log(60)) ** 2 for s in steps]   # minimum at step 60, rising after
    final, best = insight.forecast(steps, curve, 400)
    assert best == 60 and final > curve[-1]
    assert math.isnan(insight.forecast(steps[:3], [1.0] * 3, 400)[0])


def test_monitor_scores_survive_a_resume():
    from torch import nn

    from gramhook import GramMonitor, MonitorConfig

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 5, generator=g), torch.randint(0, 3, (12,), generator=g)

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return model, opt, GramMonitor(model, opt, probe=(x, y), n_train=12, every=1, config=MonitorConfig(diagnostics_every=1, train_sample_size=0, effective_gram_size=4))

    model, opt, mon = build()
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    index, score = mon.label_noise_scores()
    assert index.tolist() == list(range(12)) and torch.isfinite(score).all()
    assert len(mon.suspect_samples(3)) == 3 and mon._samples.readouts == 4
    state = mon.state_dict()
    mon.close()
    _, _, again = build()
    again.load_state_dict(state)
    assert torch.equal(again.label_noise_scores()[1], score)
    with pytest.raises(ValueError, match="positive int"):
        again.suspect_samples(0)
    with pytest.raises(ValueError, match="total_steps"):
        again.set_total_steps(0)
    again.close()
