"""KV-cache compression: token scorers, score smoothers, per-head budgets and position selection."""
