"""CRC-32 for every checked byte format (chunk records, codec blobs, calibrations).

The same polynomial and values as `zlib.crc32`, from ISA-L's SIMD implementation: about
15x faster on this kind of machine (57 against 4 GB/s per core), which is what lets a
reader check a chunk from the shared store or the disk as fast as the bytes arrive.
"""

from isal.isal_zlib import crc32

__all__ = ["crc32"]
