"""Real redis-server processes for tests: one server, or a 3-node Redis Cluster, on free ports.

Registered as a pytest plugin in `tests/conftest.py`, so every test module can
ask for `redis_server` or `redis_cluster` (one per module, stopped at its end), and
`store`: a client of the module's server, emptied for each test.
`redis-server` and `redis-cli` come from `scripts/system_deps.sh`.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence

import pytest
import redis

from lmc_connector import launch
from lmc_connector.launch import Service


def require_redis() -> None:
    """Fail (never skip) with the fix when the Redis binaries are missing."""
    missing = [b for b in ("redis-server", "redis-cli") if shutil.which(b) is None]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not on PATH: run `bash scripts/system_deps.sh` (it installs "
            "Debian's redis-server), or install Redis >= 6.2 yourself",
            pytrace=False,
        )


def cluster_url(nodes: Sequence[Service]) -> str:
    return "redis-cluster://" + ",".join(n.url.removeprefix("redis://") for n in nodes)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A redis-server for this module; its `url` is a redis:// address."""
    require_redis()
    with launch.running_redis(tmp_path_factory.mktemp("redis")) as service:
        yield service


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Service]]:
    """Three Redis Cluster primaries for this module (slots spread evenly, no replicas)."""
    require_redis()
    with launch.running_redis_cluster(tmp_path_factory.mktemp("redis-cluster")) as nodes:
        yield nodes


@pytest.fixture
def store(redis_server: Service) -> Iterator[redis.Redis]:
    """A client of this module's redis-server, emptied before the test."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()
