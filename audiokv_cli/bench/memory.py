"""Peak memory where no allocator reports it: live tensor storage on CPU, and the process's peak host RAM.

CUDA has `torch.cuda.max_memory_allocated`; the CPU allocator keeps no such count, so `PeakTensorBytes` watches
every storage that a torch operation creates inside the block (a dispatch mode) and frees from the count when
Python drops it. Tensors that existed before the block (the weights) are not counted; scratch space that a fused
kernel allocates in C++ without a torch operation is not seen either.
"""

from __future__ import annotations

import resource
import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTensorBytes(TorchDispatchMode):
    """``with PeakTensorBytes() as meter: ...`` then ``meter.peak``: most bytes of new tensors alive at once."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: weakref.WeakSet = weakref.WeakSet()

    def _release(self, size: int) -> None:
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            # Views and in-place results share a storage that is either counted already or predates the block.
            if id(storage) in inputs or storage in self._tracked or not storage.nbytes():
                continue
            self._tracked.add(storage)
            self.live += storage.nbytes()
            weakref.finalize(storage, self._release, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def peak_host_rss_bytes() -> int:
    """The process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
