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


def cache_argument(callable_: Callable) -> str:
    """"cache" where `callable_` (a model's forward, `generate`, ...) takes it, else "past_key_values"."""
    function = getattr(callable_, "__func__", callable_)
    return _cache_argument_of(function)


def cache_kwargs(callable_: Callable, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` with the argument name `callable_` expects."""
    return {cache_argument(callable_): cache}
