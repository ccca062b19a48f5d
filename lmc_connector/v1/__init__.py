"""The vLLM adapter: `"kv_connector_module_path": "lmc_connector.v1"` finds the connector here."""

from lmc_connector.v1.connector import LMCConnectorV1

__all__ = ["LMCConnectorV1"]
