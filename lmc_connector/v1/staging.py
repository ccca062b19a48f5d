"""Scratch buffers that chunk copies pass through between vLLM's paged cache and host memory.

A copy gathers (or scatters) one chunk through a layer-major scratch (see
`ops.paged.PagedKV`). On the CPU that scratch is plain host memory. On CUDA
each slot is a device scratch plus a page-locked host buffer of the same size
and an event that says when the device last finished with the host buffer:
host <-> device copies from page-locked memory run at full bus speed and do
not block the CPU thread, and a small ring of slots lets the CPU fill one
buffer while the device still copies the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmc_connector.ops.paged import PagedKV


@dataclass(slots=True)
class StagingSlot:
    """One chunk's worth of scratch: `device` on the cache's device, `host` in CPU memory
    (the same tensor on the CPU), and the event recorded after the last device use of `host`."""

    device: torch.Tensor
    host: torch.Tensor
    event: torch.cuda.Event | None


class Staging:
    """A ring of `slots` scratch slots sized for chunks of `chunk_tokens` tokens.

    Owned and used by one thread (the model-runner thread for loads, the save
    copier for saves). `next_slot` hands out the slots round robin and waits
    until the device is done with the one it returns.
    """

    def __init__(self, paged: PagedKV, chunk_tokens: int, slots: int = 2) -> None:
        numel = paged.scratch_numel(chunk_tokens)
        on_cuda = paged.device.type == "cuda"
        self._slots: list[StagingSlot] = []
        for _ in range(slots if on_cuda else 1):
            if on_cuda:
                device = torch.empty(numel, dtype=paged.dtype, device=paged.device)
                host = torch.empty(numel, dtype=paged.dtype, pin_memory=True)
                self._slots.append(StagingSlot(device, host, torch.cuda.Event()))
            else:
                host = torch.empty(numel, dtype=paged.dtype)
                self._slots.append(StagingSlot(host, host, None))
        self._next = 0

    def next_slot(self) -> StagingSlot:
        slot = self._slots[self._next]
        self._next = (self._next + 1) % len(self._slots)
        if slot.event is not None:
            slot.event.synchronize()
        return slot
