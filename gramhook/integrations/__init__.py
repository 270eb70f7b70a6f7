"""Framework adapters: Lightning, Hugging Face Trainer, Ignite and plain DDP.

Each lives in its own module (``gramhook.integrations.lightning``, ``.huggingface``, ``.ignite``,
``.ddp``) and imports its framework; the package root never imports them.
"""
