"""Granite Speech (IBM): a conformer CTC encoder, a Q-Former projector over windows of encoder frames, and a Granite
decoder that carries a speech LoRA (loaded by transformers through peft, active whenever audio is in the prompt).

`GraniteSpeechFeatureExtractor` computes its log-mel features with `torchaudio.transforms.MelSpectrogram` and refuses
to be built without torchaudio, which is not built for every torch release (PyPI has none for torch 2.13). Where
torchaudio imports, the stock `GraniteSpeechProcessor` is used; elsewhere `GraniteSpeechAudioProcessor` below computes
the same features, feature mask and number of `<|audio|>` placeholders with torch alone, from the same
`preprocessor_config.json` (`scripts/check_granite_features.py` compares the two).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch

from audiokv_cli.io.audio import SAMPLE_RATE, AudioError
from audiokv_cli.errors import AudiokvError
from audiokv_cli.models.audio_lm import AudioLMAdapter
from audiokv_cli.models.base import PreparedInput

# The system turn and instruction of the granite-speech-3.3 model cards. The system turn is given explicitly because
# Granite's chat template otherwise writes today's date into it, and the prompt would change from day to day.
GRANITE_SYSTEM_PROMPT = (
    "Knowledge Cutoff Date: April 2024.\nToday's Date: April 9, 2025.\n"
    "You are Granite, developed by IBM. You are a helpful AI assistant"
)
GRANITE_ASR_INSTRUCTION = "can you transcribe the speech into a written format?"
AUDIO_TOKEN = "<|audio|>"


@dataclass(frozen=True)
class GraniteSpeechFeatureSettings:
    """`GraniteSpeechFeatureExtractor`'s constructor arguments, with its defaults (the released values)."""

    sampling_rate: int = 16000
    n_fft: int = 512
    win_length: int = 400
    hop_length: int = 160
    n_mels: int = 80
    projector_window_size: int = 15
    projector_downsample_rate: int = 5

    @classmethod
    def from_config(cls, values: dict, source: str = "preprocessor_config.json") -> GraniteSpeechFeatureSettings:
        """The settings the stock extractor is built with from a saved config: its constructor arguments, else their
        defaults. The stock extractor ignores a saved `melspec_kwargs` (it rebuilds it from those arguments), so a
        `melspec_kwargs` that disagrees would describe features it never computes: refused rather than guessed."""
        settings = cls(**{f.name: int(values[f.name]) for f in fields(cls) if values.get(f.name) is not None})
        saved = values.get("melspec_kwargs") or {}
        for key, value in saved.items():
            expected = settings.melspec_kwargs.get(key)
            if expected is None or int(value) != expected:
                raise AudiokvError(
                    f"{source}: melspec_kwargs {key}={value} differs from what GraniteSpeechFeatureExtractor computes "
                    f"({expected}); this checkpoint's features cannot be reproduced"
                )
        return settings

    @property
    def melspec_kwargs(self) -> dict:
        return {
            "sample_rate": self.sampling_rate, "n_fft": self.n_fft, "win_length": self.win_length,
            "hop_length": self.hop_length, "n_mels": self.n_mels,
        }


class GraniteSpeechFeatures:
    """`GraniteSpeechFeatureExtractor` in torch ops: torchaudio's `MelSpectrogram` (its defaults: periodic Hann window
    of `win_length` centred in `n_fft`, centred frames with reflect padding, power 2, HTK mel scale without filter
    normalization), then the extractor's log10 floored at the maximum minus 8, /4 + 1, and pairs of frames stacked."""

    def __init__(self, settings: GraniteSpeechFeatureSettings):
        from transformers.audio_utils import mel_filter_bank

        self.settings = settings
        self.window = torch.hann_window(settings.win_length)
        self.mel_filters = torch.from_numpy(
            mel_filter_bank(
                num_frequency_bins=settings.n_fft // 2 + 1,
                num_mel_filters=settings.n_mels,
                min_frequency=0.0,
                max_frequency=float(settings.sampling_rate // 2),
                sampling_rate=settings.sampling_rate,
                norm=None,
                mel_scale="htk",
            )
        ).float()

    def input_features(self, batch: torch.Tensor) -> torch.Tensor:
        """``[batch, samples]`` -> ``[batch, frames // 2, 2 * n_mels]``, as `_extract_mel_spectrograms`."""
        s = self.settings
        with torch.no_grad():
            spectrum = torch.stft(
                batch.float(), n_fft=s.n_fft, hop_length=s.hop_length, win_length=s.win_length, window=self.window,
                center=True, pad_mode="reflect", normalized=False, onesided=True, return_complex=True,
            ).abs().pow(2.0)
            mel = torch.matmul(spectrum.transpose(-1, -2), self.mel_filters)  # [batch, frames, n_mels]
            log_mel = mel.clamp(min=1e-10).log10()
            peak = log_mel.amax(dim=(-2, -1), keepdim=True)
            log_mel = torch.maximum(log_mel, peak - 8.0) / 4 + 1
            if log_mel.shape[1] % 2 == 1:  # an odd last frame has no partner to stack with
                log_mel = log_mel[:, :-1]
            return log_mel.reshape(batch.shape[0], -1, 2 * log_mel.shape[-1])

    def audio_tokens(self, num_samples: int) -> int:
        """Projector outputs for a clip, as `_get_num_audio_features`: mel frames, two per encoder frame, whole
        projector windows, `window // downsample` queries each."""
        s = self.settings
        encoder_frames = (num_samples // s.hop_length + 1) // 2
        windows = math.ceil(encoder_frames / s.projector_window_size)
        return windows * (s.projector_window_size // s.projector_downsample_rate)

    def __call__(self, clips: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """Features of clips zero-padded to the longest, the projector-output mask and each clip's token count."""
        tensors = [torch.as_tensor(np.asarray(clip)).reshape(-1) for clip in clips]
        batch = torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=0.0)
        sizes = [self.audio_tokens(len(t)) for t in tensors]
        return {
            "input_features": self.input_features(batch),
            "input_features_mask": torch.arange(max(sizes)).view(1, -1) < torch.tensor(sizes).view(-1, 1),
            "audio_embed_sizes": sizes,
        }


class GraniteSpeechAudioProcessor:
    """`GraniteSpeechProcessor` without torchaudio: the same tokenizer and `preprocessor_config.json`, the same
    features and feature mask, each `<|audio|>` in the text expanded to the clip's number of audio tokens."""

    def __init__(self, features: GraniteSpeechFeatures, tokenizer):
        self.features = features
        self.tokenizer = tokenizer
        self.audio_token = getattr(tokenizer, "audio_token", None) or AUDIO_TOKEN

    @classmethod
    def from_pretrained(cls, path: str, revision: str | None = None, local_files_only: bool = False, **kwargs):
        from transformers import AutoTokenizer
        from transformers.feature_extraction_utils import FeatureExtractionMixin

        hub = dict(revision=revision, local_files_only=local_files_only)
        values, _ = FeatureExtractionMixin.get_feature_extractor_dict(path, **hub)
        settings = GraniteSpeechFeatureSettings.from_config(values, source=f"{path}: preprocessor_config.json")
        if settings.sampling_rate != SAMPLE_RATE:
            raise AudiokvError(f"{path}: features at {settings.sampling_rate} Hz; audiokv reads {SAMPLE_RATE} Hz audio")
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=kwargs.get("trust_remote_code", False), **hub)
        return cls(GraniteSpeechFeatures(settings), tokenizer)

    def __call__(self, text, audio, sampling_rate: int = SAMPLE_RATE, return_tensors: str = "pt", **kwargs):
        texts = [text] if isinstance(text, str) else list(text)
        clips = list(audio) if isinstance(audio, (list, tuple)) else [audio]
        expected_rate = self.features.settings.sampling_rate
        if sampling_rate != expected_rate:
            raise ValueError(f"Granite Speech takes {expected_rate} Hz audio, not {sampling_rate}")
        placeholders = sum(t.count(self.audio_token) for t in texts)
        if placeholders != len(clips):
            raise ValueError(f"{len(clips)} clips for {placeholders} {self.audio_token} in the text")
        audio_inputs = self.features(clips)
        sizes = iter(audio_inputs.pop("audio_embed_sizes"))
        expanded = [
            "".join(
                part if index == 0 else self.audio_token * next(sizes) + part
                for index, part in enumerate(t.split(self.audio_token))
            )
            for t in texts
        ]
        # The stock processor's tokenizer call (its default text kwargs pad the batch).
        tokens = self.tokenizer(expanded, padding=True, return_tensors=return_tensors)
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"], **audio_inputs}


def load_granite_speech_processor(path: str, **kwargs):
    """The stock `GraniteSpeechProcessor` where torchaudio imports, else `GraniteSpeechAudioProcessor`."""
    from transformers.utils import is_torchaudio_available

    if is_torchaudio_available():
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path, **kwargs)
    return GraniteSpeechAudioProcessor.from_pretrained(path, **kwargs)


def speech_lora_problem() -> str | None:
    """Why transformers cannot load a checkpoint's LoRA here (peft missing, or older than the release this transformers
    requires), or None."""
    import importlib.metadata

    import transformers
    from packaging import version

    try:
        from transformers.integrations.peft import MIN_PEFT_VERSION as required
    except ImportError:
        required = "0"
    try:
        installed = importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        return f"needs `pip install 'peft>={required}'`"
    if version.parse(installed) < version.parse(required):
        return f"needs peft >= {required} with transformers {transformers.__version__} (installed: {installed})"
    return None


class GraniteSpeechAdapter(AudioLMAdapter):
    """Granite Speech 3.3 (2B and 8B). Audio tokens: 10 ms mel frames, two stacked per encoder frame, and the Q-Former
    reads windows of 15 encoder frames (0.3 s) into 3 queries each: 100 ms per token, the clip rounded up to a whole
    window (2 s: 21 tokens, 30 s: 300). Neither the encoder (attention within fixed blocks of frames) nor the
    processor limits the length; the 10-minute limit is a bound chosen here (6,000 audio tokens, well inside the
    decoder's 128K-token context)."""

    family = "Granite Speech"
    model_types = ("granite_speech",)
    random_model = "audiokv_cli.testing.families:build_random_granite_speech"
    model_class = "GraniteSpeechForConditionalGeneration"
    seconds_per_audio_token = 0.1
    max_audio_seconds = 600.0
    asr_instruction = GRANITE_ASR_INSTRUCTION
    system_prompt = GRANITE_SYSTEM_PROMPT

    @classmethod
    def load(cls, path, *, device, dtype, trust_remote_code, name, revision=None, device_map=None, **kwargs):
        from transformers import GraniteSpeechConfig, GraniteSpeechForConditionalGeneration

        common = dict(trust_remote_code=trust_remote_code, revision=revision, **kwargs)
        config = GraniteSpeechConfig.from_pretrained(path, **common)
        problem = speech_lora_problem() if config.has_lora_adapter else None
        if problem:
            # Without peft transformers loads the model without its LoRA (a log line says outputs will be wrong); with
            # an older peft than it requires, switching the LoRA on (here, or in its `generate`) raises.
            raise AudiokvError(f"{path}: Granite Speech's speech LoRA {problem}")
        processor = load_granite_speech_processor(path, **common)
        model = cls.pretrained(
            GraniteSpeechForConditionalGeneration, path, device=device, dtype=dtype, device_map=device_map, **common
        )
        if getattr(model, "_hf_peft_config_loaded", False):
            # `generate` switches the LoRA on for prompts with audio; audiokv calls the model itself, always with audio.
            model.enable_adapters()
        return cls(model, processor, name, revision)

    def conversation(self, prompt: str | None) -> list[dict]:
        # Granite's chat template takes plain-string content; the audio is the placeholder in the user's text.
        instruction = self.asr_instruction if prompt is None else prompt
        return [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": f"{self.processor.audio_token}{instruction}"},
        ]

    def prompt_text(self, prompt: str | None) -> str:
        return self.processor.tokenizer.apply_chat_template(
            self.conversation(prompt), add_generation_prompt=True, tokenize=False
        )

    @property
    def min_samples(self) -> int:
        """The centred STFT reflects half a window at each end of the clip, so a clip must be longer than that."""
        processor = self.processor
        if hasattr(processor, "features"):
            return processor.features.settings.n_fft // 2 + 1
        return processor.audio_processor.melspec_kwargs["n_fft"] // 2 + 1

    def prepare(self, audio: np.ndarray, prompt: str | None = None) -> PreparedInput:
        minimum = self.min_samples
        if len(audio) < minimum:
            raise AudioError(f"{len(audio)} samples of audio are fewer than Granite Speech's minimum of {minimum}")
        return super().prepare(audio, prompt)
