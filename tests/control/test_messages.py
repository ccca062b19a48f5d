"""Wire messages: round trips, malformed input, and schema evolution."""

from __future__ import annotations

import msgspec
import pytest

from lmc_connector.control import messages as m

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


@pytest.mark.parametrize(
    "message",
    [
        m.Register("i", 0, 1, "s", "h", 1, "m", 4, ["LocalCPUBackend"], ["cachegen"], 7),
        m.Heartbeat("i", 0, "s", "h", 1, {"LocalCPUBackend": [1, 2, 3]}),
        m.ChunkEvents("i", 0, "s", [m.ChunkOp(True, "LocalCPUBackend", [0, 2**64 - 1])]),
        m.Snapshot("i", 0, "s", {"LocalCPUBackend": [5]}),
        m.JobDone("i", 0, "s", "e", 12, 3, errors=["x"]),
        m.Deregister("i", 0, "s"),
    ],
)
def test_worker_messages_round_trip(message: m.WorkerMessage) -> None:
    assert m.worker_message_decoder().decode(m.encode(message)) == message


def test_commands_and_replies_round_trip() -> None:
    op = m.TransformOp("compress", "cachegen", "LocalCPUBackend", [1, 2])
    for cmd in (m.Prepare(1, "e", op, 1.0), m.Commit(2, "e"), m.Abort(3, "e"), m.Resync(4)):
        assert m.command_decoder().decode(m.encode(cmd)) == cmd
    for reply in (m.Ok(1, num_tokens=3), m.Failed(2, "expired", "late")):
        assert m.reply_decoder().decode(m.encode(reply)) == reply


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"garbage", msgspec.msgpack.encode({"type": "Nope"}), b"\x92\x01\x02"],
)
def test_malformed_bytes_raise_message_error(data: bytes) -> None:
    with pytest.raises(m.MessageError, match="malformed worker message"):
        m.worker_message_decoder().decode(data)


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
    with pytest.raises(m.MessageError, match=r"\$\.ops\[0\]\[2\]\[0\]"):
        m.worker_message_decoder().decode(bad)


def test_an_older_register_still_decodes() -> None:
    msg = m.worker_message_decoder().decode(REGISTER_V1)
    assert isinstance(msg, m.Register) and msg.pid == 0 and msg.rank == 1


def test_unknown_fields_from_a_newer_peer_are_ignored() -> None:
    newer = msgspec.msgpack.encode(
        {"type": "Deregister", "instance_id": "i", "rank": 0, "session": "s", "reason": "bye"}
    )
    assert m.worker_message_decoder().decode(newer) == m.Deregister("i", 0, "s")


@pytest.mark.parametrize(
    ("field", "value"),
    [("host", "bad host"), ("host", "*"), ("host", "tcp://x"), ("rank", 256), ("port", 0)],
)
def test_heartbeats_with_an_unusable_address_or_rank_are_malformed(
    field: str, value: object
) -> None:
    beat = {"type": "Heartbeat", "instance_id": "i", "rank": 0, "session": "s"}
    beat.update({"host": "worker-1.example", "port": 8001, field: value})
    with pytest.raises(m.MessageError, match=field):
        m.worker_message_decoder().decode(msgspec.msgpack.encode(beat))


def test_a_prepare_without_ttl_from_an_older_controller_still_decodes() -> None:
    op = m.PinOp([1, 2])
    older = msgspec.msgpack.encode(
        {
            "type": "Prepare",
            "request_id": 1,
            "event_id": "e",
            "op": msgspec.to_builtins(op),
            "expires_at": 5.0,
        }
    )
    cmd = m.command_decoder().decode(older)
    assert isinstance(cmd, m.Prepare) and cmd.ttl_s is None and cmd.op == op
