"""The web face: thin Flask views over ``app.services``, errors, edge, metrics, access log, landing."""

from __future__ import annotations

from flask import current_app

from app.services import Services


def services() -> Services:
    """The services of the app serving the current request."""
    found: Services = current_app.extensions["x402"]
    return found
