"""Prefixes held by another instance: found by the scheduler, fetched by each worker.

Scheduler side (`PeerLocator`): when the local cache holds less of a prompt than could be
loaded, one round trip to the controller names the instance of the same layout holding
the longest prefix, with one peer address per rank. vLLM then waits for the KV
asynchronously (`load_kv_async`): the request is parked, everything else keeps running.

Worker side (`PeerLoads`): each rank fetches the chunks it lacks from the same rank of that
instance on a background thread and admits them into its CPU tier; vLLM's model-runner
thread scatters them into the request's blocks when it next collects finished transfers.
A timeout, a dead peer or a bad chunk is a miss: those blocks are reported for recompute.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import zmq

from lmc_connector.affinity import widen_current_thread
from lmc_connector.cache import CacheEngine
from lmc_connector.config import CacheConfig, ConfigError
from lmc_connector.control.agent.peer_client import PeerClient, PeerUnavailableError
from lmc_connector.control.wire import locate as lw
from lmc_connector.control.wire.codec import MessageError, encode
from lmc_connector.control.wire.rpc import RpcClient, RpcError
from lmc_connector.control.wire.security import worker_security
from lmc_connector.control.wire.sockets import parse_host_port, tcp_url
from lmc_connector.throttle import Throttle
from lmc_connector.tokens import ChunkKey
from lmc_connector.v1.metadata import LoadSpec

logger = logging.getLogger(__name__)

#: Seconds peer lookups are skipped after the controller failed to answer one, so a dead
#: controller costs one timeout per period instead of one per request.
BACKOFF_S = 5.0
#: Seconds between two warnings about failing peers or controller.
WARN_EVERY_S = 10.0


class PeerLocator:
    """The scheduler's question to the controller: which other instance holds more of this
    prompt, and where does each of its ranks serve peers?

    Owns its ZMQ context and request/reply client; called on vLLM's scheduler thread.
    Construct, `start`, `close`.
    """

    def __init__(self, config: CacheConfig) -> None:
        assert config.controller_reply_url is not None
        try:
            host, port = parse_host_port(config.controller_reply_url, "controller_reply_url")
            self._address = tcp_url(host, port)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        self._instance_id = config.lmcache_instance_id
        self._timeout_s = config.lookup_timeout_ms / 1000
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        # The controller's channel can cross hosts: secured like every such channel.
        self._client = RpcClient(self._context, "locate-client", worker_security(config))
        self._decoder = lw.peer_found_decoder()
        self._quiet_until = 0.0
        #: Instances whose peer servers failed a fetch, and until when they are not asked.
        self._avoid: dict[str, float] = {}
        self._warn = Throttle(WARN_EVERY_S)
        #: Round trips asked and answered with a peer (for logs and tests).
        self.asked = 0
        self.found = 0

    def start(self) -> None:
        self._client.start()

    def close(self) -> None:
        self._client.close()
        self._context.term()

    def find(self, keys: Sequence[ChunkKey], have_chunks: int) -> lw.PeerFound | None:
        """The peer holding more than `have_chunks` chunks of `keys`, or None (also when the
        controller does not answer in time: a miss, never an error)."""
        now = time.monotonic()
        if now < self._quiet_until:
            return None
        self.asked += 1
        self._avoid = {i: until for i, until in self._avoid.items() if until > now}
        keys = list(keys[: lw.MAX_LOCATE_KEYS])
        ask = lw.FindPeer(self._instance_id, keys, have_chunks, sorted(self._avoid))
        try:
            frames = self._client.call(self._address, [encode(ask)], self._timeout_s)
            found = self._decoder.decode(frames[0].buffer)
        except (RpcError, MessageError, IndexError) as e:
            self._quiet_until = now + BACKOFF_S
            if self._warn.ready():
                logger.warning(
                    "controller at %s did not answer a peer lookup (%s): no peer fetches for "
                    "%.0f s",
                    self._address,
                    e,
                    BACKOFF_S,
                )
            return None
        if found.error is not None or found.chunks <= have_chunks or not found.addresses:
            return None
        self.found += 1
        return found

    def avoid(self, instance_id: str) -> None:
        """A fetch from `instance_id` failed: ask for other peers for `BACKOFF_S` seconds."""
        if instance_id not in self._avoid and self._warn.ready():
            logger.warning(
                "peer instance %s failed a fetch: avoided for %.0f s", instance_id, BACKOFF_S
            )
        self._avoid[instance_id] = time.monotonic() + BACKOFF_S


#: The `tier` label of chunks fetched from another instance in the connector's statistics
#: (they are then loaded into vLLM through the CPU tier, and counted there too).
PEER_TIER = "peer"


class PeerLoads:
    """Asynchronous loads of this rank's shard of prefixes held by another instance.

    Owns one fetch thread and the loads it has finished but the model-runner thread has
    not scattered yet. `submit` and `take_finished` run on vLLM's model-runner thread;
    fetched chunks are pinned from before they arrive until `release`.
    """

    def __init__(self, engine: CacheEngine, client: PeerClient, rank: int) -> None:
        self._engine = engine
        self._client = client
        self._rank = rank
        # Started by the first `submit`, on vLLM's model-runner thread (bound to one core):
        # the fetch thread runs on every CPU the process may use instead.
        self._thread = ThreadPoolExecutor(
            1, thread_name_prefix="lmc-peer-fetch", initializer=widen_current_thread
        )
        self._done: queue.SimpleQueue[LoadSpec] = queue.SimpleQueue()
        self._pinned: dict[str, list[ChunkKey]] = {}
        self._lock = threading.Lock()
        self._warn = Throttle(WARN_EVERY_S)
        #: Chunks and bytes fetched so far (for logs and tests).
        self.chunks = 0
        self.bytes = 0

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)

    def submit(self, spec: LoadSpec) -> None:
        """Start fetching what this rank lacks of `spec` (its `peers` name the instance)."""
        engine = self._engine
        missing = [k for k in spec.keys if not engine.contains(k)]
        engine.pin_keys(missing)  # before they arrive: nothing evicts them before the scatter
        with self._lock:
            self._pinned[spec.req_id] = missing
        try:
            self._thread.submit(self._fetch, spec, missing)
        except RuntimeError:  # shut down: the load ends at once as a miss
            self._done.put(spec)

    def take_finished(self) -> list[LoadSpec]:
        """Loads whose chunks are here (or will never come): scatter them, then `release`."""
        finished: list[LoadSpec] = []
        while True:
            try:
                finished.append(self._done.get_nowait())
            except queue.Empty:
                return finished

    def release(self, req_id: str) -> None:
        with self._lock:
            keys = self._pinned.pop(req_id, [])
        self._engine.unpin_keys(keys)

    def _fetch(self, spec: LoadSpec, missing: list[ChunkKey]) -> None:
        started = time.perf_counter()
        got = nbytes = 0
        address = spec.peers[self._rank] if self._rank < len(spec.peers) else ""
        try:
            for key, chunk in self._client.fetch(address, missing):
                if not self._engine.admit(key, chunk):
                    break
                got += 1
                nbytes += chunk.nbytes
                self._engine.ctx.stats.loaded(PEER_TIER, chunk.num_tokens, chunk.nbytes)
        except (PeerUnavailableError, concurrent.futures.CancelledError, ValueError) as e:
            if self._warn.ready():
                logger.warning(
                    "%s: peer fetch from %s failed (%s): a miss", spec.req_id, address, e
                )
        except Exception:  # boundary of the fetch thread: this load is a miss; serving goes on
            logger.exception("%s: peer fetch from %s crashed", spec.req_id, address)
        finally:
            self.chunks += got
            self.bytes += nbytes
            seconds = time.perf_counter() - started
            logger.info(
                "%s: fetched %d of %d chunks (%.1f MB) from %s in %.1f ms (%.2f GB/s)",
                spec.req_id,
                got,
                len(missing),
                nbytes / 1e6,
                address,
                seconds * 1000,
                nbytes / seconds / 1e9 if seconds > 0 else 0.0,
            )
            self._done.put(spec)
