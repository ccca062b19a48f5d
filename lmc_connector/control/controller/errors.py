"""Refusals of the controller, each mapped to an HTTP status; messages say what to fix."""

from __future__ import annotations

import difflib

#: Names listed in an error message at most; a fleet of instances is summarised beyond it.
MAX_LISTED = 20
#: Characters of a caller's value echoed in an error message at most.
MAX_ECHO = 80


def echo(value: str) -> str:
    """`value` as an error message quotes it: shortened when long."""
    return value if len(value) <= MAX_ECHO else f"{value[:MAX_ECHO]}... ({len(value)} chars)"


def listing(names: list[str]) -> str:
    shown = ", ".join(sorted(names)[:MAX_LISTED]) or "none"
    return shown if len(names) <= MAX_LISTED else f"{shown} and {len(names) - MAX_LISTED} more"


def did_you_mean(value: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(value, valid, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


class ControlError(ValueError):
    """A request the controller refuses; `status` is the HTTP status to answer with.

    `event_id` names the (failed) operation when one was created before the refusal.
    """

    status = 400

    def __init__(self, message: str, event_id: str | None = None) -> None:
        super().__init__(message)
        self.event_id = event_id


class BodyError(ControlError):
    """The request body is not what the route expects; the message names the field."""


class WorkerUnavailableError(ControlError):
    """Workers did not answer in time or failed; retry later or check the workers.

    Nothing was applied when it happened in the prepare phase; a failure in the
    commit phase says which workers applied the op and which did not.
    """

    status = 503


class WorkerRejectedError(ControlError):
    """A worker refused the request (e.g. an unknown location); the message says why."""


class NotRegisteredError(ControlError):
    """Nothing registered goes by this name; use one of those listed."""

    status = 404

    def __init__(self, unknown: str, value: str, known: str, valid: list[str]) -> None:
        super().__init__(
            f"{unknown} '{echo(value)}'{did_you_mean(value, valid)}; "
            f"{known}: {listing(valid) if valid else 'none registered'}"
        )


class UnknownInstanceError(NotRegisteredError):
    """No registered instance has this id; use one of those listed."""

    def __init__(self, instance_id: str, valid: list[str]) -> None:
        super().__init__("unknown instance_id", instance_id, "instances", valid)


class UnknownAddressError(NotRegisteredError):
    """No registered worker advertises this address; use one of those listed."""

    def __init__(self, ip: str, valid: list[str]) -> None:
        super().__init__("no instance has a worker at", ip, "worker addresses", valid)


class UnknownOperationError(ControlError):
    """No operation has this event_id (never issued, or forgotten long after it ended)."""

    status = 404

    def __init__(self, event_id: str) -> None:
        super().__init__(
            f"unknown event_id '{echo(event_id)}' (never issued, or forgotten after it ended)"
        )


class InvalidChoiceError(ControlError):
    """A method or location the instance's workers do not offer; use one of those listed."""

    def __init__(self, what: str, value: str, valid: list[str]) -> None:
        super().__init__(
            f"unknown {what} '{echo(value)}'{did_you_mean(value, valid)}; valid: {listing(valid)}"
        )


class NotYetError(ControlError):
    """The instance cannot do this yet (e.g. compress with a calibrated codec before a
    calibration); the message says what to do first."""

    status = 409


class InstanceNotReadyError(ControlError):
    """Some tensor-parallel ranks of the instance are not registered; retry when they are."""

    status = 503
