"""Start-up checks: the proxy refuses to start, naming the variable to fix, on a wrong set-up."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from app import create_app, create_checked_app
from app.devnet import DevChain, Service, free_port, place_upto_contracts, start_anvil
from app.payments.keys import KEYSPACE_KEY, KEYSPACE_VERSION
from app.settings import Settings, SettingsError
from app.x402.upto import PERMIT2_ADDRESS, UPTO_PROXY_ADDRESS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def wrong_chain() -> Iterator[Service]:
    service = start_anvil(chain_id=1)
    yield service
    service.stop()


def refusal(settings: Settings) -> SettingsError:
    with pytest.raises(SettingsError) as caught:
        create_checked_app(settings)
    return caught.value


def test_a_correct_setup_starts(settings: Settings) -> None:
    assert create_checked_app(settings).config["X402_SETTINGS"] is settings


def test_rpc_on_another_chain_is_refused(settings: Settings, wrong_chain: Service) -> None:
    error = refusal(settings.with_overrides(rpc_urls=(wrong_chain.url,)))
    assert error.variable == "X402_RPC_URLS" and "chain 1" in error.problem


def test_dead_rpc_is_refused(settings: Settings) -> None:
    error = refusal(settings.with_overrides(rpc_urls=(f"http://127.0.0.1:{free_port()}",)))
    assert error.variable == "X402_RPC_URLS"


def test_token_domain_mismatch_is_refused(settings: Settings) -> None:
    error = refusal(settings.with_overrides(asset_name="USDC"))
    assert error.variable == "X402_ASSET" and "'USD Coin'" in error.problem


def test_asset_without_the_token_is_refused(settings: Settings) -> None:
    error = refusal(settings.with_overrides(asset="0x036CbD53842c5426634e7929541eC2318f3dCF7e"))
    assert error.variable == "X402_ASSET"


def test_upto_without_its_contracts_on_chain_is_refused(settings: Settings, chain: DevChain) -> None:
    """A chain without the x402UptoPermit2Proxy cannot settle upto: refused, naming X402_SCHEMES;
    with only exact offered the same chain is fine."""
    for address, name in ((UPTO_PROXY_ADDRESS, "x402UptoPermit2Proxy"), (PERMIT2_ADDRESS, "Permit2")):
        chain.rpc.call("anvil_setCode", [address, "0x"])
        try:
            error = refusal(settings)
            assert error.variable == "X402_SCHEMES" and f"no {name} at" in error.problem
            assert create_checked_app(settings.with_overrides(schemes=("exact",)))
        finally:
            place_upto_contracts(chain)


def test_redis_down_is_refused(settings: Settings) -> None:
    error = refusal(settings.with_overrides(redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    assert error.variable == "REDIS_URL"


def test_old_keyspace_is_refused_until_migrated(settings: Settings, redis_client: redis.Redis) -> None:
    from app.payments.migrate import migrate

    redis_client.hset("x402:{auth:8453:0xa:0xb:0xc}", "state", "served")  # data of an unversioned keyspace
    error = refusal(settings)
    assert error.variable == "REDIS_URL" and "x402-proxy migrate" in error.problem
    migrate(redis_client)
    assert int(redis_client.get(KEYSPACE_KEY)) == KEYSPACE_VERSION
    create_app(settings)
