"""The one request/reply transport of every channel: commands, lookups and peer fetches.

The transport knows nothing of message contents: callers encode and decode
with their own typed decoders (see `envelope` for the frames).

Threading: an `RpcClient` runs one thread that owns all its DEALER sockets;
an `RpcServer` runs one thread that owns its ROUTER socket. Any thread may
send requests through a client or answer calls of a server: work reaches the
owning thread through a bounded queue and a wake-up pipe. Every request ends
by its deadline, so a dead server costs its callers one timeout and nobody
else anything.
"""

from lmc_connector.control.wire.rpc.client import RpcClient
from lmc_connector.control.wire.rpc.envelope import (
    NOTIFY,
    Payload,
    RpcError,
    RpcSendError,
    RpcTimeout,
)
from lmc_connector.control.wire.rpc.server import Call, RpcServer

__all__ = [
    "NOTIFY",
    "Call",
    "Payload",
    "RpcClient",
    "RpcError",
    "RpcSendError",
    "RpcServer",
    "RpcTimeout",
]
