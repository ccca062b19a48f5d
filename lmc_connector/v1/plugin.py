"""The `vllm.general_plugins` entry point: registers `LMCConnectorV1` by name.

vLLM calls plugins in every process (API server, engine core, workers),
sometimes more than once; registering twice is harmless.
"""

from __future__ import annotations

CONNECTOR_NAME = "LMCConnectorV1"


def register() -> None:
    """Make `"kv_connector": "LMCConnectorV1"` resolve to `lmc_connector.v1.LMCConnectorV1`."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    registry = getattr(KVConnectorFactory, "_registry", None)
    if registry is not None and CONNECTOR_NAME in registry:
        return
    try:
        KVConnectorFactory.register_connector(
            CONNECTOR_NAME, "lmc_connector.v1.connector", "LMCConnectorV1"
        )
    except ValueError:
        # Registered concurrently or by a registry we could not inspect: already done.
        return
