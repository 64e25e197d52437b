"""gunicorn entry point: ``gunicorn -c gunicorn.conf.py wsgi:app``."""

import sys

from app import create_app
from app.settings import SettingsError

try:
    app = create_app()
except SettingsError as exc:
    sys.stderr.write(f"x402-proxy: refusing to start: {exc}\n")
    sys.exit(4)  # gunicorn's "application failed to load": the master stops instead of respawning
