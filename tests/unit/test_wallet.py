"""The ``pay`` wallet's choice of offer: exact scheme, a known network, and that network's USDC only."""

from __future__ import annotations

from typing import Any

import pytest

from app.cli.wallet import PaymentRefused, choose_requirement
from app.settings import NETWORKS

BASE_USDC = NETWORKS["eip155:8453"].usdc
SEPOLIA_USDC = NETWORKS["eip155:84532"].usdc
OTHER = "0x" + "0a" * 19 + "11"


def offer(network: Any = "eip155:8453", asset: Any = BASE_USDC, scheme: str = "exact") -> dict[str, Any]:
    return {"scheme": scheme, "network": network, "asset": asset, "amount": "1000"}


@pytest.mark.parametrize(
    ("network", "asset"),
    [
        ("eip155:8453", BASE_USDC),
        ("base", BASE_USDC.lower()),  # v1 name; addresses compare case-insensitively
        ("eip155:84532", SEPOLIA_USDC),
        ("base-sepolia", SEPOLIA_USDC.upper().replace("0X", "0x")),
    ],
)
def test_the_networks_usdc_is_paid(network: str, asset: str) -> None:
    assert choose_requirement([offer(network, asset)]) == offer(network, asset)


@pytest.mark.parametrize(
    ("network", "asset"),
    [
        ("eip155:84532", BASE_USDC),  # mainnet USDC's address named on Sepolia is not Sepolia's USDC
        ("eip155:8453", SEPOLIA_USDC),
        ("eip155:8453", OTHER),
        ("eip155:8453", None),
        ("eip155:8453", ["not", "an", "address"]),
    ],
)
def test_any_other_asset_is_refused_in_one_line(network: str, asset: Any) -> None:
    with pytest.raises(PaymentRefused) as refused:
        choose_requirement([offer(network, asset)])
    assert "not the network's USDC" in str(refused.value) and "\n" not in str(refused.value)


def test_the_usdc_offer_is_chosen_among_others() -> None:
    accepts = [offer(asset=OTHER), offer(scheme="upto"), offer()]
    assert choose_requirement(accepts) == offer()


def test_a_named_asset_replaces_usdc() -> None:
    assert choose_requirement(
        [offer(), offer(asset=OTHER)], asset=OTHER.upper().replace("0X", "0x")
    ) == offer(asset=OTHER)
    with pytest.raises(PaymentRefused, match="not the asset named"):
        choose_requirement([offer()], asset=OTHER)


@pytest.mark.parametrize("network", ["eip155:1", "ethereum", ["eip155:8453"], None])
def test_unknown_networks_are_refused(network: Any) -> None:
    with pytest.raises(PaymentRefused, match="no exact-scheme payment on a network this wallet knows"):
        choose_requirement([offer(network)])


def test_a_newline_in_the_servers_asset_stays_on_one_line() -> None:
    with pytest.raises(PaymentRefused) as refused:
        choose_requirement([offer(asset=OTHER + "\nx402-proxy pay: paid")])
    assert "\n" not in str(refused.value)
