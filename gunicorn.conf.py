"""gunicorn settings from a checkout: ``gunicorn -c gunicorn.conf.py wsgi:app``. The settings live in
the package (``app.gunicorn_conf``), which is what an installed wheel's ``x402-proxy serve`` uses."""

from app.gunicorn_conf import *  # noqa: F403  (gunicorn reads the settings from this module's names)
