"""Peak RSS of reading a file window by window (longform.AudioStream), as the long-form path reads it.

    python scripts/longform/stream_rss.py FILE
"""

import resource
import sys

from audiokv_cli.runtime.longform import WINDOW_SAMPLES, AudioStream

stream = AudioStream(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
seek, windows = 0, 0
while True:
    window = stream.window(seek)
    if window.shape[0] == 0:
        break
    seek += 25 * 16000  # Whisper's seek usually moves a little less than a window
    windows += 1
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"{sys.argv[1]}: {stream.seconds / 60:.1f} min, {windows} windows, peak RSS {peak / 1024:.1f} MiB "
      f"(after imports {before / 1024:.1f} MiB)")
