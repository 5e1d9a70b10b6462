"""Check that the assembled ``small`` checkpoint computes what training computed.

For each clip: the training graph (cached-path tower layers, projector, SmolLM2 with its LoRA adapters, audio marker
parameters), float32, scores the clip's transcript teacher-forced; the assembled Qwen2AudioForConditionalGeneration
(padded 30 s tower path, LoRA merged, float16-exported weights) scores the same tokens through its processor. The
largest logit difference and whether the greedy next tokens agree are printed.

Usage: python scripts/small_model/check_assembly.py --checkpoint .build/small-train/final examples/clip1.wav ...
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch

# Loaded under its own name: it imports the bundled model's train.py as `train` itself.
_spec = importlib.util.spec_from_file_location("small_train", Path(__file__).with_name("train.py"))
small_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(small_train)

from audio_tower import build_tower, encode_valid, feature_extractor  # noqa: E402
from audiokv_cli.io.audio import load_audio  # noqa: E402
from audiokv_cli.models.base import ASR_INSTRUCTION  # noqa: E402
from audiokv_cli.models.assets.small_model import assemble_small, build_processor, load_smollm2  # noqa: E402


class _OneClip:
    """The Shards interface build_inputs reads, for one clip's features and text."""

    def __init__(self, features, text):
        self.metas = [{"spoken": text, "n_tokens": features.shape[0]}]
        self._features = features

    def features(self, i):
        return self._features


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path(".build/small-train/final"))
    parser.add_argument("clips", nargs="+", type=Path, help="wav files with a same-named .txt transcript")
    args = parser.parse_args()

    from transformers import Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor

    llm, tokenizer = load_smollm2()
    processor = build_processor(tokenizer)
    tower = build_tower("base")
    parts = small_train.Trainable(tower, 4, llm.config.hidden_size, 16, llm)
    llm = small_train.add_lora(llm, 16)
    small_train.load_trainable(args.checkpoint, parts, llm)
    parts.eval(), llm.eval()
    prompt = small_train.Prompt(processor)

    directory = assemble_small()
    model = Qwen2AudioForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()
    assembled_processor = Qwen2AudioProcessor.from_pretrained(directory)
    conversation = [{"role": "user", "content": [{"type": "audio", "audio_url": "clip.wav"},
                                                  {"type": "text", "text": ASR_INSTRUCTION}]}]
    prompt_text = assembled_processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    for clip in args.clips:
        audio = load_audio(clip)
        text = clip.with_suffix(".txt").read_text().strip()
        features = encode_valid(build_tower("base"), feature_extractor(), audio, stop_layer=4)
        inputs, mask, labels, _, _, _ = small_train.build_inputs(parts, llm.get_input_embeddings(), prompt,
                                                  _OneClip(features, text), [0], 0.0)
        trained_logits = llm(inputs_embeds=inputs, attention_mask=mask).logits[0]
        target = prompt.target(text)
        batch = assembled_processor(text=prompt_text + tokenizer.decode(target), audio=[audio],
                                    sampling_rate=16000, return_tensors="pt")
        assembled_logits = model(**batch).logits[0]
        n = len(target)
        a, b = trained_logits[-n - 1 : -1], assembled_logits[-n - 1 : -1, : trained_logits.shape[-1]]
        agree = (a.argmax(-1) == b.argmax(-1)).float().mean()
        print(f"{clip.name}: {n} target tokens, max |logit diff| {float((a - b).abs().max()):.3f}, "
              f"greedy tokens agree {float(agree):.1%}")


if __name__ == "__main__":
    main()
