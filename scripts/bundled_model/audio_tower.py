"""The frozen Qwen2-Audio audio tower holding Whisper tiny.en's encoder, and the cheap valid-frames path used to
cache its outputs for training.

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


def build_tower() -> Qwen2AudioEncoder:
    tower = Qwen2AudioEncoder(Qwen2AudioEncoderConfig(**whisper_encoder_kwargs())).eval()
    tower.load_state_dict(encoder_state_dict(load_ct2()), strict=True)
    for p in tower.parameters():
        p.requires_grad_(False)
    return tower


def feature_extractor() -> WhisperFeatureExtractor:
    return WhisperFeatureExtractor(feature_size=80, sampling_rate=SAMPLE_RATE)


def num_audio_tokens(n_frames: int) -> int:
    """Audio tokens Qwen2-Audio produces for ``n_frames`` valid mel frames (its _get_feat_extract_output_lengths)."""
    after_conv = (n_frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


@torch.inference_mode()
def encode_valid(tower: Qwen2AudioEncoder, fe: WhisperFeatureExtractor, audio: np.ndarray) -> np.ndarray:
    """Tower output [n_tokens, 384] for one clip, computed on its valid mel frames only."""
    out = fe(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt", return_attention_mask=True)
    n_frames = int(out.attention_mask.sum())
    n_conv = (n_frames - 1) // 2 + 1
    # The last conv outputs of the real path see padding *features* (log-mel of silence), not zeros: keep two
    # padding frames so every output we keep is computed from exactly the same inputs.
    feats = out.input_features[:, :, : n_frames + 2]
    h = torch.nn.functional.gelu(tower.conv1(feats))
    h = torch.nn.functional.gelu(tower.conv2(h))[:, :, :n_conv].permute(0, 2, 1)
    h = h + tower.embed_positions.weight[: h.shape[1]]
    for layer in tower.layers:
        h = layer(h, None)
        h = h[0] if isinstance(h, tuple) else h
    h = torch.nn.functional.avg_pool1d(h.permute(0, 2, 1), 2, 2).permute(0, 2, 1)
    h = tower.layer_norm(h)[0]
    assert h.shape[0] == num_audio_tokens(n_frames)
    return h.numpy()
