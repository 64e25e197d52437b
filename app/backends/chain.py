"""The payment asset on the configured network: batched pre-settlement checks, token reads, sends,
receipts, and the start-up check of the RPC endpoints and the token.

Each paid call's on-chain verification is one batched JSON-RPC request (``app.backends.rpc``):
code, balance, nonce state, pause flag, gas estimate as simulation, relayer nonce and fees. An
endpoint whose answer is malformed (an ``eth_call`` that returns ``0x`` or a short word, a receipt
without a status) is treated like one that does not answer, and a receipt that contradicts itself
(status 1 without this authorization's ``Transfer`` and ``AuthorizationUsed`` logs, see
``app.backends.token``) is a fault to be resolved later, never "reverted, nothing charged".

Units: token amounts in atomic units (``Authorization.value``), ETH and fees in wei, gas in gas
units, block ages in seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

from eth_abi import encode

from app.backends.permit2 import allowance_calldata, nonce_bitmap_calldata, nonce_used, settle_calldata
from app.backends.rpc import (
    Broadcast,
    Call,
    ChainUnavailable,
    RpcClient,
    RpcError,
    RpcFailure,
    is_data,
    is_flag,
    is_flag_or_refused,
    is_quantity,
    is_quantity_or_refused,
    is_word,
    quantity_value,
    word_value,
)
from app.backends.token import (
    SEL_AUTHORIZATION_STATE,
    SEL_BALANCE_OF,
    SEL_IS_BLACKLISTED,
    SEL_NAME,
    SEL_PAUSED,
    SEL_VERSION,
    ReceiptContradiction,
    abi_string,
    authorization_used_topics,
    eth_call,
    is_log,
    logged,
    selector,
    transfer_calldata,
    transfer_topics,
)
from app.settings import Settings, SettingsError
from app.x402.batch_settlement import (
    BATCH_SETTLEMENT_ADDRESS,
    ERC3009_DEPOSIT_COLLECTOR_ADDRESS,
    PERMIT2_DEPOSIT_COLLECTOR_ADDRESS,
)
from app.x402.upto import PERMIT2_ADDRESS, UPTO_PROXY_ADDRESS, UptoPayment
from app.x402.upto import checks as upto
from app.x402.verdict import (
    ACCEPTED,
    INSUFFICIENT_BALANCE,
    INVALID_SIGNATURE,
    NONCE_USED,
    SIMULATION_FAILED,
    Verdict,
    reject,
)
from app.x402.wire import Authorization

ASSET_PAUSED = "asset_paused"
PAYEE_BLACKLISTED = "payee_blacklisted"
# Refusals that no payment can fix: 503, never a 402 that would invite the client to pay again.
UNPAYABLE = frozenset({ASSET_PAUSED, PAYEE_BLACKLISTED})
# How far back to look for someone else's use of an authorization: authorizations live minutes,
# and RPC providers refuse very wide log ranges.
LOG_LOOKBACK_BLOCKS = 5_000


@dataclass(frozen=True)
class Preflight:
    """What the chain says about one payment just before settlement, from one batched request."""

    verdict: Verdict
    use_vrs: bool = True
    calldata: bytes = b""
    gas_estimate: int = 0
    relayer_nonce: int = 0
    gas_price: int = 0
    priority_fee: int = 0
    spendable: int = 0  # upto: what the payer can pay now (balance and Permit2 allowance, atomic units)


def _tail_well_formed(answers: list[Any]) -> bool:
    """The common end of both pre-settlement batches: pause flag and payee blacklist (or refused),
    the simulation's gas (or its refusal), the relayer's pending nonce and the fees."""
    paused, payee_blocked, gas, nonce, gas_price, priority = answers
    return (
        is_flag_or_refused(paused)
        and is_flag_or_refused(payee_blocked)
        and is_quantity_or_refused(gas)
        and is_quantity(nonce)
        and is_quantity(gas_price)
        and is_quantity_or_refused(priority)
    )


def _preflight_well_formed(answers: list[Any]) -> bool:
    """The pre-settlement batch as the chain gives it: a balance and an authorization state that
    are real ABI words (never ``0x`` read as zero), quantities where quantities are due."""
    code, balance, used = answers[:3]
    return is_data(code) and is_word(balance) and is_flag(used) and _tail_well_formed(answers[3:])


def _accepted(
    gas: Any, nonce: Any, gas_price: Any, priority: Any, calldata: bytes, use_vrs: bool = False
) -> Preflight:
    """An accepted ``Preflight`` from a batch's gas estimate, pending nonce and fees (an endpoint
    without ``eth_maxPriorityFeePerGas`` gives no tip)."""
    return Preflight(
        ACCEPTED,
        use_vrs=use_vrs,
        calldata=calldata,
        gas_estimate=quantity_value(gas),
        relayer_nonce=quantity_value(nonce),
        gas_price=quantity_value(gas_price),
        priority_fee=0 if isinstance(priority, RpcError) else quantity_value(priority),
    )


def _upto_preflight_well_formed(answers: list[Any]) -> bool:
    """The ``upto`` pre-settlement batch: balance, allowance and nonce word as real ABI words."""
    code, balance, allowance, bitmap = answers[:4]
    words = is_word(balance) and is_word(allowance) and is_word(bitmap)
    return is_data(code) and words and _tail_well_formed(answers[4:])


def _is_receipt_of(answer: Any, tx_hash: str) -> bool:
    """None (not mined yet), or a receipt of ``tx_hash`` with a status of 0 or 1 and a log list."""
    if answer is None or isinstance(answer, RpcError):
        return True
    return (
        isinstance(answer, dict)
        and str(answer.get("transactionHash", "")).lower() == tx_hash.lower()
        and answer.get("status") in ("0x0", "0x1")
        and isinstance(answer.get("logs"), list)
        and all(isinstance(log, dict) for log in answer["logs"])
    )


SEL_IS_VALID_SIGNATURE = selector("isValidSignature(bytes32,bytes)")
EIP1271_MAGIC = "0x1626ba7e"  # bytes4(keccak256("isValidSignature(bytes32,bytes)")), EIP-1271


class Chain:
    """Reads and writes of the payment asset on the configured network."""

    def __init__(self, settings: Settings, rpc: RpcClient | None = None) -> None:
        self.settings = settings
        self.asset = settings.asset
        self.rpc = rpc or RpcClient(
            settings.rpc_urls, settings.rpc_timeout, chain_id=settings.network.chain_id
        )
        self._probes: dict[str, RpcClient] = {}  # one client (one pooled session) per endpoint probed

    def preflight(self, auth: Authorization, signature: bytes, ecdsa_signer: bool, relayer: str) -> Preflight:
        """Verify the payment against chain state (PROTOCOL.md §4 steps 8–10) in one round trip,
        simulating the settlement from ``relayer``. ``signature`` is the payer's raw signature (65
        bytes for an EOA); ``ecdsa_signer`` says whether it recovers to ``auth.from_``. A refusal is
        in the verdict; an accepted ``Preflight`` carries the calldata, the gas estimate (gas units),
        the relayer's pending nonce and the fees (wei). Raises ``ChainUnavailable``."""
        use_vrs = len(signature) == 65
        calldata = transfer_calldata(auth, signature, use_vrs)
        bytes_calldata = calldata if not use_vrs else transfer_calldata(auth, signature, False)
        code, balance, used, paused, payee_blocked, gas, nonce, gas_price, priority = self.rpc.batch(
            self._preflight_calls(auth, calldata, relayer), well_formed=_preflight_well_formed
        )
        is_contract = isinstance(code, str) and code not in ("0x", "0x0", "")
        if is_contract and use_vrs:
            # A contract wallet signs through EIP-1271: simulate and settle with the bytes overload.
            use_vrs, calldata = False, bytes_calldata
            gas = self.rpc.batch(
                [self._simulation(calldata, relayer)],
                well_formed=lambda answers: is_quantity_or_refused(answers[0]),
            )[0]
        if not is_contract and not ecdsa_signer:
            return Preflight(
                reject(INVALID_SIGNATURE, "the signature does not recover to authorization.from")
            )
        if word_value(paused) == 1:
            return Preflight(reject(ASSET_PAUSED, "the token is paused; no payment can settle now"))
        if word_value(payee_blocked) == 1:
            return Preflight(reject(PAYEE_BLACKLISTED, "the token refuses transfers to this payee"))
        if int(used, 16) == 1:
            return Preflight(reject(NONCE_USED, "this authorization was already used or canceled on chain"))
        if int(balance, 16) < auth.value:
            return Preflight(reject(INSUFFICIENT_BALANCE, "the payer's balance is below the amount"))
        if isinstance(gas, RpcError):
            return Preflight(reject(SIMULATION_FAILED, gas.message[:200]))
        return _accepted(gas, nonce, gas_price, priority, calldata, use_vrs)

    def _preflight_calls(self, auth: Authorization, calldata: bytes, relayer: str) -> list[Call]:
        """The calls of the pre-settlement batch, in the order ``_preflight_well_formed`` reads them."""
        return [
            ("eth_getCode", [auth.from_, "latest"]),
            eth_call(self.asset, SEL_BALANCE_OF + encode(["address"], [auth.from_])),
            eth_call(
                self.asset, SEL_AUTHORIZATION_STATE + encode(["address", "bytes32"], [auth.from_, auth.nonce])
            ),
            eth_call(self.asset, SEL_PAUSED),
            eth_call(self.asset, SEL_IS_BLACKLISTED + encode(["address"], [auth.to])),
            self._simulation(calldata, relayer),
            ("eth_getTransactionCount", [relayer, "pending"]),
            ("eth_gasPrice", []),
            ("eth_maxPriorityFeePerGas", []),
        ]

    def _simulation(self, calldata: bytes, relayer: str) -> Call:
        """``eth_estimateGas`` of the settlement sent from ``relayer``: it fails where the transfer would."""
        return "eth_estimateGas", [{"from": relayer, "to": self.asset, "data": "0x" + calldata.hex()}]

    def upto_preflight(
        self, payment: UptoPayment, signature: bytes, ecdsa_signer: bool, relayer: str
    ) -> Preflight:
        """Verify an ``upto`` permit against chain state in one round trip, simulating its
        settlement for the whole maximum from ``relayer`` (the witness' facilitator). Refusals, in
        order: a signature that recovers to no one for an EOA, a paused asset or blacklisted payee,
        a used Permit2 nonce, a balance or a Permit2 allowance below the maximum (the allowance is
        not needed when the payer sent an EIP-2612 permit for Permit2), a failed simulation. An
        accepted ``Preflight`` carries the gas estimate (gas units), the relayer's pending nonce and
        the fees (wei); its calldata is built for the charge later. Raises ``ChainUnavailable``."""
        auth = payment.authorization
        calldata = settle_calldata(auth, auth.amount, signature, payment.permit2612)
        answers = self.rpc.batch(
            [
                ("eth_getCode", [auth.from_, "latest"]),
                eth_call(self.asset, SEL_BALANCE_OF + encode(["address"], [auth.from_])),
                eth_call(self.asset, allowance_calldata(auth.from_)),
                eth_call(PERMIT2_ADDRESS, nonce_bitmap_calldata(auth)),
                eth_call(self.asset, SEL_PAUSED),
                eth_call(self.asset, SEL_IS_BLACKLISTED + encode(["address"], [auth.to])),
                (
                    "eth_estimateGas",
                    [{"from": relayer, "to": UPTO_PROXY_ADDRESS, "data": "0x" + calldata.hex()}],
                ),
                ("eth_getTransactionCount", [relayer, "pending"]),
                ("eth_gasPrice", []),
                ("eth_maxPriorityFeePerGas", []),
            ],
            well_formed=_upto_preflight_well_formed,
        )
        code, balance, allowance, bitmap, paused, payee_blocked, gas, nonce, gas_price, priority = answers
        is_contract = isinstance(code, str) and code not in ("0x", "0x0", "")
        if not is_contract and not ecdsa_signer:
            return Preflight(
                reject(upto.INVALID_SIGNATURE, "the signature does not recover to permit2Authorization.from")
            )
        if word_value(paused) == 1:
            return Preflight(reject(ASSET_PAUSED, "the token is paused; no payment can settle now"))
        if word_value(payee_blocked) == 1:
            return Preflight(reject(PAYEE_BLACKLISTED, "the token refuses transfers to this payee"))
        if nonce_used(auth, word_value(bitmap)):
            return Preflight(
                reject(upto.NONCE_USED, "this permit's Permit2 nonce was already used or invalidated")
            )
        if word_value(balance) < auth.amount:
            return Preflight(reject(upto.INSUFFICIENT_BALANCE, "the payer's balance is below the maximum"))
        if word_value(allowance) < auth.amount and payment.permit2612 is None:
            return Preflight(
                reject(
                    upto.ALLOWANCE_REQUIRED,
                    f"the payer has not approved Permit2 ({PERMIT2_ADDRESS}) to spend {auth.amount} of the "
                    "token: call approve(Permit2, amount) once, or send the eip2612GasSponsoring extension",
                )
            )
        if isinstance(gas, RpcError):
            return Preflight(reject(upto.SIMULATION_FAILED, gas.message[:200]))
        allowed = word_value(allowance) if payment.permit2612 is None else payment.permit2612.value
        spendable = min(word_value(balance), allowed)
        return replace(_accepted(gas, nonce, gas_price, priority, b""), spendable=spendable)

    def send_preflight(self, to: str, calldata: bytes, relayer: str) -> Preflight:
        """Simulate ``calldata`` to ``to`` from ``relayer`` and read the relayer's pending nonce and the
        fees, in one round trip (collecting a recorded ``upto`` debt). A failed simulation is a
        refusal (``invalid_upto_evm_transaction_simulation_failed``). Raises ``ChainUnavailable``."""
        gas, nonce, gas_price, priority = self.rpc.batch(
            [
                ("eth_estimateGas", [{"from": relayer, "to": to, "data": "0x" + calldata.hex()}]),
                ("eth_getTransactionCount", [relayer, "pending"]),
                ("eth_gasPrice", []),
                ("eth_maxPriorityFeePerGas", []),
            ],
            well_formed=lambda answers: (
                is_quantity_or_refused(answers[0])
                and is_quantity(answers[1])
                and is_quantity(answers[2])
                and is_quantity_or_refused(answers[3])
            ),
        )
        if isinstance(gas, RpcError):
            return Preflight(reject(upto.SIMULATION_FAILED, gas.message[:200]))
        return _accepted(gas, nonce, gas_price, priority, calldata)

    def signature_checker_accepts(self, signer: str, digest: bytes, signature: bytes) -> bool | None:
        """SignatureChecker's answer for ``signer``, in one round trip: for an address with code (a
        contract, an EIP-7702 account) whether its EIP-1271 ``isValidSignature`` accepts
        ``signature`` for ``digest``; None for an address without code (strict ECDSA decides, the
        caller's). Raises ``ChainUnavailable``."""
        data = SEL_IS_VALID_SIGNATURE + encode(["bytes32", "bytes"], [digest, signature])
        code, answer = self.rpc.batch(
            [("eth_getCode", [signer, "latest"]), eth_call(signer, data)],
            well_formed=lambda answers: is_data(answers[0]),
        )
        if code in ("0x", "0x0", ""):
            return None
        return isinstance(answer, str) and answer[:10].lower() == EIP1271_MAGIC and len(answer) == 66

    def accepts_signature(self, wallet: str, digest: bytes, signature: bytes) -> bool:
        """Whether the contract at ``wallet`` says ``signature`` is its own for ``digest`` (EIP-1271:
        ``isValidSignature(bytes32, bytes)`` returns the magic value ``0x1626ba7e``). False for an
        account without code, a revert or any other answer. Raises ``ChainUnavailable``."""
        data = SEL_IS_VALID_SIGNATURE + encode(["bytes32", "bytes"], [digest, signature])
        (answer,) = self.rpc.batch([eth_call(wallet, data)])
        return isinstance(answer, str) and answer[:10].lower() == EIP1271_MAGIC and len(answer) == 66

    def find_settlement(self, auth: Authorization) -> str | None:
        """The hash of a transaction (anyone's) that used this authorization *and* moved exactly
        its value from ``from`` to ``to``, or None. This is how a payment preempted by another
        submitter (or our own earlier send) is recognised as paid.

        The token's ``AuthorizationUsed(from, nonce)`` log names the transaction; its receipt must
        agree (status 1, the log itself). One that does not is an RPC fault: ``ReceiptContradiction``.
        A use whose ``Transfer`` went elsewhere is not ours: EIP-3009 nonces are shared with the
        payer's other authorizations (``receiveWithAuthorization``). Looks back ``LOG_LOOKBACK_BLOCKS``
        blocks. Raises ``ChainUnavailable`` (and ``ReceiptContradiction``) or ``RpcFailure`` (logs
        refused)."""
        start = max(0, self.rpc.highest_block - LOG_LOOKBACK_BLOCKS)
        topics = authorization_used_topics(auth)

        def logs_well_formed(answers: list[Any]) -> bool:
            (logs,) = answers
            return isinstance(logs, RpcError) or (
                isinstance(logs, list)
                and all(
                    isinstance(log, dict)
                    and is_word(log.get("transactionHash"))
                    and is_log(log, self.asset, topics)
                    for log in logs
                )
            )

        (logs,) = self.rpc.batch(
            [("eth_getLogs", [{"address": self.asset, "topics": topics, "fromBlock": hex(start)}])],
            well_formed=logs_well_formed,
        )
        if isinstance(logs, RpcError):
            raise RpcFailure(logs)
        for log in logs:
            tx_hash = str(log["transactionHash"])
            receipt = self.receipt(tx_hash)
            if receipt is None or not logged(receipt, self.asset, topics):
                raise ReceiptContradiction(f"{tx_hash} logged AuthorizationUsed, but its receipt disagrees")
            if logged(receipt, self.asset, transfer_topics(auth), auth.value):
                return tx_hash
        return None

    def broadcast(self, raw: bytes) -> Broadcast:
        """Send a signed transaction, ``raw`` bytes (see ``RpcClient.broadcast``: a maybe is never a
        refusal). Raises nothing: an endpoint's failure is in the ``Broadcast``."""
        return self.rpc.broadcast("0x" + raw.hex())

    def receipt(self, tx_hash: str) -> dict[str, Any] | None:
        """The receipt of ``tx_hash`` (0x-hex), as in ``receipts``."""
        return self.receipts([tx_hash])[0]

    def receipts(self, tx_hashes: list[str]) -> list[dict[str, Any] | None]:
        """Receipts of several transactions in one round trip (None where there is none yet). An
        endpoint answering with something that is not a receipt of the asked hash (no status, no
        logs, another transaction's) is skipped like one that does not answer. A receipt is the
        JSON-RPC object (``status`` "0x0"/"0x1", ``logs``, ``transactionHash``). Raises
        ``ChainUnavailable``."""
        answers = self.rpc.batch(
            [("eth_getTransactionReceipt", [h]) for h in tx_hashes],
            well_formed=lambda answers: all(
                _is_receipt_of(a, h) for a, h in zip(answers, tx_hashes, strict=True)
            ),
        )
        return [a if isinstance(a, dict) else None for a in answers]

    def pending_nonce(self, address: str) -> int:
        """The account nonce of ``address`` counting pending transactions. Raises ``ChainUnavailable``."""
        (nonce,) = self.rpc.batch(
            [("eth_getTransactionCount", [address, "pending"])],
            well_formed=lambda answers: is_quantity(answers[0]),
        )
        return int(nonce, 16)

    def chain_id(self, url: str) -> int:
        """The chain id that the endpoint ``url`` reports. Raises ``ChainUnavailable`` or ``RpcFailure``."""
        return quantity_value(RpcClient((url,), timeout=5).call("eth_chainId", []))

    def endpoint_health(self, url: str) -> dict[str, Any]:
        """One RPC endpoint, asked directly (one round trip): its chain id, how old its latest
        block is, and whether an ``eth_call`` of the token's ``name()`` comes back as a well-formed
        ABI string equal to the configured name. An endpoint that answers calls with ``0x`` or
        garbage passes a chain-id check, then fails every payment: this probe notices it.

        ``{"ok", "chain_id", "block", "block_age_s" (seconds), "error" (when not ok)}``, or
        ``{"ok": False, "error": "no answer"}``. Raises ``ChainUnavailable`` when ``url`` does not
        answer at all."""
        client = self._probes.get(url)
        if client is None:
            client = self._probes[url] = RpcClient((url,), timeout=3)
        chain_id, block, name = client.batch(
            [("eth_chainId", []), ("eth_getBlockByNumber", ["latest", False]), eth_call(self.asset, SEL_NAME)]
        )
        if not is_quantity(chain_id) or not isinstance(block, dict):
            return {"ok": False, "error": "no answer"}
        age = time.time() - quantity_value(block.get("timestamp"))
        token_name = abi_string(name)
        health: dict[str, Any] = {
            "ok": quantity_value(chain_id) == self.settings.network.chain_id
            and token_name == self.settings.asset_name,
            "chain_id": quantity_value(chain_id),
            "block": quantity_value(block.get("number")),
            "block_age_s": round(age, 1),
        }
        if not token_name:
            health["error"] = "eth_call_malformed"
        elif token_name != self.settings.asset_name:
            health["error"] = "token_mismatch"
        return health

    def asset_status(self, pay_to: str, relayers: tuple[str, ...]) -> tuple[bool, bool, list[int]]:
        """(token paused, payTo blacklisted, each relayer's ETH balance in wei) in one round trip. A
        token without ``paused()`` or ``isBlacklisted()`` is neither. Raises ``ChainUnavailable``."""
        paused, blacklisted, *balances = self.rpc.batch(
            [
                eth_call(self.asset, SEL_PAUSED),
                eth_call(self.asset, SEL_IS_BLACKLISTED + encode(["address"], [pay_to])),
                *[("eth_getBalance", [relayer, "latest"]) for relayer in relayers],
            ],
            well_formed=lambda answers: (
                is_flag_or_refused(answers[0])
                and is_flag_or_refused(answers[1])
                and all(is_quantity(answer) for answer in answers[2:])
            ),
        )
        return word_value(paused) == 1, word_value(blacklisted) == 1, [int(b, 16) for b in balances]

    def token_domain(self) -> tuple[str, str]:
        """The token's EIP-712 domain ``name()`` and ``version()``, from an endpoint whose answers
        are both well-formed ABI strings. Raises ``ChainUnavailable`` when none gives them."""
        name, version = self.rpc.batch(
            [eth_call(self.asset, SEL_NAME), eth_call(self.asset, SEL_VERSION)],
            well_formed=lambda answers: all(abi_string(answer) for answer in answers),
        )
        return abi_string(name), abi_string(version)


def check_contracts(chain: Chain, scheme: str, contracts: dict[str, str]) -> None:
    """``scheme`` settles through ``contracts`` ({name: canonical address}): each must have code on
    this chain. Raises ``SettingsError``: X402_SCHEMES when one has none, X402_RPC_URLS when no
    endpoint answers."""
    try:
        codes = chain.rpc.batch(
            [("eth_getCode", [address, "latest"]) for address in contracts.values()],
            well_formed=lambda answers: all(is_data(answer) for answer in answers),
        )
    except ChainUnavailable:
        raise SettingsError("X402_RPC_URLS", "no RPC endpoint answers eth_getCode") from None
    others = ",".join(name for name in ("exact", "upto", "batch-settlement") if name != scheme)
    for (name, address), code in zip(contracts.items(), codes, strict=True):
        if code in ("0x", "0x0", ""):
            raise SettingsError(
                "X402_SCHEMES",
                f"no {name} at {address} on {chain.settings.network.caip2}: {scheme} cannot settle here "
                f"(leave it out of X402_SCHEMES, e.g. X402_SCHEMES={others})",
            )


def check_upto_contracts(chain: Chain) -> None:
    """``upto`` settles through Permit2 and the x402UptoPermit2Proxy at their canonical addresses
    (``check_contracts``)."""
    check_contracts(chain, "upto", {"Permit2": PERMIT2_ADDRESS, "x402UptoPermit2Proxy": UPTO_PROXY_ADDRESS})


def check_batch_contracts(chain: Chain) -> None:
    """``batch-settlement`` deposits and claims through x402BatchSettlement and its two deposit
    collectors at their canonical addresses (``check_contracts``)."""
    contracts = {
        "x402BatchSettlement": BATCH_SETTLEMENT_ADDRESS,
        "ERC3009DepositCollector": ERC3009_DEPOSIT_COLLECTOR_ADDRESS,
        "Permit2DepositCollector": PERMIT2_DEPOSIT_COLLECTOR_ADDRESS,
    }
    check_contracts(chain, "batch-settlement", contracts)


def check_startup(chain: Chain, settings: Settings) -> None:
    """Every RPC that answers must be on the configured network; the token's domain must match.
    Raises ``SettingsError`` naming the variable to fix."""
    answered = 0
    for url in settings.rpc_urls:
        try:
            chain_id = chain.chain_id(url)
        except (ChainUnavailable, RpcFailure):
            continue
        answered += 1
        if chain_id != settings.network.chain_id:
            raise SettingsError(
                "X402_RPC_URLS", f"{url} is on chain {chain_id}, but X402_NETWORK is {settings.network.caip2}"
            )
    if not answered:
        raise SettingsError("X402_RPC_URLS", "no RPC endpoint answers")
    try:
        name, version = chain.token_domain()
    except ChainUnavailable:
        raise SettingsError(
            "X402_ASSET",
            f"token {settings.asset} gives no well-formed name()/version(): no token at this address, "
            "or every RPC endpoint answers calls malformed",
        ) from None
    if (name, version) != (settings.asset_name, settings.asset_version):
        raise SettingsError(
            "X402_ASSET",
            f"token {settings.asset} reports name/version {name!r}/{version!r}, "
            f"expected {settings.asset_name!r}/{settings.asset_version!r}",
        )
