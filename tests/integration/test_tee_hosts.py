"""Direct TEE hosts with their own keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from app import create_checked_app
from app.devnet.standin import StandinModel
from app.settings import DEFAULT_CATALOG, Settings, SettingsError
from tests.support import Proxy, serve, settle_response

pytestmark = pytest.mark.integration


def proxy_on(proxy: Proxy, settings: Settings) -> Proxy:
    server = serve(create_checked_app(settings))
    return Proxy(f"http://127.0.0.1:{server.server_port}", settings, proxy.wallets, proxy.chain, server)


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
