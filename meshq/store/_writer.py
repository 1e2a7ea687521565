"""The store's writer process: applies committed batches to SQLite, one at a time.

Why a process: SQLite steps drop and retake the GIL, and a busy event loop makes every
retake wait, so a writer thread runs several times slower than SQLite can. Protocol on
stdin: a stream of msgpack arrays of ops ([kind, params] pairs), one array per batch; on
stdout each batch is answered by one byte, 0 once COMMIT has returned, or 1 followed by
an error line after a rollback. After a failure it refuses every batch until it reads a
nil marker: batches sent before the daemon learnt of the failure may build on the one
that failed. On EOF it exits, so it never outlives its daemon by more than one commit.
"""

from __future__ import annotations

import os
import signal
import sys

import msgpack

from meshq.allocator import tune_allocator
from meshq.store._sql import MAX_BATCH_FRAME, SKIPPED, apply, connect


def main(path: str) -> int:
    # Ctrl-C reaches the whole process group: the daemon stops us (EOF on stdin) once it
    # has committed what it staged, so the writer must not die first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tune_allocator()  # (a batch's frame and ops come and go whole)
    conn = connect(path, schema=False)
    # The daemon is the only writer to this pipe: decode without the client codec's
    # checks, which cost more than the unpacking itself on a large batch.
    unpacker = msgpack.Unpacker(raw=False, use_list=False, max_buffer_size=MAX_BATCH_FRAME)
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    failed = False
    while True:
        data = os.read(stdin, 1 << 20)
        if not data:
            conn.close()
            return 0
        unpacker.feed(data)
        for ops in unpacker:
            if ops is None:  # the daemon has seen our failure: commit again
                failed = False
                continue
            if failed:
                reply = b"\x01" + SKIPPED.encode() + b"\n"
            else:
                try:
                    apply(conn, ops)
                    reply = b"\x00"
                except Exception as exc:
                    failed = True
                    text = f"{exc.__class__.__name__}: {exc}".replace("\n", " ")
                    reply = b"\x01" + text.encode()[:4000] + b"\n"
            view = memoryview(reply)
            while view:
                view = view[os.write(stdout, view):]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
