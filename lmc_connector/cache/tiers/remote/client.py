"""Clients of the shared store (redis-py with its C parser), built from a parsed `remote_url`."""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import (
    AuthenticationError,
    OutOfMemoryError,
    RedisClusterException,
    RedisError,
    ResponseError,
)
from redis.retry import Retry

from lmc_connector.remote_url import StoreAddress
from lmc_connector.throttle import Throttle

logger = logging.getLogger(__name__)

#: What a store call raises when the store is down, slow, or answers something unexpected.
STORE_ERRORS: tuple[type[BaseException], ...] = (RedisError, RedisClusterException, OSError)
#: Connections per client: the few threads of one worker (lookups, loads, the writer, jobs)
#: each hold at most one at a time.
MAX_CONNECTIONS = 16
#: Seconds a failed store is left alone before the next call tries it again, doubling up to
#: the maximum while it stays down: a dead store costs one timeout, not one per request.
RETRY_AFTER_S = 1.0
RETRY_AFTER_MAX_S = 30.0
#: Seconds between warnings about commands the store refused (it answered: it is up).
REFUSED_LOG_INTERVAL_S = 30.0

Client = redis.Redis | RedisCluster
_CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}


def connect(address: StoreAddress, timeout_s: float, read_size: int = 1 << 16) -> Client:
    """A client of `address` whose every socket wait is bounded by `timeout_s`, reading
    `read_size` bytes per socket read (larger for clients that move megabytes).

    No retries inside the client: a failed call fails at once and `StoreHealth`
    decides when to try again. A Redis Cluster client reads the slot map of the
    cluster here (raises a STORE_ERRORS error when no node answers).
    """
    common: dict[str, Any] = {
        "username": address.username,
        "password": address.password,
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), 0),
        "max_connections": MAX_CONNECTIONS,
        "socket_read_size": read_size,
    }
    if address.tls:
        common["ssl"] = True
        for name, value in address.tls_options:
            common[name] = _CERT_REQS[value] if name == "ssl_cert_reqs" else value
    if address.cluster:
        nodes = [ClusterNode(host, port) for host, port in address.nodes]
        return RedisCluster(startup_nodes=nodes, **common)
    host, port = address.nodes[0]
    return redis.Redis(host=host, port=port, db=address.db, **common)


class StoreHealth:
    """Whether the store is worth asking now: after a failure, calls skip it for a while.

    Owns the time of the next attempt and the current back-off; shared by every
    thread that calls the store (thread-safe). Logs one warning when the store
    goes away and one line when it is back.
    """

    def __init__(self, where: str) -> None:
        self._where = where
        self._lock = threading.Lock()
        self._retry_at = 0.0
        self._backoff = 0.0

    def available(self) -> bool:
        with self._lock:
            return time.monotonic() >= self._retry_at

    def failed(self, action: str, error: BaseException) -> None:
        with self._lock:
            first = self._backoff == 0.0
            self._backoff = min(max(self._backoff * 2, RETRY_AFTER_S), RETRY_AFTER_MAX_S)
            self._retry_at = time.monotonic() + self._backoff
            backoff = self._backoff
        refused = isinstance(error, AuthenticationError)  # up, but not for us: say so each time
        log = logger.warning if first or refused else logger.debug
        log(
            "shared store %s: %s failed (%s: %s)%s; treated as a miss, next try in %.0f s",
            self._where,
            action,
            type(error).__name__,
            error,
            "; check the user and password in remote_url" if refused else "",
            backoff,
        )

    def succeeded(self) -> None:
        with self._lock:
            if self._backoff == 0.0:
                return
            self._backoff = 0.0
            self._retry_at = 0.0
        logger.info("shared store %s: reachable again", self._where)


class StoreSession:
    """The store as one worker's threads use it: two clients made on first use (lookups with
    the short timeout, loads and uploads with `bulk_timeout_s` and large socket reads) and
    the store's health. Thread-safe; `call` is how every store command is run.
    """

    def __init__(self, address: StoreAddress, timeout_s: float, bulk_timeout_s: float) -> None:
        self.address = address
        self.health = StoreHealth(address.redacted())
        self._timeouts = (timeout_s, bulk_timeout_s)
        self._clients: tuple[Client, Client] | None = None
        self._lock = threading.Lock()
        self._refusals = Throttle(REFUSED_LOG_INTERVAL_S)
        self._eviction_checked = False

    def call(self, action: str, bulk: bool, fn: Callable[[Client], Any]) -> Any:
        """`fn(client)`, or None when the store is (or just went) unavailable, or refused
        the command (full and not evicting, read-only, no permission): the store stays in
        use for the other calls."""
        if not self.health.available():
            return None
        try:
            result = fn(self._client(bulk))
        except ResponseError as e:
            self._refused(action, e)
            return None
        except STORE_ERRORS as e:
            self.health.failed(action, e)
            return None
        self.health.succeeded()
        return result

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, None
        for client in clients or ():
            client.close()

    def check_eviction(self) -> None:
        """Warn once per session when the store has a memory limit but will not evict our
        keys to stay under it (a store that hides its configuration is left unchecked).
        Called before uploads, which such a store refuses once full: never on a lookup's
        or a load's path."""
        if self._eviction_checked or not self.health.available():
            return
        self._eviction_checked = True
        try:
            settings = self._client(True).config_get("maxmemory*")
        except STORE_ERRORS:
            return
        if not isinstance(settings, dict):
            return
        policy = str(settings.get("maxmemory-policy", ""))
        limited = str(settings.get("maxmemory", "0")) not in ("", "0")
        if limited and policy and not policy.startswith("allkeys-"):
            logger.warning(
                "shared store %s: maxmemory-policy is %s: when full it refuses uploads instead "
                "of evicting old chunks; %s",
                self.address.redacted(),
                policy,
                _EVICTION_FIX,
            )

    def _refused(self, action: str, error: ResponseError) -> None:
        if not self._refusals.ready():
            return
        hint = f"; {_FULL_HINT}" if isinstance(error, OutOfMemoryError) else ""
        logger.warning(
            "shared store %s: %s refused by the store (%s)%s",
            self.address.redacted(),
            action,
            error,
            hint,
        )

    def _client(self, bulk: bool) -> Client:
        with self._lock:
            if self._clients is None:
                lookups = connect(self.address, self._timeouts[0])
                self._clients = (lookups, connect(self.address, self._timeouts[1], 1 << 20))
            return self._clients[int(bulk)]


_EVICTION_FIX = (
    "start it with --maxmemory-policy allkeys-lru (our keys have no expiry, so volatile-* "
    "policies never evict them)"
)
_FULL_HINT = f"the store is full and does not evict: {_EVICTION_FIX}"
