"""gramhook: live generalization-gap prediction from the empirical NTK / gradient Gram matrix."""
from .kernel import empirical_ntk, gradient_gram

__version__ = "0.1.0"
__all__ = ["empirical_ntk", "gradient_gram", "__version__"]
