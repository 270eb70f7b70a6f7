"""CI regression test of the live test-loss prediction on real MNIST (benchmarks/accuracy.py, one quick config).

Loose bounds: a regression that breaks the prediction (wrong scale, NaN, sign) fails; the
benchmark itself reports the real accuracy numbers. Also checks the variant registry, the
label-noise test labels and the goal summary. ~12 s on one CPU thread.
"""
import argparse
import collections
import importlib.util
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("mlxtend")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _load_benchmark(name="accuracy"):
    spec = importlib.util.spec_from_file_location(f"gramhook_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


def test_quick_mnist_mlp_prediction_tracks_measured_test_loss():
    torch.set_num_threads(1)
    bench = _load_benchmark()
    cfg = bench.Config("mnist", 500, "mlp", "ce", "sgd", epochs=5)
    args = argparse.Namespace(seed=0, epochs=None, every=None, probe_size=64, batch_size=64, lr=None,
                              coordinates=4096)
    res = bench.run_config(cfg, args)
    print("  ".join(f"{k}={bench.fmt(k, s, res[k])}" for k, s in bench.COLUMNS))
    assert res["meas"] >= 15
    assert math.isfinite(res["pred_fin"]) and math.isfinite(res["meas_fin"])
    assert res["med_err"] < 0.6
    assert 0.5 < res["pred_fin"] / res["meas_fin"] < 2.0
    # The predicted gap must be positive and of the measured gap's order at the end.
    assert res["gap_pred"] > 0
    assert 0.25 < res["gap_pred"] / res["gap_meas"] < 4.0
    # Per-sample final gaps and losses of the whole probe; top5 is the share of its 3 largest gaps.
    gaps, losses = res["per_sample"]
    assert gaps.shape == losses.shape == (64,)
    assert res["top5"] == pytest.approx(float(gaps.sort(descending=True).values[:3].sum() / gaps.sum()))
    assert 0.05 <= res["top5"] <= 1.0


def test_results_files_hold_per_sample_gaps(tmp_path):
    bench = _load_benchmark()
    gaps, losses = torch.tensor([0.5, 0.0, 3.0]), torch.tensor([0.1, 0.01, 0.9])
    res = collections.defaultdict(lambda: 1.0, {k: 1.0 for k, _ in bench.COLUMNS})   # any other column: 1.0
    res.update(config="c", top5=bench.top_share(gaps), rows=[], per_sample=(gaps, losses))
    bench.write_results([res], tmp_path, "# header")
    lines = (tmp_path / "accuracy_per_sample.csv").read_text().splitlines()
    assert lines[0] == "config,sample,gap,train_loss" and len(lines) == 4
    assert lines[3].startswith("c,2,3.0,")
    assert "per_sample" not in (tmp_path / "accuracy.csv").read_text().splitlines()[0]
    assert res["top5"] == pytest.approx(3.0 / 3.5)

    # The noise floor of seed_spread.py reads them back: std(g)/8/meas_fin for a 64-sample probe.
    spread = _load_benchmark("seed_spread")
    row = spread.noise_floor(tmp_path).splitlines()[2].split(" | ")
    assert row[0] == "| c" and row[1] == "3"
    assert float(row[5]) == pytest.approx(0.86, abs=0.005)            # top 5% share
    assert float(row[6]) == pytest.approx(3.5 ** 2 / 9.25, abs=0.05)    # ESS of (0.5, 0, 3)
    assert float(row[7]) == pytest.approx(float(gaps.std()) / 8, abs=0.005)
    # GCV baseline and holdout baseline computed and finite.
    assert math.isfinite(res["gcv_fin_val"])
    assert res["stop_orc"] >= 1.0 and res["hold_orc"] > 0
    assert res["best_orc"] >= 1.0 and math.isfinite(res["hold_best_orc"])


def test_variants_build_monitors_and_dense_scales_patience():
    torch.set_num_threads(1)
    bench = _load_benchmark()
    from gramhook import GramMonitor

    for name in ("default", "probe128", "ref128", "dense", "exact", "sketch1024", "replace"):
        assert name in bench.VARIANTS
    cfg = bench.Config("digits", 40, "mlp", "ce", "sgd")
    args = argparse.Namespace(seed=0, every=None, probe_size=16, coordinates=64)
    x, y = torch.randn(40, 6), torch.randint(0, 10, (40,))
    for name in bench.VARIANTS:
        kwargs, default_every, patience = bench.monitor_settings(cfg, 40, 200, args, name)
        assert not set(kwargs) & bench.BENCH_KEYS
        assert kwargs["probe_size"] <= 40
        model = torch.nn.Linear(6, 10)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        GramMonitor(model, opt, probe=(x, y), n_train=40, **kwargs).close()  # every override is accepted
        if name == "dense":
            assert kwargs["every"] == default_every // 2 and patience == 2 * bench.PATIENCE
        elif name == "default":
            assert kwargs["every"] == default_every == 10 and patience == bench.PATIENCE


def test_seed_spread_separates_bias_from_noise(tmp_path):
    spread = _load_benchmark("seed_spread")
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
    assert "run 1: 1/1, run 2: 0/1" in spread.markdown(spread.read(paths))


def test_stop_rules_replay(tmp_path):
    rules = _load_benchmark("stop_rules")
    pred = [1.0, 0.8, 0.7, 0.75, 0.74, 0.76, 0.78, 0.8, 0.9]
    meas = [1.0, 0.8, 0.72, 0.70, 0.71, 0.73, 0.75, 0.8, 0.9]
    rows = [{"predicted_test_loss": p, "predicted_gap_se": 0.01, "measured_test_loss": m} for p, m in zip(pred, meas)]
    assert rules.patience_stop(rows, rules.raw, 5) == 7     # best at 2, five without improvement
    assert rules.patience_stop(rows, rules.raw, 3) == 5
    with open(tmp_path / "accuracy_rows.csv", "w") as f:
        f.write("config,predicted_test_loss,predicted_gap_se,measured_test_loss\n")
        f.writelines(f"c,{p},0.01,{m}\n" for p, m in zip(pred, meas))
    (tmp_path / "accuracy.csv").write_text("config,hold_orc,hold_best_orc\nc,1.05,1.01\n")
    res = {r["rule"]: r for r in rules.evaluate(*rules.load(tmp_path))}
    # patience 5 stops at 0.8/0.70 = 1.14 (missed); restoring its best (step 2) gives 0.72/0.70 = 1.029
    assert res["patience 5 (should_stop)"]["ok"] == 0 and res["patience 5 (should_stop)"]["ok_best"] == 0
    assert res["patience 5 (should_stop)"]["median"] == pytest.approx(0.8 / 0.70)


def test_variants_compose_with_plus():
    bench = _load_benchmark()
    cfg = bench.Config("digits", 400, "mlp", "ce", "sgd")
    args = argparse.Namespace(seed=0, every=None, probe_size=64, coordinates=64)
    kwargs, _, _ = bench.monitor_settings(cfg, 400, 200, args, "probe256+mseed2+dense")
    assert kwargs["probe_size"] == 256 and kwargs["seed"] == bench.VARIANTS["mseed2"]["seed"]
    assert kwargs["every"] == 5                       # dense halves the default 10
    assert bench._variant_name("probe256+mseed1") == "probe256+mseed1"
    with pytest.raises(argparse.ArgumentTypeError, match="nosuch"):
        bench._variant_name("probe256+nosuch")


def test_label_noise_flips_test_labels_too():
    pytest.importorskip("sklearn")
    bench = _load_benchmark()
    clean = bench.load(bench.Config("digits", 1000, "mlp", "ce", "sgd"), seed=0)
    noisy = bench.load(bench.Config("digits", 1000, "mlp", "ce", "sgd", noise=0.2), seed=0)
    assert torch.equal(clean.y_test, clean.y_test_clean) and torch.equal(noisy.y_test_clean, clean.y_test)
    for a, b in ((noisy.y_train, clean.y_train), (noisy.y_test, clean.y_test)):
        frac = float((a != b).float().mean())
        assert 0.14 < frac < 0.26
    # independent generators for train and test flips
    n = min(len(noisy.y_train), len(noisy.y_test))
    assert not torch.equal((noisy.y_train != clean.y_train)[:n], (noisy.y_test != clean.y_test)[:n])


def test_goal_summary():
    bench = _load_benchmark()
    rows = [dict(med_err=0.05, fin_err=0.1, gcv_med=0.2, stop_orc=1.0, hold_orc=1.1, gap_pred=g, gap_meas=g + 0.01,
                 gcv_gap=-g, ovh=1.0, wall_s=1.0, best_orc=1.0, hold_best_orc=1.0) for g in (0.1, 0.2, 0.3, 0.4)]
    rows.append(dict(rows[0], med_err=0.5, stop_orc=1.2, gap_pred=0.5, gap_meas=0.0, best_orc=1.01, hold_best_orc=1.0))
    g = bench.goal_summary(rows)
    assert g["acc_frac"] == 0.8 and g["gcv_better_frac"] == 0.8 and g["stop_frac"] == 0.8
    assert g["best_frac"] == 0.8  # 1.01 ≤ 1.02 but worse than the holdout's restored best
    text = "\n".join(bench.goal_lines(rows))
    assert text.count("PASS") == 3 and text.count("MISS") == 1
    assert abs(g["spearman"]) < 1e-9  # the fifth config reverses the ranking
