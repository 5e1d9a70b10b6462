"""A tiny random-weight Whisper checkpoint (config + processor + alignment heads), built offline for tests and demos
of the ``whisper:`` aligner. Its transcripts are noise; its word timings are well-formed."""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|en|>",
    "<|transcribe|>",
    "<|translate|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
]


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values (what byte-level BPE vocabularies are made of)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def build_aligner_whisper(out_dir: str | Path, seed: int = 0, d_model: int = 32, layers: int = 2) -> Path:
    """Save a random WhisperForConditionalGeneration with a byte-level BPE tokenizer to ``out_dir``."""
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    out_dir = Path(out_dir)
    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    merges = []
    for left, right in [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n")]:
        merges.append((left, right))
        vocab[left + right] = len(vocab)
    eos = SPECIAL_TOKENS[0]
    tokenizer = WhisperTokenizer(vocab=vocab, merges=merges, unk_token=eos, bos_token=eos, eos_token=eos, pad_token=eos)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=80,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        d_model=d_model,
        encoder_ffn_dim=2 * d_model,
        decoder_ffn_dim=2 * d_model,
        max_source_positions=1500,
        max_target_positions=256,
        decoder_start_token_id=ids["<|startoftranscript|>"],
        eos_token_id=ids[eos],
        pad_token_id=ids[eos],
        bos_token_id=ids[eos],
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"],
        eos_token_id=ids[eos],
        pad_token_id=ids[eos],
        no_timestamps_token_id=ids["<|notimestamps|>"],
        is_multilingual=False,
        # Every decoder head of the last layer serves as a DTW alignment head.
        alignment_heads=[[layers - 1, 0], [layers - 1, 1]],
        max_length=256,
    )
    model.save_pretrained(out_dir)
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tokenizer).save_pretrained(
        out_dir
    )
    return out_dir
