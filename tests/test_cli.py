"""Smoke tests of the ``gramhook`` command line (in-process, small) and of examples/plain_loop.py."""
import glob
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mlxtend")
pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing import event_accumulator as ea  # noqa: E402

from gramhook import cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUICK_STEPS = [0, 4, 8, 12]  # --quick: 12 steps, every 4, step 0 included


def _scalars(logdir):
    files = glob.glob(str(Path(logdir) / "events.out.tfevents.*"))
    assert len(files) == 1, files
    acc = ea.EventAccumulator(str(logdir), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _run(capsys, *argv):
    rc = cli.main(["demo", "--quick", *argv])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


def _table_rows(out):
    lines = out.splitlines()
    start = lines.index(cli.TABLE_HEADER) + 2  # header, rule
    rows = []
    for line in lines[start:]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


def _check_run(out, logdir, steps=QUICK_STEPS):
    assert cli.TABLE_HEADER in out
    rows = _table_rows(out)
    assert [int(r[0]) for r in rows] == steps
    for r in rows:  # step, epoch, train, predicted, ±, 2SE, measured, rel. error, in band
        assert r[4] == "±"
        assert all(math.isfinite(float(v)) for v in (r[2], r[3], r[5], r[6])), r
    for label in ("median relative error", "final relative error", "inside predicted ± 2 SE",
                  "should_stop(patience=5) would have stopped at", "minimum measured test loss at",
                  "monitor overhead"):
        assert label in out
    assert "tensorboard --logdir" in out

    scalars = _scalars(logdir)
    for tag in ("gramhook/predicted_test_loss", "gramhook/train_loss", cli.COMPARE_TAG):
        assert [s for s, _ in scalars[tag]] == steps, tag
        assert all(math.isfinite(v) for _, v in scalars[tag]), tag
    # The measured test loss in the table is the one logged under the compare tag.
    measured = [float(r[6]) for r in rows]
    assert [v for _, v in scalars[cli.COMPARE_TAG]] == pytest.approx(measured, abs=1e-4)


def test_no_subcommand_prints_help(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: gramhook") and "demo" in out


def test_python_dash_m_prints_help():
    proc = subprocess.run([sys.executable, "-m", "gramhook"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage: gramhook" in proc.stdout and "demo" in proc.stdout


def test_demo_quick_no_plot(tmp_path, capsys):
    out = _run(capsys, "--logdir", str(tmp_path), "--no-plot", "--threads", "1")
    _check_run(out, tmp_path)
    assert "probe_size=16, every=4" in out  # the settings are printed
    assert not (tmp_path / cli.PLOT_NAME).exists()


def test_demo_quick_with_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = _run(capsys, "--logdir", str(tmp_path), "--threads", "1")
    _check_run(out, tmp_path)
    png = tmp_path / cli.PLOT_NAME
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(png) in out


def test_demo_quick_mse_adam(tmp_path, capsys):
    out = _run(capsys, "--loss", "mse", "--optimizer", "adam", "--every", "5", "--logdir", str(tmp_path),
               "--no-plot", "--threads", "1")
    assert "Adam(lr=0.001), loss mse" in out
    _check_run(out, tmp_path, steps=[0, 5, 10, 12])  # the last step is measured off-schedule


def test_demo_keeps_global_rng(tmp_path, capsys):
    import torch

    torch.manual_seed(123)
    before = torch.get_rng_state()
    _run(capsys, "--logdir", str(tmp_path), "--no-plot", "--threads", "1")
    assert torch.equal(torch.get_rng_state(), before)


def test_missing_mlxtend_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    assert cli.main(["demo", "--quick", "--no-plot"]) == 1
    err = capsys.readouterr().err
    assert "pip install 'gramhook[demo]'" in err


def test_missing_matplotlib_skips_the_plot(monkeypatch, tmp_path, capsys):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    rows = [dict(step=0, train_loss=1.0, predicted_test_loss=1.1, predicted_gap_se=0.1, measured_test_loss=1.2)]
    assert cli._plot(rows, tmp_path / cli.PLOT_NAME, title="t") is None
    assert "skipping the plot" in capsys.readouterr().out
    assert not (tmp_path / cli.PLOT_NAME).exists()


def test_bad_n_train_is_a_clear_error(capsys):
    assert cli.main(["demo", "--quick", "--n-train", "5000", "--no-plot"]) == 1
    assert "--n-train" in capsys.readouterr().err


def test_plain_loop_example(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("plain_loop", ROOT / "examples" / "plain_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monitor = module.main(epochs=1, n_train=256, logdir=str(tmp_path))
    out = capsys.readouterr().out
    assert "predicted test" in out and "measured test" in out
    assert monitor.history and math.isfinite(monitor.predicted_test_loss)
    assert "gramhook/predicted_test_loss" in _scalars(tmp_path)


def test_device_option(tmp_path, capsys):
    out = _run(capsys, "--logdir", str(tmp_path), "--no-plot", "--threads", "1", "--device", "cpu")
    assert "device     cpu" in out
    assert cli.main(["demo", "--quick", "--device", "tpu9"]) == 1
    assert "--device 'tpu9'" in capsys.readouterr().err
    if not __import__("torch").cuda.is_available():
        assert cli.main(["demo", "--quick", "--device", "cuda"]) == 1
        assert "--device cpu" in capsys.readouterr().err
