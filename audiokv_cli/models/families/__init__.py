"""One adapter per model family (docs/models.md); `models.registry` lists them and finds one by `model_type`."""
