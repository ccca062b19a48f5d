"""The chunk cache embedded in each vLLM worker: an engine over a list of tiers."""

from lmc_connector.cache.chunk import Chunk
from lmc_connector.cache.engine import CacheEngine
from lmc_connector.cache.errors import CacheError, UnknownLocationError
from lmc_connector.cache.layout import ChunkLayout
from lmc_connector.cache.tiers import CacheEventSink, Tier, TierUsage
from lmc_connector.cache.transforms import TransformJob

__all__ = [
    "CacheEngine",
    "CacheError",
    "CacheEventSink",
    "Chunk",
    "ChunkLayout",
    "Tier",
    "TierUsage",
    "TransformJob",
    "UnknownLocationError",
]
