"""The request/reply envelope, its limits, and the errors shared by client and server.

Frames: a client sends `[request id (8 bytes), *payload]`; the server's ROUTER
receives `[identity, request id, *payload]` and answers `[identity, request
id, *reply]`; the client's DEALER receives `[request id, *reply]`. Request id
0 is a notification, which the server never answers.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

REQUEST_ID = struct.Struct("<Q")
NOTIFY = 0
#: Requests (or replies) waiting for the owning thread; beyond this they fail at once.
MAX_QUEUED = 10_000
#: Longest poll when nothing is due, so close() is noticed promptly.
IDLE_POLL_MS = 200
#: Seconds between two warnings about malformed frames from peers.
WARN_EVERY_S = 10.0

Payload = Sequence[bytes | memoryview]


class RpcError(Exception):
    """A request did not get an answer; the subclass says why."""


class RpcTimeout(RpcError, TimeoutError):
    """No answer before the deadline: treat the server as unavailable for this request (it
    may still act on it later)."""


class RpcSendError(RpcError, ConnectionError):
    """The request could not be sent (the server is not reading, its address is unusable,
    or this client is overloaded): treat the server as unavailable; nothing was sent."""
