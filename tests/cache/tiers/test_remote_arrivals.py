"""The pieces of a batch of chunks arrive as one stream, in round trips that may straddle
chunks, and come back as whole chunks; what went wrong with one chunk stays with it."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from lmc_connector.cache.chunk import Chunk
from lmc_connector.cache.record import RecordFormatError
from lmc_connector.cache.tiers.remote.arrivals import Arrival, Arrivals
from lmc_connector.cache.tiers.remote.values import PIECE_BYTES, Assembler, StoreValue, to_value
from lmc_connector.tokens import ChunkKey

#: Bytes of three float16 chunks of 1, 3 and 2 pieces.
SIZES = [1000, 2 * PIECE_BYTES + 10, PIECE_BYTES + 2]


def chunks() -> list[tuple[ChunkKey, Chunk, StoreValue]]:
    out = []
    for i, nbytes in enumerate(SIZES):
        kv = torch.randint(-9, 9, (1, 1, 1, nbytes // 2), dtype=torch.float16,
                           generator=torch.Generator().manual_seed(i))  # fmt: skip
        chunk = Chunk(4, kv=kv)
        out.append((ChunkKey(i + 1), chunk, to_value(ChunkKey(i + 1), chunk)))
    return out


@pytest.fixture(params=["on the loading thread", "on an assembly thread"])
def assembly(request: pytest.FixtureRequest) -> Iterator[ThreadPoolExecutor | None]:
    if request.param == "on the loading thread":
        yield None
        return
    pool = ThreadPoolExecutor(1)
    yield pool
    pool.shutdown()


def stream(
    values: list[tuple[ChunkKey, Chunk, StoreValue]], assembly: ThreadPoolExecutor | None
) -> Arrivals:
    arriving = [
        Arrival(key, f"c{key}", value.header, Assembler(value.header, f"c{key}", key, 8),
                [f"c{key}:{i}" for i in range(len(value.pieces))])
        for key, _, value in values
    ]  # fmt: skip
    return Arrivals(arriving, assembly)


def pieces(values: list[tuple[ChunkKey, Chunk, StoreValue]]) -> list[bytes | None]:
    return [bytes(p) for _, _, value in values for p in value.pieces]


def test_pieces_in_round_trips_that_straddle_chunks_come_back_as_whole_chunks(
    assembly: ThreadPoolExecutor | None,
) -> None:
    values = chunks()
    arrivals = stream(values, assembly)
    assert arrivals.names == ["c1:0", "c2:0", "c2:1", "c2:2", "c3:0", "c3:1"]
    sent = pieces(values)
    for start in range(0, len(sent), 2):  # (c1:0, c2:0), (c2:1, c2:2), (c3:0, c3:1)
        arrivals.take(sent[start : start + 2])
    assert arrivals.ready(timeout_s=10) == (3, False)
    for arrival, (_, chunk, _) in zip(arrivals.chunks, values, strict=True):
        got = arrival.finish().kv
        assert got is not None and chunk.kv is not None and torch.equal(got, chunk.kv)


def test_a_stream_the_store_cut_short_completes_only_the_chunks_whose_pieces_all_came(
    assembly: ThreadPoolExecutor | None,
) -> None:
    values = chunks()
    arrivals = stream(values, assembly)
    arrivals.take(pieces(values)[:3])  # c1 whole, c2 two pieces of three
    assert arrivals.ready(timeout_s=10) == (1, False)


def test_a_wrong_piece_fails_its_own_chunk_only(assembly: ThreadPoolExecutor | None) -> None:
    values = chunks()
    arrivals = stream(values, assembly)
    sent = pieces(values)
    sent[2] = b"short"  # c2's second piece
    arrivals.take(sent)
    assert arrivals.ready(timeout_s=10) == (3, False)
    first, second, third = arrivals.chunks
    assert first.finish().kv is not None and third.finish().kv is not None
    with pytest.raises(RecordFormatError, match="piece 1 is missing or has the wrong size"):
        second.finish()


def test_a_value_of_another_type_under_a_piece_name_is_named_in_the_error() -> None:
    values = chunks()
    arrivals = stream(values, None)
    sent: list[object] = list(pieces(values))
    sent[0] = RuntimeError("WRONGTYPE Operation against a key holding the wrong kind of value")
    arrivals.take(sent)
    with pytest.raises(ValueError, match=r"not a chunk value \(WRONGTYPE"):
        arrivals.chunks[0].finish()


def test_a_chunk_whose_placing_failed_in_this_process_is_a_miss_not_a_damaged_value(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Running out of memory cannot be caused on demand: `Assembler.add` raises it (a fake)
    for the second chunk."""
    values = chunks()
    add = Assembler.add

    def add_or_fail(self: Assembler, pieces: list[bytes | None]) -> None:
        if self.header.payload_len == SIZES[1]:
            raise MemoryError("no memory for the copy")
        add(self, pieces)

    monkeypatch.setattr(Assembler, "add", add_or_fail)
    with ThreadPoolExecutor(1) as pool:
        arrivals = stream(values, pool)
        arrivals.take(pieces(values))
        assert arrivals.ready(timeout_s=10) == (1, False)
    assert "c2: placing its pieces failed" in caplog.text
    assert "no memory for the copy" in caplog.text
