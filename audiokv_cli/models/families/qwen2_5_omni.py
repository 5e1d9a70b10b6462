"""Qwen2.5-Omni, text and audio in, text out: only the thinker (audio tower + Qwen2.5 decoder with M-RoPE) is loaded.

The talker and vocoder that turn the answer into speech never touch the text decoder's cache, so they are not loaded.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from audiokv_cli.io.audio import SAMPLE_RATE, check_length
from audiokv_cli.compat import cache_kwargs
from audiokv_cli.models.base import ModelAdapter, PreparedInput

# Qwen's own speech-recognition wording for Qwen2.5-Omni (system and user turn of its audio-understanding cookbook).
# Qwen2-Audio's "Detect the language ...: <|en|>" is that model's task format; `<|en|>` is not a token here.
ASR_SYSTEM_PROMPT = "You are a speech recognition model."
ASR_INSTRUCTION_OMNI = "Transcribe the English audio into text without any punctuation marks."
# The default system prompt of Qwen2.5-Omni, used for free-form prompts.
DEFAULT_SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving auditory and "
    "visual inputs, as well as generating text and speech."
)
AUDIO_TOKEN = "<|AUDIO|>"


def audio_token_count(feature_frames: int) -> int:
    """Audio tokens for ``feature_frames`` mel frames: the stride-2 convolution, then stride-2 average pooling."""
    after_conv = (feature_frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


def _load_chat_template(path: str, hub_kwargs: dict) -> str | None:
    """The processor's chat template file of a checkpoint, if it has one."""
    from transformers.utils import cached_file

    for filename in ("chat_template.jinja", "chat_template.json"):
        resolved = cached_file(
            path, filename, _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False,
            **hub_kwargs,
        )
        if resolved is None:
            continue
        with open(resolved, encoding="utf-8") as handle:
            text = handle.read()
        return json.loads(text)["chat_template"] if filename.endswith(".json") else text
    return None


class OmniAudioProcessor:
    """Qwen2.5-Omni's processor for audio-only prompts, built from the same checkpoint files.

    `Qwen2_5OmniProcessor` cannot be constructed without torchvision (its video processor needs it), although audio
    prompts never reach the image or video processors. This does what the stock processor does with one clip: Whisper
    features padded to the extractor's window with a frame mask, and the `<|AUDIO|>` placeholder repeated once per
    audio token.
    """

    def __init__(self, feature_extractor, tokenizer, chat_template: str | None):
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.audio_token = getattr(tokenizer, "audio_token", None) or AUDIO_TOKEN

    @classmethod
    def from_pretrained(cls, path: str, revision: str | None = None, local_files_only: bool = False, **kwargs):
        from transformers import AutoTokenizer, WhisperFeatureExtractor

        hub = dict(revision=revision, local_files_only=local_files_only)
        feature_extractor = WhisperFeatureExtractor.from_pretrained(path, **hub)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=kwargs.get("trust_remote_code", False), **hub)
        return cls(feature_extractor, tokenizer, _load_chat_template(path, hub))

    def apply_chat_template(self, conversation, add_generation_prompt: bool = True, tokenize: bool = False, **kwargs):
        return self.tokenizer.apply_chat_template(
            conversation,
            chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=tokenize,
            **kwargs,
        )

    #: the family named in errors, how the feature extractor pads, and audio tokens per mel frame count.
    family = "Qwen2.5-Omni"
    feature_options: dict = {"padding": "max_length"}
    token_count = staticmethod(audio_token_count)

    def __call__(self, text: str, audio, sampling_rate: int = SAMPLE_RATE, return_tensors: str = "pt", **kwargs):
        clips = audio if isinstance(audio, (list, tuple)) else [audio]
        if len(clips) != 1 or text.count(self.audio_token) != 1:
            raise ValueError(f"the audio-only {self.family} processor takes exactly one clip and one audio placeholder")
        features = self.feature_extractor(
            clips, sampling_rate=sampling_rate, return_attention_mask=True, return_tensors="pt", **self.feature_options
        )
        frame_mask = features.pop("attention_mask")
        count = self.token_count(int(frame_mask[0].sum()))
        tokens = self.tokenizer(text.replace(self.audio_token, self.audio_token * count, 1), return_tensors="pt")
        return {
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "input_features": features["input_features"],
            "feature_attention_mask": frame_mask,
        }


def load_omni_processor(path: str, **kwargs):
    """The stock `Qwen2_5OmniProcessor` where it can be built, else the audio-only equivalent."""
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers import Qwen2_5OmniProcessor

        return Qwen2_5OmniProcessor.from_pretrained(path, **kwargs)
    return OmniAudioProcessor.from_pretrained(path, **kwargs)


def thinker_config_from(path: str, full_model_type: str, full_config_class, thinker_config_class, **kwargs):
    """The thinker's config from a full Omni checkpoint (`full_model_type`) or a thinker-only one.

    Read by model type rather than through AutoConfig: early transformers 5 releases do not register the thinker-only
    types with AutoConfig.
    """
    from transformers import PretrainedConfig

    hub = {key: kwargs[key] for key in ("revision", "local_files_only") if key in kwargs}
    config_dict, _ = PretrainedConfig.get_config_dict(path, **hub)
    if config_dict.get("model_type") == full_model_type:
        config = full_config_class.from_pretrained(path, **kwargs).thinker_config
    else:
        config = thinker_config_class.from_pretrained(path, **kwargs)
    return without_vision_blocks(config)


def without_vision_blocks(thinker_config):
    """audiokv feeds the thinker audio and text only: its vision tower is built without transformer blocks, so their
    weights (0.67 B parameters in the 7B thinker) are skipped when loading instead of filling memory."""
    vision = thinker_config.vision_config
    vision.depth = 0
    if hasattr(vision, "deepstack_visual_indexes"):  # Qwen3-Omni taps blocks for its deepstack mergers
        vision.deepstack_visual_indexes = []
    return thinker_config


def load_thinker_config(path: str, **kwargs):
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniThinkerConfig

    return thinker_config_from(path, "qwen2_5_omni", Qwen2_5OmniConfig, Qwen2_5OmniThinkerConfig, **kwargs)


class Qwen2_5OmniAdapter(ModelAdapter):
    family = "Qwen2.5-Omni thinker"
    model_types = ("qwen2_5_omni", "qwen2_5_omni_thinker")
    random_model = "audiokv_cli.testing.omni:build_random_qwen2_5_omni_thinker"
    # Whisper-style mel frames every 10 ms, a stride-2 convolution, then stride-2 average pooling: 40 ms per token.
    seconds_per_audio_token = 0.04
    # The released feature extractor pads and truncates to a 300 s window (`n_samples` 4,800,000 at 16 kHz); the
    # audio tower encodes it in independent 2 s windows, so that window is the limit. Set per model from its extractor.
    max_audio_seconds = 300.0

    def __init__(self, model, processor, name, revision=None):
        super().__init__(model, processor, name, revision)
        extractor = getattr(processor, "feature_extractor", None)
        n_samples = getattr(extractor, "n_samples", None)
        if n_samples:
            self.max_audio_seconds = n_samples / getattr(extractor, "sampling_rate", SAMPLE_RATE)
        # M-RoPE offset of text positions after the prompt (0 for audio-only prompts), set by each prefill.
        self._rope_deltas: torch.Tensor | None = None

    @classmethod
    def load(cls, path, *, device, dtype, trust_remote_code, name, revision=None, device_map=None, **kwargs):
        from transformers import Qwen2_5OmniThinkerForConditionalGeneration

        common = dict(trust_remote_code=trust_remote_code, revision=revision, **kwargs)
        thinker_config = load_thinker_config(path, **common)
        # A full Omni checkpoint stores the thinker's weights under `thinker.`; transformers strips that prefix when
        # the thinker class is loaded from it (a checkpoint-key rename in newer releases, `base_model_prefix =
        # "thinker"` in older ones), so the talker and vocoder weights are simply not read.
        model = cls.pretrained(
            Qwen2_5OmniThinkerForConditionalGeneration, path, config=thinker_config, device=device, dtype=dtype, device_map=device_map, **common
        )
        processor = load_omni_processor(path, **common)
        return cls(model, processor, name, revision)

    @property
    def text_config(self):
        return self.model.config.text_config

    def _multimodal_model(self) -> torch.nn.Module | None:
        """The thinker's encoders-plus-decoder body (later transformers 5 releases), or None in the flat 5.0 layout."""
        inner = getattr(self.model, "model", None)
        return inner if inner is not None and hasattr(inner, "language_model") else None

    def _language_model(self) -> torch.nn.Module:
        body = self._multimodal_model()
        return body.language_model if body is not None else self.model.model

    def decoder_layers(self) -> list[torch.nn.Module]:
        return [layer.self_attn for layer in self._language_model().layers]

    def _prompt_positions(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """M-RoPE position ids ``[3, B, L]`` of a whole prompt and the offset of the text positions that follow."""
        input_ids = inputs["input_ids"]
        attention_mask = inputs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        frame_mask = inputs.get("feature_attention_mask")
        audio_lengths = frame_mask.sum(-1) if frame_mask is not None else inputs.get("audio_feature_lengths")
        position_ids, deltas = self.model.get_rope_index(
            input_ids, None, None, attention_mask, False, audio_lengths, None
        )
        return position_ids, deltas.reshape(input_ids.shape[0], 1).to(input_ids.device)

    def next_token_logits(self, inputs: dict, cache) -> torch.Tensor:
        # Positions are passed explicitly: prefill takes the model's own M-RoPE index, and decode steps continue
        # from the cache length plus the prompt's offset. Left to itself the thinker only applies that offset when
        # an attention mask comes with each step (and older releases not at all), which decode steps do not send.
        past = cache.get_seq_length() if cache is not None else 0
        if past == 0:
            position_ids, self._rope_deltas = self._prompt_positions(inputs)
        else:
            input_ids = inputs["input_ids"]
            steps = torch.arange(past, past + input_ids.shape[-1], device=input_ids.device)
            deltas = self._rope_deltas if self._rope_deltas is not None else torch.zeros(1, 1, dtype=torch.long)
            position_ids = (steps[None, :] + deltas.to(input_ids.device)).unsqueeze(0).expand(3, -1, -1)
        body = self._multimodal_model()
        if body is None:
            outputs = self.model(**inputs, position_ids=position_ids, **cache_kwargs(self.model, cache), use_cache=True)
            return outputs.logits[:, -1]
        # Project only the last position: the full [L, vocab] logits of a 7B prompt cost hundreds of MB.
        hidden = body(**inputs, position_ids=position_ids, **cache_kwargs(body, cache), use_cache=True).last_hidden_state
        return self.model.lm_head(hidden[:, -1])

    @property
    def audio_token_id(self) -> int:
        config = self.model.config
        value = getattr(config, "audio_token_id", None)
        return int(value if value is not None else config.audio_token_index)

    def conversation(self, prompt: str | None) -> list[dict]:
        system = ASR_SYSTEM_PROMPT if prompt is None else DEFAULT_SYSTEM_PROMPT
        instruction = ASR_INSTRUCTION_OMNI if prompt is None else prompt
        return [
            # Content as a list of parts: some releases read the system prompt as `content[0]["text"]`.
            {"role": "system", "content": [{"type": "text", "text": system}]},
            {
                "role": "user",
                "content": [{"type": "audio", "audio_url": "clip.wav"}, {"type": "text", "text": instruction}],
            },
        ]

    def prompt_text(self, prompt: str | None) -> str:
        return self.processor.apply_chat_template(self.conversation(prompt), add_generation_prompt=True, tokenize=False)

    def prepare(self, audio: np.ndarray, prompt: str | None = None) -> PreparedInput:
        # The feature extractor would cut the clip at its window without a word: refuse it instead.
        check_length(audio, self.max_audio_seconds)
        text = self.prompt_text(prompt)
        batch = self.processor(text=text, audio=[audio], sampling_rate=SAMPLE_RATE, return_tensors="pt")
        return self.prepared_input(batch, audio, text, self.audio_token_id)

    @property
    def eos_token_ids(self) -> list[int]:
        tokenizer = self.processor.tokenizer
        ids: list[int] = []
        for value in (
            getattr(self.model.generation_config, "eos_token_id", None),
            getattr(self.text_config, "eos_token_id", None),
            tokenizer.eos_token_id,
        ):
            ids.extend(value if isinstance(value, (list, tuple)) else [value])
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
            ids.append(im_end)
        return sorted({int(i) for i in ids if i is not None})
