"""Model adapters: one per model family, found through the registry by config, never by `if` chains."""

from audiokv_cli.models.base import AttentionGeometry, ModelAdapter, PreparedInput
from audiokv_cli.models.registry import MODEL_ALIASES, load_adapter

__all__ = ["AttentionGeometry", "ModelAdapter", "PreparedInput", "MODEL_ALIASES", "load_adapter"]
