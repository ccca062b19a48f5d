"""Which CPUs the connector's own threads run on: every CPU the process may use.

vLLM's CPU worker binds each OpenMP thread of the forward pass to one core, its
model-runner thread included, and a new thread inherits the CPU mask of the thread
that starts it. Started from the model-runner thread, the save thread, the lookup,
command and peer servers, the reporter and the ZeroMQ I/O threads would all share that
one core with the forward pass, and with the model-runner thread of every other worker
bound to the same core; on a busy host they then wait seconds to be scheduled, and a peer
asking for chunks gets no answer before its deadline. These helpers let such threads run
on every CPU the process may use instead (Linux only; elsewhere they do nothing).

"Every CPU the process may use" is the mask of the process that started this one (vLLM
binds the threads of its worker processes, not the engine process that starts them), so
a mask the operator set for the whole server (`taskset`, a cpuset) is kept.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

logger = logging.getLogger(__name__)


def _set(cpus: set[int]) -> bool:
    """Set the calling thread's CPU mask; False (logged) when the system refuses."""
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as e:
        logger.debug("cannot set this thread's CPU mask to %s: %s", sorted(cpus), e)
        return False
    return True


def process_cpus() -> set[int]:
    """The CPUs this process may use: those of its parent, and the calling thread's own
    (only the calling thread's when the parent's cannot be read)."""
    own = os.sched_getaffinity(0)
    try:
        return own | os.sched_getaffinity(os.getppid())
    except OSError:  # the parent is gone or not ours to ask
        return own


def widen_current_thread() -> None:
    """Let the calling thread run on every CPU the process may use. Usable as a thread
    pool's `initializer`."""
    if hasattr(os, "sched_setaffinity"):
        cpus = process_cpus()
        if cpus != os.sched_getaffinity(0):
            _set(cpus)


@contextlib.contextmanager
def threads_on_every_cpu() -> Iterator[None]:
    """Threads started inside (Python threads, and the I/O threads of ZeroMQ contexts whose
    first socket is made inside) run on every CPU the process may use, whatever the mask of
    the calling thread; the calling thread gets its own mask back on leaving."""
    if not hasattr(os, "sched_getaffinity"):
        yield
        return
    own = os.sched_getaffinity(0)
    widen_current_thread()
    try:
        yield
    finally:
        if os.sched_getaffinity(0) != own:
            _set(own)
