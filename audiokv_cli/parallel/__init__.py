"""Scaling out with torchrun: `ranks` (which rank does what, the hand-over between ranks), `rank_parts` (each rank's
partial results and their exact merge)."""
