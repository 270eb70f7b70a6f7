"""Framework adapters (Lightning, Hugging Face Trainer). Never imported by the package root."""
