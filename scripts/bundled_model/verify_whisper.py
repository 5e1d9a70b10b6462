"""Check the CT2 -> transformers weight mapping of Whisper tiny.en.

1. Loads encoder + decoder into ``WhisperForConditionalGeneration`` and transcribes an espeak-ng sentence with the
   package's own tokenizer.json (a wrong mapping produces garbage, so this validates every tensor).
2. Loads the encoder into a Qwen2-Audio audio tower and checks its output equals
   ``layer_norm(avg_pool_2(whisper encoder layers))`` computed with the Whisper modules.

Usage: python scripts/bundled_model/verify_whisper.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).parent))
from whisper_weights import decoder_state_dict, default_ct2_dir, encoder_state_dict, load_ct2, whisper_encoder_kwargs  # noqa: E402

SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank."


def synthesize(text: str) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        raw, wav = Path(tmp) / "raw.wav", Path(tmp) / "out.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(raw), text], check=True)
        subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(wav)], check=True)
        audio, _ = sf.read(wav, dtype="float32")
    return audio


def main() -> None:
    from tokenizers import Tokenizer
    from transformers import (
        Qwen2AudioEncoder,
        Qwen2AudioEncoderConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )

    torch.manual_seed(0)
    ct2 = load_ct2()
    enc_sd, dec_sd = encoder_state_dict(ct2), decoder_state_dict(ct2)
    kw = whisper_encoder_kwargs()
    config = WhisperConfig(
        vocab_size=51864, decoder_layers=4, decoder_attention_heads=6, decoder_ffn_dim=1536, max_target_positions=448,
        decoder_start_token_id=50257, pad_token_id=50256, bos_token_id=50257, eos_token_id=50256,
        **{k: v for k, v in kw.items() if k not in ("num_mel_bins",)}, num_mel_bins=80,
    )
    whisper = WhisperForConditionalGeneration(config).eval()
    whisper.model.encoder.load_state_dict(enc_sd, strict=True)
    whisper.model.decoder.load_state_dict(dec_sd, strict=True)
    whisper.proj_out.weight = whisper.model.decoder.embed_tokens.weight

    audio = synthesize(SENTENCE)
    fe = WhisperFeatureExtractor(feature_size=80)
    feats = fe(audio, sampling_rate=16000, return_tensors="pt").input_features
    tok = Tokenizer.from_file(str(default_ct2_dir() / "tokenizer.json"))
    # tiny.en prompt: <|startoftranscript|><|notimestamps|>
    prompt = [tok.token_to_id("<|startoftranscript|>"), tok.token_to_id("<|notimestamps|>")]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        enc_out = whisper.model.encoder(feats).last_hidden_state
        for _ in range(40):
            logits = whisper(encoder_outputs=(enc_out,), decoder_input_ids=ids).logits[0, -1]
            nxt = int(logits.argmax())
            if nxt == tok.token_to_id("<|endoftext|>"):
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    text = tok.decode(ids[0, len(prompt):].tolist(), skip_special_tokens=True).strip()
    print(f"whisper transcript: {text!r}")
    # Whisper tiny is imperfect on robotic espeak speech; a broken mapping gives no English at all.
    assert "lazy dog near the river bank" in text.lower(), "mapping broken: Whisper does not transcribe"

    tower = Qwen2AudioEncoder(Qwen2AudioEncoderConfig(**kw)).eval()
    tower.load_state_dict(enc_sd, strict=True)
    with torch.no_grad():
        ours = tower(feats).last_hidden_state
        wenc = whisper.model.encoder
        h = torch.nn.functional.gelu(wenc.conv2(torch.nn.functional.gelu(wenc.conv1(feats)))).permute(0, 2, 1)
        h = h + wenc.embed_positions.weight
        for layer in wenc.layers:
            out = layer(h, None)
            h = out[0] if isinstance(out, tuple) else out
        ref = wenc.layer_norm(torch.nn.functional.avg_pool1d(h.permute(0, 2, 1), 2, 2).permute(0, 2, 1))
        # and the plain Whisper path, pooled after its final norm, is close but not identical (norm vs pool order)
    diff = (ours - ref).abs().max().item()
    print(f"qwen2-audio tower {tuple(ours.shape)} vs whisper layers pooled+norm: max abs diff {diff:.2e}")
    assert ours.shape == (1, 750, 384) and diff < 1e-4
    print("OK")


if __name__ == "__main__":
    main()
