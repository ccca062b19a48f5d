"""Where the scheduler reaches each worker's lookup server, on this host or another.

Every worker binds a node-local IPC path derived from the engine id, the
data-parallel rank and its own rank, which the scheduler can compute without
asking anyone. A worker on another host (tensor or pipeline parallelism over
several nodes) cannot be reached there: each worker therefore also tells the
scheduler, through vLLM's connector handshake (`get_handshake_metadata` on the
worker, `set_xfer_handshake_metadata*` on the scheduler), which host it runs
on and, when `lookup_host` is set, a TCP address. The scheduler asks local
ranks over IPC, remote ranks over TCP, and a remote rank without a TCP address
not at all (a chunk such a rank lacks fails its load there and vLLM recomputes
it: slower, never wrong).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import stat
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorHandshakeMetadata

logger = logging.getLogger(__name__)

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def channel_path(engine_id: str, dp_rank: int, rank: int) -> str:
    """The IPC address worker `rank` of an engine binds (short: socket paths are limited)."""
    digest = hashlib.blake2b(engine_id.encode(), digest_size=6).hexdigest()
    return f"ipc://{Path(tempfile.gettempdir()) / f'lmc-{digest}-{dp_rank}-{rank}.sock'}"


def host_identity() -> str:
    """Names this machine's boot: equal in two processes that share its IPC paths."""
    try:
        boot = _BOOT_ID.read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def ipc_file(address: str) -> Path | None:
    return Path(address[len("ipc://") :]) if address.startswith("ipc://") else None


def live_socket_holds(address: str) -> bool:
    """Whether a process is listening on the IPC `address` (a stale file is not one)."""
    path = ipc_file(address)
    if path is None:
        return False
    try:
        if not stat.S_ISSOCK(path.stat().st_mode):
            return False
    except OSError:
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(os.fspath(path))
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            probe.close()
    return True


@dataclass(frozen=True, slots=True)
class LookupHandshake(KVConnectorHandshakeMetadata):
    """What a worker tells the scheduler about its lookup server (through vLLM)."""

    host: str
    ipc: str
    tcp: str | None = None


def plan_addresses(
    defaults: Sequence[str],
    handshakes: Mapping[int, LookupHandshake],
    here: str | None = None,
) -> list[str | None]:
    """The address to ask each rank at (None: not reachable, not asked).

    `defaults` are the IPC paths by rank; `handshakes` what ranks reported.
    A rank that reported nothing keeps its default (the handshake is optional
    in vLLM's protocol).
    """
    here = host_identity() if here is None else here
    out: list[str | None] = []
    for rank, default in enumerate(defaults):
        shake = handshakes.get(rank)
        if shake is None:
            out.append(default)
        elif shake.host == here:
            out.append(shake.ipc)
        else:
            out.append(shake.tcp)
    unreachable = [rank for rank, address in enumerate(out) if address is None]
    if unreachable:
        logger.warning(
            "lmc_connector: ranks %s run on another host and serve no TCP lookups (set "
            "lookup_host on them): the scheduler does not ask them, and a chunk they lack "
            "fails its load there and is recomputed",
            unreachable,
        )
    return out
