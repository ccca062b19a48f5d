"""A scheduler half over real lookup servers on IPC sockets, one per rank's engine."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from lmc_connector.cache import CacheEngine
from lmc_connector.v1.lookup import LookupClient, LookupServer, PinRegistry
from lmc_connector.v1.scheduler import LMCScheduler
from tests.cache.conftest import CHUNK


@contextmanager
def scheduler_over(
    engines: Sequence[CacheEngine], folder: Path
) -> Iterator[tuple[LMCScheduler, list[LookupServer]]]:
    """A started scheduler asking one started lookup server per engine; all closed after."""
    addresses = [f"ipc://{folder}/rank{r}.sock" for r in range(len(engines))]
    servers = [
        LookupServer(a, PinRegistry(e), e.reset) for a, e in zip(addresses, engines, strict=True)
    ]
    for server in servers:
        server.start()
    scheduler = LMCScheduler(CHUNK, CHUNK, LookupClient(addresses, timeout_ms=2000))
    scheduler.start()
    try:
        yield scheduler, servers
    finally:
        scheduler.close()
        for server in servers:
            server.close()
