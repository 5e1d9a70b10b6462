"""Named eviction methods, each a small composition of scorer, smoother and budget allocator.

Adding a method is one entry here (plus a new scorer, smoother or allocator if it needs one). Any part can be
swapped from the command line (`--scorer`, `--smoother`, `--budget`), so "SnapKV + SSS" is `--method snapkv
--smoother sss`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from audiokv_cli.compression.budgets import make_budget
from audiokv_cli.compression.policy import CompressionPolicy
from audiokv_cli.compression.scorers import make_scorer
from audiokv_cli.compression.smoothers import make_smoother
from audiokv_cli.errors import AudiokvError


@dataclass(frozen=True)
class MethodRecipe:
    scorer: str | None
    smoother: str = "none"
    budget: str = "uniform"
    description: str = ""


METHODS: dict[str, MethodRecipe] = {
    "full": MethodRecipe(None, description="no eviction (reference)"),
    "streamingllm": MethodRecipe("streaming", description="attention sinks + most recent tokens"),
    "h2o": MethodRecipe("h2o", description="accumulated attention over all prompt queries (heavy hitters)"),
    "snapkv": MethodRecipe("window", "avgpool", description="observation-window attention + average pooling"),
    "pyramidkv": MethodRecipe("window", "avgpool", "pyramid", "SnapKV scores, layer budgets shrinking with depth"),
    "adakv": MethodRecipe("window", "avgpool", "adaptive", "SnapKV scores, layer-local adaptive head budgets"),
    "random": MethodRecipe("random", description="uniformly random positions (sanity baseline)"),
    "stride": MethodRecipe("stride", description="evenly spaced positions (position-only, covers all audio)"),
    "audiokv": MethodRecipe("window", "sss", "profile", "profile head budgets + window scores + spectral smoothing"),
}


@dataclass
class MethodOptions:
    """Tunable parameters shared by the parts; a part ignores what it does not use."""

    window: int = 32
    scope: str = "all"
    kernel: int = 7
    sss_alpha: float = 0.5
    sss_rho: float = 0.7
    sinks: int = 4
    seed: int = 0
    head_scores: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


def _scorer(name: str, options: MethodOptions):
    params = {"window": {"window": options.window}, "random": {"seed": options.seed}, "streaming": {"sinks": options.sinks}}
    return make_scorer(name, **params.get(name, {}))


def _smoother(name: str, options: MethodOptions):
    params = {
        "avgpool": {"kernel": options.kernel},
        "maxpool": {"kernel": options.kernel},
        "sss": {"alpha": options.sss_alpha, "rho": options.sss_rho},
    }
    return make_smoother(name, **params.get(name, {}))


def _budget(name: str, options: MethodOptions):
    if name == "profile":
        if options.head_scores is None:
            raise AudiokvError("budget 'profile' needs a head profile (--profile)")
        return make_budget(name, head_scores=options.head_scores)
    return make_budget(name)


def method_uses_profile(name: str, budget: str | None = None) -> bool:
    recipe = METHODS.get(name)
    return (budget or (recipe.budget if recipe else "")) == "profile"


def build_policy(
    method: str,
    retention: float = 1.0,
    options: MethodOptions | None = None,
    scorer: str | None = None,
    smoother: str | None = None,
    budget: str | None = None,
) -> CompressionPolicy:
    """The policy for a named method, with any of its three parts overridden."""
    options = options or MethodOptions()
    if method not in METHODS:
        raise AudiokvError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    recipe = METHODS[method]
    if not 0.0 < retention <= 1.0:
        raise AudiokvError(f"retention must be in (0, 1], got {retention}")
    if options.window < 1:
        raise AudiokvError(f"window must be at least 1, got {options.window}")
    scorer_name = scorer or recipe.scorer
    if scorer_name is None:
        if smoother or budget:
            raise AudiokvError("method 'full' evicts nothing; add --scorer to compose an eviction method")
        return CompressionPolicy(name="full", scorer=None, retention=1.0, window=options.window, scope=options.scope)
    smoother_name = smoother or recipe.smoother
    budget_name = budget or recipe.budget
    overridden = (scorer_name, smoother_name, budget_name) != (recipe.scorer, recipe.smoother, recipe.budget)
    name = f"{scorer_name}+{smoother_name}+{budget_name}" if overridden else method
    return CompressionPolicy(
        name=name,
        scorer=_scorer(scorer_name, options),
        smoother=_smoother(smoother_name, options),
        budget=_budget(budget_name, options),
        retention=retention,
        window=options.window,
        scope=options.scope,
    )
