"""CI regression test of the live test-loss prediction on real MNIST (benchmarks/accuracy.py, one quick config).

Loose bounds: a regression that breaks the prediction (wrong scale, NaN, sign) fails; the
benchmark itself reports the real accuracy numbers. ~15 s on one CPU thread.
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


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("gramhook_bench_accuracy", ROOT / "benchmarks" / "accuracy.py")
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
    # GCV baseline and holdout baseline computed and finite.
    assert math.isfinite(res["gcv_fin_val"])
    assert res["stop_orc"] >= 1.0 and res["hold_orc"] > 0
