"""Speech synthesis with every English engine on the machine, voice settings split into train / held-out, and
augmentation (tempo, pitch, noise, reverb, band limits) for training clips.

Engines: espeak-ng (many accents x voice variants, free rate and pitch), flite (CMU voices), festival (diphone and
HTS voices). Held-out voices never appear in training: whole espeak accents and variants, one flite voice and one
festival voice are reserved (``HELDOUT_*``), so evaluation measures speakers the model has not heard.
"""

from __future__ import annotations

import random
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16000
MAX_SECONDS = 30.0

ESPEAK_BASES = (
    "en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-us-nyc", "en-gb-x-gbcwmd", "en-029",
)
ESPEAK_VARIANTS = (
    "", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2", "klatt3",
    "klatt4", "Alex", "Andy", "Annie", "Michael", "Mike", "Storm", "adam", "anika", "aunty", "belinda", "benjamin",
    "caleb", "david", "ed", "edward", "grandma", "grandpa", "john", "linda", "max", "norbert", "paul", "quincy",
    "rob", "robert", "shelby", "steph", "travis", "victor", "zac", "croak", "Lee", "Jacky", "Gene",
)
HELDOUT_ESPEAK_BASES = ("en-gb-x-gbcwmd", "en-029")
HELDOUT_ESPEAK_VARIANTS = ("m6", "f4", "Annie", "klatt3", "grandma", "travis", "Gene")
FLITE_VOICES = ("kal", "kal16", "awb", "rms", "slt")
HELDOUT_FLITE_VOICES = ("rms",)
FESTIVAL_VOICES = ("voice_kal_diphone", "voice_ked_diphone", "voice_cmu_us_slt_arctic_hts")
HELDOUT_FESTIVAL_VOICES = ("voice_ked_diphone",)


@dataclass(frozen=True)
class VoiceSetting:
    engine: str  # espeak | flite | festival
    voice: str
    rate: float  # espeak: words per minute; flite/festival: duration stretch factor (>1 = slower)
    pitch: int  # espeak pitch 0-99; flite target f0 (Hz, 0 = voice default); unused by festival

    def describe(self) -> dict:
        return asdict(self)


def is_heldout_voice(setting: VoiceSetting) -> bool:
    if setting.engine == "espeak":
        base, _, variant = setting.voice.partition("+")
        return base in HELDOUT_ESPEAK_BASES or variant in HELDOUT_ESPEAK_VARIANTS
    if setting.engine == "flite":
        return setting.voice in HELDOUT_FLITE_VOICES
    return setting.voice in HELDOUT_FESTIVAL_VOICES


def sample_voice(rng: random.Random, heldout: bool, engine_weights=(0.7, 0.2, 0.1)) -> VoiceSetting:
    """A random voice setting from the requested side of the split."""
    while True:
        engine = rng.choices(("espeak", "flite", "festival"), weights=engine_weights)[0]
        if engine == "espeak":
            base, variant = rng.choice(ESPEAK_BASES), rng.choice(ESPEAK_VARIANTS)
            voice = base + (f"+{variant}" if variant else "")
            setting = VoiceSetting("espeak", voice, float(rng.randint(125, 215)), rng.randint(15, 85))
        elif engine == "flite":
            f0 = rng.choice((0, 0, rng.randint(85, 190)))
            setting = VoiceSetting("flite", rng.choice(FLITE_VOICES), round(rng.uniform(0.8, 1.3), 2), f0)
        else:
            setting = VoiceSetting("festival", rng.choice(FESTIVAL_VOICES), round(rng.uniform(0.85, 1.25), 2), 0)
        if is_heldout_voice(setting) == heldout:
            return setting


def _read_resampled(path: Path, tmp: Path) -> np.ndarray:
    out = tmp / "resampled.wav"
    subprocess.run(["sox", "-V1", str(path), "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", str(out)], check=True)
    audio, _ = sf.read(out, dtype="float32")
    return audio


def synthesize(text: str, setting: VoiceSetting) -> np.ndarray:
    """float32 mono 16 kHz audio of ``text`` spoken with ``setting``."""
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        raw = tmp / "raw.wav"
        if setting.engine == "espeak":
            cmd = ["espeak-ng", "-v", setting.voice, "-s", str(int(setting.rate)), "-p", str(setting.pitch),
                   "-w", str(raw), text]
        elif setting.engine == "flite":
            cmd = ["flite", "-voice", setting.voice, "--setf", f"duration_stretch={setting.rate}"]
            if setting.pitch:
                cmd += ["--setf", f"int_f0_target_mean={setting.pitch}"]
            cmd += ["-t", text, "-o", str(raw)]
        else:
            (tmp / "text.txt").write_text(text)
            cmd = ["text2wave", "-eval", f"({setting.voice})", "-eval",
                   f"(Parameter.set 'Duration_Stretch {setting.rate})", str(tmp / "text.txt"), "-o", str(raw)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        audio = _read_resampled(raw, tmp)
    return _trim_silence(audio)


def _trim_silence(audio: np.ndarray, keep: float = 0.15) -> np.ndarray:
    """Cut long leading/trailing silence but keep a short natural margin."""
    loud = np.flatnonzero(np.abs(audio) > 0.01)
    if loud.size == 0:
        return audio
    pad = int(keep * SAMPLE_RATE)
    return audio[max(0, loud[0] - pad) : loud[-1] + pad]


def augment(audio: np.ndarray, rng: random.Random) -> tuple[np.ndarray, list[str]]:
    """Random acoustic perturbations (training only). Returns the audio and the names of the effects applied."""
    effects: list[str] = []
    sox_effects: list[str] = []
    if rng.random() < 0.3:
        tempo = round(rng.uniform(0.88, 1.15), 3)
        if len(audio) / SAMPLE_RATE / tempo < MAX_SECONDS - 0.3:
            sox_effects += ["tempo", "-s", str(tempo)]
            effects.append(f"tempo{tempo}")
    if rng.random() < 0.25:
        cents = rng.randint(-300, 300)
        sox_effects += ["pitch", str(cents)]
        effects.append(f"pitch{cents}")
    if rng.random() < 0.25:
        reverb = rng.randint(15, 70)
        sox_effects += ["reverb", str(reverb), "50", str(rng.randint(30, 100))]
        effects.append(f"reverb{reverb}")
    if rng.random() < 0.15:
        sox_effects += ["sinc", f"{rng.randint(200, 400)}-{rng.randint(3000, 4000)}"]
        effects.append("band")
    if sox_effects:
        with tempfile.TemporaryDirectory() as tmp_name:
            src, dst = Path(tmp_name) / "in.wav", Path(tmp_name) / "out.wav"
            sf.write(src, audio, SAMPLE_RATE, subtype="FLOAT")
            subprocess.run(["sox", "-V1", str(src), "-b", "16", str(dst), *sox_effects, "channels", "1"], check=True)
            audio, _ = sf.read(dst, dtype="float32")
            audio = audio[: int(MAX_SECONDS * SAMPLE_RATE)]
    if rng.random() < 0.35:
        snr_db = rng.uniform(8, 35)
        nprng = np.random.default_rng(rng.randrange(2**32))
        noise = nprng.standard_normal(len(audio)).astype(np.float32)
        if rng.random() < 0.5:  # brown-ish noise: integrate and normalize
            noise = np.cumsum(noise)
            noise -= np.convolve(noise, np.ones(801) / 801, mode="same")
        power = float(np.mean(audio**2)) + 1e-9
        noise *= np.sqrt(power / (10 ** (snr_db / 10)) / (float(np.mean(noise**2)) + 1e-9))
        audio = audio + noise
        effects.append(f"noise{snr_db:.0f}dB")
    gain = rng.uniform(0.3, 1.0) / max(1e-4, float(np.abs(audio).max()))
    return (audio * gain).astype(np.float32), effects
