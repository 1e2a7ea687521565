"""Error codes of SPEC section 5, shared by the daemon, the clients and the CLIs.

Every error that crosses the socket is one of these codes; the CLIs map each code to
its own exit status so that scripts can tell "safe to retry" from "outcome unknown".
"""

from __future__ import annotations

__all__ = [
    "EXIT_CODES",
    "BadRequest",
    "ConsumerCancelled",
    "MeshqError",
    "NotFound",
    "PreconditionFailed",
    "ProtocolError",
    "StartupError",
    "Timeout",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
    "error_from_code",
]


class MeshqError(Exception):
    """Base of every error meshq raises on purpose. ``code`` is the wire code."""

    code = "INTERNAL"

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" if self.message else self.code


class NotFound(MeshqError):
    code = "NOT_FOUND"


class PreconditionFailed(MeshqError):
    code = "PRECONDITION_FAILED"


class BadRequest(MeshqError):
    code = "BAD_REQUEST"


class TooLarge(BadRequest):
    code = "TOO_LARGE"


class Unavailable(MeshqError):
    """Nothing was written: the request is safe to retry."""

    code = "UNAVAILABLE"


class Unauthorized(MeshqError):
    code = "UNAUTHORIZED"


class Timeout(MeshqError):
    """The outcome is unknown (the connection or the daemon went away mid-request)."""

    code = "TIMEOUT"


class ConsumerCancelled(MeshqError):
    """The daemon ended a subscription for good (its queue was deleted); the message is
    the daemon's reason. Raised by a subscription's ``get`` and iteration."""

    code = "CANCELLED"


class StartupError(RuntimeError):
    """meshqd cannot start (socket or data dir in use, store too new); one line says why."""


class ProtocolError(BadRequest):
    """Bytes on the wire that are not a valid frame. The only error the codec raises."""


class FrameTooLarge(ProtocolError, TooLarge):
    code = "TOO_LARGE"


_BY_CODE: dict[str, type[MeshqError]] = {
    cls.code: cls
    for cls in (NotFound, PreconditionFailed, BadRequest, TooLarge, Unavailable, Unauthorized,
                Timeout, ConsumerCancelled)
}

#: Exit status of the command-line tools per error code (SPEC section 5).
EXIT_CODES: dict[str, int] = {
    "NOT_FOUND": 3,
    "PRECONDITION_FAILED": 4,
    "UNAVAILABLE": 5,
    "TIMEOUT": 6,
    "UNAUTHORIZED": 7,
    "TOO_LARGE": 8,
    "BAD_REQUEST": 9,
}


def error_from_code(code: str, message: str) -> MeshqError:
    """The exception for a wire error code; unknown codes become a plain MeshqError."""
    cls = _BY_CODE.get(code)
    if cls is None:
        err = MeshqError(message)
        err.code = code
        return err
    return cls(message)
