"""Operator endpoints: ``/healthz`` (the process answers), ``/readyz`` (every dependency does, one
JSON entry per check) and ``/metrics`` (Prometheus).

``/readyz`` is answered from one evaluation per ``READY_CACHE_SECONDS`` per process: a flood of
probes (load balancers, or anyone, since it is public) costs one round of Redis and RPC work per
window, however many requests arrive, and concurrent probes wait for that one round."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify

from app import metrics
from app.backends.enclave import AttestationFailed
from app.backends.store import STORE_ERRORS
from app.backends.upstream import UpstreamFailed
from app.catalog import Model
from app.payments.keys import KEYSPACE_VERSION, relayer_nonce_key, used_keys
from app.payments.ledger import keyspace_version
from app.settings import Settings
from app.web import services
from app.web.metrics import exposition

bp = Blueprint("ops", __name__)
MAX_BLOCK_AGE_SECONDS = 120
UPSTREAM_CHECK_TTL = 30.0
READY_CACHE_SECONDS = 2.0  # how long one /readyz evaluation answers every probe (seconds)
_upstream_cache: dict[str, tuple[float, dict[str, Any]]] = {}
_upstream_lock = threading.Lock()


class Readiness:
    """The last ``/readyz`` evaluation of this process and when it was made (monotonic seconds)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._at = 0.0
        self._answer: tuple[bool, dict[str, Any]] | None = None

    def get(self, evaluate: Callable[[], tuple[bool, dict[str, Any]]]) -> tuple[bool, dict[str, Any]]:
        """The cached answer while it is younger than ``READY_CACHE_SECONDS``, else a fresh one from
        ``evaluate()``; concurrent callers wait for the one evaluation instead of each running it."""
        with self._lock:
            if self._answer is None or time.monotonic() - self._at >= READY_CACHE_SECONDS:
                self._answer = evaluate()
                self._at = time.monotonic()
            return self._answer


def _check(run: Any) -> dict[str, Any]:
    """Run one readiness check; any exception is a failed check, named by its type only."""
    try:
        result: dict[str, Any] = run()
    except Exception as exc:
        return {"ok": False, "error": type(exc).__name__}
    return result


def _redis(settings: Settings) -> dict[str, Any]:
    """Redis answers for every slot the payment path writes (on a cluster: each master holding one
    answers, and the cluster says its state is ok), and the keyspace is this code's version."""
    store = services().ledger.store
    counters = [relayer_nonce_key(settings.network.chain_id, a) for a in services().settler.addresses]
    coverage = store.coverage((*used_keys(), *counters))
    try:
        version = keyspace_version(store.client)
    except STORE_ERRORS:  # the master of the keyspace key is down: reported in the coverage
        version = None
    result: dict[str, Any] = {
        "ok": coverage.ok and version == KEYSPACE_VERSION,
        "mode": "cluster" if store.cluster else "single",
        "keyspace": version,
        "expected": KEYSPACE_VERSION,
    }
    if store.cluster:
        result.update(
            cluster_state=coverage.state,
            masters=len(coverage.masters),
            masters_down=list(coverage.down),
            slots_unserved=coverage.unserved,
            require_full_coverage=list(coverage.full_coverage),  # README: set it to "no"
        )
    return result


def _rpc(url: str) -> dict[str, Any]:
    health = services().chain.endpoint_health(url)
    if health.get("ok") and health["block_age_s"] > MAX_BLOCK_AGE_SECONDS:
        health["ok"], health["error"] = False, "stale block"
    return health


def _asset(settings: Settings) -> dict[str, Any]:
    relayers = services().settler.addresses
    paused, blacklisted, balances = services().chain.asset_status(settings.pay_to, relayers)
    result: dict[str, Any] = {
        "ok": not paused and not blacklisted,
        "paused": paused,
        "pay_to_blacklisted": blacklisted,
    }
    if not settings.facilitator_url:
        balance = min(balances)  # the relayer that runs out first
        metrics.RELAYER_BALANCE.set(balance)
        result["relayer_balance_wei"] = balance
        if len(relayers) > 1:
            result["relayer_balances_wei"] = dict(zip(relayers, balances, strict=True))
        result["relayer_ok"] = balance >= settings.relayer_min_wei
        result["ok"] = result["ok"] and result["relayer_ok"]
    return result


def _upstream(settings: Settings) -> dict[str, Any]:
    """The model host answers; cached so probes do not hammer it."""
    now = time.monotonic()
    with _upstream_lock:
        cached = _upstream_cache.get(settings.upstream_url)
        if cached and now - cached[0] < UPSTREAM_CHECK_TTL:
            return cached[1]
    try:
        answer = services().upstream.probe()
        answer.close()
        result: dict[str, Any] = {"ok": True, "status": answer.status}
    except UpstreamFailed as exc:
        result = {"ok": False, "error": str(exc)}
    with _upstream_lock:
        _upstream_cache[settings.upstream_url] = (now, result)
    return result


def _claims() -> dict[str, Any]:
    """The batch-settlement claim loop: started in this process (a worker that serves no voucher
    still claims), and its last error here, if any. Informational: the proxy stays ready, since the
    loop retries every ``X402_CLAIM_INTERVAL`` and ``/metrics`` shows the unclaimed charges."""
    batch = services().gate.batch
    assert batch is not None
    batch.claims.ensure_running()
    error = batch.claims.last_error
    return {"ok": True, "running": True, "last_error": type(error).__name__ if error else None}


def _attestation(models: list[Model]) -> dict[str, Any]:
    """Each attested model's enclave: verified (its measurement and evidence hash) or why not.
    Informational: the proxy stays ready, since the other models are still sold and a model whose
    enclave fails answers 503 ``attestation_failed`` on its own."""
    result: dict[str, Any] = {"ok": True}
    for model in models:
        try:
            verdict = services().attestor.evidence(model).verdict
        except AttestationFailed as failure:
            result[model.name] = {"verified": False, "reason": failure.reason, "detail": failure.detail}
        else:
            result[model.name] = {
                "verified": True,
                "measurement": verdict.measurement,
                "evidence_sha256": verdict.evidence_sha256,
            }
    return result


def _open_payments() -> dict[str, Any]:
    counts = services().ledger.count_open()
    for state, count in counts.items():
        metrics.OPEN_PAYMENTS.labels(state).set(count)
    return {"ok": True, **counts}


@bp.get("/healthz")
def healthz() -> Response:
    """``GET /healthz``, free: ``{"status": "ok"}`` whenever the process answers."""
    return jsonify({"status": "ok"})


def _evaluate(settings: Settings) -> tuple[bool, dict[str, Any]]:
    """Every readiness check, run now: (ready, one entry per check)."""
    checks = {"redis": _check(lambda: _redis(settings))}
    for index, url in enumerate(settings.rpc_urls):
        checks[f"rpc_{index}"] = _check(lambda url=url: _rpc(url))
    checks["asset"] = _check(lambda: _asset(settings))
    checks["upstream"] = _check(lambda: _upstream(settings))
    checks["open_payments"] = _check(_open_payments)
    if services().gate.batch is not None:
        checks["claims"] = _claims()
    attested = [m for m in services().catalog.listed() if m.attested]
    if attested:
        checks["attestation"] = _attestation(attested)
    rpc_ok = any(c["ok"] for name, c in checks.items() if name.startswith("rpc_"))
    ready = rpc_ok and all(c["ok"] for name, c in checks.items() if not name.startswith("rpc_"))
    return ready, checks


@bp.get("/readyz")
def readyz() -> Response:
    """``GET /readyz``, free: ``{"ready", "checks"}`` (one entry per check), 200 when ready, else 503;
    evaluated at most once per ``READY_CACHE_SECONDS`` (2 s) per process."""
    settings: Settings = current_app.config["X402_SETTINGS"]
    readiness: Readiness = current_app.extensions["x402.readiness"]
    ready, checks = readiness.get(lambda: _evaluate(settings))
    response = jsonify({"ready": ready, "checks": checks})
    response.status_code = 200 if ready else 503
    return response


@bp.get("/metrics")
def metrics_endpoint() -> Response:
    """``GET /metrics``, free: the Prometheus text exposition (``exposition``)."""
    return exposition(current_app.config["X402_SETTINGS"].metrics_dir)


def init_app(app: Flask) -> None:
    """Register the ops blueprint (``/healthz``, ``/readyz``, ``/metrics``) and this app's ``Readiness``
    cache as ``app.extensions["x402.readiness"]``."""
    app.extensions["x402.readiness"] = Readiness()
    app.register_blueprint(bp)
