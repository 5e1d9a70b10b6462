"""`audiokv bench`: `model` times methods side by side on one prompt (bytes, speed, streams in a memory budget),
`kernels` times decode attention alone on real geometries, `memory` measures peak tensor and host memory."""
