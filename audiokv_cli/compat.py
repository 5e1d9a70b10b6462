"""The one place that knows which transformers release names the cache argument how.

transformers 5.x renamed `past_key_values` to `cache` (old name deprecated, removed in 5.40 for model forwards and
in 6.0 for `generate`). Every call that hands audiokv's cache to a model goes through `cache_kwargs`, so the name
follows the installed release and no deprecation warning comes from audiokv's own calls.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any, Callable


@lru_cache(maxsize=None)
def _cache_argument_of(function: Callable) -> str:
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def cache_argument(model: Any) -> str:
    """"cache" where the model's forward takes it, else "past_key_values".

    `generate` takes **kwargs and renamed the argument in the same release, so the forward decides for both.
    """
    forward = getattr(model, "forward", model)
    return _cache_argument_of(getattr(forward, "__func__", forward))


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for `model(...)` and `model.generate(...)` with the name the installed release expects."""
    return {cache_argument(model): cache}
