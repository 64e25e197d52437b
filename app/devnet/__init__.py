"""The whole loop on one machine: anvil as Base (chain id 8453, our EIP-3009 token at the USDC
address), Redis, a stand-in model and the proxy. Used by ``x402-proxy devnet`` and by the tests'
fixtures, so the demo and the tests run the very same set-up.

Keys are made fresh for every run (nothing secret is baked in); the relayer gets gas with
``anvil_setBalance`` and the demo payer gets test USDC from the token's open ``mint``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eth_abi import encode
from eth_account import Account

from app.backends.rpc import RpcClient
from app.backends.token import eth_call, selector
from app.settings import NETWORKS
from app.x402.batch_settlement.payload import (
    BATCH_SETTLEMENT_ADDRESS,
    ERC3009_DEPOSIT_COLLECTOR_ADDRESS,
    PERMIT2_DEPOSIT_COLLECTOR_ADDRESS,
)
from app.x402.upto import PERMIT2_ADDRESS, UPTO_PROXY_ADDRESS

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TOKEN_ARTIFACT = PROJECT_ROOT / "contracts" / "EIP3009Token.json"
BASE_USDC = NETWORKS["eip155:8453"].usdc
ANVIL_CANDIDATES = (
    PROJECT_ROOT / "node_modules" / "@foundry-rs" / "anvil-linux-amd64" / "bin" / "anvil",
    PROJECT_ROOT / "node_modules" / "@foundry-rs" / "anvil-linux-arm64" / "bin" / "anvil",
    PROJECT_ROOT / "node_modules" / ".bin" / "anvil",
)


class DevnetError(RuntimeError):
    """A devnet part could not be found or started."""


def require_checkout() -> None:
    """The devnet deploys the test token from ``contracts/`` and runs anvil from ``npm ci``: both are
    in a checkout of the repository, not in an installed wheel (which only serves)."""
    if not TOKEN_ARTIFACT.is_file():
        raise DevnetError(
            f"{TOKEN_ARTIFACT.relative_to(PROJECT_ROOT)} not found beside the package: the devnet runs "
            "from a checkout of the repository (git clone, then `npm ci` and `pip install -e '.[dev]'`)"
        )


def fake_redis_or_none() -> Any:
    """None when ``redis-server`` is installed (the devnet starts one); else an in-process fake Redis
    from the ``dev`` extra (fakeredis with Lua, for the ledger's scripts)."""
    if shutil.which("redis-server") is not None:
        return None
    try:
        import fakeredis
    except ImportError:
        raise DevnetError(
            "redis-server not found and the dev extra is not installed: install redis-server, "
            "or `pip install 'x402-tee-proxy[dev]'` for an in-process fake Redis"
        ) from None
    return fakeredis.FakeRedis()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the OS found free; it is released again, so another process may
    take it first."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_anvil() -> str:
    """anvil from the project's npm install (``npm ci``), else from PATH."""
    for candidate in ANVIL_CANDIDATES:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("anvil")
    if found:
        return found
    raise DevnetError("anvil not found: run `npm ci` in the project root (installs @foundry-rs/anvil)")


def _wait_until(ready: Any, what: str, process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DevnetError(f"{what} exited at start (code {process.returncode})")
        try:
            if ready():
                return
        except Exception:
            pass
        time.sleep(0.05)
    process.kill()
    raise DevnetError(f"{what} did not come up within {timeout:.0f} s")


@dataclass
class Service:
    """A child process on a loopback port."""

    url: str
    process: subprocess.Popen[bytes]
    workdir: str = ""

    def stop(self) -> None:
        """Terminate the process (kill it when it has not exited after 5 seconds) and remove its work
        directory, if any."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def start_anvil(port: int | None = None, chain_id: int = 8453) -> Service:
    """anvil on 127.0.0.1 (``port``, else a free one) with ``chain_id`` (Base's 8453 by default), once it
    answers ``eth_chainId``. Raises ``DevnetError`` when it is not found, exits, or is not up within 20 s."""
    port = port or free_port()
    process = subprocess.Popen(
        [find_anvil(), "--host", "127.0.0.1", "--port", str(port), "--chain-id", str(chain_id), "--silent"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    rpc = RpcClient((url,), timeout=2)
    _wait_until(lambda: rpc.call("eth_chainId", []), "anvil", process)
    return Service(url, process)


def start_redis(port: int | None = None, binary: str | None = None) -> Service | None:
    """A throw-away ``redis-server`` (or the compatible server at ``binary``, e.g. ``valkey-server``)
    without persistence, or None when it is not installed."""
    binary = binary or shutil.which("redis-server")
    if binary is None:
        return None
    port = port or free_port()
    workdir = tempfile.mkdtemp(prefix="x402-redis-")
    process = subprocess.Popen(
        [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import redis

    client = redis.Redis(port=port, socket_connect_timeout=0.5)
    _wait_until(client.ping, "redis-server", process)
    client.close()
    return Service(f"redis://127.0.0.1:{port}/0", process, workdir)


def token_runtime_code() -> str:
    """The test token's deployed bytecode (0x-hex) from ``contracts/EIP3009Token.json``; raises ``OSError``
    when the file is missing (not a checkout)."""
    artifact = json.loads(TOKEN_ARTIFACT.read_text())
    return str(artifact["deployedBytecode"])


@dataclass
class DevChain:
    """Helpers over an anvil RPC: place the token, fund accounts, mint test USDC."""

    url: str
    token: str = BASE_USDC
    rpc: RpcClient = field(init=False)

    def __post_init__(self) -> None:
        self.rpc = RpcClient((self.url,))

    def place_token(self) -> None:
        """Put the test token's runtime code at ``token`` (Base's USDC address by default) with
        ``anvil_setCode``; raises ``RpcFailure`` or ``ChainUnavailable``."""
        self.rpc.call("anvil_setCode", [self.token, token_runtime_code()])

    def set_eth(self, address: str, wei: int) -> None:
        """Set the ETH balance of ``address`` to ``wei`` with ``anvil_setBalance``; raises ``RpcFailure`` or
        ``ChainUnavailable``."""
        self.rpc.call("anvil_setBalance", [address, hex(wei)])

    def transact(self, to: str, data: bytes) -> dict[str, Any]:
        """Send from anvil's first unlocked account and wait for the receipt (automine is quick,
        but not always done by the time ``eth_sendTransaction`` answers)."""
        sender = self.rpc.call("eth_accounts", [])[0]
        tx_hash = self.rpc.call(
            "eth_sendTransaction", [{"from": sender, "to": to, "data": "0x" + data.hex()}]
        )
        deadline = time.monotonic() + 10
        while True:
            receipt: dict[str, Any] | None = self.rpc.call("eth_getTransactionReceipt", [tx_hash])
            if receipt is not None or time.monotonic() > deadline:
                if receipt is None:
                    raise DevnetError(f"no receipt for {tx_hash}: is anvil mining?")
                return receipt
            time.sleep(0.01)

    def token_call(self, signature: str, types: list[str], args: list[Any]) -> dict[str, Any]:
        """Send the token ``signature``'s selector with ``args`` ABI-encoded as ``types``; returns the receipt
        (``transact``)."""
        return self.transact(self.token, selector(signature) + encode(types, args))

    def mint(self, to: str, amount: int) -> None:
        """Mint ``amount`` atomic units of the test token to ``to`` with the token's open ``mint``."""
        self.token_call("mint(address,uint256)", ["address", "uint256"], [to, amount])

    def balance(self, address: str) -> int:
        """The token balance of ``address`` in atomic units (``balanceOf``); raises ``ChainUnavailable`` when
        anvil does not answer."""
        (answer,) = self.rpc.batch(
            [eth_call(self.token, selector("balanceOf(address)") + encode(["address"], [address]))]
        )
        return int(answer, 16)


@dataclass
class Wallets:
    """Fresh keys for one run: the relayer (pays gas), the payee and a demo payer (holds USDC)."""

    relayer_key: str
    payer_key: str
    pay_to: str

    @classmethod
    def fresh(cls) -> Wallets:
        """New random 32-byte keys (0x-hex) for the relayer and the demo payer, and a new payee address."""
        return cls(
            relayer_key="0x" + os.urandom(32).hex(),
            payer_key="0x" + os.urandom(32).hex(),
            pay_to=str(Account.create().address),
        )

    @property
    def relayer(self) -> str:
        """The relayer's address (checksummed), from ``relayer_key``."""
        return str(Account.from_key(self.relayer_key).address)

    @property
    def payer(self) -> str:
        """The demo payer's address (checksummed), from ``payer_key``."""
        return str(Account.from_key(self.payer_key).address)


def prepare_chain(chain: DevChain, wallets: Wallets, payer_usdc: int) -> None:
    """Place the test token, the ``upto`` and the ``batch-settlement`` contracts, give the relayer
    100 ETH (10**20 wei) for gas and mint ``payer_usdc`` atomic units of USDC to the demo payer."""
    chain.place_token()
    place_upto_contracts(chain)
    place_batch_settlement_contracts(chain)
    chain.set_eth(wallets.relayer, 10**20)
    chain.mint(wallets.payer, payer_usdc)


def place_upto_contracts(chain: DevChain) -> dict[str, str]:
    """Put our Permit2 and x402UptoPermit2Proxy (runtime code from ``contracts/<name>.json``) at their
    canonical addresses with ``anvil_setCode``, for the x402 ``upto`` scheme; returns {name: address}.
    Raises ``OSError`` outside a checkout, ``RpcFailure`` or ``ChainUnavailable`` from anvil."""
    placed = {"Permit2": PERMIT2_ADDRESS, "x402UptoPermit2Proxy": UPTO_PROXY_ADDRESS}
    for name, address in placed.items():
        artifact = json.loads((PROJECT_ROOT / "contracts" / f"{name}.json").read_text())
        chain.rpc.call("anvil_setCode", [address, artifact["deployedBytecode"]])
    return placed


def place_batch_settlement_contracts(chain: DevChain) -> dict[str, str]:
    """Put our x402BatchSettlement escrow and its ERC3009DepositCollector and Permit2DepositCollector
    (runtime code from ``contracts/<name>.json``) at their canonical addresses (PyPI x402 2.25,
    ``batch_settlement/constants.py``) with ``anvil_setCode``, for the x402 ``batch-settlement`` scheme;
    returns {name: address}. The Permit2 collector spends through Permit2, which
    ``place_upto_contracts`` places. Raises ``OSError`` outside a checkout, ``RpcFailure`` or
    ``ChainUnavailable`` from anvil."""
    placed = {
        "x402BatchSettlement": BATCH_SETTLEMENT_ADDRESS,
        "ERC3009DepositCollector": ERC3009_DEPOSIT_COLLECTOR_ADDRESS,
        "Permit2DepositCollector": PERMIT2_DEPOSIT_COLLECTOR_ADDRESS,
    }
    for name, address in placed.items():
        artifact = json.loads((PROJECT_ROOT / "contracts" / f"{name}.json").read_text())
        chain.rpc.call("anvil_setCode", [address, artifact["deployedBytecode"]])
    return placed
