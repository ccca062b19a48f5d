"""CRC-32 for every checked byte format (chunk records, codec blobs, calibrations).

zlib's polynomial and values, from ISA-L's SIMD implementation where its wheel exists
(x86-64 and ARM64): about 15x faster than zlib's there (57 against 4 GB/s per core), which
is what lets a reader check a chunk from the shared store or the disk as fast as the bytes
arrive. Elsewhere (e.g. POWER, s390x) zlib's own, with the same values.
"""

try:
    from isal.isal_zlib import crc32
except ImportError:  # no ISA-L wheel for this machine: pyproject.toml installs it where one is
    from zlib import crc32

__all__ = ["crc32"]
