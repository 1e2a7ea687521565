"""AMQP 0-9-1 for meshq (issue 10): the frame reader (``frames``) and the sans-IO
connection state machine (``connection``). Not yet served by meshqd."""

__all__: list[str] = []
