"""gunicorn settings for x402-tee-proxy: ``gunicorn -c python:app.gunicorn_conf app.wsgi:app`` (what
``x402-proxy serve`` runs; a checkout's ``gunicorn.conf.py`` imports them).

Threaded workers: a streamed answer holds a thread for its whole length, so each worker runs
several. All payment state is in Redis, so any number of workers and hosts can share the load.
"""

import glob
import logging
import multiprocessing
import os
import tempfile

from app import logs

bind = os.environ.get("X402_BIND", "0.0.0.0:8402")
workers = int(os.environ.get("X402_WORKERS", str(max(2, multiprocessing.cpu_count()))))
worker_class = "app.gunicorn_worker.ThreadWorker"  # gthread, its lingering closes off the main thread
# A stream holds a thread for its whole length: size it to the streams one worker should carry.
threads = int(os.environ.get("X402_THREADS", "32"))
# A gthread worker accepts a connection whenever it holds fewer than worker_connections (gunicorn's
# default: 1000), whether or not a thread is free, and a connection it accepted waits for one of its
# threads. Long streams then piled onto one worker while the other had idle threads, and short paid
# calls landing there waited for a stream to end. With worker_connections = threads a worker holds no
# more connections than it has threads: once they are all busy it stops accepting (gthread.py's run
# loop), and the next connection goes to a worker with a free thread, or waits in the listen backlog
# until one frees. benchmarks/stream_starvation.py measures both; see benchmarks/RESULTS.md.
worker_connections = threads
# Build the app once in the master: start-up checks (RPC chain id, token domain, Redis, keyspace)
# then fail before any worker forks, with our one-line reason and no respawn loop. Everything
# that holds connections (RPC and upstream sessions, the settlement pool) is created per process.
preload_app = True
timeout = 180  # longer than the slowest settlement plus model call
graceful_timeout = 30
# Off, and it must be with worker_connections = threads: an idle kept-alive connection counts against
# worker_connections and would hold a worker's slot while no request runs on it (gunicorn keeps only
# worker_connections - threads of them, i.e. none, and warns at start if keepalive is on). Each
# request is then answered with "Connection: close"; a client or nginx opens a new connection.
keepalive = 0
accesslog = None  # the app writes its own line per request (x402.access), without the client address
errorlog = "-"
# Every logger, gunicorn's own included, writes one JSON object per line to standard error.
logconfig_dict = logs.logging_config()
logging.captureWarnings(True)  # Python's warnings too, as JSON lines of the "py.warnings" logger

# Metrics summed over all workers: prometheus-client's multiprocess mode needs a directory shared by
# the workers, set before the app (and prometheus_client) is imported, emptied at start.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="x402-metrics-")
for stale in glob.glob(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "*.db")):
    os.remove(stale)


def child_exit(server: object, worker: object) -> None:
    """A worker is gone: fold its metrics into the totals (gunicorn server hook)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[attr-defined]


def post_worker_init(worker: object) -> None:
    """A worker is ready: its batch-settlement claim loop starts now (gunicorn server hook), so
    what was charged before a restart is claimed even if no voucher comes; the deployment runs one
    cycle at a time whatever the number of workers and hosts."""
    extensions = getattr(getattr(worker, "wsgi", None), "extensions", {})
    services = extensions.get("x402")  # None for another app (a benchmark's reference stack)
    if services is not None and services.gate.batch is not None:
        services.gate.batch.claims.ensure_running()
