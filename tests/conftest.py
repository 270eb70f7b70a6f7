"""Shared test settings.

The checks run many tiny float64 problems; one intra-op thread keeps them fast and stable on
small CI machines (thread oversubscription slowed them 10× or more in practice).
"""
import torch

torch.set_num_threads(1)
