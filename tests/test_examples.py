"""The framework examples in examples/ run at tiny sizes (in process, or as a script where it
launches processes itself). examples/ddp_mnist.py is not run here: its DistributedGramMonitor is
exercised by tests/test_ddp.py, and two more spawned processes cost ~20 s."""
import csv
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytest.importorskip("mlxtend")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _last_json(text):
    return [json.loads(m) for m in re.findall(r"\{\"[^{}]*\}", text)]


def _script(name, *args, timeout=240):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / f"{name}.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=str(ROOT))
    assert done.returncode == 0, done.stderr[-3000:]
    return _last_json(done.stdout)


def test_lightning_example(tmp_path, capsys):
    pytest.importorskip("lightning")
    _load("lightning_mnist").main(["--n-train", "128", "--steps", "4", "--every", "2", "--probe-size", "16",
                                   "--logdir", str(tmp_path)])
    out = _last_json(capsys.readouterr().out)[-1]
    assert out["global_step"] == 4 and out["steps"] == [0, 2, 4]
    with open(pathlib.Path(out["metrics"]) / "metrics.csv") as fh:
        assert any(r.get("gramhook/predicted_test_loss") for r in csv.DictReader(fh))


@pytest.mark.slow
def test_lightning_ddp_example_ranks_stop_together(tmp_path):
    pytest.importorskip("lightning")
    outs = _script("lightning_mnist", "--n-train", "128", "--steps", "30", "--every", "1", "--probe-size", "16",
                   "--devices", "2", "--strategy", "ddp", "--stop", "--patience", "2", "--min-delta", "1e9",
                   "--logdir", str(tmp_path))
    assert sorted(o["rank"] for o in outs) == [0, 1]
    assert outs[0]["global_step"] == outs[1]["global_step"] == 2
    assert outs[0]["predicted_test_loss"] == outs[1]["predicted_test_loss"]


def test_huggingface_example(tmp_path, capsys):
    pytest.importorskip("transformers")
    _load("huggingface_bert").main(["--n-train", "64", "--steps", "4", "--every", "2", "--probe-size", "16",
                                    "--hidden", "16", "--output-dir", str(tmp_path)])
    out = _last_json(capsys.readouterr().out)[-1]
    assert out["global_step"] == 4 and out["logged_steps"] == [0, 2, 4]


def test_ignite_example(capsys):
    pytest.importorskip("ignite")
    _load("ignite_mnist").main(["--n-train", "128", "--epochs", "1", "--every", "1", "--probe-size", "16"])
    out = _last_json(capsys.readouterr().out)[-1]
    assert out["iterations"] == 2 and out["steps"] == [0, 1, 2]
