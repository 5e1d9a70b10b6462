"""Long development recordings for the Whisper long-form path (docs/results.md, "Long-form Whisper").

Speech is espeak-ng (several voices and speeds) reading plain narrative sentences, one clip per sentence (each
well under 30 s), plus the real recordings in examples/. The clips are joined with pauses of 0.4-1.6 s into one
long file; the same clips stay as a JSONL manifest, so the long file's WER can be compared with the clips
transcribed one by one. `--repeat N` writes the long file N times over (a 60-minute file from a 5-minute one, for
memory measurements).

    python scripts/longform/build_long.py --out .build/longform --minutes 5
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile

SENTENCES = """The old lighthouse keeper climbed the stairs every evening to light the lamp.
He had done this for forty years, and he had never missed a single night.
One winter the storms came early and the sea turned grey and wild.
A small fishing boat was caught far from the harbour when the wind rose.
The keeper saw its lantern swinging between the waves.
He rang the bell in the tower so that the sailors would know where the rocks were.
The boat turned slowly toward the sound and found the calm water behind the point.
In the morning the fishermen walked up the hill to thank him.
They brought bread, cheese and a basket of apples from the village.
The keeper smiled and said that the bell had done most of the work.
Every spring the children of the village planted flowers along the road to the school.
The teacher gave each child a small packet of seeds and a wooden marker.
Some of the seeds grew quickly, and some did not grow at all.
A boy named Peter watered his patch every day, but nothing came up.
He was sad, because the other children already had green shoots.
After three weeks a tiny leaf finally pushed through the soil.
By the summer his sunflower was taller than the classroom window.
The market opens at seven o'clock on Saturday mornings.
Farmers arrive before sunrise to set up their tables and awnings.
There are potatoes, carrots, onions and fresh eggs from the hills.
A woman sells honey in glass jars with hand written labels.
The baker always runs out of rye bread before nine.
People come early to buy the best fruit and to talk with their neighbours.
The river behind the mill was once used to turn a great wooden wheel.
Today the mill is a museum, and the wheel turns only for visitors.
A guide explains how the grain was ground into flour between two heavy stones.
Visitors can buy a small bag of flour as a souvenir.
The train to the coast leaves from the second platform every hour.
It passes through forests, small towns and long fields of wheat.
Near the end of the journey the tracks run right beside the sea.
Many passengers stand up to look at the boats in the bay.
My grandmother kept a notebook of recipes that she had collected for fifty years.
Some pages were stained with butter, and some had notes in the margins.
Her apple cake was the most famous recipe in the family.
She always said that the secret was to use apples that were a little sour.
We still bake it every autumn when the first apples fall from the tree.
The library was quiet except for the ticking of a large clock on the wall.
A student sat near the window reading a book about the history of ships.
Outside, the rain tapped gently against the glass.
The librarian walked between the shelves, putting returned books back in their places.
When the clock struck five, the lights flickered and the library began to close.
The mountain path is steep, but the view from the top is worth the climb.
Hikers should carry water, a warm jacket and a map of the trails.
The weather can change quickly, even on a sunny afternoon.
At the summit there is a small stone hut where travellers can rest.
From there you can see three lakes and the roofs of the village far below.
The concert began with a slow piece for violin and piano.
The audience listened in silence as the music filled the hall.
When the last note faded, everyone stood up and applauded.
The musicians bowed and then played one more short song.
A fox lived at the edge of the forest near a large farm.
Every night it watched the chickens from behind the fence.
The farmer built the fence higher, but the fox was patient.
One night the gate was left open, and the fox walked right in.
The dog woke up and barked so loudly that the fox ran back into the trees.
Since then the farmer checks the gate twice before he goes to bed.""".split("\n")

VOICES = [("en-us", 160), ("en-gb", 150), ("en-us+m3", 170), ("en+f2", 155), ("en-gb-x-rp", 145)]


def speak(text: str, voice: str, speed: int, work: Path) -> np.ndarray:
    wav = work / "s.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(wav), text], check=True)
    data, rate = soundfile.read(str(wav), dtype="float32")
    if rate != 16000:
        import librosa

        data = librosa.resample(data, orig_sr=rate, target_sr=16000)
    return data.astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(".build/longform"))
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=1, help="also write long-xN.wav: the long file N times over")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    out = args.out
    (out / "clips").mkdir(parents=True, exist_ok=True)
    pieces, rows, total = [], [], 0.0
    examples = sorted(Path("examples").glob("clip*.wav"))
    with tempfile.TemporaryDirectory() as work:
        index = 0
        while total < args.minutes * 60:
            if index % 20 == 19 and examples:  # a real recording now and then
                source = examples[(index // 20) % len(examples)]
                audio, _ = soundfile.read(str(source), dtype="float32")
                text = source.with_suffix(".txt").read_text().strip()
            else:
                text = SENTENCES[index % len(SENTENCES)]
                voice, speed = VOICES[(index // len(SENTENCES) + index) % len(VOICES)]
                audio = speak(text, voice, speed, Path(work))
            clip = out / "clips" / f"{index:04d}.wav"
            soundfile.write(str(clip), audio, 16000)
            rows.append({"audio": str(clip.resolve()), "text": text, "start": round(total, 3)})
            pause = np.zeros(int(rng.uniform(0.4, 1.6) * 16000), dtype=np.float32)
            pieces += [audio, pause]
            total += (audio.shape[0] + pause.shape[0]) / 16000
            index += 1
    long_audio = np.concatenate(pieces)
    soundfile.write(str(out / "long.wav"), long_audio, 16000)
    (out / "clips.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (out / "long.txt").write_text(" ".join(row["text"] for row in rows) + "\n")
    (out / "long.jsonl").write_text(json.dumps({"audio": str((out / "long.wav").resolve()), "text": " ".join(r["text"] for r in rows)}) + "\n")
    if args.repeat > 1:
        with soundfile.SoundFile(str(out / f"long-x{args.repeat}.wav"), "w", 16000, 1) as handle:
            for _ in range(args.repeat):
                handle.write(long_audio)
    print(f"{len(rows)} clips, {total / 60:.1f} minutes -> {out}")


if __name__ == "__main__":
    main()
