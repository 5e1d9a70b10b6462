"""The example clips the README uses: real 16 kHz mono speech with transcripts, readable by the whole pipeline."""

import json
from pathlib import Path

import soundfile
from typer.testing import CliRunner

from audiokv_cli.io.audio import load_audio
from audiokv_cli.cli import app

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_examples_have_transcripts():
    clips = sorted(EXAMPLES.glob("*.wav"))
    assert 3 <= len(clips) <= 4
    for clip in clips:
        info = soundfile.info(str(clip))
        assert info.samplerate == 16000 and info.channels == 1
        assert 1.0 < info.duration < 10.0
        assert len(clip.with_suffix(".txt").read_text().split()) >= 4
        assert abs(load_audio(clip)).max() > 0.05  # speech, not silence


def test_readme_demo_runs_on_an_example(random_model_dir):
    clips = [str(p) for p in sorted(EXAMPLES.glob("*.wav"))]
    result = CliRunner().invoke(app, ["infer", *clips, "--model", str(random_model_dir), "--json",
                                      "--max-new-tokens", "4", "--method", "audiokv", "--retention", "0.5",
                                      "--profile", "missing.safetensors"])
    assert result.exit_code == 1 and "no such profile file" in result.output
    result = CliRunner().invoke(app, ["infer", *clips, "--model", str(random_model_dir), "--json",
                                      "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [Path(r["clip"]).name for r in records] == [Path(c).name for c in clips]
    assert all(r["audio_tokens"] > 50 for r in records)
