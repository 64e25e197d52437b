"""gunicorn's threaded worker (``gthread``), with a connection's lingering close off its main thread.

gunicorn 27 closes a connection that will not be kept alive "gracefully" (RFC 9112 §9.6: it sends
FIN, then reads until the client closes or 2 s pass) from ``finish_request``, which runs on the
worker's main thread: meanwhile that worker accepts and dispatches nothing. With keep-alive off
(``app.gunicorn_conf``) every answer ends so, and a client that keeps its socket open after reading
one (the official x402 requests client does, retrying after a 402) stalled the worker for 2 s for
everyone. Here the same graceful close runs in a small pool of the worker's own.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gunicorn.workers.gthread import ThreadWorker as GunicornThreadWorker

LINGER_THREADS = 16  # connections lingering at once per worker; more wait their turn, not the worker


class ThreadWorker(GunicornThreadWorker):
    """``gthread`` whose graceful closes linger in ``LINGER_THREADS`` threads of their own."""

    def init_process(self) -> None:
        self._lingering = ThreadPoolExecutor(LINGER_THREADS, thread_name_prefix="x402-linger")
        super().init_process()

    def finish_request(self, conn: Any, fs: Any) -> None:
        if not getattr(conn, "_x402_lingers_apart", False):
            close = conn.close

            def close_apart(graceful: bool = False) -> None:
                if graceful:
                    self._lingering.submit(close, True)
                else:
                    close()

            conn.close = close_apart
            conn._x402_lingers_apart = True
        super().finish_request(conn, fs)
