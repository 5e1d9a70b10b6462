"""The head-profile file: safetensors tensors + JSON metadata, a readable JSON twin, validation, merge and lookup.

Layout (see docs/profile-format.md): ``NAME.safetensors`` holds float64/int64 tensors ``hits``, ``steps``,
``audio_mass`` and ``score`` shaped [layers, query_heads], and (schema 2, optional) ``sensitivity`` shaped
[layers, kv_heads, strengths]; its safetensors metadata key ``audiokv`` holds a JSON string with the schema version,
the model fingerprint and the provenance. ``NAME.json`` repeats that metadata with the score table for people and
tools without safetensors. Schema 1 files (no sensitivity) still load.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from audiokv_cli.errors import AudiokvError
from audiokv_cli.io.files import write_together
from audiokv_cli.models import checkpoint_signature
from audiokv_cli.profiling.alignment import data_digest
from audiokv_cli.profiling.sensitivity import HeadSensitivity
from audiokv_cli.profiling.statistics import HeadStatistics

logger = logging.getLogger(__name__)

FORMAT_NAME = "audiokv-head-profile"
SCHEMA_VERSION = 2
# Versions this audiokv reads: 1 has no sensitivity table (budgets then use the head scores alone).
READABLE_VERSIONS = (1, 2)
SENSITIVITY_TENSOR = "sensitivity"
METADATA_KEY = "audiokv"
TENSOR_DTYPES = {
    "hits": torch.float64,
    "steps": torch.int64,
    "audio_mass": torch.float64,
    "score": torch.float64,
}
STATISTICS = ("topk_hits", "audio_mass")
# Fingerprint fields that name the checkpoint; all other fields describe the architecture and must match.
IDENTITY_FIELDS = ("name_or_path", "revision", "weights")
# Provenance fields that must agree for profiles to be merged (they change what the statistic means).
MERGE_KEYS = ("statistic", "aligner", "top_k", "min_confidence", "decoding")
PROFILE_SUFFIX = ".safetensors"
# safetensors' own limit on header size; a larger claimed size means a damaged file.
MAX_HEADER_BYTES = 100_000_000
PARTIAL_TAG = ".partial"
HOW_TO_MAKE = (
    "make one with `audiokv probe-set --out probes --n 200 && "
    "audiokv profile --model {model} --data probes --out profiles/{stem}.safetensors`"
)


class ProfileError(AudiokvError):
    """A profile file is missing, corrupt, from another model, or incompatible with another profile."""


def audiokv_version() -> str:
    try:
        from audiokv_cli import __version__

        return str(__version__)
    except ImportError:  # pragma: no cover - the package always defines it
        return "unknown"


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


@dataclass
class HeadProfile:
    """Statistics plus who made them and how. ``score`` is derived, never stored independently."""

    stats: HeadStatistics
    fingerprint: dict[str, Any]
    provenance: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    #: what compressing each (layer, KV head) alone costs; None in schema 1 files and runs with --no-sensitivity.
    sensitivity: HeadSensitivity | None = None

    @property
    def statistic(self) -> str:
        return self.provenance["statistic"]

    @property
    def score(self) -> torch.Tensor:
        return self.stats.score(self.statistic)

    def tensors(self) -> dict[str, torch.Tensor]:
        tensors = {
            "hits": self.stats.hits.contiguous(),
            "steps": self.stats.steps.contiguous(),
            "audio_mass": self.stats.audio_mass.contiguous(),
            "score": self.score.contiguous(),
        }
        if self.sensitivity is not None:
            tensors[SENSITIVITY_TENSOR] = self.sensitivity.table.contiguous()
        return tensors

    def metadata(self) -> dict[str, Any]:
        layers, heads = self.stats.shape
        meta = {
            "format": FORMAT_NAME,
            "schema_version": SCHEMA_VERSION,
            "shape": {"layers": layers, "query_heads": heads},
            "fingerprint": self.fingerprint,
            "provenance": self.provenance,
        }
        if self.sensitivity is not None:
            meta["sensitivity"] = self.sensitivity.metadata()
        meta.update(self.extra)
        return meta


# ------------------------------------------------------------------------------------------------------------ paths


def profile_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """(NAME.safetensors, NAME.json) for ``out`` given with or without the .safetensors / .json suffix."""
    out = Path(out)
    if out.suffix in (PROFILE_SUFFIX, ".json"):
        out = out.with_suffix("")
    return out.with_name(out.name + PROFILE_SUFFIX), out.with_name(out.name + ".json")


def partial_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """Checkpoint files of an unfinished run writing ``out``: NAME.partial.safetensors / NAME.partial.json."""
    tensors_path, _ = profile_paths(out)
    stem = tensors_path.name[: -len(PROFILE_SUFFIX)]
    return profile_paths(tensors_path.with_name(stem + PARTIAL_TAG))


# ------------------------------------------------------------------------------------------------------------ write


def readable_json(value: Any, indent: int = 0) -> str:
    """JSON with one line per table row: lists of scalars stay on one line, everything else is indented."""
    pad, inner = "  " * indent, "  " * (indent + 1)
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [f"{inner}{json.dumps(str(k))}: {readable_json(v, indent + 1)}" for k, v in sorted(value.items())]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, list) and value and any(isinstance(v, (list, dict)) for v in value):
        return "[\n" + ",\n".join(inner + readable_json(v, indent + 1) for v in value) + "\n" + pad + "]"
    return json.dumps(value, ensure_ascii=False)


def save_profile(profile: HeadProfile, out: str | os.PathLike) -> Path:
    """Write NAME.safetensors and NAME.json atomically; returns the safetensors path."""
    from safetensors.torch import save

    tensors_path, json_path = profile_paths(out)
    meta = profile.metadata()
    payload = save(profile.tensors(), metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
    twin = dict(meta)
    twin["score"] = profile.score.tolist()
    twin["steps"] = profile.stats.steps.tolist()
    if profile.sensitivity is not None:
        twin["sensitivity_table"] = profile.sensitivity.table.tolist()
    write_together({tensors_path: payload, json_path: readable_json(twin) + "\n"})
    return tensors_path


def remove_profile_files(out: str | os.PathLike) -> None:
    for path in profile_paths(out):
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------------------- read


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a profile, read from the safetensors header only (cheap; used for discovery)."""
    path = Path(path)
    if not path.is_file():
        raise ProfileError(f"{path}: no such profile file")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ProfileError(f"{path}: not a profile (file too short; truncated?)")
        (header_size,) = struct.unpack("<Q", head)
        if header_size <= 0 or header_size > MAX_HEADER_BYTES or 8 + header_size > size:
            raise ProfileError(f"{path}: not a profile (bad or truncated safetensors header)")
        raw = handle.read(header_size)
    try:
        header = json.loads(raw.decode("utf-8"))
        meta = json.loads(header["__metadata__"][METADATA_KEY])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise ProfileError(f"{path}: not an audiokv profile (no '{METADATA_KEY}' metadata in the header)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ProfileError(f"{path}: not an audiokv profile (format is {meta.get('format')!r})")
    version = meta.get("schema_version")
    if version not in READABLE_VERSIONS:
        readable = " and ".join(str(v) for v in READABLE_VERSIONS)
        raise ProfileError(
            f"{path}: profile schema version {version!r} is not supported (this audiokv reads {readable}); "
            "a newer audiokv wrote it, so upgrade audiokv or remake the profile"
        )
    for key in ("fingerprint", "provenance", "shape"):
        if not isinstance(meta.get(key), dict):
            raise ProfileError(f"{path}: profile metadata lacks '{key}'")
    provenance = meta["provenance"]
    if provenance.get("statistic") not in STATISTICS or not isinstance(provenance.get("top_k"), int):
        raise ProfileError(f"{path}: profile provenance lacks a valid 'statistic' and 'top_k'")
    return meta


def fingerprint_differences(found: dict, expected: dict) -> tuple[list[str], list[str]]:
    """(architecture fields that differ, identity fields that differ)."""
    keys = sorted(set(found) | set(expected))
    arch = [k for k in keys if k not in IDENTITY_FIELDS and found.get(k) != expected.get(k)]
    ident = [k for k in keys if k in IDENTITY_FIELDS and found.get(k) != expected.get(k)]
    return arch, ident


def same_checkpoint(found: dict, expected: dict) -> bool:
    """Whether two fingerprints name the same weights: by their weight signatures where both have one (the same
    weights under another path match), else (profiles from before signatures) by name and revision."""
    verdict = checkpoint_signature.same_checkpoint(found.get("weights"), expected.get("weights"))
    if verdict is not None:
        return verdict
    return all(found.get(k) == expected.get(k) for k in ("name_or_path", "revision"))


def check_fingerprint(found: dict, expected: dict, where: str, allow_mismatch: bool = False) -> None:
    arch, _ = fingerprint_differences(found, expected)
    if arch:
        detail = ", ".join(f"{k} {found.get(k)!r} != {expected.get(k)!r}" for k in arch)
        raise ProfileError(f"{where}: profile was made for another model ({detail})")
    if not same_checkpoint(found, expected):
        if not allow_mismatch:
            raise ProfileError(
                f"{where}: profile was measured on another checkpoint ({found.get('name_or_path')}) of this "
                f"architecture than {expected.get('name_or_path')}; its head ranking may not hold: measure one for "
                "this model, or pass --allow-profile-mismatch to use it anyway"
            )
        logger.warning(
            "%s: profile was measured on %s, this model is %s (same architecture; used as asked)",
            where, found.get("name_or_path"), expected.get("name_or_path"),
        )


def load_profile(
    path: str | os.PathLike, expect_fingerprint: dict | None = None, allow_mismatch: bool = False
) -> HeadProfile:
    """Read and validate a profile; with ``expect_fingerprint`` the architecture must match (the name may differ,
    with a warning). Any problem is one ProfileError line."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = profile_paths(path)[0] if Path(path).suffix != PROFILE_SUFFIX else Path(path)
    meta = read_metadata(path)
    try:
        tensors = load(path.read_bytes())
    except (SafetensorError, ValueError, OSError) as error:
        raise ProfileError(f"{path}: corrupt profile ({str(error).splitlines()[0]})") from None
    layers, heads = meta["shape"].get("layers"), meta["shape"].get("query_heads")
    fingerprint = meta["fingerprint"]
    if fingerprint.get("num_layers", layers) != layers or fingerprint.get("num_query_heads", heads) != heads:
        raise ProfileError(f"{path}: profile shape does not match its own fingerprint")
    for name, dtype in TENSOR_DTYPES.items():
        tensor = tensors.get(name)
        if tensor is None:
            raise ProfileError(f"{path}: profile lacks the '{name}' tensor")
        if tuple(tensor.shape) != (layers, heads) or tensor.dtype != dtype:
            raise ProfileError(
                f"{path}: tensor '{name}' is {tuple(tensor.shape)} {tensor.dtype}, expected ({layers}, {heads}) {dtype}"
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ProfileError(f"{path}: tensor '{name}' holds NaN or infinite values")
    provenance = meta["provenance"]
    stats = HeadStatistics.from_tensors(tensors["hits"], tensors["steps"], tensors["audio_mass"], provenance["top_k"])
    if (stats.steps < 0).any() or (stats.hit_counts < 0).any():
        raise ProfileError(f"{path}: profile holds negative counts")
    own = ("format", "schema_version", "shape", "fingerprint", "provenance", "sensitivity")
    extra = {k: v for k, v in meta.items() if k not in own}
    sensitivity = _read_sensitivity(path, meta, tensors, layers)
    profile = HeadProfile(stats, fingerprint, provenance, extra, sensitivity)
    if not torch.allclose(profile.score, tensors["score"], rtol=1e-12, atol=1e-12):
        raise ProfileError(f"{path}: stored 'score' does not match hits / steps (file edited or corrupt)")
    if expect_fingerprint is not None:
        check_fingerprint(fingerprint, expect_fingerprint, str(path), allow_mismatch)
    return profile


def _read_sensitivity(path: Path, meta: dict, tensors: dict, layers: int) -> HeadSensitivity | None:
    """The sensitivity table of a schema 2 profile that has one, validated; None otherwise."""
    described = meta.get("sensitivity")
    table = tensors.get(SENSITIVITY_TENSOR)
    if described is None and table is None:
        return None
    if not isinstance(described, dict) or table is None:
        raise ProfileError(f"{path}: profile has a sensitivity table without its description, or the reverse")
    strengths = described.get("strengths")
    if not isinstance(strengths, list) or not strengths or not all(isinstance(g, int) and g >= 2 for g in strengths):
        raise ProfileError(f"{path}: sensitivity strengths must be a list of integers >= 2, got {strengths!r}")
    kv_heads = meta["fingerprint"].get("num_kv_heads")
    expected = (layers, kv_heads, len(strengths))
    if tuple(table.shape) != expected or table.dtype != torch.float64:
        raise ProfileError(f"{path}: tensor 'sensitivity' is {tuple(table.shape)} {table.dtype}, expected {expected} float64")
    if not torch.isfinite(table).all() or (table < 0).any():
        raise ProfileError(f"{path}: tensor 'sensitivity' holds negative, NaN or infinite values")
    try:
        return HeadSensitivity.from_metadata(described, table)
    except (KeyError, TypeError, ValueError):
        raise ProfileError(f"{path}: profile's sensitivity description lacks 'positions' or 'clips'") from None


# ------------------------------------------------------------------------------------------------------------ merge


def merge_profiles(profiles: Sequence[HeadProfile], names: Sequence[str] | None = None) -> HeadProfile:
    """Add the statistics of profiles made with the same model and settings (exact: equals one run over all clips
    in the given order). Refuses different fingerprints, K, aligners, thresholds or decoding, and repeated clips."""
    if not profiles:
        raise ProfileError("nothing to merge")
    names = list(names) if names is not None else [f"profile {i + 1}" for i in range(len(profiles))]
    first = profiles[0]
    for other, name in zip(profiles[1:], names[1:]):
        if other.fingerprint != first.fingerprint:
            arch, ident = fingerprint_differences(other.fingerprint, first.fingerprint)
            raise ProfileError(f"{name}: made with a different model than {names[0]} (differs in {', '.join(arch + ident)})")
        for key in MERGE_KEYS:
            if other.provenance.get(key) != first.provenance.get(key):
                raise ProfileError(
                    f"{name}: {key} is {other.provenance.get(key)!r} but {names[0]} has {first.provenance.get(key)!r}; "
                    "only profiles made with the same settings can be merged"
                )
    stats = HeadStatistics.zeros(*first.stats.shape, first.stats.top_k)
    data: list[list[str]] = []
    seen: set[tuple[str, str]] = set()
    for profile, name in zip(profiles, names):
        stats.add(profile.stats)
        for clip_id, sha in profile.provenance.get("data", []):
            if (clip_id, sha) in seen:
                raise ProfileError(f"{name}: clip {clip_id!r} is already in another profile; merging would count it twice")
            seen.add((clip_id, sha))
            data.append([clip_id, sha])
    provenance = {key: first.provenance.get(key) for key in MERGE_KEYS}
    for key in ("clips", "words", "words_aligned", "scored_steps", "decode_steps"):
        provenance[key] = sum(int(p.provenance.get(key, 0)) for p in profiles)
    for key in ("dtype", "device", "audio_token_map", "max_new_tokens"):
        values = {json.dumps(p.provenance.get(key)) for p in profiles}
        provenance[key] = first.provenance.get(key) if len(values) == 1 else "mixed"
    provenance.update(
        data=data,
        data_digest=data_digest([tuple(entry) for entry in data]),
        merged_from=[p.provenance.get("data_digest") for p in profiles],
        audiokv_version=audiokv_version(),
        created=utc_now(),
    )
    # The sensitivity tables present are combined (a distributed run measures one, on rank 0); a single one is
    # taken as it is, so the merge writes the table bit for bit.
    measured = [p.sensitivity for p in profiles if p.sensitivity is not None]
    sensitivity = measured[0] if len(measured) == 1 else None
    if len(measured) > 1:
        try:
            sensitivity = HeadSensitivity.combined(measured)
        except AudiokvError:
            logger.warning("the profiles' sensitivity tables were measured at different strengths; the merge has none")
    return HeadProfile(stats, dict(first.fingerprint), provenance, sensitivity=sensitivity)


# ------------------------------------------------------------------------------------------------------- discovery


def default_profile_dirs() -> list[Path]:
    """Where ``find_profile`` looks without a folder: ./profiles, the source checkout's profiles/, bundled ones."""
    package = Path(__file__).resolve().parent.parent
    candidates = [Path.cwd() / "profiles", package.parent / "profiles", package / "assets" / "profiles"]
    unique: list[Path] = []
    for candidate in candidates:
        if candidate.is_dir() and candidate.resolve() not in [u.resolve() for u in unique]:
            unique.append(candidate)
    return unique


def _candidates(directories: Iterable[Path]) -> Iterable[Path]:
    for directory in directories:
        for path in sorted(Path(directory).rglob(f"*{PROFILE_SUFFIX}")):
            if not path.name.endswith(PARTIAL_TAG + PROFILE_SUFFIX):
                yield path


def find_profile(adapter, profiles_dir: str | os.PathLike | None = None, defaults: bool = True) -> Path | None:
    """The best profile for ``adapter`` in ``profiles_dir`` (then the default folders unless ``defaults`` is False): a
    full fingerprint match first, else one with the same architecture; the one with most scored steps wins a tie.
    None if there is none."""
    expected = adapter.fingerprint()
    directories = ([Path(profiles_dir)] if profiles_dir is not None else []) + (default_profile_dirs() if defaults else [])
    best: tuple[tuple[int, int], Path] | None = None
    for path in _candidates(d for d in directories if Path(d).is_dir()):
        try:
            meta = read_metadata(path)
        except ProfileError:
            continue
        arch, _ = fingerprint_differences(meta["fingerprint"], expected)
        if arch:
            continue
        rank = (1 if same_checkpoint(meta["fingerprint"], expected) else 0, int(meta["provenance"].get("scored_steps", 0)))
        if best is None or rank > best[0]:
            best = (rank, path)
    return best[1] if best else None


def missing_profile_message(adapter, searched: Sequence[Path]) -> str:
    where = ", ".join(str(p) for p in searched) or "profiles/"
    stem = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in str(adapter.name)).strip("-") or "model"
    return f"no head profile for {adapter.name} in {where}; " + HOW_TO_MAKE.format(model=adapter.name, stem=stem)


def require_profile(adapter, profiles_dir: str | os.PathLike | None = None) -> Path:
    """Like ``find_profile`` but raises a ProfileError that says how to make a profile."""
    found = find_profile(adapter, profiles_dir)
    if found is None:
        searched = ([Path(profiles_dir)] if profiles_dir is not None else []) + default_profile_dirs()
        raise ProfileError(missing_profile_message(adapter, searched))
    return found


def load_head_scores(path: str | os.PathLike, adapter, allow_mismatch: bool = False) -> torch.Tensor:
    """Head scores S(l, h) as float32 [layers, query_heads] for the budget allocator, validated for ``adapter``
    (another checkpoint's profile only with ``allow_mismatch``)."""
    return load_budget_inputs(path, adapter, allow_mismatch)[0]


def load_budget_inputs(
    path: str | os.PathLike, adapter, allow_mismatch: bool = False
) -> tuple[torch.Tensor, HeadSensitivity | None]:
    """What the profile budget reads, validated for ``adapter``: head scores S(l, h) as float32
    [layers, query_heads], and the sensitivity table when the profile has one."""
    profile = load_profile(path, expect_fingerprint=adapter.fingerprint(), allow_mismatch=allow_mismatch)
    return profile.score.to(torch.float32), profile.sensitivity
