"""The public surface: GramMonitor's keywords, MonitorConfig's checks and the Measurement record."""
import dataclasses
import math

import pytest
import torch
from torch import nn

import gramhook
from gramhook import GramMonitor, Measurement, MonitorConfig
from gramhook.config import REMOVED_OPTIONS
from gramhook.insight import INSIGHT_KEYS


def _monitor(**kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    return GramMonitor(model, opt, probe=(x, y), n_train=32, **kwargs)


def test_public_names():
    assert gramhook.__all__ == ["GramMonitor", "MonitorConfig", "Measurement", "empirical_ntk", "gradient_gram",
                                "__version__"]


@pytest.mark.parametrize("name", sorted(REMOVED_OPTIONS))
def test_removed_options_fail_with_their_reason(name):
    with pytest.raises(TypeError, match=f"{name!r}, which was removed because"):
        _monitor(**{name: None})


def test_settings_go_in_the_config():
    with pytest.raises(TypeError, match=r"pass config=MonitorConfig\(rows=8, overhead=0.1\)"):
        _monitor(rows=8, overhead=0.1)
    with _monitor(every=1, probe_size=16, seed=3, config=MonitorConfig(rows=4, total_steps=10)) as mon:
        assert (mon.config.every, mon.config.probe_size, mon.config.seed) == (1, 16, 3)
        assert mon.config.rows == 4 and mon.total_steps == 10 and mon.probe.m == 16
        mon.set_total_steps(20)
        assert mon.config.total_steps == 20
        with pytest.raises(ValueError, match="total_steps"):
            mon.set_total_steps(0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        MonitorConfig().rows = 3


def test_measurement_record():
    assert set(INSIGHT_KEYS) <= {f.name for f in dataclasses.fields(Measurement)}
    with _monitor(every=1) as mon:
        rec = mon.measure()
        assert rec is mon.history[-1] and isinstance(rec, Measurement) and rec.step == 0
        d = rec.as_dict()
        assert d["predicted_test_loss"] == rec.predicted_test_loss and Measurement.from_dict(d) == rec
        lo, hi = rec.band
        assert lo == pytest.approx(rec.predicted_test_loss - 2 * rec.predicted_gap_se) and lo <= hi
    blank = Measurement(step=3)
    assert math.isnan(blank.alignment) and Measurement.from_dict({"step": 3, "gone": 1.0}).step == 3
