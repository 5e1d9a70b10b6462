"""The cache argument follows the installed transformers, and audiokv's own calls raise no deprecation warning."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from audiokv_cli.compat import cache_argument, cache_kwargs
from audiokv_cli.compression.methods import build_policy
from audiokv_cli.compression.policy import apply_policy
from audiokv_cli.runtime.decoding import greedy_generate


def test_name_follows_the_forward_signature():
    class New:
        def forward(self, input_ids=None, cache=None, **kwargs): ...

    class Old:
        def forward(self, input_ids=None, past_key_values=None, **kwargs): ...

    assert cache_kwargs(New(), "c") == {"cache": "c"}
    assert cache_kwargs(Old(), "c") == {"past_key_values": "c"}


def _clip(seconds=3.0):
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def _cache_warnings(caught):
    return [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning)) and "cache" in str(w.message)]


def test_old_name_warns_on_this_release(random_adapter):
    """The check below can fail: the installed release does warn when the old name is used."""
    if cache_argument(random_adapter.model) != "cache":
        pytest.skip("this transformers release still takes past_key_values")
    prepared = random_adapter.prepare(_clip())
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        random_adapter.model(**prepared.inputs, past_key_values=DynamicCache(), use_cache=True)
    assert _cache_warnings(caught)


def test_no_deprecation_warning_from_audiokv_calls(random_adapter):
    prepared = random_adapter.prepare(_clip())
    policy = build_policy("snapkv", 0.5)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        with apply_policy(policy, random_adapter, prepared) as session:
            greedy_generate(random_adapter, prepared.inputs, session.cache, 4)
        with apply_policy(policy, random_adapter, prepared) as session:
            random_adapter.model.generate(
                **prepared.inputs, **cache_kwargs(random_adapter.model, session.cache), max_new_tokens=4, do_sample=False
            )
    assert not _cache_warnings(caught), [str(w.message) for w in caught]
