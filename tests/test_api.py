"""The public Python API: `audiokv_cli.transcribe`, `audiokv_cli.compress`, `audiokv_cli.load_model`."""

from __future__ import annotations

import pytest
import torch

import audiokv_cli
from audiokv_cli.compression.methods import MethodOptions, build_policy
from audiokv_cli.runtime.inference import ClipResult, run_clip
from audiokv_cli.runtime.longform import Transcript
from audiokv_cli.models.registry import load_adapter
from audiokv_cli.testing.families import build_random_whisper
from tests.adapter_checks import noise_clip


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    return load_adapter(str(build_random_whisper(tmp_path_factory.mktemp("api-whisper"))), device="cpu", dtype="float32")


def test_exports_are_listed_and_typed():
    import importlib.resources

    for name in audiokv_cli.__all__:
        assert getattr(audiokv_cli, name) is not None, name
    assert importlib.resources.files("audiokv_cli").joinpath("py.typed").is_file()
    with pytest.raises(AttributeError):
        audiokv_cli.not_a_name  # noqa: B018


def test_compress_a_model_loaded_with_transformers(random_adapter):
    model = random_adapter.model  # as `Qwen2AudioForConditionalGeneration.from_pretrained` returns it
    inputs = random_adapter.prepare(noise_clip(2.0, seed=4)).inputs  # as the processor returns them
    prompt = inputs["input_ids"].shape[-1]
    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, prompt:].tolist()
        with audiokv_cli.compress(model, inputs, method="full") as kv:
            full = model.generate(**inputs, **kv.generate_kwargs, max_new_tokens=6, do_sample=False)[0, prompt:]
        assert full.tolist() == plain
        with audiokv_cli.compress(model, inputs, method="snapkv", retention=0.5, window=8) as kv:
            ids = model.generate(**inputs, **kv.generate_kwargs, max_new_tokens=6, do_sample=False)[0, prompt:]
            kept, summary = kv.kept_bytes(), kv.summary()
    # The command line's path on the same prompt and policy gives the same tokens.
    reference = run_clip(
        random_adapter, noise_clip(2.0, seed=4), build_policy("snapkv", 0.5, MethodOptions(window=8)), max_new_tokens=6
    )
    eos = set(random_adapter.eos_token_ids)
    tokens = [t for t in ids.tolist() if t not in eos]
    assert tokens == reference.token_ids[: len(tokens)] and len(tokens) >= 1
    assert kept == reference.kv_bytes_kept < reference.kv_bytes_full
    assert sum(map(sum, summary["kept"])) > 0


def test_compress_works_with_generate_sampling(random_adapter):
    model, inputs = random_adapter.model, random_adapter.prepare(noise_clip(2.0, seed=5)).inputs
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        with torch.no_grad(), audiokv_cli.compress(model, inputs, method="h2o", retention=0.4) as kv:
            out = model.generate(**inputs, **kv.generate_kwargs, max_new_tokens=5, min_new_tokens=5,
                                 do_sample=True, top_k=20, temperature=0.8)
        runs.append(out[0, inputs["input_ids"].shape[-1]:].tolist())
    assert runs[0] == runs[1] and len(runs[0]) == 5


def test_compress_whisper_cross_attention(whisper):
    model = whisper.model
    inputs = dict(whisper.processor.feature_extractor(noise_clip(3.0, seed=6), sampling_rate=16000, return_tensors="pt"))
    decoder = torch.tensor([whisper.prompt_ids])
    with torch.no_grad():
        plain = model.generate(**inputs, decoder_input_ids=decoder, max_new_tokens=4, do_sample=False)
        with audiokv_cli.compress(model, {**inputs, "decoder_input_ids": decoder}, processor=whisper.processor,
                                  method="full") as kv:
            full = model.generate(**inputs, decoder_input_ids=decoder, **kv.generate_kwargs, max_new_tokens=4,
                                  do_sample=False)
        assert full.tolist() == plain.tolist()
        with audiokv_cli.compress(model, inputs, processor=whisper.processor, method="snapkv", retention=0.2) as kv:
            model.generate(**inputs, decoder_input_ids=decoder, **kv.generate_kwargs, max_new_tokens=4, do_sample=False)
            kept = kv.kept_bytes()
    full_bytes = whisper.frames * whisper.geometry.kv_bytes_per_token(whisper.dtype)
    assert kept / full_bytes == pytest.approx(0.2, abs=0.02)


def test_compress_finds_the_processor_saved_with_the_model(whisper):
    """As the README writes it: a Whisper model loaded with from_pretrained, no processor= (it is read from the
    model's directory)."""
    model = whisper.model
    inputs = dict(whisper.processor.feature_extractor(noise_clip(3.0, seed=6), sampling_rate=16000, return_tensors="pt"))
    with torch.no_grad(), audiokv_cli.compress(model, inputs, method="snapkv", retention=0.2) as kv:
        model.generate(**inputs, **kv.generate_kwargs, max_new_tokens=4, do_sample=False)
        kept = kv.kept_bytes()
    full_bytes = whisper.frames * whisper.geometry.kv_bytes_per_token(whisper.dtype)
    assert kept / full_bytes == pytest.approx(0.2, abs=0.02)


def test_compress_lets_a_forward_without_cache_through(whisper):
    """transformers' Whisper generate detects the language with a forward that writes no cache (use_cache=False)
    before it decodes: inside the block that forward gives the model's own logits, and the prefill after it is still
    compressed."""
    model = whisper.model
    inputs = dict(whisper.processor.feature_extractor(noise_clip(3.0, seed=6), sampling_rate=16000, return_tensors="pt"))
    decoder = torch.tensor([whisper.prompt_ids[:1]])
    with torch.no_grad():
        plain = model(**inputs, decoder_input_ids=decoder, use_cache=False).logits
        with audiokv_cli.compress(model, inputs, processor=whisper.processor, method="snapkv", retention=0.2) as kv:
            inside = model(**inputs, decoder_input_ids=decoder, use_cache=False).logits
            model.generate(**inputs, decoder_input_ids=torch.tensor([whisper.prompt_ids]), **kv.generate_kwargs,
                           max_new_tokens=4, do_sample=False)
            kept = kv.kept_bytes()
    torch.testing.assert_close(inside, plain)
    full_bytes = whisper.frames * whisper.geometry.kv_bytes_per_token(whisper.dtype)
    assert kept / full_bytes == pytest.approx(0.2, abs=0.02)


def test_compress_refuses_what_it_cannot_do(random_adapter, whisper, monkeypatch, tmp_path):
    inputs = random_adapter.prepare(noise_clip(1.0)).inputs
    batch = {key: torch.cat([value, value]) for key, value in inputs.items()}
    with pytest.raises(audiokv_cli.AudiokvError, match="one prompt"):
        with audiokv_cli.compress(random_adapter.model, batch, method="snapkv", retention=0.5):
            pass
    features = dict(whisper.processor.feature_extractor(noise_clip(1.0), sampling_rate=16000, return_tensors="pt"))
    # A model whose processor is nowhere to be found (not beside its weights, not given).
    monkeypatch.setattr(whisper.model.config, "name_or_path", str(tmp_path))
    with pytest.raises(audiokv_cli.AudiokvError, match="processor="):
        with audiokv_cli.compress(whisper.model, features, method="snapkv", retention=0.5):
            pass
    with pytest.raises(audiokv_cli.AudiokvError, match="not both"):
        audiokv_cli.transcribe(noise_clip(1.0), model=random_adapter, method="snapkv", retention=0.5, kv_budget=0.2)


def test_transcribe_returns_what_infer_prints(random_adapter, whisper):
    audio = noise_clip(2.0, seed=7)
    clip = audiokv_cli.transcribe(audio, model=random_adapter, method="snapkv", retention=0.5, window=8, max_new_tokens=5)
    assert isinstance(clip, ClipResult)
    reference = run_clip(random_adapter, audio, build_policy("snapkv", 0.5, MethodOptions(window=8)), max_new_tokens=5)
    assert clip.token_ids == reference.token_ids and clip.kv_bytes_kept == reference.kv_bytes_kept
    long = audiokv_cli.transcribe(noise_clip(40.0, seed=8), model=whisper, method="stride", retention=0.5,
                                  max_new_tokens=4)
    assert isinstance(long, Transcript) and long.windows >= 2
    assert long.kv_bytes_kept_max <= 0.51 * long.kv_bytes_full
