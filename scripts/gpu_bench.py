"""GPU figures for docs/performance.md: real-size text decoders with random weights, 8k and 32k prompt tokens.

Builds, in memory on the device, Qwen2-Audio-7B's text decoder (32 layers, 32 q / 32 KV heads x 128, hidden 4096,
MLP 11008) and Qwen2.5-Omni-7B's thinker decoder (28 layers, 28 q / 4 KV heads x 128, hidden 3584, MLP 18944,
M-RoPE), each behind a small random audio tower (the KV cache, decode and selection costs are the decoder's; the
prefill seconds leave out a real-size audio tower). Random weights cost the same to run as trained ones. Writes one
JSON object per line to OUT/model.jsonl (`audiokv bench` rows) and OUT/kernel.jsonl (`bench --kernel` rows).

    python scripts/gpu_bench.py --out gpu-bench                      # the full run (an H100/H200-class GPU)
    python scripts/gpu_bench.py --out /tmp/smoke --device cpu --dtype float32 --layers 2 --vocab 512 \\
        --prompt-tokens 600 --new-tokens 4 --repeats 1               # a smoke test of the script itself
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from audiokv_cli.bench.model import bench_policies, prompt_of
from audiokv_cli.compression.methods import MethodOptions, build_policy
from audiokv_cli.bench.kernels import GEOMETRIES, bench_kernels, synthetic_head_scores

MODELS = {
    "qwen2-audio-7b": {"intermediate": 11008, "vocab": 156032},
    "qwen2.5-omni-7b": {"intermediate": 18944, "vocab": 152064},
}


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _qwen2_audio(geometry, intermediate, vocab, tmp: Path):
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor, WhisperFeatureExtractor

    from audiokv_cli.models.families.qwen2_audio import Qwen2AudioAdapter
    from audiokv_cli.testing.qwen2_audio import CHAT_TEMPLATE, build_character_tokenizer, tiny_audio_encoder_config

    tokenizer = build_character_tokenizer()
    processor = Qwen2AudioProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )
    config = Qwen2AudioConfig(
        audio_config=tiny_audio_encoder_config(64),
        text_config={
            "model_type": "qwen2",
            "vocab_size": vocab,
            "hidden_size": geometry.hidden_size,
            "intermediate_size": intermediate,
            "num_hidden_layers": geometry.num_layers,
            "num_attention_heads": geometry.num_query_heads,
            "num_key_value_heads": geometry.num_kv_heads,
            "max_position_embeddings": 65536,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
    )
    return Qwen2AudioForConditionalGeneration, config, processor, Qwen2AudioAdapter


def _qwen2_5_omni(geometry, intermediate, vocab, tmp: Path):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from audiokv_cli.models.families.qwen2_5_omni import Qwen2_5OmniAdapter, load_omni_processor
    from audiokv_cli.testing.omni import build_omni_character_tokenizer, save_omni_processor_files, tiny_thinker_config

    tokenizer = build_omni_character_tokenizer()
    config = tiny_thinker_config(
        tokenizer, geometry.num_layers, geometry.num_query_heads, geometry.num_kv_heads, geometry.hidden_size
    )
    config.text_config.intermediate_size = intermediate
    config.text_config.vocab_size = vocab
    config.text_config.max_position_embeddings = 65536
    save_omni_processor_files(tmp, tokenizer)
    return Qwen2_5OmniThinkerForConditionalGeneration, config, load_omni_processor(str(tmp)), Qwen2_5OmniAdapter


def build_adapter(name: str, device: torch.device, dtype: torch.dtype, layers: int | None, vocab: int | None, tmp: Path):
    """A random-weight model of ``name``'s decoder geometry, built on the device in ``dtype`` (no host copy)."""
    from dataclasses import replace

    geometry = GEOMETRIES[name]
    if layers:
        geometry = replace(geometry, num_layers=layers)
    spec = MODELS[name]
    builder = _qwen2_audio if name == "qwen2-audio-7b" else _qwen2_5_omni
    model_class, config, processor, adapter_class = builder(geometry, spec["intermediate"], vocab or spec["vocab"], tmp)
    torch.manual_seed(0)
    with torch.device(device), _default_dtype(dtype):
        model = model_class(config).eval()
    return adapter_class(model, processor, f"random-{name}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", default="qwen2-audio-7b,qwen2.5-omni-7b")
    parser.add_argument("--prompt-tokens", default="8192,32768")
    parser.add_argument("--methods", default="full,snapkv,adakv,audiokv")
    parser.add_argument("--retention", default="0.4,0.2")
    parser.add_argument("--batch-sizes", default="4,8", help="decode tokens/s at these batch sizes (8k prompts only)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill-chunk", type=int, default=4096, help="also time chunked prefill (0: skip)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers (smoke tests)")
    parser.add_argument("--vocab", type=int, default=None, help="a smaller vocabulary (smoke tests)")
    args = parser.parse_args(argv)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    lengths = [int(n) for n in args.prompt_tokens.split(",")]
    retentions = [float(r) for r in args.retention.split(",")]
    methods = args.methods.split(",")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    stamp = {"gpu": gpu, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "dtype": args.dtype}

    with open(args.out / "kernel.jsonl", "w") as kernel_out:
        for name in args.models.split(","):
            options = MethodOptions(head_scores=synthetic_head_scores(GEOMETRIES[name]))
            for tokens in lengths:
                for retention in retentions:
                    policies = [build_policy(m, 1.0 if m == "full" else retention, options) for m in methods]
                    for row in bench_kernels(name, policies, tokens, device, dtype, 1, args.repeats):
                        kernel_out.write(json.dumps({**stamp, **row.__dict__}) + "\n")
                        kernel_out.flush()
                        print(name, tokens, row.method, row.retention, row.kernel, f"{row.vs_dense:.3f}x", flush=True)

    with open(args.out / "model.jsonl", "w") as model_out, tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            adapter = build_adapter(name, device, dtype, args.layers, args.vocab, Path(tmp))
            geometry = adapter.geometry
            options = MethodOptions(head_scores=synthetic_head_scores(GEOMETRIES[name]))
            options.head_scores = options.head_scores[: geometry.num_layers]
            for tokens in lengths:
                prepared = prompt_of(adapter, tokens)
                batches = tuple(int(b) for b in args.batch_sizes.split(",") if b) if tokens <= 8192 else ()
                chunks = [None] + ([args.prefill_chunk] if args.prefill_chunk and name == "qwen2-audio-7b" else [])
                for retention in retentions:
                    policies = [build_policy(m, 1.0 if m == "full" else retention, options) for m in methods]
                    for chunk in chunks:
                        chosen = [p for p in policies if p.evicts] if chunk else policies
                        rows = bench_policies(adapter, prepared, chosen, args.new_tokens, args.repeats, batches,
                                              prefill_chunk=chunk)
                        for row in rows:
                            record = {**stamp, "model": name, "prefill_chunk": chunk, **row.__dict__}
                            record["tokens_per_second"] = {str(k): v for k, v in row.tokens_per_second.items()}
                            model_out.write(json.dumps(record) + "\n")
                            model_out.flush()
                            print(name, tokens, row.method, row.retention, chunk, f"{row.ms_per_token:.2f} ms/token",
                                  f"{row.seconds_prefill:.2f} s prefill", flush=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            del adapter
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
