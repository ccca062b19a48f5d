"""The vLLM plugin hook: which `kv_connector` names resolve to this connector."""

from collections.abc import Callable
from typing import Any

import pytest

from lmc_connector import entrypoints

Registry = dict[str, Callable[[], Any]]


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Registry:
    """vLLM's connector registry, restored after the test."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    copy: Registry = dict(KVConnectorFactory._registry)
    monkeypatch.setattr(KVConnectorFactory, "_registry", copy)
    return copy


def test_lmc_connector_v1_names_this_connector(registry: Registry) -> None:
    from lmc_connector.v1 import LMCConnectorV1

    entrypoints.vllm_plugin()
    entrypoints.vllm_plugin()  # vLLM may call plugins more than once per process
    assert registry["LMCConnectorV1"]() is LMCConnectorV1


def test_lmcaches_name_means_this_connector_where_lmcache_is_not_installed(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmc_connector.v1 import LMCConnectorV1

    monkeypatch.setattr(entrypoints, "lmcache_installed", lambda: False)
    entrypoints.vllm_plugin()
    assert registry["LMCacheConnectorV1"]() is LMCConnectorV1


def test_lmcaches_name_stays_lmcaches_where_lmcache_is_installed(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    vllms_own = registry["LMCacheConnectorV1"]
    monkeypatch.setattr(entrypoints, "lmcache_installed", lambda: True)
    entrypoints.vllm_plugin()
    assert registry["LMCacheConnectorV1"] is vllms_own
    assert registry["LMCConnectorV1"] is not vllms_own
