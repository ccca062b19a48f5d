"""The chunk cache embedded in each vLLM worker."""

from lmc_connector.cache.chunk import Chunk
from lmc_connector.cache.engine import CacheEngine
from lmc_connector.cache.errors import CacheError, UnknownLocationError
from lmc_connector.cache.layout import ChunkLayout
from lmc_connector.cache.tiers import CacheEventSink
from lmc_connector.cache.transform import TransformJob

__all__ = [
    "CacheEngine",
    "CacheError",
    "CacheEventSink",
    "Chunk",
    "ChunkLayout",
    "TransformJob",
    "UnknownLocationError",
]
