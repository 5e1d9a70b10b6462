"""Tiny random-weight Qwen2-Audio checkpoints built from the real config classes, for offline tests and demos."""

from __future__ import annotations

import string
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|en|>", "<|im_start|>", "<|im_end|>"]

# Renders a user turn as `<|audio_bos|><|AUDIO|><|audio_eos|>` + instruction: Qwen2-Audio base's raw ASR prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}{% endfor %}"
)


def build_character_tokenizer(
    special_tokens=SPECIAL_TOKENS,
    eos_token: str = "<|endoftext|>",
    pad_token: str = "<|endoftext|>",
    with_newline: bool = False,
    **tokenizer_kwargs,
):
    """A character-level tokenizer with a model family's special tokens, built locally (no Hub)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    excluded = set("\t\r\x0b\x0c") | (set() if with_newline else {"\n"})
    characters = sorted(set(string.printable) - excluded)
    vocab = {"<unk>": 0}
    for token in list(special_tokens) + characters:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(special_tokens))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token=eos_token, pad_token=pad_token, **tokenizer_kwargs
    )


def tiny_audio_encoder_config(audio_hidden: int) -> dict:
    """A one-layer Whisper-style audio encoder over 80 mel bins and 30 s windows (Qwen2-Audio and Omni towers)."""
    return {
        "num_mel_bins": 80,
        "d_model": audio_hidden,
        "encoder_layers": 1,
        "encoder_attention_heads": 2,
        "encoder_ffn_dim": 2 * audio_hidden,
        "max_source_positions": 1500,
    }


def tiny_text_geometry(vocab_size: int, hidden: int, num_layers: int, num_heads: int, num_kv_heads: int) -> dict:
    """Size of a tiny text decoder; fewer KV heads than query heads keeps the GQA paths exercised."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": 4096,
    }


def build_random_qwen2_audio(
    out_dir: str | Path,
    seed: int = 0,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    hidden: int = 64,
    audio_hidden: int = 32,
) -> Path:
    """Save a random Qwen2AudioForConditionalGeneration plus a working processor to ``out_dir``."""
    import torch
    from transformers import (
        Qwen2AudioConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        WhisperFeatureExtractor,
    )

    out_dir = Path(out_dir)
    tokenizer = build_character_tokenizer()
    processor = Qwen2AudioProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=80),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    config = Qwen2AudioConfig(
        audio_config=tiny_audio_encoder_config(audio_hidden),
        text_config={
            "model_type": "qwen2",
            **tiny_text_geometry(len(tokenizer), hidden, num_layers, num_heads, num_kv_heads),
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
    )
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    """`python -m audiokv_cli.testing.qwen2_audio DIR`: write a tiny random Qwen2-Audio to DIR (a demo model that runs anywhere)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_random_qwen2_audio(args.out, seed=args.seed))


if __name__ == "__main__":
    main()
