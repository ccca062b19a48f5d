"""The chunk cache embedded in each vLLM worker."""

from lmc_connector.cache.chunk import Chunk
from lmc_connector.cache.engine import CacheEngine, CacheEventSink, TransformJob
from lmc_connector.cache.errors import CacheError, UnknownLocationError
from lmc_connector.cache.layout import ChunkLayout

__all__ = [
    "CacheEngine",
    "CacheError",
    "CacheEventSink",
    "Chunk",
    "ChunkLayout",
    "TransformJob",
    "UnknownLocationError",
]
