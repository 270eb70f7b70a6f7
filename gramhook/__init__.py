"""gramhook: live generalization-gap prediction from the empirical NTK / gradient Gram matrix.

>>> from gramhook import GramMonitor  # doctest: +SKIP
>>> monitor = GramMonitor(model, optimizer, probe=(x, y), n_train=len(train_set), logdir="runs/exp")  # doctest: +SKIP
"""
from .config import MonitorConfig
from .kernel import empirical_ntk, gradient_gram
from .measurement import Measurement
from .monitor import GramMonitor

__version__ = "0.1.0"
__all__ = ["GramMonitor", "MonitorConfig", "Measurement", "empirical_ntk", "gradient_gram", "__version__"]
