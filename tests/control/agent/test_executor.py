"""The executor's bound on prepared operations: a flood from some connections never pushes
out another connection's prepared operation."""

from __future__ import annotations

from lmc_connector.cache.engine import CacheEngine
from lmc_connector.cache.layout import ChunkLayout
from lmc_connector.config import load_config
from lmc_connector.control.agent.executor import MAX_PREPARED, MAX_PREPARED_PER_PEER, OpExecutor
from lmc_connector.control.wire import commands as cmd


def test_the_controllers_prepared_operation_survives_a_flood_from_other_connections() -> None:
    config = load_config({"chunk_size": 4, "max_local_cpu_size": 0.01}, env={})
    engine = CacheEngine(config, ChunkLayout("tiny", 1, 0, "float32", 2, 2, 8, 4))
    engine.open()
    executor = OpExecutor(engine, ["fp8"], lambda event_id, outcome: None)
    try:
        assert isinstance(
            executor.prepare(cmd.Prepare("mine", cmd.UnpinOp([1]), 5), owner=b"c"), cmd.Ok
        )
        for n in range(6):  # six connections of 300 each: more than the worker holds
            for i in range(300):
                executor.prepare(cmd.Prepare(f"{n}-{i}", cmd.UnpinOp([1]), 300), owner=b"%d" % n)
        held = executor._prepared
        assert "mine" in held and len(held) <= MAX_PREPARED
        assert max(sum(p.owner == b"%d" % n for p in held.values()) for n in range(6)) <= (
            MAX_PREPARED_PER_PEER
        )
        assert isinstance(executor.commit(cmd.Commit("mine")), cmd.Ok)
    finally:
        executor.close()
