"""CI subset of benchmarks/accuracy.py: one small MNIST config at the monitor's defaults.

The bounds hold the measured accuracy with margin and fail a prediction that is NaN, of the wrong
sign or off by a factor of two; the benchmark itself reports the real accuracy. The full grid
stays out of CI.
Also checks the variant registry, the label-noise labels, the goal summary on synthetic rows and
the result files that research/seed_spread.py and research/stop_rules.py read. ~20 s on one CPU thread.
"""
import argparse
import importlib.util
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("mlxtend")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _load_benchmark(name="accuracy"):
    spec = importlib.util.spec_from_file_location(f"gramhook_bench_{Path(name).name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _load_benchmark()


def test_quick_config_at_defaults(bench):
    torch.set_num_threads(1)
    cfg = bench.Config("mnist", 500, "mlp", "ce", "sgd", epochs=2)
    baselines = (ROOT / "benchmarks" / "stopping_baselines.py").exists()
    res = bench.run_config(cfg, argparse.Namespace(seed=0, epochs=None, baselines=baselines))
    print("  ".join(f"{k}={bench.fmt(k, s, res[k])}" for k, s in bench.COLUMNS))
    assert res["meas"] >= 2                                  # step 0 and the final measure()
    assert res["rows"][0]["step"] == 0 and res["rows"][-1]["step"] == res["steps"] == 16
    for k in ("pred_fin", "meas_fin", "rse", "gap_pred", "gap_meas", "ours", "hold", "oracle", "wall_ratio"):
        assert math.isfinite(res[k]), k
    # Measured: predicted gap 0.305 against 0.337 (−9%), final test loss 0.732 against 0.764
    # (−4%). Injections scaled by 2 give a gap ratio of 2.2 and a final-loss ratio of 1.5 (a
    # bound of 0.5 < ratio < 2 lets that through); a sign flip makes the gap negative.
    assert 0.75 < res["gap_pred"] / res["gap_meas"] < 1.3
    assert abs(res["pred_fin"] / res["meas_fin"] - 1) < 0.12
    assert 0 < res["rse"] < 0.1 and res["oracle"] <= res["meas_fin"] and res["oracle"] <= res["ours"]
    assert res["wall_ratio"] > 1.0 and res["mon_s"] > 0
    if baselines:
        assert math.isfinite(res["evid"]) and math.isfinite(res["gd"]) and not res["notes"]
    gaps, losses = res["per_sample"]
    assert gaps.shape == losses.shape == (res["probe"],)


def test_monitor_kwargs_are_the_defaults_and_variants_build(bench):
    from gramhook import GramMonitor

    args = argparse.Namespace(seed=0)
    cfg = bench.Config("digits", 40, "mlp", "mse", "sgd")
    assert bench.monitor_kwargs(cfg, 40, 200, args) == {"loss": "mse", "seed": 0}
    assert bench.monitor_kwargs(cfg, 40, 200, args, "every20")["every"] == 10
    assert bench.monitor_kwargs(cfg, 40, 200, args, "probe256+every20") == {
        "loss": "mse", "seed": 0, "every": 10, "probe_size": 40}
    for name in ("every20", "periodic", "probe256", "exact"):
        assert name in bench.VARIANTS
    with pytest.raises(argparse.ArgumentTypeError, match="nosuch"):
        bench._variant_name("probe256+nosuch")
    x, y = torch.randn(40, 6), torch.randint(0, 10, (40,))
    for name in bench.VARIANTS:
        kwargs = bench.monitor_kwargs(bench.Config("digits", 40, "mlp", "ce", "sgd"), 40, 200, args, name)
        model = torch.nn.Linear(6, 10)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        GramMonitor(model, opt, probe=(x, y), n_train=40, **kwargs).close()  # every variant's keywords exist


def test_rejected_variant_is_reported_unavailable(bench, monkeypatch, capsys):
    monkeypatch.setitem(bench.VARIANTS, "bogus", {"no_such_setting": 1})
    cfg = bench.Config("mnist", 100, "mlp", "ce", "sgd", epochs=1)
    assert bench.run_config(cfg, argparse.Namespace(seed=0, epochs=None), "bogus") is None
    assert "[unavailable]" in capsys.readouterr().out


def test_models_and_schedules(bench):
    model = bench.bn_cnn()
    assert 25_000 < sum(p.numel() for p in model.parameters()) < 40_000
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert 0.28e6 < sum(p.numel() for p in bench.mid_cnn().parameters()) < 0.35e6
    for sched, per_batch in (("cosine", True), ("onecycle", True), ("step", False), ("", False)):
        cfg = bench.Config("mnist", 100, "bn_cnn", "ce", "adamw", sched=sched, wd=0.01)
        opt, s, pb = bench.make_opt(cfg, model, 2, 3)
        assert isinstance(opt, torch.optim.AdamW) and (s is None) == (not sched) and pb == per_batch
    names = [c.name for c in bench.CONFIGS]
    assert len(set(names)) == len(names)
    for fam in ("mlp", "cnn", "bn_cnn", "cnn1d"):
        assert {c.loss for c in bench.CONFIGS if c.model == fam} == {"ce", "mse"}, fam


def test_label_noise_and_bootstrap(bench):
    clean = bench.load(bench.Config("mnist", 1000, "mlp", "ce", "sgd"), seed=0)
    noisy = bench.load(bench.Config("mnist", 1000, "mlp", "ce", "sgd", noise=0.2), seed=0)
    assert clean.x_test.shape[0] == 4000
    for a, b in ((noisy.y_train, clean.y_train), (noisy.y_test, clean.y_test)):
        assert 0.14 < float((a != b).float().mean()) < 0.26
    v = torch.rand(4000, generator=torch.Generator().manual_seed(0))
    assert bench.bootstrap_rse(v) == pytest.approx(float(v.std() / v.mean()) / math.sqrt(4000), rel=0.15)


def _row(**kw):
    r = dict(config="c", med_err=0.05, fin_err=0.1, gcv_med=0.2, rse=0.01, gap_pred=0.1, gap_meas=0.11,
             gcv_gap=0.0, ours=1.0, hold=1.1, evid=1.2, gd=1.2, wall_ratio=1.01, meas=3)
    r.update(kw)
    return r


def test_goal_summary(bench):
    rows = [_row(gap_pred=g, gap_meas=g + 0.01) for g in (0.1, 0.2, 0.3, 0.4)]
    rows.append(_row(med_err=0.5, ours=1.2, gap_pred=0.5, gap_meas=0.0, evid=math.nan))
    rows.append(_row(rse=0.05, med_err=0.9))           # does not qualify for the accuracy goal
    g = bench.goal_summary(rows, cost={"wall_ratio": 1.02})
    assert g["qualified"] == 5 and g["acc_frac"] == 0.8
    assert g["gcv_better_frac"] == pytest.approx(4 / 6) and g["hold_frac"] == pytest.approx(5 / 6)
    assert g["free_n"] == 5 and g["free_frac"] == 1.0   # the nan baseline is left out
    assert g["wall_ratio"] == pytest.approx(1.01) and g["cost_ratio"] == 1.02
    cost = dict(config="mid", params=1, steps=1, meas=1, wall_s=1.0, plain_s=1.0, wall_ratio=1.02)
    text = "\n".join(bench.goal_lines(rows, cost))
    assert text.count("PASS") == 4 and text.count("MISS") == 2 and "5 qualify" in text
    assert "fidelity" in text and "cadence_invariance" in text


def test_result_files_feed_seed_spread_and_stop_rules(bench, tmp_path):
    gaps, losses = torch.tensor([0.5, 0.0, 3.0]), torch.tensor([0.1, 0.01, 0.9])
    rows = [{"step": s, "predicted_test_loss": p, "predicted_gap_se": 0.01, "train_loss": 0.1, "measured_test_loss": m,
             "gcv_test_loss": math.nan} for s, p, m in ((0, 1.0, 1.0), (8, 0.6, 0.7))]
    res = {k: 1.0 for k, _ in bench.COLUMNS}
    res.update(config="c", variant="default", stop=8, best=8, notes="", rows=rows, per_sample=(gaps, losses),
               hold_orc=1.1, hold_best_orc=1.0, top5=bench.top_share(gaps), evid_stop=None)
    bench.write_results([res], tmp_path, "# header")
    assert (tmp_path / "accuracy_per_sample.csv").read_text().splitlines()[3].startswith("c,2,3.0,")
    assert res["top5"] == pytest.approx(3.0 / 3.5)
    spread = _load_benchmark("research/seed_spread")
    row = spread.noise_floor(tmp_path).splitlines()[2].split(" | ")
    assert row[0] == "| c" and row[1] == "3"
    rules = _load_benchmark("research/stop_rules")
    curves, holdout = rules.load(tmp_path)
    assert len(curves["c"]) == 2 and holdout["c"] == (1.1, 1.0)
    assert "| c |" in (tmp_path / "accuracy.md").read_text()


def test_seed_spread_separates_bias_from_noise(tmp_path):
    spread = _load_benchmark("research/seed_spread")
    paths = []
    for run, pred in enumerate((0.5, 0.7, 0.9)):
        (tmp_path / str(run)).mkdir()
        path = tmp_path / str(run) / "accuracy.csv"
        path.write_text("config,variant,meas_fin,pred_fin,med_err,fin_err\n"
                        f"c,v{run},0.5,{pred},0.05,{abs(pred - 0.5) / 0.5}\n")
        paths.append(path)
    s = spread.spread(spread.read(paths)["c"])
    assert s["bias"] == pytest.approx(0.4) and s["sd"] == pytest.approx(0.4)
    assert s["passes"] == [True, False, False]


def test_stop_rules_replay(tmp_path):
    rules = _load_benchmark("research/stop_rules")
    pred = [1.0, 0.8, 0.7, 0.75, 0.74, 0.76, 0.78, 0.8, 0.9]
    rows = [{"predicted_test_loss": p, "predicted_gap_se": 0.01} for p in pred]
    assert rules.patience_stop(rows, rules.raw, 5) == 7     # best at 2, five without improvement
    assert rules.patience_stop(rows, rules.raw, 3) == 5
