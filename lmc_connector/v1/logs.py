"""The package's log lines in vLLM's log output, in vLLM's format.

vLLM configures its own `vllm` logger only, so without this a connector's
lines (start-up summary, registration with the controller, job completions,
warnings) never show in a vLLM server's output. `follow_vllm_logging` hands
every record of the `lmc_connector` logger to the `vllm` logger's handlers,
whatever they are at that moment (vLLM may reconfigure them later), at
vLLM's level. It does nothing where vLLM's logging is off
(`VLLM_CONFIGURE_LOGGING=0`) or the application configured `lmc_connector`
itself.
"""

from __future__ import annotations

import logging

from lmc_connector.config import CacheConfig

PACKAGE_LOGGER = "lmc_connector"
VLLM_LOGGER = "vllm"

logger = logging.getLogger(__name__)


class _ToVllmHandlers(logging.Handler):
    """Passes records to the `vllm` logger's handlers (each applies its own level)."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger(VLLM_LOGGER).handle(record)


def follow_vllm_logging() -> bool:
    """Route the package's records to vLLM's handlers (once per process); True if it does."""
    ours = logging.getLogger(PACKAGE_LOGGER)
    if any(isinstance(h, _ToVllmHandlers) for h in ours.handlers):
        return True
    vllm_logger = logging.getLogger(VLLM_LOGGER)
    if ours.handlers or not vllm_logger.handlers:
        return False
    ours.addHandler(_ToVllmHandlers())
    ours.setLevel(vllm_logger.getEffectiveLevel())
    ours.propagate = False
    return True


def log_startup(config: CacheConfig, role: str, kv_events: bool) -> None:
    """One line saying how this side of the connector is set up (the worker half adds its
    tiers once they are open)."""
    controller = (
        f"controller {config.controller_pull_url} as '{config.lmcache_instance_id}'"
        if config.enable_controller
        else "no controller"
    )
    logger.info(
        "lmc_connector %s side: chunk_size %d, %s, KV events %s",
        role,
        config.chunk_size,
        controller,
        "on" if kv_events else "off",
    )
