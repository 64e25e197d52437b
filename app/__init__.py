"""x402-tee-proxy: a pay-per-call x402 gateway in front of confidential (TEE) model hosts."""

from __future__ import annotations

from flask import Flask

from app.settings import Settings


def create_app(settings: Settings | None = None, services: object | None = None) -> Flask:
    """Build the app: no network I/O (``app.services.check`` runs the start-up checks from the entry
    points). ``services`` (an ``app.services.Services``) replaces the ones built from ``settings``,
    so views can be tested with fakes at the backend boundary; raises ``SettingsError`` for settings
    or a catalog that cannot be used."""
    from app.services import Services, build
    from app.web import accesslog, edge, errors, landing, metrics, ops, routes

    app = Flask(__name__)
    settings = settings or Settings.from_env()
    app.config["X402_SETTINGS"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    built = services if isinstance(services, Services) else build(settings)
    app.extensions["x402"] = built
    for part in (edge, metrics, accesslog, errors, routes, landing, ops):
        part.init_app(app)
    return app


def create_checked_app(settings: Settings | None = None) -> Flask:
    """``create_app`` and its start-up checks (Redis, RPC chain id, token domain, facilitator): what
    gunicorn and the CLI serve. Raises ``SettingsError`` naming the variable to fix."""
    from app.services import check

    app = create_app(settings)
    check(app.extensions["x402"])
    return app
