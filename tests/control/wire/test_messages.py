"""Wire messages: round trips, malformed input, bounds, and schema evolution."""

from __future__ import annotations

import msgspec
import pytest

from lmc_connector.control.wire import commands as cmd
from lmc_connector.control.wire import monitor as mon
from lmc_connector.control.wire.codec import MessageError, encode
from lmc_connector.control.wire.types import PromptScope
from lmc_connector.operations import JobOutcome
from lmc_connector.tokens import ChunkKey, KeyScope

#: A Register as the first release encoded it; later releases must keep decoding it.
REGISTER_V1 = msgspec.msgpack.encode(
    {
        "type": "Register",
        "instance_id": "inst",
        "rank": 1,
        "world_size": 2,
        "session": "s",
        "host": "127.0.0.1",
        "port": 8001,
        "model": "m",
        "chunk_size": 256,
        "locations": ["LocalCPUBackend"],
        "methods": ["cachegen"],
    }
)
#: A Prepare as the first release encoded it (request ids inside messages, a wall-clock expiry).
PREPARE_V1 = msgspec.msgpack.encode(
    {
        "type": "Prepare",
        "request_id": 1,
        "event_id": "e",
        "op": {"type": "pin", "tokens": [1, 2]},
        "expires_at": 5.0,
        "ttl_s": 5.0,
    }
)


def decode_worker(data: bytes) -> mon.WorkerMessage:
    return mon.worker_message_decoder().decode(data)


@pytest.mark.parametrize(
    "message",
    [
        mon.Register("i", 0, 1, "s", "h", 1, "m", 4, ["LocalCPUBackend"], ["cachegen"], 7),
        mon.Heartbeat("i", 0, "s", "h", 1, {"LocalCPUBackend": mon.TierReport(1, 2, 3)}),
        mon.ChunkEvents(
            "i", 0, "s", [mon.ChunkOp(True, "LocalCPUBackend", [ChunkKey(0), ChunkKey(2**64 - 1)])]
        ),
        mon.Snapshot("i", 0, "s", {"LocalCPUBackend": [ChunkKey(5)]}),
        mon.JobDone("i", 0, "s", "e", JobOutcome(num_tokens=12, chunks_done=3, errors=["x"])),
        mon.Deregister("i", 0, "s"),
    ],
)
def test_worker_messages_round_trip(message: mon.WorkerMessage) -> None:
    assert decode_worker(encode(message)) == message


def test_commands_and_replies_round_trip() -> None:
    op = cmd.TransformOp("compress", "cachegen", "LocalCPUBackend", [1, 2])
    for command in (cmd.Prepare("e", op, 1.0), cmd.Commit("e"), cmd.Abort("e"), cmd.Resync()):
        assert cmd.command_decoder().decode(encode(command)) == command
    for reply in (cmd.Ok(JobOutcome(num_tokens=3)), cmd.Failed("expired", "late")):
        assert cmd.reply_decoder().decode(encode(reply)) == reply


def test_ops_carry_the_prompts_salt_and_adapter() -> None:
    scope = PromptScope(cache_salt="tenant-a", lora_name="sql", lora_path="/adapters/sql")
    ops: list[cmd.Op] = [
        cmd.TransformOp("compress", "cachegen", "LocalCPUBackend", [1, 2], scope=scope),
        cmd.PinOp([1, 2], scope=scope),
        cmd.UnpinOp([1, 2], scope=scope),
        cmd.MoveOp("LocalCPUBackend", "LocalDiskBackend", [1, 2], scope=scope),
    ]
    for op in ops:
        prepare = cmd.Prepare("e", op, 1.0)
        decoded = cmd.command_decoder().decode(encode(prepare))
        assert isinstance(decoded, cmd.Prepare) and decoded == prepare
        assert decoded.op.scope is not None  # type: ignore[union-attr]
        assert decoded.op.scope.key_scope() == KeyScope("tenant-a", "sql", "/adapters/sql")  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"garbage", msgspec.msgpack.encode({"type": "Nope"}), b"\x92\x01\x02"],
)
def test_malformed_bytes_raise_message_error(data: bytes) -> None:
    with pytest.raises(MessageError, match="malformed worker message"):
        decode_worker(data)


def test_validation_errors_name_the_field() -> None:
    bad = msgspec.msgpack.encode(
        {
            "type": "ChunkEvents",
            "instance_id": "i",
            "rank": 0,
            "session": "s",
            "ops": [[True, "LocalCPUBackend", [-5]]],
        }
    )
    with pytest.raises(MessageError, match=r"\$\.ops\[0\]\[2\]\[0\]"):
        decode_worker(bad)


def test_an_older_register_still_decodes() -> None:
    msg = decode_worker(REGISTER_V1)
    assert isinstance(msg, mon.Register) and msg.pid == 0 and msg.rank == 1


def test_a_prepare_of_the_first_release_still_decodes() -> None:
    prepare = cmd.command_decoder().decode(PREPARE_V1)
    assert prepare == cmd.Prepare("e", cmd.PinOp([1, 2]), 5.0)


def test_unknown_fields_from_a_newer_peer_are_ignored() -> None:
    newer = msgspec.msgpack.encode(
        {"type": "Deregister", "instance_id": "i", "rank": 0, "session": "s", "reason": "bye"}
    )
    assert decode_worker(newer) == mon.Deregister("i", 0, "s")


@pytest.mark.parametrize(
    ("field", "value"),
    [("host", "bad host"), ("host", "*"), ("host", "tcp://x"), ("rank", 256), ("port", 0)],
)
def test_heartbeats_with_an_unusable_address_or_rank_are_malformed(
    field: str, value: object
) -> None:
    beat = {"type": "Heartbeat", "instance_id": "i", "rank": 0, "session": "s"}
    beat.update({"host": "worker-1.example", "port": 8001, field: value})
    with pytest.raises(MessageError, match=field):
        decode_worker(msgspec.msgpack.encode(beat))


def test_a_heartbeat_with_a_short_usage_report_is_malformed() -> None:
    beat = {
        "type": "Heartbeat",
        "instance_id": "i",
        "rank": 0,
        "session": "s",
        "host": "h",
        "port": 1,
        "usage": {"LocalCPUBackend": [1, 2]},
    }
    with pytest.raises(MessageError, match="usage"):
        decode_worker(msgspec.msgpack.encode(beat))


def test_a_prepare_held_longer_than_the_cap_is_malformed() -> None:
    forged = encode(cmd.Prepare("e", cmd.PinOp([1]), 1e12))
    with pytest.raises(MessageError, match="ttl_s"):
        cmd.command_decoder().decode(forged)


def test_a_huge_instance_id_is_malformed() -> None:
    forged = encode(mon.Deregister("x" * 1_000_000, 0, "s"))
    with pytest.raises(MessageError, match="instance_id"):
        decode_worker(forged)


def test_a_register_from_before_peers_decodes_with_no_peer_address() -> None:
    register = decode_worker(REGISTER_V1)
    assert isinstance(register, mon.Register)
    assert register.peer_address is None and register.layout is None


def test_peer_and_locate_messages_round_trip_and_bound_their_sizes() -> None:
    from lmc_connector.control.wire import locate as lw
    from lmc_connector.control.wire import peer as pw

    fetch = pw.Fetch("abc", [ChunkKey(1), ChunkKey(2**64 - 1)], "LocalCPUBackend")
    assert pw.peer_request_decoder().decode(encode(fetch)) == fetch
    reply = pw.Chunks([pw.ChunkInfo(4, "cachegen"), pw.ChunkInfo(2)])
    assert pw.chunks_decoder().decode(encode(reply)) == reply
    ask = lw.FindPeer("inst", [ChunkKey(5), ChunkKey(6)], 1)
    assert lw.find_peer_decoder().decode(encode(ask)) == ask
    with pytest.raises(MessageError):
        pw.peer_request_decoder().decode(
            encode(pw.Fetch("abc", [ChunkKey(k) for k in range(pw.MAX_FETCH_KEYS + 1)]))
        )
    pull = cmd.Prepare("e", cmd.PullOp(["tcp://h:1"], "A", "B", [1], True, 1), ttl_s=1.0)
    assert cmd.command_decoder().decode(encode(pull)) == pull
    bad = cmd.Prepare("e", cmd.PullOp(["tcp://h:1; rm -rf /"], "A", "B", [1]), ttl_s=1.0)
    with pytest.raises(MessageError):
        cmd.command_decoder().decode(encode(bad))


def test_calibrations_travel_and_a_register_from_before_them_needs_none() -> None:
    prepare = cmd.Prepare("e", cmd.CalibrateOp("kvtc"), 1.0)
    assert cmd.command_decoder().decode(encode(prepare)) == prepare
    refusal = cmd.Failed("conflict", "calibrate first")
    assert cmd.reply_decoder().decode(encode(refusal)) == refusal
    fitted = mon.JobDone("i", 0, "s", "e", JobOutcome(calibration_id="0" * 32))
    assert decode_worker(encode(fitted)) == fitted
    register = decode_worker(REGISTER_V1)
    assert isinstance(register, mon.Register)
    assert register.calibrated_methods == [] and register.calibrations == {}


def test_a_calibration_id_that_is_not_one_is_malformed() -> None:
    forged = msgspec.msgpack.encode(
        {"type": "JobDone", "instance_id": "i", "rank": 0, "session": "s", "event_id": "e",
         "outcome": {"calibration_id": "../../etc"}}
    )  # fmt: skip
    with pytest.raises(MessageError, match=r"calibration_id"):
        decode_worker(forged)
