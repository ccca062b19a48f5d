"""The checksum of every checked format is zlib's CRC-32, fast where a wheel allows."""

from __future__ import annotations

import os
import platform
import zlib

import numpy as np
import pytest

from lmc_connector.checksum import crc32

ISAL_MACHINES = {"x86_64", "AMD64", "aarch64", "arm64"}


@pytest.mark.parametrize("size", [0, 1, 63, 4096, (1 << 20) - 64, 3 << 20])
def test_values_are_zlibs_so_stored_data_stays_readable(size: int) -> None:
    data = os.urandom(size)
    assert crc32(data) == zlib.crc32(data)
    assert crc32(data[size // 2 :], crc32(data[: size // 2])) == zlib.crc32(data)


def test_any_buffer_is_read_as_its_bytes() -> None:
    floats = np.arange(1000, dtype=np.float32)
    # numpy declares ndarray.__buffer__ only for Python >= 3.12; arrays export buffers on 3.11 too.
    assert crc32(memoryview(floats)) == zlib.crc32(floats.tobytes())  # type: ignore[arg-type]
    assert crc32(memoryview(floats).cast("B")[3:], 7) == zlib.crc32(floats.tobytes()[3:], 7)  # type: ignore[arg-type]


@pytest.mark.skipif(platform.machine() not in ISAL_MACHINES, reason="no ISA-L wheel here")
def test_isal_computes_it_where_pyproject_installs_it() -> None:
    assert crc32.__module__ == "isal.isal_zlib"
