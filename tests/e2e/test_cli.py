"""The command line as a user runs it: the devnet demo and the ``pay`` wallet client."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from eth_utils import to_checksum_address

from app import create_checked_app
from app.cli import main
from app.devnet import DevChain, Service, Wallets, free_port
from app.devnet.standin import StandinModel
from app.settings import DEFAULT_CATALOG, NETWORKS, Settings
from tests.support import USDC, Proxy, serve

PROJECT_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
# Our test token placed at a second address on anvil: same EIP-712 name and version as Base USDC,
# but not USDC. A server may ask to be paid in it.
OTHER_TOKEN = to_checksum_address("0x" + "0a" * 19 + "11")


def run_devnet_demo(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "devnet", "--demo", "--port", str(free_port())],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_devnet_demo_makes_a_paid_call_and_moves_the_price() -> None:
    result = run_devnet_demo({**os.environ, "X402_UPSTREAM_API_KEY": ""})
    assert result.returncode == 0, result.stderr
    assert "paid call → HTTP 200" in result.stdout
    assert "'success': True" in result.stdout
    assert "payee balance 0.000000 USDC → 0.001000 USDC (price 0.001000 USDC)" in result.stdout
    assert "WARNING" not in result.stderr  # redis-server is installed here, so no fake Redis
    # the environment the operator's commands (channels, reconcile, revenue) read, as printed
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("operator commands")]
    exported = dict(part.split("=", 1) for part in line.split("export ", 1)[1].split())
    assert sorted(exported) == ["REDIS_URL", "X402_PAY_TO", "X402_RELAYER_KEY", "X402_RPC_URLS"]
    settings = Settings.from_env(env={}, overrides=exported)
    assert settings.redis_url.startswith("redis://127.0.0.1:") and settings.rpc_urls[0].startswith("http://")


def test_devnet_runs_its_own_relayer_whatever_relayer_keys_the_environment_holds() -> None:
    key = "0x" + os.urandom(32).hex()
    result = run_devnet_demo({**os.environ, "X402_UPSTREAM_API_KEY": "", "X402_RELAYER_KEYS": key})
    assert result.returncode == 0, result.stderr
    assert "paid call → HTTP 200" in result.stdout


def test_devnet_refused_by_its_settings_leaves_no_redis_server_behind() -> None:
    def redis_servers() -> set[str]:
        return set(
            subprocess.run(["pgrep", "-f", "redis-server"], capture_output=True, text=True).stdout.split()
        )

    before = redis_servers()
    result = run_devnet_demo({**os.environ, "X402_UPSTREAM_API_KEY": "", "X402_SCHEMES": "bogus"})
    assert result.returncode == 2 and "X402_SCHEMES" in result.stderr  # bad settings: exit 2
    time.sleep(0.5)
    assert redis_servers() - before == set()


def test_devnet_stopped_with_sigterm_leaves_no_child_process() -> None:
    """`kill`, `timeout` and supervisors send SIGTERM: anvil, redis-server and the rest stop too."""
    devnet = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "devnet", "--port", str(free_port())],
        cwd=PROJECT_ROOT,
        env={**os.environ, "X402_UPSTREAM_API_KEY": ""},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert devnet.stdout is not None
        while "serving" not in (line := devnet.stdout.readline()):
            assert line, "the devnet exited before serving"
        children = subprocess.run(
            ["pgrep", "-P", str(devnet.pid)], capture_output=True, text=True
        ).stdout.split()
        assert len(children) >= 2  # anvil and redis-server
        devnet.send_signal(signal.SIGTERM)
        assert devnet.wait(timeout=30) == 0
        time.sleep(0.5)
        assert [pid for pid in children if Path(f"/proc/{pid}").exists()] == []
    finally:
        devnet.kill()
        devnet.wait()


def test_devnet_falls_back_to_in_process_redis_when_redis_server_is_missing() -> None:
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # anvil comes from node_modules
    assert shutil.which("redis-server", path=env["PATH"]) is None
    result = run_devnet_demo(env)
    assert result.returncode == 0, result.stderr
    assert "WARNING: redis-server not found" in result.stderr
    assert "paid call → HTTP 200" in result.stdout


def test_pay_command_pays_and_prints_the_answer(proxy: Proxy, capsys: pytest.CaptureFixture[str]) -> None:
    payer_before, payee_before = proxy.balances()
    code = main(["pay", proxy.url + "/v1/chat/completions", "--key", proxy.wallets.payer_key])
    assert code == 0
    out, err = capsys.readouterr()
    assert "stand-in answer" in out and "tx 0x" in err
    spent = payer_before - proxy.balances()[0]
    assert spent > 0 and proxy.balances()[1] == payee_before + spent


def test_pay_refuses_to_pay_above_max_amount(proxy: Proxy, capsys: pytest.CaptureFixture[str]) -> None:
    balances = proxy.balances()
    code = main(
        [
            "pay",
            proxy.url + "/v1/chat/completions",
            "--key",
            proxy.wallets.payer_key,
            "--json",
            '{"model": "hermes-3-8b-tee", "messages": [{"role": "user", "content": "hi"}], '
            '"max_tokens": 4000}',
            "--max-amount",
            "0.001",
        ]
    )
    assert code == 1
    assert "above the limit of 1000" in capsys.readouterr().err
    assert proxy.balances() == balances


def test_migrate_command_dry_run_then_apply(
    redis_client, redis_service, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from app.payments.keys import KEYSPACE_KEY, KEYSPACE_VERSION

    redis_client.hset("x402:{auth:8453:0xa:0xb:0xc}", "state", "served")  # written before versioning
    monkeypatch.setenv("REDIS_URL", redis_service.url)
    assert main(["migrate", "--dry-run"]) == 0
    assert "would apply: 0001_initial" in capsys.readouterr().out
    assert redis_client.get(KEYSPACE_KEY) is None
    assert main(["migrate"]) == 0
    assert "applied: 0001_initial" in capsys.readouterr().out
    assert int(redis_client.get(KEYSPACE_KEY)) == KEYSPACE_VERSION
    assert main(["migrate"]) == 0
    assert "nothing (keyspace is current)" in capsys.readouterr().out


@pytest.fixture
def other_token_proxy(settings: Settings, wallets: Wallets, anvil: Service) -> Iterator[Proxy]:
    """A real proxy whose 402 asks for OTHER_TOKEN (``X402_ASSET``); its payer holds 10 of it."""
    other = DevChain(anvil.url, token=OTHER_TOKEN)
    other.place_token()
    other.mint(wallets.payer, 10 * USDC)
    other_settings = settings.with_overrides(asset=OTHER_TOKEN)
    server = serve(create_checked_app(other_settings))
    yield Proxy(f"http://127.0.0.1:{server.server_port}", other_settings, wallets, other, server)
    server.shutdown()


def test_pay_refuses_a_server_asking_for_another_asset(
    other_token_proxy: Proxy, proxy: Proxy, standin: StandinModel, capsys: pytest.CaptureFixture[str]
) -> None:
    """The offer is cheap (0.001 in atomic units of 6 decimals) but in a token that is not USDC."""
    other_before, usdc_before = other_token_proxy.balances(), proxy.balances()
    url = other_token_proxy.url + "/v1/chat/completions"
    code = main(["pay", url, "--key", other_token_proxy.wallets.payer_key])
    assert code == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert OTHER_TOKEN in err and "not the network's USDC" in err and "refusing" in err
    assert other_token_proxy.balances() == other_before and proxy.balances() == usdc_before
    assert standin.received == []


def test_pay_with_asset_pays_in_the_named_token(
    other_token_proxy: Proxy, proxy: Proxy, capsys: pytest.CaptureFixture[str]
) -> None:
    (payer_before, payee_before), usdc_before = other_token_proxy.balances(), proxy.balances()
    url = other_token_proxy.url + "/v1/chat/completions"
    key = other_token_proxy.wallets.payer_key
    code = main(["pay", url, "--key", key, "--asset", OTHER_TOKEN.lower(), "--decimals", "6"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "stand-in answer" in out and f"paid 0.001000 {OTHER_TOKEN} · tx 0x" in err
    spent = payer_before - other_token_proxy.balances()[0]
    assert spent == 1000 and other_token_proxy.balances()[1] == payee_before + spent
    assert proxy.balances() == usdc_before  # no USDC moved


def test_pay_with_asset_refuses_a_usdc_offer(proxy: Proxy, capsys: pytest.CaptureFixture[str]) -> None:
    balances = proxy.balances()
    code = main(
        [
            "pay",
            proxy.url + "/v1/chat/completions",
            "--key",
            proxy.wallets.payer_key,
            "--asset",
            OTHER_TOKEN,
            "--decimals",
            "18",
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert NETWORKS["eip155:8453"].usdc in err and f"not the asset named ({OTHER_TOKEN})" in err
    assert proxy.balances() == balances


def test_pay_needs_decimals_with_asset(proxy: Proxy, capsys: pytest.CaptureFixture[str]) -> None:
    """--max-amount is in whole tokens: without the token's decimals it cannot be read."""
    balances = proxy.balances()
    url = proxy.url + "/v1/chat/completions"
    code = main(["pay", url, "--key", proxy.wallets.payer_key, "--asset", OTHER_TOKEN])
    assert code == 2
    assert "--asset and --decimals go together" in capsys.readouterr().err
    assert proxy.balances() == balances


# -- ordinary failures: one line on standard error, an exit code, no traceback ---------------------------


def x402_proxy(*args: str, env: dict[str, str] | None = None, cwd: Path = PROJECT_ROOT) -> tuple[int, str]:
    """Run ``x402-proxy args`` as a user does; returns its exit code and standard error, after checking
    that it printed nothing else and no traceback."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("X402_") and k != "REDIS_URL"}
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=cwd,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout == "" and "Traceback" not in done.stderr, done.stdout + done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    return done.returncode, done.stderr.strip()


@pytest.fixture
def dead_url() -> str:
    """A loopback port nobody listens on."""
    return f"127.0.0.1:{free_port()}"


@pytest.fixture
def books_env(dead_url: str) -> dict[str, str]:
    """Valid settings whose Redis does not answer."""
    wallets = Wallets.fresh()
    return {
        "X402_PAY_TO": wallets.pay_to,
        "X402_RELAYER_KEY": wallets.relayer_key,
        "X402_RPC_URLS": f"http://{dead_url}",
        "REDIS_URL": f"redis://{dead_url}/0",
    }


def test_migrate_says_when_redis_is_down_or_unset(dead_url: str) -> None:
    code, err = x402_proxy("migrate", "--dry-run", env={"REDIS_URL": f"redis://{dead_url}/0"})
    assert code == 3 and err.startswith("x402-proxy migrate: Redis: ") and "Connection refused" in err
    code, err = x402_proxy("migrate")
    assert code == 2 and err.startswith("x402-proxy migrate: ") and "REDIS_URL" in err


def test_migrate_refuses_a_cluster_setting_that_does_not_fit_the_node(redis_service: Service) -> None:
    env = {"REDIS_URL": redis_service.url, "REDIS_CLUSTER": "yes"}
    code, err = x402_proxy("migrate", "--dry-run", env=env)
    assert code == 2 and "REDIS_CLUSTER" in err and "is yes, but" in err
    code, err = x402_proxy("migrate", "--dry-run", env={**env, "REDIS_CLUSTER": "perhaps"})
    assert code == 2 and "REDIS_CLUSTER" in err


@pytest.mark.parametrize("command", ["reconcile", "revenue"])
def test_books_commands_say_when_redis_is_down(command: str, books_env: dict[str, str]) -> None:
    code, err = x402_proxy(command, env=books_env)
    assert code == 3 and err.startswith(f"x402-proxy {command}: Redis: "), err


@pytest.mark.parametrize("command", ["reconcile", "revenue"])
def test_books_commands_refuse_bad_settings(command: str, books_env: dict[str, str]) -> None:
    code, err = x402_proxy(command, env={**books_env, "X402_PAY_TO": "0x1234"})
    assert code == 2 and err.startswith(f"x402-proxy {command}: ") and "X402_PAY_TO" in err
    code, err = x402_proxy(command, "--since", "yesterday", env=books_env)
    assert code == 2 and "not a duration" in err


def test_pay_says_when_the_server_does_not_answer(dead_url: str, tmp_path: Path) -> None:
    url = f"http://{dead_url}/v1/chat/completions"
    code, err = x402_proxy("pay", url, "--key", Wallets.fresh().payer_key)
    assert code == 3 and err == f"x402-proxy pay: no answer from {url} (ConnectionError)"
    code, err = x402_proxy("pay", url, "--key-file", str(tmp_path / "missing.key"))
    assert code == 2 and err.startswith("x402-proxy pay: --key-file: ") and "missing.key" in err


def test_verify_receipt_says_what_it_could_not_read(dead_url: str, tmp_path: Path) -> None:
    (tmp_path / "request.json").write_text("{}")
    (tmp_path / "response.json").write_text("{}")
    files = ["--request", str(tmp_path / "request.json"), "--response", str(tmp_path / "response.json")]
    code, err = x402_proxy("verify-receipt", "--request", str(tmp_path / "nope.json"), "--response", "x")
    assert code == 2 and err.startswith("x402-proxy verify-receipt: ") and "nope.json" in err
    code, err = x402_proxy("verify-receipt", *files, "--receipt", "r", "--proxy", f"http://{dead_url}")
    assert code == 3 and err.startswith(f"x402-proxy verify-receipt: no answer from http://{dead_url}/")


def test_verify_receipt_says_when_the_proxy_names_no_receipt_address(
    standin: StandinModel, tmp_path: Path
) -> None:
    """The stand-in model is no x402 proxy: its /.well-known/x402 holds no receipt address."""
    (tmp_path / "request.json").write_text("{}")
    (tmp_path / "response.json").write_text("{}")
    files = ["--request", str(tmp_path / "request.json"), "--response", str(tmp_path / "response.json")]
    code, err = x402_proxy("verify-receipt", *files, "--receipt", "r", "--proxy", standin.url)
    assert (
        code == 2
        and err == f"x402-proxy verify-receipt: {standin.url}/.well-known/x402 names no receiptAddress"
    )


def test_catalog_import_says_when_the_file_is_missing(tmp_path: Path) -> None:
    code, err = x402_proxy("catalog", "import", str(tmp_path / "aggregate.json"))
    assert code == 2 and err.startswith("x402-proxy catalog import: ") and "aggregate.json" in err


def test_serve_refuses_bad_settings_in_one_line(dead_url: str) -> None:
    code, err = x402_proxy("serve", env={"X402_BIND": dead_url, "X402_PAY_TO": "0x1234"})
    assert code == 4 and "refusing to start" in err and "X402_PAY_TO" in err


def test_devnet_without_redis_server_nor_the_dev_extra_says_so(tmp_path: Path) -> None:
    """No redis-server on PATH and no fakeredis (a stub that fails to import, as when the dev extra is
    not installed): the devnet stops before starting anything."""
    (tmp_path / "fakeredis.py").write_text("raise ImportError('the dev extra is not installed')\n")
    env = {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(tmp_path)}
    assert shutil.which("redis-server", path=env["PATH"]) is None
    code, err = x402_proxy("devnet", "--demo", "--port", str(free_port()), env=env)
    assert code == 1 and err.startswith("x402-proxy devnet: redis-server not found and the dev extra")


def test_devnet_refuses_a_catalog_it_cannot_use_as_bad_settings(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(DEFAULT_CATALOG.read_text() + 'attestation_url = "https://host/report"\n')
    code, err = x402_proxy("devnet", "--demo", "--port", str(free_port()), env={"X402_CATALOG": str(catalog)})
    assert code == 2 and err.startswith("x402-proxy devnet: X402_CATALOG: ") and "are gone" in err
