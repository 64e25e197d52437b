"""x402-tee-proxy: a pay-per-call x402 gateway in front of confidential (TEE) model hosts."""

from __future__ import annotations

from flask import Flask

from app.settings import Settings


def create_app(settings: Settings | None = None) -> Flask:
    """Build the app. Each resource module checks its own dependency at start (Redis, RPC chain id,
    token domain) and raises ``SettingsError`` naming the variable to fix."""
    from app import catalog
    from app.backends import attestation, chain, upstream
    from app.payments import gate, ledger, settlement
    from app.web import accesslog, edge, errors, landing, metrics, ops, routes

    app = Flask(__name__)
    settings = settings or Settings.from_env()
    app.config["X402_SETTINGS"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    edge.init_app(app)
    metrics.init_app(app)
    accesslog.init_app(app)
    errors.init_app(app)
    catalog.init_app(app)
    ledger.init_app(app)
    chain.init_app(app)
    settlement.init_app(app)
    upstream.init_app(app)
    gate.init_app(app)
    attestation.init_app(app)
    routes.init_app(app)
    landing.init_app(app)
    ops.init_app(app)
    return app
