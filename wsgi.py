"""gunicorn entry point from a checkout: ``gunicorn -c gunicorn.conf.py wsgi:app``. The app is
built in the package (``app.wsgi``), which is what an installed wheel serves."""

from app.wsgi import app

__all__ = ["app"]
