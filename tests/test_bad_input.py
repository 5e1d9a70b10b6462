"""Bad input, every command: one clear line, a non-zero exit, no traceback, no half-written output and earlier
outputs intact. The cases are listed (with what each prints) in docs/reliability.md."""

from __future__ import annotations

import errno
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import soundfile
from typer.testing import CliRunner

from audiokv_cli.io import files
from audiokv_cli.cli import app
from audiokv_cli.profiling.profile_file import save_profile
from tests.conftest import write_tone
from tests.test_profile_file import FINGERPRINT, make_profile

EARLIER = b"earlier output, must survive\n"


@dataclass
class Case:
    args: Callable[["Inputs"], list]
    says: str  # a fragment of the one error line
    earlier: Callable[["Inputs"], Path] | None = None  # an existing output file the failed run must leave as it was
    patch: str | None = None  # "enospc", "interrupt-infer", "interrupt-eval", "interrupt-profile"
    exit_code: int = 1
    marks: list = field(default_factory=list)


class Inputs:
    """Every bad (and good) input file the cases need, built once per session in one folder."""

    def __init__(self, root: Path, model: Path):
        self.root, self.model = root, model
        self.good = write_tone(root / "good.wav", seconds=2.0)
        self.empty = root / "empty.wav"
        self.empty.write_bytes(b"")
        self.truncated = root / "truncated.wav"
        self.truncated.write_bytes(self.good.read_bytes()[:30])  # cut inside the header
        self.corrupt = root / "corrupt.wav"
        self.corrupt.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" + bytes(range(256)) * 8)
        self.text = root / "notes.wav"
        self.text.write_text("these are meeting notes, not audio\n")
        self.nan = root / "nan.wav"
        data = np.zeros(16000, dtype=np.float32)
        data[100] = np.nan
        soundfile.write(str(self.nan), data, 16000, subtype="FLOAT")
        self.silent = root / "silent.wav"
        soundfile.write(str(self.silent), np.zeros(16000, dtype=np.float32), 16000)
        self.long = write_tone(root / "long.wav", seconds=31.0)
        self.folder = root / "folder.wav"
        self.folder.mkdir()
        # profiles: one good, then damaged ones
        self.profile = save_profile(make_profile(), root / "good-profile")
        self.profile_b = save_profile(make_profile(seed=1, clip_ids=("c", "d")), root / "other-clips")
        raw = self.profile.read_bytes()
        self.profile_corrupt = root / "corrupt.safetensors"
        self.profile_corrupt.write_bytes(b"\x00" * 64)
        self.profile_truncated = root / "truncated.safetensors"
        self.profile_truncated.write_bytes(raw[: len(raw) // 2])
        self.profile_other = save_profile(make_profile(fingerprint={**FINGERPRINT, "num_layers": 3}), root / "other")
        self.profile_nan = self._tampered("nan", lambda t: t["audio_mass"].fill_(float("nan")))
        self.profile_negative = self._tampered("negative", lambda t: t["steps"].fill_(-3))
        # manifests for eval (and profile)
        self.manifests = {}
        good = {"audio": str(self.good), "text": "a tone"}
        self._manifest("bad-json", json.dumps(good) + "\n{not json\n")
        self._manifest("wrong-types", json.dumps({"audio": str(self.good), "text": 5}) + "\n")
        self._manifest("empty-text", json.dumps({"audio": str(self.good), "text": "  "}) + "\n")
        self._manifest("missing-audio", json.dumps({"audio": str(root / "gone.wav"), "text": "a"}) + "\n")
        self._manifest("duplicate-ids", "".join(json.dumps({**good, "id": "x"}) + "\n" for _ in range(2)))
        self._manifest("empty", "\n")
        self._manifest("not-an-object", "[1, 2]\n")
        self._manifest("bad-audio", json.dumps({"audio": str(self.corrupt), "text": "a"}) + "\n")
        (root / "latin1.jsonl").write_bytes(('{"audio": "%s", "text": "caf\xe9"}\n' % self.good).encode("latin-1"))
        self.manifests["non-utf8"] = root / "latin1.jsonl"
        self.manifests["good"] = self._manifest("good", json.dumps(good) + "\n")

    def _tampered(self, name: str, change) -> Path:
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(self.profile), framework="pt") as handle:
            metadata = handle.metadata()
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        change(tensors)
        path = self.root / f"{name}.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        return path

    def _manifest(self, name: str, text: str) -> Path:
        path = self.root / f"{name}.jsonl"
        path.write_text(text)
        self.manifests[name] = path
        return path

    def earlier(self, name: str) -> Path:
        """An output from an earlier run, in a folder of its own."""
        folder = self.root / "outputs" / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def _earlier_file(path_of: Callable[[Inputs], Path]) -> Callable[[Inputs], Path]:
    return path_of


def infer(i: Inputs, clip, *more):
    return ["infer", clip, "--model", i.model, "--max-new-tokens", 2, *more]


def audiokv_infer(i: Inputs, profile):
    return infer(i, i.good, "--method", "audiokv", "--retention", "0.5", "--profile", profile)


def evaluate(i: Inputs, data, *more, out=None):
    return ["eval", "--data", data, "--model", i.model, "--methods", "full,snapkv", "--retention", "0.5",
            "--max-new-tokens", 2, "--out", out or i.root / "eval-out", *more]


def profile(i: Inputs, data, *more, out=None):
    return ["profile", "--model", i.model, "--data", data, "--out", out or i.root / "new-profile", "--aligner", "none",
            "--max-new-tokens", 2, *more]


CASES: dict[str, Case] = {
    # ---- audio, through infer
    "audio missing": Case(lambda i: infer(i, i.root / "absent.wav"), "no such file"),
    "audio empty": Case(lambda i: infer(i, i.empty), "empty file"),
    "audio truncated": Case(lambda i: infer(i, i.truncated), "not a readable audio file"),
    "audio corrupt": Case(lambda i: infer(i, i.corrupt), "not a readable audio file"),
    "audio not audio": Case(lambda i: infer(i, i.text), "not a readable audio file"),
    "audio NaN": Case(lambda i: infer(i, i.nan), "NaN"),
    "audio all-zero": Case(lambda i: infer(i, i.silent), "silent"),
    "audio too long": Case(lambda i: infer(i, i.long, "--max-seconds", "30"), "longer than this model's limit"),
    "audio a directory": Case(lambda i: infer(i, i.folder), "is a directory"),
    "audio one bad among good": Case(lambda i: infer(i, i.good, i.corrupt), "corrupt.wav"),
    # ---- options
    "infer retention 0": Case(lambda i: infer(i, i.good, "--retention", "0"), "--retention must be in (0, 1]"),
    "infer retention 1.5": Case(lambda i: infer(i, i.good, "--retention", "1.5"), "--retention must be in (0, 1]"),
    "infer sss-alpha 2": Case(lambda i: infer(i, i.good, "--sss-alpha", "2"), "--sss-alpha must be in [0, 1]"),
    "infer sss-rho 0": Case(lambda i: infer(i, i.good, "--sss-rho", "0"), "--sss-rho must be in (0, 1]"),
    "infer unknown method": Case(lambda i: infer(i, i.good, "--method", "magic"), "magic"),
    "infer unknown smoother": Case(lambda i: infer(i, i.good, "--method", "snapkv", "--smoother", "blur"), "blur"),
    "infer max-new-tokens 0": Case(lambda i: infer(i, i.good, "--max-new-tokens", "0"), "--max-new-tokens", exit_code=2),
    "infer stream with json": Case(lambda i: infer(i, i.good, "--stream", "--json"), "--stream"),
    "infer model missing": Case(lambda i: ["infer", i.good, "--model", i.root / "no-model"], "no-model"),
    # ---- profiles given to infer, inspect and merge
    "profile missing": Case(lambda i: audiokv_infer(i, i.root / "absent.safetensors"), "no such profile file"),
    "profile corrupt": Case(lambda i: audiokv_infer(i, i.profile_corrupt), "corrupt.safetensors"),
    "profile truncated": Case(lambda i: audiokv_infer(i, i.profile_truncated), "truncated.safetensors"),
    "profile other model": Case(lambda i: audiokv_infer(i, i.profile_other), "other.safetensors"),
    "profile NaN scores": Case(lambda i: audiokv_infer(i, i.profile_nan), "NaN"),
    "profile negative counts": Case(lambda i: audiokv_infer(i, i.profile_negative), "negative"),
    "inspect corrupt": Case(lambda i: ["inspect", i.profile_corrupt], "corrupt.safetensors"),
    "inspect truncated": Case(lambda i: ["inspect", i.profile_truncated], "truncated.safetensors"),
    "inspect NaN": Case(lambda i: ["inspect", i.profile_nan], "NaN"),
    "inspect negative": Case(lambda i: ["inspect", i.profile_negative], "negative"),
    "inspect png unwritable": Case(lambda i: ["inspect", i.profile, "--png", i.good / "heat.png"], "cannot write"),
    "merge one profile": Case(lambda i: ["merge", i.profile, "--out", i.root / "m"], "at least two"),
    "merge corrupt": Case(lambda i: ["merge", i.profile, i.profile_corrupt, "--out", i.earlier("mc") / "m"],
                          "corrupt.safetensors", earlier=lambda i: i.earlier("mc") / "m.safetensors"),
    "merge other model": Case(lambda i: ["merge", i.profile, i.profile_other, "--out", i.earlier("mo") / "m"],
                              "fingerprint", earlier=lambda i: i.earlier("mo") / "m.safetensors"),
    "merge full disk": Case(lambda i: ["merge", i.profile, i.profile_b, "--out", i.earlier("mf") / "m"],
                            "No space left on device", earlier=lambda i: i.earlier("mf") / "m.safetensors",
                            patch="enospc"),
    "merge out under a file": Case(lambda i: ["merge", i.profile, i.profile_b, "--out", i.good / "m"], "good.wav"),
    # ---- manifests, through eval
    "eval data missing": Case(lambda i: evaluate(i, i.root / "absent.jsonl"), "absent.jsonl"),
    "eval bad JSON line": Case(lambda i: evaluate(i, i.manifests["bad-json"]), "malformed JSON"),
    "eval wrong field type": Case(lambda i: evaluate(i, i.manifests["wrong-types"]), '"text" string'),
    "eval empty text": Case(lambda i: evaluate(i, i.manifests["empty-text"]), "empty"),
    "eval non-UTF-8": Case(lambda i: evaluate(i, i.manifests["non-utf8"]), "UTF-8"),
    "eval duplicate ids": Case(lambda i: evaluate(i, i.manifests["duplicate-ids"]), "duplicate id"),
    "eval missing audio file": Case(lambda i: evaluate(i, i.manifests["missing-audio"]), "does not exist"),
    "eval empty manifest": Case(lambda i: evaluate(i, i.manifests["empty"]), "empty.jsonl"),
    "eval line not an object": Case(lambda i: evaluate(i, i.manifests["not-an-object"]), "JSON object"),
    "eval corrupt audio in manifest": Case(lambda i: evaluate(i, i.manifests["bad-audio"], out=i.earlier("ea")),
                                           "corrupt.wav", earlier=lambda i: i.earlier("ea") / "summary.json"),
    "eval retention 0": Case(lambda i: evaluate(i, i.manifests["good"], "--retention", "0"), "retention"),
    "eval unknown method": Case(lambda i: evaluate(i, i.manifests["good"], "--methods", "full,magic"), "magic"),
    "eval unknown scope": Case(lambda i: evaluate(i, i.manifests["good"], "--scope", "video"), "video"),
    "eval out is a file": Case(lambda i: evaluate(i, i.manifests["good"], out=i.good), "not a directory"),
    "eval full disk": Case(lambda i: evaluate(i, i.manifests["good"], out=i.earlier("ef")), "No space left on device",
                           earlier=lambda i: i.earlier("ef") / "summary.json", patch="enospc"),
    "eval Ctrl-C": Case(lambda i: evaluate(i, i.manifests["good"], out=i.earlier("ei")), "interrupted",
                        earlier=lambda i: i.earlier("ei") / "summary.json", patch="interrupt-eval", exit_code=130),
    # ---- manifests and options, through profile
    "profile bad JSON line": Case(lambda i: profile(i, i.manifests["bad-json"]), "not valid JSON"),
    "profile missing audio file": Case(lambda i: profile(i, i.manifests["missing-audio"]), "gone.wav"),
    "profile non-UTF-8": Case(lambda i: profile(i, i.manifests["non-utf8"]), "UTF-8"),
    "profile duplicate ids": Case(lambda i: profile(i, i.manifests["duplicate-ids"]), "duplicate"),
    "profile wrong field type": Case(lambda i: profile(i, i.manifests["wrong-types"]), "text"),
    "profile top-k 0": Case(lambda i: profile(i, i.manifests["good"], "--top-k", "0"), "top"),
    "profile min-confidence 2": Case(lambda i: profile(i, i.manifests["good"], "--min-confidence", "2"), "confidence"),
    "profile unknown aligner": Case(lambda i: profile(i, i.manifests["good"], "--aligner", "magic"), "magic"),
    "profile corrupt audio": Case(lambda i: profile(i, i.manifests["bad-audio"], out=i.earlier("pa") / "p"),
                                  "corrupt.wav", earlier=lambda i: i.earlier("pa") / "p.safetensors"),
    "profile full disk": Case(lambda i: profile(i, i.manifests["good"], out=i.earlier("pf") / "p"),
                              "No space left on device", earlier=lambda i: i.earlier("pf") / "p.safetensors",
                              patch="enospc"),
    "profile Ctrl-C": Case(lambda i: profile(i, i.manifests["good"], out=i.earlier("pi") / "p"), "interrupted",
                           earlier=lambda i: i.earlier("pi") / "p.safetensors", patch="interrupt-profile",
                           exit_code=130),
    # ---- probe-set
    "probe-set n 0": Case(lambda i: ["probe-set", "--out", i.root / "probes", "--n", "0"], "--n", exit_code=2),
    "probe-set min > max words": Case(lambda i: ["probe-set", "--out", i.root / "probes", "--min-words", "5",
                                                 "--max-words", "2"], "words"),
    "probe-set out is a file": Case(lambda i: ["probe-set", "--out", i.good, "--n", "1"], "good.wav"),
    # ---- bench
    "bench retention 0": Case(lambda i: ["bench", "--model", i.model, "--retention", "0"], "--retention"),
    "bench seconds 0": Case(lambda i: ["bench", "--model", i.model, "--seconds", "0"], "--seconds"),
    "bench unknown method": Case(lambda i: ["bench", "--model", i.model, "--methods", "magic"], "magic"),
    "bench corrupt profile": Case(lambda i: ["bench", "--model", i.model, "--methods", "audiokv", "--seconds", "1",
                                             "--profile", i.profile_corrupt], "corrupt.safetensors"),
    # ---- Ctrl-C during inference
    "infer Ctrl-C": Case(lambda i: infer(i, i.good), "interrupted", patch="interrupt-infer", exit_code=130),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, random_model_dir):
    return Inputs(tmp_path_factory.mktemp("bad-input"), random_model_dir)


def _apply(patch: str | None, monkeypatch) -> None:
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    def full_disk(handle, data):
        handle.write(data[: len(data) // 2])  # part of the bytes made it, as on a real full disk
        raise OSError(errno.ENOSPC, "No space left on device")

    if patch == "enospc":
        monkeypatch.setattr(files, "_write", full_disk)
    elif patch == "interrupt-infer":
        monkeypatch.setattr("audiokv_cli.runtime.runner.decode_rows", interrupt)
    elif patch == "interrupt-eval":
        monkeypatch.setattr("audiokv_cli.evaluation.sweep.run_cell", interrupt)
    elif patch == "interrupt-profile":
        monkeypatch.setattr("audiokv_cli.profiling.runner.profile_clip", interrupt)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, inputs, monkeypatch):
    case = CASES[name]
    if case.earlier is not None:
        earlier = case.earlier(inputs)
        earlier.write_bytes(EARLIER)
    before = _snapshot(inputs.root)
    _apply(case.patch, monkeypatch)
    result = CliRunner().invoke(app, [str(a) for a in case.args(inputs)])
    output = result.output
    assert result.exit_code == case.exit_code, output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in output
    errors = [line for line in result.stderr.splitlines() if line.startswith(("error:", "interrupted"))]
    assert len(errors) == 1, result.stderr
    assert case.says in errors[0], errors[0]
    if case.exit_code == 2:  # an option value click refuses: the same one line, no usage box
        assert "Invalid value" in errors[0] and "Usage:" not in result.stderr, result.stderr
    after = _snapshot(inputs.root)
    # nothing written, nothing changed: no partial file, no temporary left, earlier outputs intact
    assert after == before, sorted(set(after) ^ set(before)) or "a file changed"


@pytest.mark.parametrize(
    "name, rate, channels, fmt",
    [("8 kHz", 8000, 1, "WAV"), ("44.1 kHz stereo", 44100, 2, "WAV"), ("flac", 16000, 1, "FLAC"),
     ("ogg", 16000, 1, "OGG"), ("mp3", 16000, 1, "MP3")],
)
def test_unusual_but_valid_audio_is_accepted(name, rate, channels, fmt, random_model_dir, tmp_path):
    # Not bad input: resampled to 16 kHz mono and transcribed (the duration survives the conversion).
    t = np.arange(2 * rate) / rate
    wave = (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    path = tmp_path / f"clip.{fmt.lower()}"
    soundfile.write(str(path), np.stack([wave] * channels, axis=1) if channels > 1 else wave, rate, format=fmt)
    result = CliRunner().invoke(app, ["infer", str(path), "--model", str(random_model_dir), "--max-new-tokens", "2",
                                      "--json"])
    assert result.exit_code == 0, result.output
    assert abs(json.loads(result.stdout.splitlines()[-1])["audio_seconds"] - 2.0) < 0.1
