"""Reading audio and writing outputs: `audio` (any file to 16 kHz mono float32, one-line errors for bad input),
`files` (atomic writes), `output_formats` (txt, json, srt, vtt)."""
