"""Running as one of several processes started by torchrun (or `accelerate launch`): ranks, shards, hand-over.

The launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) says who this process is. Clips are
dealt round-robin by rank; each rank writes its part atomically under the output; every rank reports success or its
error line to all others (so one failing rank stops the rest instead of leaving them waiting); rank 0 then merges
the parts into exactly what one process writes. Multi-node is the same with torchrun's rendezvous.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Sequence, TypeVar

from audiokv_cli.errors import AudiokvError

T = TypeVar("T")
# A rank waits this long for the others at a hand-over (a slow rank profiling a 7B model can take hours).
HANDOVER_TIMEOUT = timedelta(hours=24)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # ranks on this node (torchrun's LOCAL_WORLD_SIZE)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share: items rank, rank + world, ... (the same dealing as `eval --workers`)."""
        return list(items[self.rank :: self.world])

    def part_name(self, stem: str) -> str:
        return f"{stem}.rank{self.rank}-of-{self.world}"


def current_ranks() -> Ranks:
    """From the launcher's environment; a plain run is rank 0 of 1."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError:
        raise AudiokvError("RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers (set by torchrun)") from None
    if world < 1 or not 0 <= rank < world:
        raise AudiokvError(f"RANK {rank} is outside WORLD_SIZE {world}")
    return Ranks(rank, world, local, max(1, local_world))


def rank_gpus(ranks: Ranks, gpu_count: int) -> list[int]:
    """The GPUs of this node that this rank's model may spread over (``--device-map``): the node's GPUs dealt in
    contiguous groups, one group per local rank (4 GPUs, 2 ranks: [0, 1] and [2, 3]); all of them for a lone rank."""
    if ranks.local_world <= 1:
        return list(range(gpu_count))
    if gpu_count < ranks.local_world:
        raise AudiokvError(
            f"--device-map with {ranks.local_world} ranks on a node of {gpu_count} GPUs: each rank needs at least "
            "one GPU (start fewer ranks per node)"
        )
    per_rank = gpu_count // ranks.local_world
    return list(range(ranks.local_rank * per_rank, (ranks.local_rank + 1) * per_rank))


def join(ranks: Ranks, device: str) -> None:
    """Join torch.distributed when several ranks run (idempotent; left at exit). On GPUs each rank takes the GPU of
    its LOCAL_RANK first, so `--device cuda` means this rank's GPU."""
    if not ranks.distributed:
        return
    import atexit

    import torch
    import torch.distributed as dist

    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(ranks.local_rank % torch.cuda.device_count())
    if dist.is_initialized():
        return
    # The hand-over carries small pickled objects, which gloo does on CPU and GPU machines alike.
    dist.init_process_group(backend="gloo", rank=ranks.rank, world_size=ranks.world, timeout=HANDOVER_TIMEOUT)
    atexit.register(dist.destroy_process_group)


def agree(ranks: Ranks, error: str | None) -> None:
    """Hand-over point: every rank says whether its part succeeded. Raises (on every rank) the first rank's error."""
    if not ranks.distributed:
        if error is not None:
            raise AudiokvError(error)
        return
    import torch.distributed as dist

    statuses: list = [None] * ranks.world
    dist.all_gather_object(statuses, error)
    for rank, status in enumerate(statuses):
        if status is not None:
            raise AudiokvError(status if rank == ranks.rank else f"rank {rank}: {status}")


@contextmanager
def rank_part(ranks: Ranks) -> Iterator[None]:
    """Run this rank's part; its error (or success) is shared with every rank at the end of the block, so no rank
    waits for one that failed. The failing rank raises its own error, the others name the rank."""
    if not ranks.distributed:
        yield
        return
    try:
        yield
    except Exception as failure:
        message = str(failure) if isinstance(failure, AudiokvError) else f"{type(failure).__name__}: {failure}"
        try:
            agree(ranks, message)
        except AudiokvError:
            raise failure from None
    else:
        agree(ranks, None)
