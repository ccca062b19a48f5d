"""Cache tiers, named as in LMCache: LocalCPUBackend and LocalDiskBackend."""

from lmc_connector.cache.backends.cpu import LocalCPUBackend
from lmc_connector.cache.backends.disk import LocalDiskBackend

CPU = LocalCPUBackend.name
DISK = LocalDiskBackend.name

__all__ = ["CPU", "DISK", "LocalCPUBackend", "LocalDiskBackend"]
