"""Whether the controller took a worker's registration, and what the worker says meanwhile.

Messages to the controller are fire-and-forget (PUSH), so a registration is
re-sent, with backoff, until the controller answers on the worker's command
port (`Registered`, or `RegistrationRefused` with its reason). While the
connection itself is down, `link.ControllerLink` warns; while it is up but no
answer comes, this warns (the controller cannot reach the command port).
"""

from __future__ import annotations

import logging
import time

logger = logging.getLogger(__name__)

#: Seconds before an unanswered registration is first sent again; doubles up to the maximum.
REGISTER_RETRY_S = 2.0
MAX_REGISTER_RETRY_S = 30.0
#: Seconds without an answer before (and between) warnings.
UNANSWERED_WARN_S = 10.0


class Registration:
    """Owns the state of one worker's registration: when the first unanswered one left, when
    to send it again and to warn next, and the controller's answer.

    The reporter thread calls `sent`, `follow`, `reconnected` and `due`; the
    command server thread hands over the controller's answer with `answer`.
    """

    def __init__(self, who: str, session: str, url: str, command_address: str) -> None:
        self._who = who
        self._session = session
        self._url = url
        self._command_address = command_address
        self._unanswered_since: float | None = None
        self._chunks = 0
        self._retry_at = 0.0
        self._retry_s = REGISTER_RETRY_S
        self._warn_at = 0.0
        self._answer: tuple[bool, str] | None = None
        self._ever_acknowledged = False

    @property
    def acknowledged(self) -> bool:
        """Whether the controller answered the last registration sent (any thread)."""
        return self._ever_acknowledged and self._unanswered_since is None

    def sent(self, chunks: int) -> None:
        """A registration with a snapshot of `chunks` chunks just left."""
        now = time.monotonic()
        if self._unanswered_since is None:
            self._unanswered_since = now
            self._retry_s = REGISTER_RETRY_S
            self._warn_at = now + UNANSWERED_WARN_S
        self._chunks = chunks
        self._retry_at = now + self._retry_s
        self._retry_s = min(self._retry_s * 2, MAX_REGISTER_RETRY_S)

    def answer(self, session: str, accepted: bool, reason: str = "") -> None:
        """The controller's answer for `session` (answers for another session are ignored)."""
        if session == self._session:
            self._answer = (accepted, reason)

    def due(self) -> float | None:
        """When `follow` must run next (time.monotonic()), or None while nothing is pending."""
        if self._unanswered_since is None and self._answer is None:
            return None
        return min(self._retry_at, self._warn_at)

    def reconnected(self) -> None:
        """The connection to the controller came back (the answer to the next one says more)."""
        if self._ever_acknowledged:
            logger.info("%s: connected to the controller again", self._who)

    def follow(self, now: float, connected: bool) -> bool:
        """Take the answer, or warn while there is none; True when it must be sent again."""
        answer, self._answer = self._answer, None
        since = self._unanswered_since
        if answer is not None and since is not None:
            accepted, reason = answer
            if accepted:
                self._unanswered_since = None
                self._ever_acknowledged = True
                waited = now - since
                level = logging.WARNING if waited >= UNANSWERED_WARN_S else logging.INFO
                logger.log(
                    level,
                    "%s registered with %d chunks (acknowledged after %.1f s)",
                    self._who,
                    self._chunks,
                    waited,
                )
                return False
            logger.warning("%s: the controller at %s refused it: %s", self._who, self._url, reason)
        if since is None:
            return False
        if connected and now >= self._warn_at:
            self._warn_at = now + UNANSWERED_WARN_S
            logger.warning(
                "%s: the controller at %s is connected but has not acknowledged the registration "
                "for %.0f s (still trying): check that it can reach this worker's command port "
                "%s (lmcache_worker_host, lmcache_worker_ports)",
                self._who,
                self._url,
                now - since,
                self._command_address,
            )
        return now >= self._retry_at
