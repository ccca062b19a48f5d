"""Every way into the package from outside: console scripts and the vLLM plugin hook.

Each is a thin function that imports what it runs lazily, so that
`lmc-admin --help` never loads the controller and the vLLM plugin never loads
anything until vLLM asks for the connector.
"""

from __future__ import annotations

import contextlib

#: The name `--kv-transfer-config` uses: `{"kv_connector": "LMCConnectorV1", ...}`.
CONNECTOR_NAME = "LMCConnectorV1"
#: LMCache's name, which vLLM maps to its LMCache adapter (it needs the `lmcache` package).
#: Where that package is not installed the name means this connector, so that an LMCache
#: command line runs unchanged; where it is, the name stays LMCache's.
LMCACHE_CONNECTOR_NAME = "LMCacheConnectorV1"


def controller() -> int:
    """`lmc-controller`: run the controller process."""
    from lmc_connector.control.controller.main import main

    return main()


def admin() -> int:
    """`lmc-admin`: the controller's HTTP API from the shell."""
    from lmc_connector.control.admin.cli import main

    return main()


def vllm_plugin() -> None:
    """`vllm.general_plugins` hook: make `LMCConnectorV1` resolve to our connector, and
    `LMCacheConnectorV1` too where LMCache is not installed (see LMCACHE_CONNECTOR_NAME).

    vLLM calls plugins in every process (API server, engine core, workers),
    sometimes more than once; registering twice is harmless.
    """
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    registry = getattr(KVConnectorFactory, "_registry", None)
    if registry is None or CONNECTOR_NAME not in registry:
        # ValueError: registered concurrently, or by a registry we could not inspect.
        with contextlib.suppress(ValueError):
            KVConnectorFactory.register_connector(
                CONNECTOR_NAME, "lmc_connector.v1.connector", "LMCConnectorV1"
            )
    if registry is not None and CONNECTOR_NAME in registry and not lmcache_installed():
        registry[LMCACHE_CONNECTOR_NAME] = registry[CONNECTOR_NAME]


def lmcache_installed() -> bool:
    """Whether the `lmcache` package is importable here (then LMCache's names stay LMCache's)."""
    import importlib.util

    return importlib.util.find_spec("lmcache") is not None
