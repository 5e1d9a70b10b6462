"""Streaming: generate in a streamer thread is still compressed; `infer --stream` prints the same line, token by token,
and stdout/stderr lines stay whole and in order."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from audiokv_cli.cli import app
from audiokv_cli.compat import cache_kwargs
from audiokv_cli.compression.methods import build_policy
from audiokv_cli.compression.policy import apply_policy
from audiokv_cli.runtime.streaming import TextStream
from tests.conftest import write_tone

ROOT = Path(__file__).resolve().parents[1]


def _clip(seconds=6.0):
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * (200 + 100 * t) * t)).astype(np.float32)


def _generate(adapter, prepared, policy, in_thread: bool):
    """model.generate under ``apply_policy``, in this thread or in a new one (as with a TextIteratorStreamer)."""
    from transformers import TextIteratorStreamer

    tokenizer = adapter.processor.tokenizer
    with apply_policy(policy, adapter, prepared) as session, torch.no_grad():
        kwargs = dict(**prepared.inputs, **cache_kwargs(adapter.model, session.cache), max_new_tokens=6, do_sample=False)
        if not in_thread:
            ids = adapter.model.generate(**kwargs)
            return ids[0, prepared.prompt_tokens :].tolist(), session
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
        out = {}
        worker = threading.Thread(target=lambda: out.setdefault("ids", adapter.model.generate(**kwargs, streamer=streamer)))
        worker.start()
        pieces = list(streamer)
        worker.join()
        assert pieces  # the streamer delivered text while generating
        return out["ids"][0, prepared.prompt_tokens :].tolist(), session


def test_generate_in_a_streamer_thread_is_compressed(random_adapter):
    prepared = random_adapter.prepare(_clip())
    policy = build_policy("snapkv", 0.4)
    same_ids, same = _generate(random_adapter, prepared, policy, in_thread=False)
    thread_ids, threaded = _generate(random_adapter, prepared, policy, in_thread=True)
    layers = range(random_adapter.geometry.num_layers)
    assert all(threaded.cache.is_compressed(i) for i in layers)
    assert threaded.kept_bytes() == same.kept_bytes() < prepared.prompt_tokens * random_adapter.geometry.kv_bytes_per_token(
        random_adapter.dtype
    )
    assert thread_ids == same_ids


def test_text_stream_writes_prefixes_then_the_whole_line():
    pieces = {1: "he", 2: "hel\ufffd", 3: "hello ", 4: "hello w"}
    out = io.StringIO()
    writes = []
    out.write = lambda text, _write=out.write: (writes.append(text), _write(text))[1]
    stream = TextStream(lambda ids: pieces[len(ids)].strip(), out)
    for n in range(1, 5):
        stream(list(range(n)))
    stream.finish("hello world")
    assert out.getvalue() == "hello world\n"
    assert writes == ["he", "llo", " w", "orld\n"]  # held back the half character, never rewrote shown text


def test_infer_stream_prints_the_same_text(random_model_dir, tmp_path):
    clip = write_tone(tmp_path / "clip.wav", seconds=4.0)
    args = ["infer", str(clip), "--model", str(random_model_dir), "--max-new-tokens", "8", "--method", "snapkv",
            "--retention", "0.5"]
    plain = CliRunner().invoke(app, args)
    streamed = CliRunner().invoke(app, args + ["--stream"])
    assert plain.exit_code == 0 and streamed.exit_code == 0, streamed.output
    assert streamed.stdout == plain.stdout and plain.stdout.strip()
    both = CliRunner().invoke(app, args + ["--stream", "--json"])
    assert both.exit_code == 1 and "--stream" in both.output


@pytest.mark.parametrize("stream", [False, True])
def test_lines_whole_and_in_order_on_one_pipe(stream):
    # stdout and stderr on one pipe, as on a terminal or in a log: every line whole, in program order.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "60"}
    command = [sys.executable, "-m", "audiokv_cli", "infer", str(ROOT / "examples/clip1.wav"), "--model", "tiny", "--method",
               "audiokv", "--retention", "0.7"] + (["--stream"] if stream else [])
    run = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                         timeout=300)
    assert run.returncode == 0, run.stdout
    lines = run.stdout.splitlines()
    transcript = " ".join((ROOT / "examples/clip1.txt").read_text().split()).lower()
    announce = "model: tiny, the bundled small Qwen2-Audio (pass --model qwen2-audio for the real 7B)"
    position = {
        "announce": lines.index(announce),
        "profile": next(i for i, line in enumerate(lines) if line.startswith("using head profile ")),
        "transcript": next(i for i, line in enumerate(lines) if line.strip(" .").lower() == transcript.strip(" .")),
        "summary": next(i for i, line in enumerate(lines) if line.startswith("model ") and line.split()[1] == "tiny"),
    }
    assert list(position.values()) == sorted(position.values()), lines
