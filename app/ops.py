"""Operator endpoints: ``/healthz`` (the process answers) and ``/readyz`` (its dependencies do)."""

from __future__ import annotations

from flask import Blueprint, Flask, Response, jsonify

from .chain import get_chain
from .ledger import get_ledger

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> Response:
    checks: dict[str, dict[str, object]] = {}
    try:
        get_ledger().redis.ping()
        checks["redis"] = {"ok": True}
    except Exception as exc:
        checks["redis"] = {"ok": False, "error": type(exc).__name__}
    chain = get_chain()
    try:
        chain_id = int(chain.rpc.call("eth_chainId", []), 16)
        expected = chain.settings.network.chain_id
        checks["rpc"] = {"ok": chain_id == expected, "chain_id": chain_id}
    except Exception as exc:
        checks["rpc"] = {"ok": False, "error": type(exc).__name__}
    ready = all(c["ok"] for c in checks.values())
    response = jsonify({"ready": ready, "checks": checks})
    response.status_code = 200 if ready else 503
    return response


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
