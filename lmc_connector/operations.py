"""The vocabulary of operations, shared by the controller, the wire and the workers' caches.

Two words, never mixed:

* an **operation** is what an operator asks the controller for (compress,
  pin, clear, ...); the controller tracks each one under an id that the HTTP
  API calls `event_id` (LMCache's name, kept for compatibility);
* a **chunk event** is a chunk entering (admit) or leaving (evict) a location
  of a worker; workers report them so that the controller's index stays current.

Torch-free and importable by every process.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

import msgspec

#: What an operator can ask an instance to do.
OpKind = Literal["compress", "decompress", "pin", "unpin", "clear", "move", "calibrate"]
OP_KINDS: tuple[OpKind, ...] = get_args(OpKind)
#: The operations that re-encode chunks in the background (a job per worker).
TransformKind = Literal["compress", "decompress"]
TRANSFORM_KINDS: tuple[TransformKind, ...] = get_args(TransformKind)


class JobOutcome(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What one worker's part of an operation did; counters fill in as a job runs.

    The same struct travels from the cache (`TransformJob.outcome`) over the
    wire (`JobDone.outcome`) into the HTTP answer, where a worker's part of an
    operation extends it (`OperationPart`). Fields are only ever appended.
    """

    #: Tokens covered (transforms, pin, unpin, move).
    num_tokens: int = 0
    chunks_done: int = 0
    #: Chunks already in the asked form, or changed by someone else meanwhile.
    chunks_skipped: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    #: Seconds of work on the worker (the job itself, not the round trips).
    seconds: float = 0.0
    #: Chunk entries removed, and kept because pinned (clear).
    removed: int = 0
    kept: int = 0
    #: Why the part failed; empty on success.
    errors: list[str] = []
    #: The calibration a calibrate fitted (its id); `num_tokens` and `chunks_done` count
    #: the samples, `bytes_before` their plain KV, `bytes_after` the calibration's size.
    calibration_id: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{32}$")] | None = None
