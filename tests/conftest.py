"""Shared test settings and fixtures.

The checks run many tiny float64 problems; one intra-op thread keeps them fast and stable on
small CI machines (thread oversubscription slowed them 10× or more in practice).
"""
import pytest
import torch

torch.set_num_threads(1)


class FakeClock:
    """A wall clock that moves only when told to: ``clock()`` is the time, ``advance(s)`` moves it."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def fake_clock(monkeypatch):
    """The monitor's clock replaced by a :class:`FakeClock` (install it before building a monitor)."""
    clock = FakeClock()
    monkeypatch.setattr("gramhook.monitor._clock", clock)
    return clock


@pytest.fixture
def costly_readouts():
    """``costly_readouts(monitor, clock, seconds)``: every readout of ``monitor`` from now on takes
    ``seconds`` on the fake ``clock`` (the real work still runs)."""

    def install(monitor, clock, seconds):
        real = monitor._measure

        def measure():
            clock.advance(seconds)
            return real()

        monitor._measure = measure

    return install
