import math

import numpy as np
import pytest
import torch

from audiokv_cli.compression.smoothers import (
    NoSmoothing,
    PoolSmoothing,
    SpectralSmoothing,
    make_smoother,
)
from audiokv_cli.errors import AudiokvError


def naive_pool(scores, kernel, mode):
    """Centred window over each sequence; avg divides by the kernel (zero padding counted), max ignores padding."""
    out = torch.empty_like(scores)
    length = scores.shape[-1]
    half = kernel // 2
    for b in range(scores.shape[0]):
        for h in range(scores.shape[1]):
            for i in range(length):
                window = scores[b, h, max(0, i - half) : min(length, i + half + 1)]
                out[b, h, i] = window.sum() / kernel if mode == "avg" else window.max()
    return out


def naive_sss(signal, alpha, rho, taper):
    """SSS on one 1-D numpy sequence with an explicit DFT matrix and its explicit real inverse."""
    length = len(signal)
    n = np.arange(length)
    bins = np.arange(length // 2 + 1)
    spectrum = np.exp(-2j * np.pi * np.outer(bins, n) / length) @ signal
    energy = np.cumsum(np.abs(spectrum) ** 2)
    cutoff = len(bins) - 1 if rho >= 1 else next(k for k in bins if energy[k] >= rho * energy[-1])
    mask = np.zeros(len(bins))
    for k in bins:
        if k <= cutoff:
            mask[k] = 1.0
        elif k - cutoff <= taper:
            mask[k] = 0.5 * (1 + math.cos(math.pi * (k - cutoff) / (taper + 1)))
    filtered = spectrum * mask
    # Real inverse: DC once, bins 1..ceil(L/2)-1 twice (their mirrored halves), Nyquist once for even L.
    low_pass = np.full(length, filtered[0].real)
    for k in range(1, len(bins)):
        weight = 1.0 if (length % 2 == 0 and k == length // 2) else 2.0
        low_pass += weight * np.real(filtered[k] * np.exp(2j * np.pi * k * n / length))
    low_pass /= length
    return (1 - alpha) * signal + alpha * low_pass


def test_no_smoothing_is_identity():
    scores = torch.rand(1, 2, 9)
    assert torch.equal(NoSmoothing().smooth(scores), scores)


@pytest.mark.parametrize("kernel", [1, 3, 5, 7, 13])
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_pooling_matches_naive_loop(kernel, mode):
    torch.manual_seed(0)
    scores = torch.rand(2, 3, 11)
    got = PoolSmoothing(kernel=kernel, mode=mode).smooth(scores)
    assert got.shape == scores.shape
    torch.testing.assert_close(got, naive_pool(scores, kernel, mode), atol=1e-6, rtol=1e-6)


def test_pooling_rejects_even_kernel_and_bad_mode():
    with pytest.raises(AudiokvError, match="odd"):
        PoolSmoothing(kernel=4)
    with pytest.raises(AudiokvError, match="odd"):
        make_smoother("avgpool", kernel=0)
    with pytest.raises(AudiokvError, match="mode"):
        PoolSmoothing(mode="median")


@pytest.mark.parametrize("length", [1, 2, 16, 33])
def test_sss_identity_for_alpha_zero_and_rho_one(length):
    torch.manual_seed(0)
    scores = torch.rand(2, 3, length)
    assert torch.equal(SpectralSmoothing(alpha=0.0, rho=0.5).smooth(scores), scores)
    assert torch.equal(SpectralSmoothing(alpha=0.7, rho=1.0).smooth(scores), scores)


@pytest.mark.parametrize("length", [5, 16, 33, 64])
@pytest.mark.parametrize("alpha,rho,taper", [(0.5, 0.7, 4), (1.0, 0.3, 0), (0.3, 0.9, 2), (0.8, 0.05, 6)])
def test_sss_matches_naive_dft(length, alpha, rho, taper):
    torch.manual_seed(length)
    # Spiky, positive sequences like attention scores (exponential bursts on a small floor).
    scores = torch.rand(2, 2, length) ** 4 + 0.01
    got = SpectralSmoothing(alpha=alpha, rho=rho, taper=taper).smooth(scores)
    assert got.dtype == scores.dtype and got.shape == scores.shape
    for b in range(2):
        for h in range(2):
            expected = naive_sss(scores[b, h].double().numpy(), alpha, rho, taper)
            np.testing.assert_allclose(got[b, h].double().numpy(), expected, atol=1e-5, rtol=1e-5)


def test_sss_cutoff_is_the_first_bin_reaching_the_energy_quantile():
    spectrum = torch.tensor([[3.0, 2.0, 1.0, 1.0, 1.0]], dtype=torch.complex128)  # energies 9 4 1 1 1 -> 16
    cutoffs = {rho: int(SpectralSmoothing(rho=rho).cutoff(spectrum)[0]) for rho in [0.5, 0.5625, 0.6, 0.85, 0.99]}
    assert cutoffs == {0.5: 0, 0.5625: 0, 0.6: 1, 0.85: 2, 0.99: 4}


def test_sss_removes_an_injected_high_frequency():
    length, low_bin, high_bin = 256, 2, 60
    n = torch.arange(length, dtype=torch.float64)
    low = 1.0 + torch.cos(2 * math.pi * low_bin * n / length)
    high = 0.3 * torch.cos(2 * math.pi * high_bin * n / length)
    signal = (low + high).float()[None, None]
    # Energies: DC 256^2, bin 2 128^2, bin 60 38.4^2, so rho = 0.9 puts k* at bin 2 and bin 60 is far past the
    # taper. The low-pass branch then drops bin 60 completely and only the (1 - alpha) share of it survives:
    # its energy ratio must be (1 - alpha)^2 = 0.25, while bin 2 is kept whole.
    smoothed = SpectralSmoothing(alpha=0.5, rho=0.9, taper=4).smooth(signal)[0, 0].double()
    before = torch.fft.rfft(signal[0, 0].double()).abs() ** 2
    after = torch.fft.rfft(smoothed).abs() ** 2
    assert after[high_bin] / before[high_bin] == pytest.approx(0.25, abs=1e-5)
    assert after[low_bin] / before[low_bin] == pytest.approx(1.0, abs=1e-5)
    fully_smoothed = SpectralSmoothing(alpha=1.0, rho=0.9, taper=4).smooth(signal)[0, 0].double()
    assert (torch.fft.rfft(fully_smoothed).abs() ** 2)[high_bin] / before[high_bin] < 1e-9


def test_sss_keeps_dtype_and_rejects_bad_parameters():
    scores = torch.rand(1, 2, 20, dtype=torch.float64)
    assert SpectralSmoothing().smooth(scores).dtype == torch.float64
    assert SpectralSmoothing().smooth(scores.half()).dtype == torch.float16
    for bad in [dict(alpha=1.5), dict(rho=-0.1), dict(taper=-1), dict(taper=1.5)]:
        with pytest.raises(AudiokvError):
            SpectralSmoothing(**bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_smoothers_on_cuda_match_cpu():
    torch.manual_seed(0)
    scores = torch.rand(1, 4, 300)
    for smoother in [SpectralSmoothing(), PoolSmoothing(kernel=7), PoolSmoothing(kernel=5, mode="max")]:
        got = smoother.smooth(scores.cuda()).cpu()
        torch.testing.assert_close(got, smoother.smooth(scores), atol=1e-5, rtol=1e-5)


def test_make_smoother_names():
    assert make_smoother("none").name == "none"
    assert make_smoother("avgpool", kernel=5).kernel == 5
    maxpool = make_smoother("maxpool")
    assert maxpool.mode == "max" and maxpool.name == "maxpool"
    sss = make_smoother("sss", alpha=0.3, rho=0.6, taper=2)
    assert (sss.alpha, sss.rho, sss.taper) == (0.3, 0.6, 2)
    with pytest.raises(AudiokvError, match="unknown smoother"):
        make_smoother("gauss")
    with pytest.raises(AudiokvError):
        make_smoother("maxpool", mode="avg")
