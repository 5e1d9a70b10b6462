"""Random test checkpoints built from the real transformers config classes, and the masked-dense reference the
tests check compressed decoding against. For tests and demos; nothing a user's code needs to import.

- `qwen2_audio`: the tiny random Qwen2-Audio (`python -m audiokv_cli.testing.qwen2_audio DIR` writes one);
- `families`, `omni`: one random checkpoint per other model family;
- `aligner_whisper`: a random Whisper with a byte-level tokenizer and alignment heads, for the `whisper:` aligner;
- `masked_dense`: the end-to-end reference for compressed decoding.
"""
