"""gramhook: live generalization-gap prediction from the empirical NTK / gradient Gram matrix.

>>> from gramhook import GramMonitor  # doctest: +SKIP
>>> monitor = GramMonitor(model, optimizer, probe=(x, y), n_train=len(train_set), logdir="runs/exp")  # doctest: +SKIP
"""
from .kernel import empirical_ntk, gradient_gram
from .monitor import GramMonitor, MonitorConfig

__version__ = "0.1.0"
__all__ = ["GramMonitor", "MonitorConfig", "empirical_ntk", "gradient_gram", "__version__"]
