"""Synthesize sentences with a Piper voice; run by make_dev_sets.py in a subprocess whose PYTHONPATH holds piper-tts.

stdin: JSON {"model": path, "jobs": [{"text", "out", "length_scale", "noise_scale", "noise_w_scale"}]}.
Writes each job's sentence as a float32 16-bit PCM wav at the voice's own rate (22,050 Hz for joe-medium).
"""

from __future__ import annotations

import json
import sys
import wave

import numpy as np
from piper import PiperVoice, SynthesisConfig


def main() -> None:
    request = json.load(sys.stdin)
    voice = PiperVoice.load(request["model"])
    for job in request["jobs"]:
        config = SynthesisConfig(
            length_scale=job["length_scale"],
            noise_scale=job["noise_scale"],
            noise_w_scale=job["noise_w_scale"],
            normalize_audio=True,
        )
        chunks = list(voice.synthesize(job["text"], syn_config=config))
        audio = np.concatenate([chunk.audio_float_array for chunk in chunks])
        pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")
        with wave.open(job["out"], "wb") as handle:
            handle.setnchannels(1)
            handle.setsampwidth(2)
            handle.setframerate(chunks[0].sample_rate)
            handle.writeframes(pcm.tobytes())
        print(job["out"], flush=True)


if __name__ == "__main__":
    main()
