"""Output sinks for gramhook measurements.

``TensorBoardSink`` is imported lazily so that importing :mod:`gramhook.sinks`
does not pull in TensorBoard until a sink is actually requested.
"""

from typing import Any

__all__ = ["TensorBoardSink"]


def __getattr__(name: str) -> Any:
    if name == "TensorBoardSink":
        from gramhook.sinks.tensorboard import TensorBoardSink

        return TensorBoardSink
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
