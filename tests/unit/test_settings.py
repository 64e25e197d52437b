"""Settings.from_env: every bad or missing variable is a SettingsError naming it; secrets stay out of repr."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from eth_utils import to_checksum_address

from app.backends.upstream import abandoned_after
from app.settings import DEFAULT_CATALOG, NETWORKS, Settings, SettingsError, redis_from_env

PAY_TO = "0x209693bc6afc0c5328ba36faf03c514ef312287c"
PAY_TO_CHECKSUM = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"


def new_key() -> str:
    return os.urandom(32).hex()


def base_env(**changes: str) -> dict[str, str]:
    env = {
        "X402_PAY_TO": PAY_TO,
        "X402_RELAYER_KEY": "0x" + new_key(),
        "REDIS_URL": "redis://127.0.0.1:6379/0",
    }
    env.update(changes)
    return env


def error_for(env: dict[str, str]) -> SettingsError:
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env)
    return info.value


# -- required ------------------------------------------------------------------------------------


@pytest.mark.parametrize("variable", ["X402_PAY_TO", "X402_RELAYER_KEY", "REDIS_URL"])
def test_each_required_variable(variable: str) -> None:
    env = base_env()
    del env[variable]
    error = error_for(env)
    assert error.variable == variable
    assert str(error).startswith(f"{variable}: ")
    blank = base_env(**{variable: "   "})
    assert error_for(blank).variable == variable


def test_minimal_env_is_enough() -> None:
    settings = Settings.from_env(base_env())
    assert settings.pay_to == PAY_TO_CHECKSUM
    assert settings.redis_url == "redis://127.0.0.1:6379/0"


def test_settings_error_fields() -> None:
    error = SettingsError("X402_NETWORK", "bad")
    assert isinstance(error, ValueError)
    assert (error.variable, error.problem, str(error)) == ("X402_NETWORK", "bad", "X402_NETWORK: bad")


# -- malformed values ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("X402_NETWORK", "base"),
        ("X402_NETWORK", "eip155:1"),
        ("X402_NETWORK", "8453"),
        ("X402_PAY_TO", "0x1234"),
        ("X402_PAY_TO", PAY_TO[2:]),
        ("X402_PAY_TO", PAY_TO + "00"),
        ("X402_PAY_TO", "0x" + "zz" * 20),
        ("X402_ASSET", "0xusdc"),
        ("X402_RELAYER_KEY", "0x1234"),
        ("X402_RELAYER_KEY", "zz" * 32),
        ("X402_RELAYER_KEY", "0x" + "ab" * 33),
        ("X402_RPC_URLS", "ftp://node.example"),
        ("X402_RPC_URLS", "node.example:8545"),
        ("X402_RPC_URLS", "https://ok.example,ws://bad.example"),
        ("X402_RPC_URLS", " , "),
        ("X402_UPSTREAM_URL", "api.libertai.io"),
        ("X402_PUBLIC_URL", "proxy.example"),
        ("X402_TEE_ONLY", "maybe"),
        ("X402_TEE_ONLY", "2"),
        ("X402_UPSTREAM_TIMEOUT", "soon"),
        ("X402_UPSTREAM_TIMEOUT", "0"),
        ("X402_RECEIPT_TIMEOUT", "-1"),
        ("X402_RECEIPT_TIMEOUT", "nan"),
        ("X402_MAX_TIMEOUT_SECONDS", "two minutes"),
        ("X402_MAX_BODY_BYTES", "0"),
        ("X402_CATALOG", "/nonexistent/catalog.toml"),
    ],
)
def test_bad_value_names_its_variable(variable: str, value: str) -> None:
    assert error_for(base_env(**{variable: value})).variable == variable


@pytest.mark.parametrize("variable", ["X402_MAX_TIMEOUT_SECONDS", "X402_MAX_BODY_BYTES"])
def test_infinite_integer_setting_is_a_settings_error(variable: str) -> None:
    assert error_for(base_env(**{variable: "inf"})).variable == variable


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        ("on", True),
        ("0", False),
        ("False", False),
        ("off", False),
    ],
)
def test_flags(value: str, expected: bool) -> None:
    assert Settings.from_env(base_env(X402_TEE_ONLY=value)).tee_only is expected


# -- defaults ------------------------------------------------------------------------------------------


def test_defaults_base_mainnet() -> None:
    settings = Settings.from_env(base_env())
    assert settings.network.caip2 == "eip155:8453"
    assert settings.network.v1_name == "base"
    assert settings.network.chain_id == 8453
    assert settings.asset == "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
    assert (settings.asset_name, settings.asset_version) == ("USD Coin", "2")
    assert settings.rpc_urls == ("https://mainnet.base.org",)
    assert settings.upstream_url == "https://api.libertai.io"
    assert settings.catalog_path == DEFAULT_CATALOG
    assert settings.tee_only is True
    assert settings.max_timeout_seconds == 120
    assert settings.upstream_api_key == ""
    assert settings.public_url == ""


def test_defaults_base_sepolia() -> None:
    settings = Settings.from_env(base_env(X402_NETWORK="eip155:84532"))
    assert settings.network == NETWORKS["eip155:84532"]
    assert settings.network.v1_name == "base-sepolia"
    assert settings.asset == "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
    assert (settings.asset_name, settings.asset_version) == ("USDC", "2")


def test_explicit_values_are_parsed(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(DEFAULT_CATALOG.read_text())
    settings = Settings.from_env(
        base_env(
            X402_ASSET="0x" + "ab" * 20,
            X402_ASSET_NAME="Token",
            X402_ASSET_VERSION="1",
            X402_RPC_URLS=" http://a.example:8545 , https://b.example/ ",
            X402_UPSTREAM_URL="http://up.example/",
            X402_PUBLIC_URL="https://proxy.example/",
            X402_UPSTREAM_TIMEOUT="2.5",
            X402_RECEIPT_TIMEOUT="3",
            X402_MAX_TIMEOUT_SECONDS="60",
            X402_MAX_BODY_BYTES="1024",
            X402_CATALOG=str(catalog),
            X402_UPSTREAM_API_KEY="sk-test",
        )
    )
    assert settings.asset == to_checksum_address("0x" + "ab" * 20)
    assert (settings.asset_name, settings.asset_version) == ("Token", "1")
    assert settings.rpc_urls == ("http://a.example:8545", "https://b.example/")
    assert settings.upstream_url == "http://up.example"
    assert settings.public_url == "https://proxy.example"
    assert (settings.upstream_timeout, settings.receipt_timeout) == (2.5, 3.0)
    assert (settings.max_timeout_seconds, settings.max_body_bytes) == (60, 1024)
    assert settings.catalog_path == catalog
    assert settings.upstream_api_key == "sk-test"


def test_addresses_are_checksummed() -> None:
    settings = Settings.from_env(base_env(X402_PAY_TO=PAY_TO.upper().replace("0X", "0x")))
    assert settings.pay_to == PAY_TO_CHECKSUM


# -- relayer key ---------------------------------------------------------------------------------------


def test_relayer_key_gets_0x_prefix_and_address() -> None:
    key = new_key()
    settings = Settings.from_env(base_env(X402_RELAYER_KEY=key))
    assert settings.relayer_key == "0x" + key


def test_relayer_key_file_is_read(tmp_path: Path) -> None:
    key = new_key()
    path = tmp_path / "relayer.key"
    path.write_text(f"0x{key}\n")
    env = base_env(X402_RELAYER_KEY_FILE=str(path))
    del env["X402_RELAYER_KEY"]
    assert Settings.from_env(env).relayer_key == "0x" + key


def test_relayer_key_wins_over_key_file(tmp_path: Path) -> None:
    key, file_key = new_key(), new_key()
    path = tmp_path / "relayer.key"
    path.write_text(file_key)
    assert Settings.from_env(base_env(X402_RELAYER_KEY=key, X402_RELAYER_KEY_FILE=str(path))).relayer_key == (
        "0x" + key
    )


def test_unreadable_key_file(tmp_path: Path) -> None:
    env = base_env(X402_RELAYER_KEY_FILE=str(tmp_path / "missing.key"))
    del env["X402_RELAYER_KEY"]
    assert error_for(env).variable == "X402_RELAYER_KEY_FILE"


def test_malformed_key_file(tmp_path: Path) -> None:
    path = tmp_path / "relayer.key"
    path.write_text("not a key")
    env = base_env(X402_RELAYER_KEY_FILE=str(path))
    del env["X402_RELAYER_KEY"]
    error = error_for(env)
    assert error.variable == "X402_RELAYER_KEY"
    assert "not a key" not in str(error)


def test_several_relayer_keys_settle_in_turn(tmp_path: Path) -> None:
    keys = [new_key(), "0x" + new_key(), new_key()]
    env = base_env(X402_RELAYER_KEYS=" , ".join(keys))
    del env["X402_RELAYER_KEY"]
    settings = Settings.from_env(env)
    assert settings.settling_keys == tuple(k if k.startswith("0x") else "0x" + k for k in keys)
    assert settings.relayer_key == settings.settling_keys[0]
    assert keys[1] not in repr(settings)
    path = tmp_path / "relayers"
    path.write_text("\n".join(keys) + "\n")
    env = base_env(X402_RELAYER_KEYS_FILE=str(path))
    del env["X402_RELAYER_KEY"]
    assert Settings.from_env(env).settling_keys == settings.settling_keys
    single = Settings.from_env(base_env())
    assert single.settling_keys == (single.relayer_key,)


@pytest.mark.parametrize(
    ("listed", "reason"),
    [("abc", "32-byte"), ("{k},{k}", "twice"), ("", "required")],
)
def test_bad_relayer_key_lists_are_refused(listed: str, reason: str) -> None:
    key = new_key()
    env = base_env(X402_RELAYER_KEYS=listed.format(k=key))
    del env["X402_RELAYER_KEY"]
    error = error_for(env)
    assert reason in str(error)
    assert key not in str(error)


def test_relayer_keys_and_relayer_key_together_are_ambiguous() -> None:
    assert error_for(base_env(X402_RELAYER_KEYS=new_key())).variable == "X402_RELAYER_KEYS"


def test_the_receipt_key_is_none_of_the_relayer_keys() -> None:
    first, second = new_key(), new_key()
    env = base_env(X402_RELAYER_KEYS=f"{first},{second}", X402_RECEIPT_KEY=second)
    del env["X402_RELAYER_KEY"]
    assert error_for(env).variable == "X402_RECEIPT_KEY"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("exact,upto", ("exact", "upto")),
        ("upto", ("upto",)),
        (" EXACT ", ("exact",)),
        ("exact,exact", ("exact",)),
    ],
)
def test_x402_schemes(value: str, expected: tuple[str, ...]) -> None:
    assert Settings.from_env(base_env(X402_SCHEMES=value)).schemes == expected


def test_x402_schemes_default_and_refusals() -> None:
    assert Settings.from_env(base_env()).schemes == ("exact", "upto", "batch-settlement")
    assert Settings.from_env(base_env(X402_SCHEMES="batch-settlement")).schemes == ("batch-settlement",)
    facilitated = base_env(X402_FACILITATOR_URL="http://127.0.0.1:9")
    assert Settings.from_env(facilitated).schemes == ("exact",)  # upto needs our own relayer
    assert error_for({**facilitated, "X402_SCHEMES": "exact,upto"}).variable == "X402_SCHEMES"
    assert error_for({**facilitated, "X402_SCHEMES": "batch-settlement"}).variable == "X402_SCHEMES"
    assert error_for(base_env(X402_SCHEMES="deferred")).variable == "X402_SCHEMES"
    assert error_for(base_env(X402_SCHEMES=",")).variable == "X402_SCHEMES"


def test_batch_settlement_settings() -> None:
    """The receiver authorizer is derived from the relayer key when unset (never the relayer key,
    nor the receipt key); the withdraw delay lies within the escrow's bounds."""
    settings = Settings.from_env(base_env())
    keys = {settings.receiver_authorizer_key, settings.receipt_key, settings.relayer_key}
    assert len(keys) == 3 and all(len(key) == 66 for key in keys)
    assert settings.withdraw_delay == 86400 and settings.min_deposit == 0
    assert (settings.claim_interval, settings.settle_interval) == (60, 120)
    own = "0x" + "ab" * 32
    assert Settings.from_env(base_env(X402_RECEIVER_AUTHORIZER_KEY=own)).receiver_authorizer_key == own
    env = base_env()
    shared = {**env, "X402_RECEIVER_AUTHORIZER_KEY": env["X402_RELAYER_KEY"].upper().replace("0X", "0x")}
    assert error_for(shared).variable == "X402_RECEIVER_AUTHORIZER_KEY"
    assert error_for(base_env(X402_RECEIVER_AUTHORIZER_KEY="0x12")).variable == "X402_RECEIVER_AUTHORIZER_KEY"
    assert Settings.from_env(base_env(X402_WITHDRAW_DELAY="900")).withdraw_delay == 900
    for bad in ("899", "2592001", "0", "abc"):
        assert error_for(base_env(X402_WITHDRAW_DELAY=bad)).variable == "X402_WITHDRAW_DELAY"
    assert Settings.from_env(base_env(X402_MIN_DEPOSIT="5000")).min_deposit == 5000


# -- overrides and environment -------------------------------------------------------------------------


def test_overrides_win_over_env() -> None:
    env = base_env(X402_NETWORK="eip155:8453", REDIS_URL="redis://env/0")
    settings = Settings.from_env(
        env, overrides={"X402_NETWORK": "eip155:84532", "REDIS_URL": "redis://over/1"}
    )
    assert settings.network.caip2 == "eip155:84532"
    assert settings.redis_url == "redis://over/1"
    assert env["REDIS_URL"] == "redis://env/0"  # the caller's mapping is untouched


def test_overrides_can_supply_missing_variables() -> None:
    env = base_env()
    del env["REDIS_URL"]
    assert Settings.from_env(env, overrides={"REDIS_URL": "redis://x/0"}).redis_url == "redis://x/0"


def test_overrides_are_validated() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env(base_env(), overrides={"X402_PAY_TO": "nope"})
    assert info.value.variable == "X402_PAY_TO"


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("X402_") or name == "REDIS_URL":
            monkeypatch.delenv(name)
    for name, value in base_env(REDIS_URL="redis://from-environ/2").items():
        monkeypatch.setenv(name, value)
    assert Settings.from_env().redis_url == "redis://from-environ/2"


def test_with_overrides_returns_a_changed_copy() -> None:
    settings = Settings.from_env(base_env())
    changed = settings.with_overrides(max_timeout_seconds=5)
    assert changed.max_timeout_seconds == 5
    assert settings.max_timeout_seconds == 120
    with pytest.raises(AttributeError):
        settings.max_timeout_seconds = 1  # type: ignore[misc]


def test_redis_from_env() -> None:
    assert redis_from_env({"REDIS_URL": " redis://a/0 "}) == ("redis://a/0", "auto")
    assert redis_from_env({"REDIS_URL": "redis://a/0", "REDIS_CLUSTER": " YES "}) == ("redis://a/0", "yes")
    with pytest.raises(SettingsError) as info:
        redis_from_env({})
    assert info.value.variable == "REDIS_URL"
    with pytest.raises(SettingsError) as info:
        redis_from_env({"REDIS_URL": "redis://a/0", "REDIS_CLUSTER": "maybe"})
    assert info.value.variable == "REDIS_CLUSTER"


def test_redis_cluster_mode_is_read_and_checked() -> None:
    assert Settings.from_env(base_env()).redis_cluster == "auto"
    assert Settings.from_env(base_env(REDIS_CLUSTER="No")).redis_cluster == "no"
    assert error_for(base_env(REDIS_CLUSTER="sometimes")).variable == "REDIS_CLUSTER"


# -- secrets -----------------------------------------------------------------------------------------------


def test_repr_hides_secrets() -> None:
    key = new_key()
    api_key = "sk-" + os.urandom(16).hex()
    settings = Settings.from_env(base_env(X402_RELAYER_KEY=key, X402_UPSTREAM_API_KEY=api_key))
    for text in (repr(settings), str(settings)):
        assert key not in text
        assert key.upper() not in text
        assert api_key not in text
        assert PAY_TO_CHECKSUM in text  # repr still shows the non-secret fields


def test_settings_error_does_not_echo_the_key() -> None:
    bad_key = new_key()[:-2]  # 31 bytes: malformed, but still secret material
    error = error_for(base_env(X402_RELAYER_KEY=bad_key))
    assert error.variable == "X402_RELAYER_KEY"
    assert bad_key not in str(error)


def test_receipt_key_is_never_the_relayer_key() -> None:
    key = new_key()
    with pytest.raises(SettingsError) as refused:
        Settings.from_env(base_env(X402_RELAYER_KEY=key, X402_RECEIPT_KEY=key))
    assert refused.value.variable == "X402_RECEIPT_KEY"
    derived = Settings.from_env(base_env(X402_RELAYER_KEY=key)).receipt_key
    assert derived and derived.removeprefix("0x") != key
    assert Settings.from_env(base_env(X402_RELAYER_KEY=key)).receipt_key == derived  # same in every worker


def test_an_upto_permit_lives_430_seconds_by_default() -> None:
    """README: 3 × X402_UPSTREAM_TIMEOUT + X402_RECEIPT_TIMEOUT + 40 s, 430 s with the defaults."""
    settings = Settings.from_env(base_env())
    assert math.ceil(abandoned_after(settings) + settings.upstream_timeout) == 430
