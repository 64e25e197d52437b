"""Direct TEE hosts with their own keys, and the attestation check before any payment."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask, jsonify

from app import create_checked_app
from app.devnet.standin import StandinModel
from app.settings import DEFAULT_CATALOG, Settings, SettingsError
from tests.support import Proxy, serve, settle_response

pytestmark = pytest.mark.integration
MEASUREMENT = os.urandom(48).hex()


class ReportHost:
    """A stand-in host publishing an attestation report whose measurement and age can change."""

    def __init__(self) -> None:
        self.report: dict[str, Any] = {"measurement": MEASUREMENT, "timestamp": int(time.time())}
        app = Flask("report-host")
        app.add_url_rule("/attestation", "report", lambda: jsonify(self.report))
        self.server = serve(app)
        self.url = f"http://127.0.0.1:{self.server.server_port}/attestation"


@pytest.fixture
def report_host() -> Iterator[ReportHost]:
    host = ReportHost()
    yield host
    host.server.shutdown()


def attested_catalog(tmp_path: Path, report_url: str) -> Path:
    path = tmp_path / "catalog.toml"
    path.write_text(
        DEFAULT_CATALOG.read_text()
        + f'attestation_url = "{report_url}"\nmeasurement = "0x{MEASUREMENT}"\nattestation_max_age = 600\n'
    )
    return path


def proxy_on(proxy: Proxy, settings: Settings) -> Proxy:
    server = serve(create_checked_app(settings))
    return Proxy(f"http://127.0.0.1:{server.server_port}", settings, proxy.wallets, proxy.chain, server)


def test_attested_host_is_served_with_its_measurement(
    proxy: Proxy, standin: StandinModel, report_host: ReportHost, tmp_path: Path
) -> None:
    attested = proxy_on(
        proxy, proxy.settings.with_overrides(catalog_path=attested_catalog(tmp_path, report_host.url))
    )
    try:
        response = attested.pay(attested.payment(attested.requirement()))
        assert response.status_code == 200 and response.headers["X-TEE-Measurement"] == MEASUREMENT
        shown = requests.get(attested.url + "/v1/attestation/hermes-3-8b-tee", timeout=10).json()
        assert shown["ok"] is True and shown["measured"] == MEASUREMENT and shown["url"] == report_host.url
        assert shown["checked_at"] >= shown["report_time"]
    finally:
        assert attested.server is not None
        attested.server.shutdown()


@pytest.mark.parametrize("fault", ["other measurement", "old report", "no report"])
def test_host_failing_attestation_is_refused_before_any_payment(
    proxy: Proxy, standin: StandinModel, report_host: ReportHost, tmp_path: Path, fault: str
) -> None:
    catalog = attested_catalog(tmp_path, report_host.url)
    requirement = proxy.requirement()  # the same price on the plain proxy
    payment = proxy.payment(requirement)
    if fault == "other measurement":
        report_host.report["measurement"] = os.urandom(48).hex()
    elif fault == "old report":
        report_host.report["timestamp"] = int(time.time()) - 3600
    else:
        report_host.report = {"status": "not exposed yet"}
    refusing = proxy_on(proxy, proxy.settings.with_overrides(catalog_path=catalog))
    try:
        balances = refusing.balances()
        response = refusing.pay(payment)
        assert response.status_code == 503 and response.json()["error"]["code"] == "attestation_mismatch"
        assert "PAYMENT-RESPONSE" not in response.headers
        assert refusing.balances() == balances and standin.received == []
        shown = requests.get(refusing.url + "/v1/attestation/hermes-3-8b-tee", timeout=10).json()
        assert shown["ok"] is False and shown["reason"]
    finally:
        assert refusing.server is not None
        refusing.server.shutdown()


def test_direct_tee_host_gets_its_own_key_and_the_shared_host_nothing(
    proxy: Proxy, standin: StandinModel, tmp_path: Path
) -> None:
    with StandinModel() as direct:
        catalog = tmp_path / "catalog.toml"
        catalog.write_text(
            DEFAULT_CATALOG.read_text() + f'upstream_url = "{direct.url}"\nupstream_key = "HERMES_CRN"\n'
        )
        with pytest.raises(SettingsError) as missing:
            create_checked_app(proxy.settings.with_overrides(catalog_path=catalog))
        assert missing.value.variable == "X402_UPSTREAM_API_KEY_HERMES_CRN"
        settings = Settings.from_env(
            env={"X402_UPSTREAM_API_KEY_HERMES_CRN": "crn-key"},
            overrides={
                "X402_PAY_TO": proxy.wallets.pay_to,
                "X402_RPC_URLS": proxy.settings.rpc_urls[0],
                "X402_RELAYER_KEY": proxy.wallets.relayer_key,
                "REDIS_URL": proxy.settings.redis_url,
                "X402_UPSTREAM_URL": standin.url,
                "X402_UPSTREAM_API_KEY": "shared-gateway-key",
                "X402_CATALOG": str(catalog),
            },
        )
        direct_proxy = proxy_on(proxy, settings)
        try:
            response = direct_proxy.pay(direct_proxy.payment(direct_proxy.requirement()))
            assert response.status_code == 200 and settle_response(response)["success"] is True
            (received,) = direct.received
            assert received.headers["Authorization"] == "Bearer crn-key"
            assert standin.received == []
        finally:
            assert direct_proxy.server is not None
            direct_proxy.server.shutdown()
