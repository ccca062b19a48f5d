"""A worker in its own process: a CPU cache engine holding a prompt, and a control agent.

argv: monitor_port instance_id port rank world_size tokens(comma list) run|block
With "block", compress/decompress jobs never finish (the test kills the process
mid-command). Runs until stdin closes or the process is killed.
"""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.control.harness import engine_config, start_worker


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    monitor_port, instance_id, port, rank, world_size, tokens_text, mode = sys.argv[1:8]
    config = engine_config(int(monitor_port), instance_id, [int(port) - int(rank)])
    worker = start_worker(config, int(rank), int(world_size))
    if mode == "block":
        forever = threading.Event()

        def blocked_run(job: object) -> object:
            forever.wait()
            return job

        worker.engine.run = blocked_run
    worker.fill([int(t) for t in tokens_text.split(",")])
    sys.stdin.read()
    worker.agent.close()


if __name__ == "__main__":
    main()
