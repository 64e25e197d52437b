"""WSGI entry point, in the package so an installed wheel can serve: ``x402-proxy serve`` runs
``gunicorn -c python:app.gunicorn_conf app.wsgi:app``. Settings come from X402_* variables.

Settings or start-up checks that fail are logged as one line and end the process with code 4,
gunicorn's "application failed to load": the master stops instead of respawning workers.
"""

from __future__ import annotations

import logging
import sys

from app import create_checked_app
from app.settings import SettingsError

APP_LOAD_FAILED = 4  # gunicorn's exit code for an application that cannot load

try:
    app = create_checked_app()
except SettingsError as exc:
    logging.getLogger("x402.startup").critical("x402-proxy: refusing to start: %s", exc)
    sys.exit(APP_LOAD_FAILED)
