"""The ``/metrics`` exposition and per-request counting; the metrics themselves are ``app.metrics``."""

from __future__ import annotations

import time

from flask import Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest, multiprocess

from app.metrics import REQUESTS


def exposition(multiprocess_dir: str) -> Response:
    """The Prometheus text exposition: summed over the gunicorn workers' files in ``multiprocess_dir``
    when it is set, else this process's default registry."""
    if multiprocess_dir:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=multiprocess_dir)
    else:
        registry = REGISTRY
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


def init_app(app: Flask) -> None:
    """Register a before_request hook starting the request's clock (``g.x402_started``, perf_counter seconds)
    and an after_request hook counting ``x402_requests_total`` by URL rule and status."""

    @app.before_request
    def _start_clock() -> None:
        g.x402_started = time.perf_counter()

    @app.after_request
    def _count(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        REQUESTS.labels(route, str(response.status_code)).inc()
        return response
