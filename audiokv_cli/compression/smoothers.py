"""Score smoothers: filter each head's importance sequence along the token axis before top-k.

Raw attention scores are spiky; top-k on them keeps dense clusters and drops whole stretches of audio.
SnapKV smooths with local pooling; AudioKV's Spectral Score Smoothing (SSS) low-pass filters with an FFT.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from audiokv_cli.compression.scorers import _build
from audiokv_cli.errors import AudiokvError


@runtime_checkable
class Smoother(Protocol):
    name: str

    def smooth(self, scores: Tensor) -> Tensor:
        """scores [B, Hkv, L] -> same shape, smoothed along the last (token) axis per head."""
        ...


@dataclass
class NoSmoothing:
    name: str = dataclasses.field(default="none", init=False)

    def smooth(self, scores: Tensor) -> Tensor:
        return scores


@dataclass
class PoolSmoothing:
    """SnapKV-style 1-D pooling with a centred odd kernel; output length equals input length.

    Average pooling counts the zero padding at the edges (count_include_pad, as SnapKV's avg_pool1d call does);
    max pooling pads with -inf, so edges are never inflated.
    """

    kernel: int = 7
    mode: str = "avg"
    name: str = dataclasses.field(default="", init=False)

    def __post_init__(self) -> None:
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise AudiokvError(f"pooling kernel must be a positive odd number (centred window), got {self.kernel}")
        if self.mode not in ("avg", "max"):
            raise AudiokvError(f"pooling mode must be 'avg' or 'max', got {self.mode!r}")
        self.name = f"{self.mode}pool"

    def smooth(self, scores: Tensor) -> Tensor:
        if self.kernel == 1 or scores.shape[-1] == 0:
            return scores
        shape = scores.shape
        flat = scores.reshape(-1, 1, shape[-1])
        pad = self.kernel // 2
        if self.mode == "avg":
            pooled = F.avg_pool1d(flat, self.kernel, stride=1, padding=pad, count_include_pad=True)
        else:
            pooled = F.max_pool1d(flat, self.kernel, stride=1, padding=pad)
        return pooled.reshape(shape)


def spectral_taper(num_bins: int, cutoff: Tensor, taper: int) -> Tensor:
    """Low-pass mask [..., num_bins] for per-head cutoff bins `cutoff` [...].

    mask(k) = 1 for k <= k*; 0.5 * (1 + cos(pi * (k - k*) / (taper + 1))) for k* < k <= k* + taper
    (a raised-cosine roll-off that starts just below 1 and ends just above 0); 0 beyond. taper = 0 is a hard cut.
    """
    bins = torch.arange(num_bins, device=cutoff.device, dtype=torch.float64)
    distance = bins - cutoff.to(torch.float64).unsqueeze(-1)
    rolloff = 0.5 * (1.0 + torch.cos(math.pi * distance / (taper + 1)))
    mask = torch.where(distance <= 0, torch.ones_like(rolloff), rolloff)
    return torch.where(distance > taper, torch.zeros_like(mask), mask)


@dataclass
class SpectralSmoothing:
    """AudioKV Spectral Score Smoothing (SSS), per head along the token axis.

    F = rfft(s); E(k) = cumsum |F_k|^2 over the one-sided rfft bins (no doubling of the mirrored bins, as the
    method states it); k* = the smallest k with E(k) >= rho * E(last); keep bins <= k*, roll off over `taper` bins
    (see spectral_taper), drop the rest; s_hat = (1 - alpha) * s + alpha * irfft(F * mask, n=L).
    alpha = 0 or rho = 1 returns the input unchanged. Computed in float64, returned in the input dtype.
    """

    alpha: float = 0.5
    rho: float = 0.7
    taper: int = 4
    name: str = dataclasses.field(default="sss", init=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise AudiokvError(f"SSS alpha must be in [0, 1], got {self.alpha}")
        if not 0.0 <= self.rho <= 1.0:
            raise AudiokvError(f"SSS rho must be in [0, 1], got {self.rho}")
        if self.taper < 0 or int(self.taper) != self.taper:
            raise AudiokvError(f"SSS taper must be a whole number of bins >= 0, got {self.taper}")

    def cutoff(self, spectrum: Tensor) -> Tensor:
        """k* per sequence for an rfft spectrum [..., K]: energy-quantile cutoff bin, long [...]."""
        num_bins = spectrum.shape[-1]
        if self.rho >= 1.0:
            # rho = 1 keeps everything; set explicitly so float rounding in the cumsum can never cut a bin.
            return torch.full(spectrum.shape[:-1], num_bins - 1, dtype=torch.long, device=spectrum.device)
        energy = torch.cumsum(spectrum.abs() ** 2, dim=-1)
        threshold = self.rho * energy[..., -1:]
        # E is non-decreasing, so the count of bins still below the threshold is the first index reaching it.
        return (energy < threshold).sum(dim=-1)

    def smooth(self, scores: Tensor) -> Tensor:
        length = scores.shape[-1]
        if self.alpha == 0.0 or self.rho >= 1.0 or length == 0:
            return scores
        signal = scores.to(torch.float64)
        spectrum = torch.fft.rfft(signal, dim=-1)
        mask = spectral_taper(spectrum.shape[-1], self.cutoff(spectrum), int(self.taper))
        low_pass = torch.fft.irfft(spectrum * mask, n=length, dim=-1)
        smoothed = (1.0 - self.alpha) * signal + self.alpha * low_pass
        return smoothed.to(scores.dtype)


_SMOOTHERS = {
    "none": NoSmoothing,
    "avgpool": PoolSmoothing,
    "maxpool": PoolSmoothing,
    "sss": SpectralSmoothing,
}

SMOOTHER_NAMES = tuple(_SMOOTHERS)


def make_smoother(name: str, **params) -> Smoother:
    """Build a smoother by short name (none, avgpool, maxpool, sss) with its parameters."""
    if name in ("avgpool", "maxpool"):
        if "mode" in params:
            raise AudiokvError(f"smoother {name!r} fixes the pooling mode; pass only kernel")
        params = {**params, "mode": name[:3]}
    return _build(_SMOOTHERS, "smoother", name, params)
