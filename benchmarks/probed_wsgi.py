"""``wsgi:app`` with the timing probes of ``benchmarks.probe`` (env ``BENCH_PROBE_DIR``), for profiles:
``python -m gunicorn -c gunicorn.conf.py benchmarks.probed_wsgi:app``."""

from benchmarks import probe

probe.install()

from wsgi import app  # noqa: E402  (the probes go in before the app is built)

probe.wrap_wsgi(app)
