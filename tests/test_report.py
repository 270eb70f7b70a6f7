"""`gramhook report`: real TensorBoard events written by a monitored run, read back, rendered, and
looked at in headless Chromium (a screenshot and the rendered DOM)."""
import json
import re
import shutil
import subprocess

import pytest
import torch
from torch import nn

pytest.importorskip("tensorboard")

from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from gramhook import GramMonitor, MonitorConfig  # noqa: E402
from gramhook.cli import main  # noqa: E402
from gramhook.report import COLORS, load_run  # noqa: E402

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.fixture(scope="module")
def rundir(tmp_path_factory):
    """A short run on 8x8 images with noisy labels, logged like a user would (test/loss beside)."""
    logdir = tmp_path_factory.mktemp("run")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 1, 8, 8, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()
    y[:5] = (y[:5] + 1) % 4                     # flipped labels
    xt = torch.randn(48, 1, 8, 8, generator=g)
    yt = (xt.mean((1, 2, 3)) > 0).long() + 2 * (xt[:, 0, 0, 0] > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    writer = SummaryWriter(str(logdir))
    steps = 24
    monitor = GramMonitor(model, opt, probe=(x, y), n_train=48, probe_size=48, every=3,
                          logdir=writer, config=MonitorConfig(diagnostics_every=1, compare_tag="test/loss", effective_gram_size=16, total_steps=steps, train_sample_size=0))
    for step in range(1, steps + 1):
        b = torch.randint(0, 48, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[b]), y[b]).backward()
        opt.step()
        if step % 3 == 0:
            with torch.no_grad():
                writer.add_scalar("test/loss", float(nn.functional.cross_entropy(model(xt), yt)), step)
    suspects = monitor.suspect_samples(5)
    monitor.close()
    writer.close()
    return logdir, suspects, monitor


def test_monitor_scores_and_suspects(rundir):
    _, suspects, monitor = rundir
    index, score = monitor.label_noise_scores()
    assert index.tolist() == list(range(48)) and torch.isfinite(score).all()
    assert [s["index"] for s in suspects] == score.argsort(descending=True)[:5].tolist()
    assert set(suspects[0]) == {"index", "score", "label", "gap", "loss"}
    last = monitor.history[-1]
    for key in ("effective_rank", "label_alignment", "residual_alignment", "margin_min", "rho",
                "normalized_ce", "forecast_final_test_loss", "forecast_best_step"):
        assert getattr(last, key) == getattr(last, key), key  # logged, not NaN


def test_event_files_hold_the_per_sample_view(rundir):
    run = load_run(rundir[0])
    assert len(run["scalars"]["gramhook/predicted_test_loss"]) == 9
    assert "gramhook/label_noise_score" in run["histograms"] and "gramhook/per_sample_gap" in run["histograms"]
    rows = json.loads(run["texts"]["gramhook/suspects_json"][1])
    assert [r["index"] for r in rows[:5]] == [s["index"] for s in rundir[1]]
    assert run["images"]["gramhook/suspect_image/1"][:4] == b"\x89PNG"
    assert len(json.loads(run["texts"]["gramhook/spectrum_json"][1])) == 16 * 4


def test_report_from_saved_history(tmp_path, rundir):
    (tmp_path / "history.json").write_text(json.dumps([h.as_dict() for h in rundir[2].history], allow_nan=True))
    assert main(["report", str(tmp_path)]) == 0
    text = (tmp_path / "gramhook_report.html").read_text()
    assert text.count('class="series"') >= 5


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (.ci/run installs it with apt)")
def test_report_renders_in_headless_chromium(rundir, tmp_path):
    logdir = rundir[0]
    out = tmp_path / "report.html"
    assert main(["report", str(logdir), "--out", str(out)]) == 0
    text = out.read_text()
    assert not re.search(r"(src|href)=['\"]https?:", text) and "<script" not in text  # self-contained
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--user-data-dir=" + str(tmp_path / "prof")]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", out.as_uri()], capture_output=True, text=True,
                         timeout=60).stdout
    # The rendered page: the prediction, its band and the measured curve, each with its points.
    points = {m.group(1): int(m.group(2)) for m in re.finditer(r'data-name="([^"]+)" data-points="(\d+)"', dom)}
    assert points["predicted test loss"] == 9 and points["test/loss"] == 8 and points["train loss"] == 9
    assert points["eigenvalue"] == 64 and points["forecast final test loss"] >= 3
    assert dom.count('class="band"') == 1 and dom.count('class="bar"') >= 5
    assert dom.count("class=\"thumb\"") == 10
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *flags, "--window-size=1200,2600", f"--screenshot={shot}", out.as_uri()],
                   capture_output=True, timeout=60)
    from PIL import Image

    import numpy as np

    img = np.asarray(Image.open(shot).convert("RGB")).astype(np.int64)
    rgb = lambda c: np.array([int(c[i:i + 2], 16) for i in (1, 3, 5)])  # noqa: E731
    near = lambda c: int((np.abs(img - rgb(c)).sum(-1) < 40).sum())  # noqa: E731
    assert near(COLORS[0]) > 3000 and near(COLORS[1]) > 500   # lines and bars drawn in the series colours
    # The first chart's plot area (top left) is not blank: the curves and the band vary its pixels.
    assert img[120:360, 60:560].mean(-1).var() > 50
