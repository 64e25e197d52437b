"""The command line as a user runs it: the devnet demo and the ``pay`` wallet client."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import main
from app.devnet import free_port
from tests.support import Proxy

PROJECT_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


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
    from app.ledger import KEYSPACE_KEY, KEYSPACE_VERSION

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
