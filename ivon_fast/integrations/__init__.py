"""Integrations with training frameworks, imported on demand so that the package itself needs
neither: ``ivon_fast.integrations.hf`` (Hugging Face Trainer) and
``ivon_fast.integrations.lightning`` (PyTorch Lightning)."""
