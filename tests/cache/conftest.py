import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import torch

from lmc_connector.cache import CacheEngine, ChunkLayout
from lmc_connector.config import load_config
from lmc_connector.tokens import ChunkKey

CHUNK = 4
LAYOUT = ChunkLayout(
    model="tiny",
    world_size=1,
    rank=0,
    dtype="float16",
    planes=2,
    layers=2,
    channels=8,
    chunk_size=CHUNK,
)
#: Bytes of one full chunk of LAYOUT.
CHUNK_BYTES = 2 * 2 * CHUNK * 8 * 2


def make_kv(num_tokens: int = CHUNK, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(LAYOUT.shape(num_tokens), generator=generator).to(torch.float16)


class RecordingSink:
    """Collects admit/evict events the way the control agent receives them."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, ChunkKey]] = []

    def chunks_admitted(self, location: str, keys: Sequence[ChunkKey]) -> None:
        self.events += [("admit", location, k) for k in keys]

    def chunks_evicted(self, location: str, keys: Sequence[ChunkKey]) -> None:
        self.events += [("evict", location, k) for k in keys]


EngineFactory = Callable[..., CacheEngine]


@pytest.fixture
def make_engine(tmp_path: Path) -> Iterator[EngineFactory]:
    def build(
        cpu_chunks: float = 4,
        disk_chunks: float | None = None,
        layout: ChunkLayout = LAYOUT,
        **extra: object,
    ) -> CacheEngine:
        config: dict[str, object] = {
            "chunk_size": CHUNK,
            "max_local_cpu_size": cpu_chunks * CHUNK_BYTES / 1e9,
            **extra,
        }
        if disk_chunks is not None:
            config["local_disk"] = str(tmp_path / "disk")
            config["max_local_disk_size"] = disk_chunks * (CHUNK_BYTES + 64) / 1e9
        engine = CacheEngine(load_config(config, env={}), layout)
        engine.open()
        return engine

    yield build


def put_prompt(engine: CacheEngine, tokens: list[int], seed: int = 0) -> list[ChunkKey]:
    """Store every chunk of `tokens` (as the connector does after prefill); return the keys."""
    keys = engine.hashes(tokens)
    for i, key in enumerate(keys):
        n = min(CHUNK, len(tokens) - i * CHUNK)
        assert engine.put(key, make_kv(n, seed + i))
    return keys


def run_in_threads(work: Callable[[int], None], count: int) -> list[BaseException]:
    """Run `work(0)`..`work(count - 1)` on as many threads; return what they raised."""
    errors: list[BaseException] = []

    def guarded(seed: int) -> None:
        try:
            work(seed)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(seed,)) for seed in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return errors
