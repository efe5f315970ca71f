"""Device-to-host copies of a checkpoint capture, off the training stream (CUDA).

``reshard.capture`` copies this rank's shares of the weights and Adam moments to host memory. On the
CPU those are plain copies. On CUDA a ``HostCopies`` issues them on a side stream into page-locked host
memory and returns at once: the training thread only enqueues the copies (the snapshot's stall), and
the next forward and backward run beside them. What keeps the copies consistent:

* the side stream first waits for the training stream, so it reads the state after the last update;
* the optimizer (``SkippableAdamW.hold_until``) makes the next update, the first thing that writes
  the state again, wait for the copies' event: it is the only writer of the master weights and
  moments, and the router-bias update runs after it;
* whoever reads the host tensors (the fast tier's thread, a storage save) first calls
  ``RankPart.wait_copied``, which waits for the same event.

The page-locked buffers come from a pool of exact sizes (``cudaHostRegister`` of ordinary host
memory; torch's pinned allocator would round each one up to a power of two), one buffer per capture,
returned to the pool when the captured part is garbage-collected: a steady run reuses one or two
buffers (two while a storage save still writes the previous snapshot). Registration costs time once
per buffer (the first snapshot); the pool keeps the memory until the process ends.

``HPFRAME_SYNC_SNAPSHOT=1`` turns this off: the copies then run on the training thread, each one a
blocking copy to pageable memory (the behaviour before; for comparison and debugging).
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

import torch

_ALIGN = 64  # byte alignment of each piece in a buffer


class PinnedPool:
    """Page-locked host buffers of exact byte sizes, reused."""

    def __init__(self) -> None:
        self._free: dict[int, list[torch.Tensor]] = {}
        self._lock = threading.Lock()
        self.registered_bytes = 0

    def take(self, nbytes: int) -> torch.Tensor:
        """A page-locked uint8 tensor of ``nbytes``: a free one of that size, or a newly registered one."""
        with self._lock:
            free = self._free.get(nbytes)
            if free:
                return free.pop()
        buf = torch.empty(nbytes, dtype=torch.uint8)
        # the whole allocation, from its start: torch's is_pinned looks up the storage's base address
        err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0)
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed with CUDA error {int(err)}")
        # registered for the life of the process: a buffer is either in the pool or held by a part
        with self._lock:
            self.registered_bytes += nbytes
        return buf

    def give(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free.setdefault(buf.numel(), []).append(buf)


POOL = PinnedPool()
_STREAMS: dict[int, Any] = {}


def copy_stream(device: torch.device) -> Any:
    """The side stream of ``device`` that snapshot copies run on (one per device, created once)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _STREAMS:
        _STREAMS[index] = torch.cuda.Stream(device=index)
    return _STREAMS[index]


def enabled() -> bool:
    return os.environ.get("HPFRAME_SYNC_SNAPSHOT", "0") != "1"


class HostCopies:
    """Collects device tensors, then copies them all on the side stream into one pinned buffer.

    ``run`` returns the host tensors (fp32, in ``add`` order, each of its source's shape) and the CUDA
    event recorded after the last copy. ``owner`` is the object whose lifetime the buffer follows.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._sources: list[torch.Tensor] = []

    def add(self, source: torch.Tensor) -> None:
        self._sources.append(source)

    def run(self, owner: object) -> tuple[list[torch.Tensor], Any]:
        offsets, total = [], 0
        for s in self._sources:
            offsets.append(total)
            total += -(-s.numel() * 4 // _ALIGN) * _ALIGN
        buf = POOL.take(max(total, _ALIGN))
        weakref.finalize(owner, POOL.give, buf)
        side = copy_stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))  # the state after the last update
        outs = []
        with torch.cuda.stream(side):
            for s, off in zip(self._sources, offsets):
                dst = buf[off:off + s.numel() * 4].view(torch.float32).view(s.shape)
                s.record_stream(side)
                # fp32 on the device first (a temporary of the side stream) when the state is bf16
                dst.copy_(s if s.dtype == torch.float32 else s.float(), non_blocking=True)
                outs.append(dst)
            done = torch.cuda.Event()
            done.record(side)
        self._sources = []
        return outs, done
