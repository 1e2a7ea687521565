"""The command-line tools: ``meshq`` (queues and messages) and ``meshq-ctl`` (node status).

Both follow SPEC section 5: ``--socket``, else ``$MESHQ_SOCKET``, else the default socket;
errors are one line on stderr starting with the error code, with a distinct exit status.
"""

__all__: list[str] = []
