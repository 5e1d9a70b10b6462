"""The shape most audio LMs in transformers share: audio encoder + projector + a causal text decoder, one processor.

`XForConditionalGeneration.model.language_model` is the text decoder (an AutoModel of `config.text_config`),
`lm_head` sits on the outer model, the audio placeholder id is `config.audio_token_id`, and the stock processor turns
a chat prompt plus audio into `input_ids` with the placeholder repeated once per audio token. A family adapter says
which model class to load, how long its audio may be, and how its prompt reads.
"""

from __future__ import annotations

import inspect
import logging
from typing import ClassVar

import numpy as np
import torch

from audiokv_cli.io.audio import SAMPLE_RATE, check_length
from audiokv_cli.compat import cache_kwargs
from audiokv_cli.models.base import ModelAdapter, PreparedInput


def extract_transcription(processor, text: str) -> str:
    """The spoken text of a diarized transcript, through the processor's own parser (``extract_transcription``):
    segments' text without timestamps and speaker tags. Text the parser cannot read (a free-form answer) comes back
    as it is, without the warning the parser logs for it."""
    parser_log = logging.getLogger(type(processor).__module__)
    level = parser_log.level
    parser_log.setLevel(logging.ERROR)
    try:
        return processor.extract_transcription(text)
    except ValueError:  # transformers 5.10's JSON parser raises on a transcript cut short by the token limit
        return text
    finally:
        parser_log.setLevel(level)


class AudioLMAdapter(ModelAdapter):
    #: name of the transformers class to load (`transformers.<name>`).
    model_class: ClassVar[str] = ""
    #: instruction used when no prompt is given.
    asr_instruction: ClassVar[str] = "Transcribe the input speech."
    #: whether the audio item comes before the instruction in the user turn (as the family's processor orders it).
    audio_first: ClassVar[bool] = True

    @classmethod
    def load(cls, path, *, device, dtype, trust_remote_code, name, revision=None, device_map=None, **kwargs):
        import transformers
        from transformers import AutoProcessor

        model_class = getattr(transformers, cls.model_class, None)
        if model_class is None:
            from audiokv_cli.errors import AudiokvError

            raise AudiokvError(
                f"{path}: {cls.model_class} is not in transformers {transformers.__version__}; "
                "this model family needs a newer release (pip install -U transformers)"
            )
        common = dict(trust_remote_code=trust_remote_code, revision=revision, **kwargs)
        processor = AutoProcessor.from_pretrained(path, **common)
        model = cls.pretrained(model_class, path, device=device, dtype=dtype, device_map=device_map, **common)
        return cls(model, processor, name, revision)

    @property
    def text_config(self):
        return self.model.config.text_config

    def _language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    def decoder_layers(self) -> list[torch.nn.Module]:
        return [layer.self_attn for layer in self._language_model().layers]

    def _cache_kwargs(self, cache) -> dict:
        """The cache argument under the name the decoder takes: some bodies pass **kwargs through to it unnamed."""
        body = self.model.model
        parameters = inspect.signature(body.forward).parameters
        named = "cache" in parameters or "past_key_values" in parameters
        return cache_kwargs(body if named else self._language_model(), cache)

    def next_token_logits(self, inputs: dict, cache) -> torch.Tensor:
        # Project only the last position: the full [L, vocab] logits of a long prompt cost hundreds of MB.
        hidden = self.model.model(**inputs, **self._cache_kwargs(cache), use_cache=True).last_hidden_state
        return self.model.lm_head(hidden[:, -1])

    @property
    def audio_token_id(self) -> int:
        return int(self.model.config.audio_token_id)

    def conversation(self, prompt: str | None) -> list[dict]:
        audio = {"type": "audio", "audio": "clip.wav"}
        text = {"type": "text", "text": self.asr_instruction if prompt is None else prompt}
        return [{"role": "user", "content": [audio, text] if self.audio_first else [text, audio]}]

    def prompt_text(self, prompt: str | None) -> str:
        return self.processor.apply_chat_template(self.conversation(prompt), add_generation_prompt=True, tokenize=False)

    def prepare(self, audio: np.ndarray, prompt: str | None = None) -> PreparedInput:
        # Processors of these families cut long audio with at most a log line; refuse it instead.
        check_length(audio, self.max_audio_seconds)
        text = self.prompt_text(prompt)
        batch = self.processor(text=text, audio=[audio], sampling_rate=SAMPLE_RATE, return_tensors="pt")
        return self.prepared_input(batch, audio, text, self.audio_token_id)

    @property
    def eos_token_ids(self) -> list[int]:
        tokenizer = self.processor.tokenizer
        ids: list[int] = []
        for value in (getattr(self.model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
            ids.extend(value if isinstance(value, (list, tuple)) else [value])
        return sorted({int(i) for i in ids if i is not None})
