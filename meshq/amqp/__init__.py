"""AMQP 0-9-1 for meshq (issue 10): the frame reader and the sans-IO connection state
machine. Not yet served by meshqd."""
