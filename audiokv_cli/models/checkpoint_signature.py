"""What a checkpoint is, read from its weights rather than from the name it was loaded under.

A profile belongs to the weights it was measured on. The name typed (`whisper-base`, a local folder, a Hub id) does
not say that: the same weights live under many paths, and a base and an instruction-tuned checkpoint share every
config field. The signature is the sign bits of the first elements of a few parameters spread over the model. Signs
survive the dtype the model is loaded in (a profile measured in bfloat16 on a GPU matches the float32 model on a
CPU), while any fine-tuning moves enough small weights across zero to tell two checkpoints apart.
"""

from __future__ import annotations

import base64

import numpy as np
import torch

#: parameters sampled, evenly spaced over the sorted parameter names
SAMPLED_TENSORS = 8
#: leading elements of each sampled parameter whose signs are kept
SAMPLED_ELEMENTS = 1024
#: share of equal sign bits above which two signatures are the same checkpoint (a dtype change flips almost none:
#: only values that underflow to zero; fine-tuning flips every weight smaller than its update)
SAME_CHECKPOINT_AGREEMENT = 0.999


def weights_signature(model: torch.nn.Module) -> dict[str, str]:
    """{parameter name: base64 of its first elements' sign bits} for a few parameters; offloaded (meta) ones are
    left out, so a comparison uses the names both sides hold."""
    named = sorted(
        (name, param) for name, param in model.named_parameters() if param.numel() >= SAMPLED_ELEMENTS
    )
    if not named:
        return {}
    count = min(SAMPLED_TENSORS, len(named))
    picks = sorted({round(i * (len(named) - 1) / max(count - 1, 1)) for i in range(count)})
    signature = {}
    for index in picks:
        name, param = named[index]
        if param.device.type == "meta":
            continue
        with torch.no_grad():
            signs = (param.detach().reshape(-1)[:SAMPLED_ELEMENTS].float().cpu() > 0).numpy()
        signature[name] = base64.b64encode(np.packbits(signs).tobytes()).decode("ascii")
    return signature


def agreement(first: dict[str, str], second: dict[str, str]) -> float | None:
    """Share of equal sign bits over the parameters both signatures hold (None when they share none)."""
    equal = total = 0
    for name in sorted(set(first) & set(second)):
        a = np.unpackbits(np.frombuffer(base64.b64decode(first[name]), dtype=np.uint8))
        b = np.unpackbits(np.frombuffer(base64.b64decode(second[name]), dtype=np.uint8))
        if a.shape != b.shape:
            return 0.0
        equal += int((a == b).sum())
        total += a.size
    return equal / total if total else None


def same_checkpoint(first: dict[str, str] | None, second: dict[str, str] | None) -> bool | None:
    """True or False when both signatures share parameters; None when that cannot be told (one is missing)."""
    if not first or not second:
        return None
    share = agreement(first, second)
    return None if share is None else share >= SAME_CHECKPOINT_AGREEMENT
