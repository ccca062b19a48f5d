"""Following an operation to its end (`--wait`), with a progress line on a terminal only."""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from lmc_connector.control.admin.client import ControllerClient

#: Seconds between event polls.
POLL_S = 0.2
TERMINAL = ("finished", "failed")


class WaitTimeoutError(TimeoutError):
    """The operation had not ended when the wait ran out; it goes on, `event` is its last state."""

    def __init__(self, event: dict[str, Any], limit: float) -> None:
        super().__init__(f"event {event['event_id']} still {event['status']} after {limit:g} s")
        self.event = event


def _describe(event: dict[str, Any]) -> str:
    workers = event.get("workers", [])
    done = sum(w["status"] in TERMINAL for w in workers)
    chunks = sum(w.get("chunks_done", 0) for w in workers)
    return (
        f"{event.get('kind', 'event')} {event['event_id'][:12]}: {event['status']}, "
        f"{chunks} chunks done, {done}/{len(workers)} workers finished"
    )


def follow(client: ControllerClient, event_id: str, limit: float, progress: bool) -> dict[str, Any]:
    """Poll the event until it ends; WaitTimeoutError after `limit` seconds.

    With `progress`, a transient line on stderr shows the elapsed time and the
    chunks done so far; it is gone before anything else is printed.
    """
    deadline = time.monotonic() + limit
    bar = (
        Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        if progress
        else None
    )
    with bar if bar is not None else nullcontext():
        task = bar.add_task(f"event {event_id[:12]}", total=None) if bar is not None else None
        while True:
            event: dict[str, Any] = client.event(event_id)
            if bar is not None and task is not None:
                bar.update(task, description=_describe(event))
            if event["status"] in TERMINAL:
                return event
            if time.monotonic() > deadline:
                raise WaitTimeoutError(event, limit)
            time.sleep(POLL_S)
