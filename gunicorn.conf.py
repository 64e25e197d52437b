"""gunicorn settings for x402-tee-proxy.

Threaded workers: a streamed answer holds a thread for its whole length, so each worker runs
several. All payment state is in Redis, so any number of workers and hosts can share the load.
"""

import multiprocessing
import os

bind = os.environ.get("X402_BIND", "0.0.0.0:8402")
workers = int(os.environ.get("X402_WORKERS", str(max(2, multiprocessing.cpu_count()))))
worker_class = "gthread"
# A stream holds a thread for its whole length. Measured with benchmarks/stream_starvation.py on
# 2 cores, 2 workers, 40 concurrent 1 s paid streams: 8 threads let short calls wait up to 2.2 s
# (streams finished after 4.0 s); 32 threads kept short calls under 0.1 s (streams done in 2.4 s).
# Size it to the streams one worker should carry at once.
threads = int(os.environ.get("X402_THREADS", "32"))
# Build the app once in the master: start-up checks (RPC chain id, token domain, Redis, keyspace)
# then fail before any worker forks, with our one-line reason and no respawn loop. Everything
# that holds connections (RPC and upstream sessions, the settlement pool) is created per process.
preload_app = True
timeout = 180  # longer than the slowest settlement plus model call
graceful_timeout = 30
keepalive = 5
accesslog = None  # the request line may carry nothing secret, but keep logs to the app's own
errorlog = "-"
