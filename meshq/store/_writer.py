"""The store's writer process: applies committed batches to SQLite, one at a time.

Why a process: SQLite steps drop and retake the GIL, and a busy event loop makes every
retake wait, so a writer thread runs several times slower than SQLite can. Protocol on
stdin/stdout: frames (meshq.protocol.codec) of {"ops": [[kind, params], ...]}, each
answered by {"ok": true} once COMMIT has returned, or {"error": "..."} after a rollback.
On EOF it exits, so it never outlives its daemon by more than one commit.
"""

from __future__ import annotations

import os
import sys

from meshq.protocol.codec import FrameDecoder, encode_frame
from meshq.store._sql import MAX_BATCH_FRAME, apply, connect


def main(path: str) -> int:
    conn = connect(path)
    decoder = FrameDecoder(MAX_BATCH_FRAME)
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    while True:
        data = os.read(stdin, 1 << 20)
        if not data:
            conn.close()
            return 0
        decoder.feed(data)
        for frame in decoder.frames():
            try:
                apply(conn, frame["ops"])
                reply = encode_frame({"ok": True})
            except Exception as exc:
                reply = encode_frame({"error": f"{exc.__class__.__name__}: {exc}"})
            view = memoryview(reply)
            while view:
                view = view[os.write(stdout, view):]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
