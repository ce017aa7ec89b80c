"""Training tasks beyond classification: segmentation and detection (data, models, metrics, CLI)."""
