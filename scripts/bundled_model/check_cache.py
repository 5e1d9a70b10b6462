"""Measure how far the cached valid-frames tower outputs (training) are from the real padded path (inference).

The real path is the processor (pads to 3000 frames) followed by the Qwen2-Audio model's own masked audio tower;
its features for the valid audio tokens are compared with ``audio_tower.encode_valid``.

Usage: python scripts/bundled_model/check_cache.py [--model .build/train/final]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from audio_tower import build_tower, encode_valid, feature_extractor  # noqa: E402
from speech import VoiceSetting, synthesize  # noqa: E402

TEXT = ("The licence does not grant permission to use the trade names, trademarks, service marks or product names "
        "of the licensor, except as required for reasonable and customary use in describing the origin of the work. "
        "Each contributor grants you a perpetual worldwide license to reproduce and distribute the work.")


@torch.inference_mode()
def padded_path_features(audio: np.ndarray) -> np.ndarray:
    """What Qwen2AudioModel feeds its projector for this clip (valid tokens only)."""
    from transformers.masking_utils import create_bidirectional_mask

    tower = build_tower()
    fe = feature_extractor()
    out = fe(audio, sampling_rate=16000, return_tensors="pt", return_attention_mask=True)
    n_frames = int(out.attention_mask.sum())
    feat_len, n_tokens = tower._get_feat_extract_output_lengths(torch.tensor([n_frames]))
    mask_2d = (torch.arange(1500)[None] < feat_len[:, None]).long()
    mask = create_bidirectional_mask(config=tower.config, inputs_embeds=torch.zeros(1, 1500, 1), attention_mask=mask_2d)
    hidden = tower(out.input_features, attention_mask=mask).last_hidden_state
    return hidden[0, : int(n_tokens)].numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.parse_args()
    torch.set_num_threads(2)
    tower, fe = build_tower(), feature_extractor()
    words = TEXT.split()
    for n_words in (6, 20, 45, len(words)):
        audio = synthesize(" ".join(words[:n_words]), VoiceSetting("espeak", "en-us", 165.0, 50))
        cached = encode_valid(tower, fe, audio)
        real = padded_path_features(audio)
        diff = np.abs(cached - real)
        rel = np.linalg.norm(cached - real) / np.linalg.norm(real)
        worst = int(diff.max(axis=1).argmax())
        print(f"{len(audio) / 16000:5.1f} s, {real.shape[0]} tokens: max abs diff {diff.max():.2e} "
              f"(at token {worst}), mean abs diff {diff.mean():.2e}, relative L2 {rel:.2e}")


if __name__ == "__main__":
    main()
