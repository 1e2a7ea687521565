"""The one accept loop of meshqd: client sockets, peer streams and the simulated network.

Shaped as trio's ``serve_listeners``: accept, hand each stream to a handler task in the
loop's own nursery, report ``started()`` once accepting. Never: the loop ended by a
failed accept other than the listener's close (EMFILE and friends are waited out).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

__all__ = ["ACCEPT_BACKOFF", "serve_accepted"]

log = logging.getLogger("meshq.mesh.accept")
ACCEPT_BACKOFF = 0.1  # seconds to wait after a failed accept (out of descriptors, memory)

S = TypeVar("S")


async def serve_accepted(accept: Callable[[], Awaitable[S]],
                         handle: Callable[[trio.Nursery, S], None], *, what: str,
                         task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
                         ) -> None:
    """Call ``accept()`` until it raises trio.ClosedResourceError (the listener was
    closed: return) and ``handle(nursery, stream)`` for each stream it returns; ``handle``
    does not block: it starts the stream's task in ``nursery`` (or closes it). An OSError
    from ``accept`` (EMFILE, ENFILE, ENOMEM, ENOBUFS, a connection aborted before it was
    accepted) is logged and waited out for ACCEPT_BACKOFF seconds. Returning or being
    cancelled, the nursery waits for (or cancels) the handler tasks."""
    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            try:
                stream = await accept()
            except trio.ClosedResourceError:
                return
            except OSError as exc:
                log.warning("%s: accept failed: %s; retrying in %g s", what, exc,
                            ACCEPT_BACKOFF)
                await trio.sleep(ACCEPT_BACKOFF)
                continue
            handle(nursery, stream)
