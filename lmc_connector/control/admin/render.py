"""How `lmc-admin` prints an answer: a table (`-o table`, `-o wide`), JSON or YAML.

Tables are for people: times are local dates or ages, sizes are bytes with a
unit, absent values are "-". JSON and YAML are the controller's answer
unchanged, for scripts. Each answer is recognised by its fields, so a
command's output and the event it waits for print alike.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, TextIO

import yaml
from rich.console import Console
from rich.table import Table

FORMATS = ("table", "wide", "json", "yaml")
#: Columns of a table printed into a pipe or a file (never wrapped there).
PIPE_WIDTH = 1000

Row = list[str]


def console(stream: TextIO | None = None) -> Console:
    """A console on `stream` (stdout by default) that never wraps tables into a pipe."""
    stream = stream or sys.stdout
    terminal = stream.isatty()
    return Console(file=stream, width=None if terminal else PIPE_WIDTH, highlight=False)


def text(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return ",".join(text(v) for v in value) or "-"
    return str(value)


def size(nbytes: int | float | None) -> str:
    if nbytes is None:
        return "-"
    value = float(nbytes)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(value) < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def age(seconds: float | None) -> str:
    """A duration as kubectl shows ages: 850ms, 12s, 4m10s, 3h5m, 2d4h."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def when(epoch: float | None) -> str:
    """A wall-clock time (seconds since the epoch) as a local date and time."""
    if epoch is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _table(out: Console, headers: list[str], rows: Iterable[Row], empty: str) -> None:
    rows = list(rows)
    if not rows:
        out.print(empty)
        return
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for header in headers:
        table.add_column(header, no_wrap=True, overflow="fold")
    for row in rows:
        table.add_row(*row)
    if out.is_terminal:
        out.print(table)
        return
    with out.capture() as captured:  # into a pipe: no padding after the last column
        out.print(table)
    out.file.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))


def _fields(out: Console, pairs: list[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in pairs)
    for key, value in pairs:
        out.print(f"{key + ':':<{width + 1}} {value}", soft_wrap=True)


# -- one renderer per kind of answer -------------------------------------------------------


def _event(out: Console, data: dict[str, Any], wide: bool) -> None:
    created = data.get("created_at")
    finished = data.get("finished_at")
    took = finished - created if finished is not None and created is not None else None
    _fields(
        out,
        [
            ("event", data["event_id"]),
            ("kind", data.get("kind", "-")),
            *([("method", data["method"])] if data.get("method") else []),
            ("instance", text(data.get("instance_id"))),
            ("status", data["status"]),
            ("tokens", text(data.get("num_tokens"))),
            ("started", when(created)),
            ("took", age(took) if took is not None else "-"),
            *([("error", data["error"])] if data.get("error") else []),
        ],
    )
    headers = ["RANK", "STATUS", "TOKENS", "CHUNKS", "SKIPPED", "BEFORE", "AFTER", "SECONDS"]
    calibrations = any(w.get("calibration_id") for w in data.get("workers", []))
    if calibrations:
        headers.append("CALIBRATION")
    if wide:
        headers += ["REMOVED", "KEPT", "ERRORS"]
    rows = []
    for w in data.get("workers", []):
        row = [
            text(w["rank"]),
            w["status"],
            text(w.get("num_tokens", 0)),
            text(w.get("chunks_done", 0)),
            text(w.get("chunks_skipped", 0)),
            size(w.get("bytes_before", 0)),
            size(w.get("bytes_after", 0)),
            f"{w.get('seconds', 0.0):.2f}",
        ]
        if calibrations:
            row.append(text(w.get("calibration_id")))
        if wide:
            row += [text(w.get("removed", 0)), text(w.get("kept", 0)), text(w.get("errors"))]
        rows.append(row)
    out.print()
    _table(out, headers, rows, "no workers")


def _usage(worker: dict[str, Any]) -> tuple[int, int, int]:
    usage = worker.get("usage", {}).values()
    return (
        sum(u["chunks"] for u in usage),
        sum(u["used_bytes"] for u in usage),
        sum(u["capacity_bytes"] for u in usage),
    )


def _workers(out: Console, workers: list[dict[str, Any]], wide: bool) -> None:
    headers = ["INSTANCE", "WORKER", "ADDRESS", "MODEL", "LOCATIONS", "CHUNKS", "USED"]
    headers += ["HEARTBEAT", "AGE"]
    if wide:
        headers += ["CAPACITY", "METHODS", "CALIBRATIONS", "PEER", "REGISTERED", "PID"]
    rows = []
    for w in workers:
        chunks, used, capacity = _usage(w)
        row = [
            w["instance_id"],
            text(w["worker_id"]),
            w.get("address", f"{w.get('ip')}:{w.get('port')}"),
            text(w.get("model")),
            text(w.get("locations")),
            text(chunks),
            size(used),
            age(w.get("last_heartbeat_age_s")) + " ago",
            age(w.get("registered_age_s")),
        ]
        if wide:
            row += [
                size(capacity),
                text(w.get("methods")),
                text([f"{m}:{i[:12]}" for m, i in sorted((w.get("calibrations") or {}).items())]),
                text(w.get("peer_init_url")),
                when(w.get("registration_time")),
                text(w.get("pid")),
            ]
        rows.append(row)
    _table(out, headers, rows, "no workers registered")


def _instances(out: Console, data: dict[str, Any], wide: bool) -> None:
    headers = ["INSTANCE", "MODEL", "WORKERS", "CHUNK SIZE", "CHUNKS", "LOCATIONS"]
    if wide:
        headers += ["METHODS", "USED", "CAPACITY"]
    rows = []
    for inst in data["instances"]:
        row = [
            inst["instance_id"],
            text(inst["model"]),
            f"{len(inst['workers'])}/{inst['world_size']}",
            text(inst["chunk_size"]),
            text(inst["indexed_chunks"]),
            text(inst["locations"]),
        ]
        if wide:
            usage = [_usage(w) for w in inst["workers"]]
            row += [
                text(inst["methods"]),
                size(sum(u[1] for u in usage)),
                size(sum(u[2] for u in usage)),
            ]
        rows.append(row)
    _table(out, headers, rows, "no instances registered")


def _health(out: Console, data: dict[str, Any], wide: bool) -> None:
    _fields(
        out,
        [
            ("status", data["status"]),
            ("instances", data.get("instances", "-")),
            ("workers", data.get("workers", "-")),
            ("indexed chunks", data.get("indexed_chunks", "-")),
        ],
    )
    for problem in data.get("problems", []):
        out.print(f"problem: {problem}", soft_wrap=True)
    codes = data.get("error_codes") or {}
    if codes:
        out.print()
        rows = [[str(w), "ok" if c == 0 else f"missing ({c})"] for w, c in codes.items()]
        _table(out, ["WORKER", "STATE"], rows, "")


def _lookup(out: Console, data: dict[str, Any], wide: bool) -> None:
    rows = [[inst, loc, text(n)] for inst, (loc, n) in sorted(data["layout_info"].items())]
    _table(out, ["INSTANCE", "LOCATION", "TOKENS"], rows, "not cached on any instance")


def _clear(out: Console, data: dict[str, Any], wide: bool) -> None:
    row = [data["event_id"], text(data["num_tokens"]), text(data["removed"])]
    _table(
        out,
        ["EVENT", "TOKENS", "REMOVED", "KEPT (PINNED)"],
        [[*row, text(data["kept_pinned"])]],
        "",
    )


def _scheduled(out: Console, data: dict[str, Any], wide: bool) -> None:
    _table(out, ["EVENT", "TOKENS"], [[data["event_id"], text(data["num_tokens"])]], "")


def _query_instance(out: Console, data: dict[str, Any], wide: bool) -> None:
    rows = [[i] for i in data.get("instance_ids") or [data["res"]]]
    _table(out, ["INSTANCE"], rows, "")


def _operations(out: Console, data: dict[str, Any], wide: bool) -> None:
    headers = ["EVENT", "KIND", "METHOD", "INSTANCE", "STATUS", "TOKENS", "STARTED", "TOOK"]
    rows = []
    for op in data["operations"]:
        created, finished = op.get("created_at"), op.get("finished_at")
        took = finished - created if finished is not None and created is not None else None
        rows.append(
            [
                op["event_id"],
                op.get("kind", "-"),
                text(op.get("method")),
                text(op.get("instance_id")),
                op["status"],
                text(op.get("num_tokens")),
                when(created),
                age(took) if took is not None else "-",
            ]
        )
    _table(out, headers, rows, "no operations")


def _mapping(out: Console, data: dict[str, Any], wide: bool) -> None:
    _fields(
        out, [(k, text(v) if not isinstance(v, dict) else json.dumps(v)) for k, v in data.items()]
    )


Renderer = Callable[[Console, dict[str, Any], bool], None]

#: (fields that identify an answer, how to print it), most specific first.
_RENDERERS: list[tuple[frozenset[str], Renderer]] = [
    (frozenset({"kind", "status", "workers"}), _event),
    (frozenset({"status", "indexed_chunks"}), _health),
    (frozenset({"instances"}), _instances),
    (frozenset({"operations"}), _operations),
    (frozenset({"worker_infos"}), lambda o, d, w: _workers(o, d["worker_infos"], w)),
    (frozenset({"workers", "total_count"}), lambda o, d, w: _workers(o, d["workers"], w)),
    (frozenset({"worker_id", "ip", "usage"}), lambda o, d, w: _workers(o, [d], w)),
    (frozenset({"layout_info"}), _lookup),
    (frozenset({"removed", "kept_pinned"}), _clear),
    (frozenset({"res"}), _query_instance),
    (frozenset({"event_id", "num_tokens"}), _scheduled),
]


def show(result: Any, fmt: str, out: Console | None = None) -> None:
    """Print `result` (an answer, or the metrics text) in format `fmt` (one of FORMATS)."""
    out = out or console()
    if isinstance(result, str):
        out.file.write(result if result.endswith("\n") else result + "\n")
    elif fmt == "json":
        out.file.write(json.dumps(result, indent=2) + "\n")
    elif fmt == "yaml":
        out.file.write(yaml.safe_dump(result, sort_keys=False, default_flow_style=False))
    else:
        fields = set(result) if isinstance(result, dict) else set()
        render = next((r for keys, r in _RENDERERS if keys <= fields), _mapping)
        render(out, result, fmt == "wide")
    out.file.flush()
