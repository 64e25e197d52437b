"""The ``upto`` scheme against ``exact``, and one relayer key against three, side by side in one run.

Everything is on loopback: anvil (automine), redis-server, the stand-in model and the proxy under
gunicorn (``gunicorn.conf.py``, 2 workers x 32 threads). One payer pays both schemes: ``exact`` with
EIP-3009 payments signed by our own payer code (``harness.sign_headers``), ``upto`` with Permit2
permits signed by the official PyPI x402 client (``UptoEvmClientScheme``, as
``tests.support.upto_header``), all signed before timing. The payer approved Permit2 once, before
anything is measured.

1. **Latency.** Sequential paid JSON chat calls, exact and upto alternating (their order swapped
   every other pair), with the stand-in answering at once and after ``--delay`` (300 ms). The body,
   here and in part 2, is ``tests.support.CHAT_BODY`` with max_tokens 4096: priced 2470 atomic units,
   and upto charges the stand-in's short answer the catalog's floor, 1000, so what is charged differs
   from what is authorized. ``exact`` settles beside the model call; ``upto`` calls the host first
   and settles the charge before the answer goes out, so with a slow model it is expected to be
   slower by about one settlement; with a 0 ms model both wait for one settlement.
2. **Load.** 16 clients pay one distinct payment per call for ``--seconds`` after 64 warm-up calls,
   on a fresh gunicorn over an empty Redis, the chain put back before every run (``ChainReset``).
   Four setups: exact and upto, each with one relayer key (``X402_RELAYER_KEY``) and with three
   (``X402_RELAYER_KEYS``), in ABBA order (E1 U1 E3 U3 U3 E3 U1 E1 with ``--rounds 2``), each
   setup's runs pooled. Checked per run on the calls answered 200 (n): the payee gained exactly n x
   price (exact) or exactly the sum of the ``amount`` of every ``PAYMENT-RESPONSE`` (upto), and the
   relayers' account nonces grew by n in all. With three keys, upto permits are signed against 402s
   naming each relayer in turn (the proxy settles a permit with the key it names); exact payments
   are settled by the keys in turn (round robin in each worker).
3. **Charged / priced.** For a small mix of chat bodies (short and long prompts, max_tokens 64 to
   4096), one upto call each: the ``amount`` of the ``PAYMENT-RESPONSE`` over the priced maximum
   (the 402's ``amount``), on the default catalog (floor 1000 atomic units) and on a copy with
   ``floor = 1`` (``X402_CATALOG``), each checked against ``app.catalog.usage.charge`` of the usage
   the answer reports and against what moved on chain. The stand-in reports its prompt as one token
   per whitespace-separated word and writes a 5-6 token answer whatever max_tokens says; a second
   pass, on the floor-1 catalog, has the stand-in report ``completion_tokens = max_tokens`` (a model
   that writes to the limit; patched on the stand-in object in this process only), which bounds a
   real model's answers from above.

Stalls. Now and then (about one 6-8 s load run in 20-40 here) anvil (1.7.1) keeps a settlement
"queued" although its nonce is the relayer's next one (seen during a stall: latest = pending nonce
= the lowest queued nonce), and every later settlement of that relayer queues behind it until the
proxy re-sends the stuck transaction with higher fees after ``X402_FEE_BUMP_AFTER`` (10 s). That
run makes far fewer calls, some taking about 10 s, and the replaced original stays in the pool.
``evm_revert`` does not empty the pool, so that original would be mined in a later run of the
same relayer once its nonce comes round again: an old settlement replayed on the reverted chain
(the payee gains more than that run's answers say) and that run's own transaction with the nonce
refused. So whatever is left in the pool after each run is reported and dropped
(``anvil_dropAllTransactions``), and a run with a call slower than 5 s is reported as stalled.

    python -m benchmarks.upto [--seconds 8] [--clients 16] [--rounds 2] [--calls 40]
                              [--slow-calls 15] [--delay 0.3]

About two minutes on 2 cores with the defaults.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import requests
from eth_account import Account
from x402 import x402ClientSync
from x402.http.x402_http_client import x402HTTPClientSync
from x402.mechanisms.evm import EthAccountSigner
from x402.mechanisms.evm.upto import UptoEvmClientScheme
from x402.schemas import PaymentRequired

from app.catalog import Model, load_catalog
from app.catalog.usage import Usage, charge
from app.devnet.standin import StandinModel
from app.settings import DEFAULT_CATALOG
from app.x402.codec import decode_header
from app.x402.upto import UPTO_PROXY_ADDRESS
from tests.support import CHAT_BODY, approve_permit2

from .harness import (
    CHAT_PATH,
    ChainReset,
    CpuMeter,
    Devnet,
    Gunicorn,
    LoadParser,
    Row,
    cpu_per_call_text,
    devnet,
    failed_answers_row,
    gunicorns,
    median,
    offered,
    percentile,
    print_table,
    session,
    sign_headers,
)
from .load import LoadResult, paid_load
from .throughput import settlement_rows

BENCH = "upto"
SECONDS = 8.0  # measured seconds per load run
CLIENTS = 16
ROUNDS = 2  # load runs per setup, ABBA
CALLS = 40  # sequential calls per scheme, model 0 ms
SLOW_CALLS = 15  # sequential calls per scheme, model at --delay
DELAY = 0.3
WARM_PAIRS = 2  # sequential pairs left out of the latencies (connections, worker threads)
KEYS = 3
MAX_HEADERS = 4_000
RATE_FLOOR = 100  # calls/s to sign payments for at least (an upto permit takes ~2.5 ms to sign)
MODEL = str(CHAT_BODY["model"])
STALL = 5.0  # seconds: a paid call slower than this under load marks its run as stalled (docstring)
# The body of parts 1, 2 and 4: CHAT_BODY with max_tokens 4096, priced 2470 on the default catalog,
# so that an upto charge (the floor, 1000, for the stand-in's short answer) differs from the maximum
# and the chain check can tell "charged" from "authorized".
BODY: dict[str, Any] = {**CHAT_BODY, "max_tokens": 4096}
HEADER = "PAYMENT-SIGNATURE"


# --- paying ---------------------------------------------------------------------------------------


class UptoSigner:
    """``upto`` ``PAYMENT-SIGNATURE`` values made by the official PyPI x402 client, as
    ``tests.support.upto_header`` makes them, with one client kept for every header."""

    def __init__(self, key: str) -> None:
        client = x402ClientSync()
        client.register("eip155:*", UptoEvmClientScheme(EthAccountSigner(Account.from_key(key))))
        self.http = x402HTTPClientSync(client)

    def headers(self, challenge: dict[str, Any], count: int) -> list[dict[str, str]]:
        """``count`` distinct permits (the client draws a fresh Permit2 nonce for each) for a decoded
        v2 402 challenge; the client picks its ``upto`` entry."""
        required = PaymentRequired.model_validate(challenge)
        out = []
        for _ in range(count):
            payload = self.http.create_payment_payload(required)
            out.append({HEADER: str(self.http.encode_payment_signature_header(payload)[HEADER])})
        assert len({h[HEADER] for h in out}) == count, "the client signed the same permit twice"
        return out


def challenge(url: str, body: Any = None) -> dict[str, Any]:
    """The decoded ``PAYMENT-REQUIRED`` of a real 402 for this body (default ``BODY``)."""
    response = requests.post(url, json=BODY if body is None else body, timeout=30)
    assert response.status_code == 402, (response.status_code, response.text[:300])
    decoded = decode_header(response.headers["PAYMENT-REQUIRED"])
    assert isinstance(decoded, dict)
    return decoded


def entry(decoded: dict[str, Any], scheme: str) -> dict[str, Any]:
    (found,) = [a for a in decoded["accepts"] if a["scheme"] == scheme]
    return dict(found)


def upto_challenges(url: str, relayers: list[str]) -> list[dict[str, Any]]:
    """One 402 challenge naming each relayer (the 402s name them in turn, per worker)."""
    found: dict[str, dict[str, Any]] = {}
    for _ in range(20 * len(relayers)):
        decoded = challenge(url)
        found.setdefault(entry(decoded, "upto")["extra"]["facilitatorAddress"].lower(), decoded)
        if len(found) == len(relayers):
            break
    assert sorted(found) == sorted(r.lower() for r in relayers), (sorted(found), relayers)
    return list(found.values())


def interleaved(groups: list[list[dict[str, str]]]) -> list[dict[str, str]]:
    """The headers of every group, taken in turn (the relayers share the load evenly)."""
    return [h for turn in zip(*groups, strict=True) for h in turn]


def settle_answer(response: requests.Response) -> dict[str, Any]:
    value = decode_header(response.headers.get("PAYMENT-RESPONSE", ""))
    return value if isinstance(value, dict) else {}


# --- load -----------------------------------------------------------------------------------------


@dataclass
class ChargedLoad(LoadResult):
    """A ``LoadResult`` plus what the ``PAYMENT-RESPONSE`` of each 200 said."""

    charged: int = 0  # the sum of their ``amount`` (upto; exact answers carry none)
    without_amount: int = 0  # 200s whose PAYMENT-RESPONSE names no amount
    unconfirmed: int = 0  # 200s whose PAYMENT-RESPONSE is not ``success: true``

    def answered(self, response: requests.Response) -> None:
        settled = settle_answer(response)
        if "amount" in settled:
            self.charged += int(settled["amount"])
        else:
            self.without_amount += 1
        self.unconfirmed += settled.get("success") is not True


def charged_load(
    url: str, headers: list[dict[str, str]], clients: int, seconds: float | None = None
) -> ChargedLoad:
    """``benchmarks.load.paid_load`` of ``BODY`` (closed loop, one header per call, bounded by time
    and headers) that also reads the ``PAYMENT-RESPONSE`` of every 200."""
    result = ChargedLoad()
    paid_load(url, headers, clients, seconds, BODY, result=result)
    return result


class PoolSampler:
    """anvil's transaction pool (``txpool_status``) sampled every ``every`` seconds in a thread while
    the load runs: ``queued`` counts transactions waiting behind a missing nonce of their sender
    (automine mines a transaction at once unless its account nonce has a gap before it)."""

    def __init__(self, url: str, every: float = 0.05) -> None:
        self.url = url
        self.every = every
        self.samples: list[tuple[int, int]] = []  # (pending, queued)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="txpool-sampler", daemon=True)

    def _sample(self) -> None:
        s = session()
        try:
            while not self._stop.wait(self.every):
                with contextlib.suppress(requests.RequestException, ValueError, KeyError):
                    body = {"jsonrpc": "2.0", "id": 1, "method": "txpool_status", "params": []}
                    status = s.post(self.url, json=body, timeout=2).json()["result"]
                    self.samples.append((int(status["pending"], 16), int(status["queued"], 16)))
        finally:
            s.close()

    def __enter__(self) -> PoolSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def pool_leftovers(dev: Devnet) -> list[str]:
    """What is still in anvil's pool once a proxy is stopped, every call answered: "pending" or
    "queued" (behind a nonce gap), sender, nonce and target, then dropped
    (``anvil_dropAllTransactions``). ``evm_revert`` keeps the pool: a transaction left queued would
    otherwise be mined in a later run, once that run's settlements fill the gap before it."""
    content = dev.chain.rpc.call("txpool_content", [])
    targets = {dev.chain.token.lower(): "token (exact)", UPTO_PROXY_ADDRESS.lower(): "upto proxy"}
    left = []
    for kind in ("pending", "queued"):
        for sender, by_nonce in (content.get(kind) or {}).items():
            for nonce, tx in by_nonce.items():
                to = str(tx.get("to") or "").lower()
                left.append(f"{kind}: {sender[:10]} nonce {nonce} to {targets.get(to, to)}")
    if left:
        dev.chain.rpc.call("anvil_dropAllTransactions", [])
    return left


@dataclass(frozen=True)
class Setup:
    scheme: str  # exact | upto
    keys: int  # relayer keys the proxy settles with

    @property
    def name(self) -> str:
        return f"{self.scheme}, {self.keys} key{'s' if self.keys > 1 else ''}"


@dataclass
class Run:
    """One load run of one setup; or, with ``parts``, the runs of a setup pooled (``pooled``)."""

    setup: Setup
    load: ChargedLoad
    price: int  # the 402's amount for BODY: exact's price, upto's maximum
    paid_delta: int  # the payee's balance, after - before
    nonce_deltas: dict[str, int]  # each relayer's account nonce, after - before
    cpu_used: dict[str, float] = field(default_factory=dict)
    pool: list[tuple[int, int]] = field(default_factory=list)  # anvil txpool (pending, queued) samples
    blocks: int = 0  # blocks anvil mined during the load
    leftover: list[str] = field(default_factory=list)  # left in anvil's pool after the run (dropped)
    parts: list[Run] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.setup.name

    def queued(self) -> float:
        """Mean transactions queued behind a nonce gap in anvil's pool while the load ran."""
        return sum(q for _p, q in self.pool) / len(self.pool) if self.pool else float("nan")

    def pool_text(self) -> str:
        if not self.pool:
            return "no txpool samples"
        n = len(self.pool)
        queued = sum(q for _p, q in self.pool) / n
        pending = sum(p for p, _q in self.pool) / n
        with_gap = sum(q > 0 for _p, q in self.pool) / n
        return (
            f"anvil txpool over {n} samples: mean {pending:.2f} pending, {queued:.2f} queued "
            f"(behind a nonce gap; {with_gap:.0%} of samples had one); {self.txs_per_block():.2f} "
            f"settlements per block ({self.blocks} blocks)"
        )

    def txs_per_block(self) -> float:
        return sum(self.nonce_deltas.values()) / self.blocks if self.blocks else float("nan")

    @property
    def expected(self) -> int:
        """What should have moved: n x price (exact), the sum of the amounts charged (upto)."""
        return self.load.charged if self.setup.scheme == "upto" else self.load.ok * self.price

    @property
    def settled_once(self) -> bool:
        if self.parts:
            return all(part.settled_once for part in self.parts)
        amounts_named = self.setup.scheme == "exact" or not self.load.without_amount
        return (
            self.paid_delta == self.expected
            and sum(self.nonce_deltas.values()) == self.load.ok
            and not self.load.unconfirmed
            and amounts_named
        )

    def check_text(self) -> str:
        what = "sum of PAYMENT-RESPONSE amounts" if self.setup.scheme == "upto" else "n x price"
        split = "+".join(str(d) for d in self.nonce_deltas.values())
        text = (
            f"n={self.load.ok}: payee +{self.paid_delta} ({what} = {self.expected}), relayer nonces +{split}"
        )
        if self.load.unconfirmed:
            text += f", {self.load.unconfirmed} PAYMENT-RESPONSEs not success"
        if self.setup.scheme == "upto" and self.load.without_amount:
            text += f", {self.load.without_amount} without an amount"
        if self.leftover:
            text += f"; left in anvil's pool after the run: {'; '.join(self.leftover[:4])}"
        return text


def pooled(runs: list[Run]) -> Run:
    load = ChargedLoad(
        ok=sum(r.load.ok for r in runs),
        elapsed=sum(r.load.elapsed for r in runs),
        latencies=[t for r in runs for t in r.load.latencies],
        statuses=sum((r.load.statuses for r in runs), Counter()),
        errors=[e for r in runs for e in r.load.errors][:5],
        exhausted=any(r.load.exhausted for r in runs),
        charged=sum(r.load.charged for r in runs),
        without_amount=sum(r.load.without_amount for r in runs),
        unconfirmed=sum(r.load.unconfirmed for r in runs),
    )
    deltas: Counter[str] = Counter()
    for r in runs:
        deltas.update(r.nonce_deltas)
    cpu = {name: sum(r.cpu_used.get(name, 0.0) for r in runs) for name in runs[0].cpu_used}
    return replace(
        runs[0],
        load=load,
        paid_delta=sum(r.paid_delta for r in runs),
        nonce_deltas=dict(deltas),
        cpu_used=cpu,
        pool=[s for r in runs for s in r.pool],
        blocks=sum(r.blocks for r in runs),
        leftover=[t for r in runs for t in r.leftover],
        parts=list(runs),
    )


def proxy_env(dev: Devnet, keys: list[str], **extra: str) -> dict[str, str]:
    """The proxy's environment: one key as ``X402_RELAYER_KEY``, several as ``X402_RELAYER_KEYS``
    (the settings refuse both at once)."""
    env = dev.proxy_env(**extra)
    if len(keys) > 1:
        del env["X402_RELAYER_KEY"]
        env["X402_RELAYER_KEYS"] = ",".join(keys)
    return env


def measure(
    dev: Devnet, setup: Setup, keys: list[str], signer: UptoSigner, clients: int, seconds: float
) -> Run:
    """One run of ``setup`` on an empty Redis (run it on a chain just reset): a fresh gunicorn,
    warm-up, ``seconds`` of paid load, the chain deltas."""
    dev.flush_redis()  # the relayers' nonce counters start again from the reset chain
    keys = keys[: setup.keys]
    relayers = [str(Account.from_key(k).address) for k in keys]
    with Gunicorn("wsgi:app", proxy_env(dev, keys)) as server:
        url = server.url + CHAT_PATH
        requirement = offered(url, BODY)
        price = int(requirement["amount"])
        if setup.scheme == "exact":

            def make(count: int) -> list[dict[str, str]]:
                return sign_headers(requirement, dev.payer_key, count)
        else:
            challenges = upto_challenges(url, relayers)

            def make(count: int) -> list[dict[str, str]]:
                share = -(-count // len(challenges))
                return interleaved([signer.headers(c, share) for c in challenges])

        warm = charged_load(url, make(4 * clients), clients)
        assert warm.ok, (setup.name, warm.statuses, warm.errors)
        headers = make(min(MAX_HEADERS, int(max(warm.rate, RATE_FLOOR) * seconds * 1.6) + 200))
        balance = dev.chain.balance(dev.wallets.pay_to)
        nonces = {r: dev.nonce_of(r) for r in relayers}
        block = int(dev.chain.rpc.call("eth_blockNumber", []), 16)
        meter = CpuMeter(
            {
                "gunicorn": [server.process.pid, *server.worker_pids()],
                "anvil": [dev.anvil.process.pid],
                "redis": [dev.redis.process.pid],
            }
        ).start()
        with PoolSampler(dev.anvil.url) as pool:
            load = charged_load(url, headers, clients, seconds)
        meter.stop()
    return Run(
        setup,
        load,
        price,
        dev.chain.balance(dev.wallets.pay_to) - balance,
        {r: dev.nonce_of(r) - nonces[r] for r in relayers},
        dict(meter.used),
        pool.samples,
        int(dev.chain.rpc.call("eth_blockNumber", []), 16) - block,
        pool_leftovers(dev),  # read once the proxy is stopped
    )


# --- latency and charged / priced -------------------------------------------------------------------


@dataclass
class Latency:
    delay: float
    samples: dict[str, list[float]]  # scheme -> seconds, warm-up left out
    statuses: dict[str, Counter[Any]]
    errors: list[str]

    def p(self, scheme: str, fraction: float) -> float:
        lat = self.samples[scheme]
        if not lat:
            return float("nan")
        return median(lat) if fraction == 0.5 else percentile(lat, fraction)

    @property
    def ratio(self) -> float:
        return self.p("upto", 0.5) / self.p("exact", 0.5)


def sequential(
    dev: Devnet, url: str, signer: UptoSigner, delay: float, calls: int, moved: list[int]
) -> Latency:
    """``calls`` exact and ``calls`` upto calls, one at a time, alternating; ``moved`` gets what each
    answered call says it paid (exact: its price; upto: its PAYMENT-RESPONSE amount)."""
    dev.standin.behaviour.delay = delay
    total = calls + WARM_PAIRS
    requirement = offered(url, BODY)
    paid = {
        "exact": sign_headers(requirement, dev.payer_key, total),
        "upto": signer.headers(challenge(url), total),
    }
    result = Latency(delay, {"exact": [], "upto": []}, {"exact": Counter(), "upto": Counter()}, [])
    client = session()
    try:
        for i in range(total):
            for scheme in ("exact", "upto") if i % 2 == 0 else ("upto", "exact"):
                t0 = time.perf_counter()
                response = client.post(url, json=BODY, headers=paid[scheme][i], timeout=30)
                elapsed = time.perf_counter() - t0
                result.statuses[scheme][response.status_code] += 1
                if response.status_code != 200:
                    result.errors.append(f"{scheme} {response.status_code}: {response.text[:200]}")
                    continue
                settled = settle_answer(response)
                moved.append(int(settled.get("amount", requirement["amount"])))
                if i >= WARM_PAIRS:
                    result.samples[scheme].append(elapsed)
    finally:
        client.close()
        dev.standin.behaviour.delay = 0.0
    return result


LONG_TEXT = " ".join(
    [
        "A trusted execution environment keeps code and data in memory that the host cannot read:",
        "the processor encrypts the guest's pages with a key only it holds, and a signed attestation",
        "report lets a remote party check which firmware and image were measured at launch before it",
        "sends anything secret. Confidential virtual machines apply this to a whole guest, so an",
        "inference server can run unchanged while the cloud operator sees only ciphertext.",
    ]
)
SYSTEM = "You are a careful assistant. Answer briefly and cite the section you rely on."


def chat(content: str, max_tokens: int, system: str = "") -> dict[str, Any]:
    messages = [{"role": "system", "content": system}] if system else []
    return {
        "model": MODEL,
        "messages": [*messages, {"role": "user", "content": content}],
        "max_tokens": max_tokens,
    }


def bodies() -> list[tuple[str, dict[str, Any]]]:
    """A small mix of chat bodies: short questions at each max_tokens, a short conversation, long
    documents (about 2 and 8 KB) to summarise."""
    question = "What is a trusted execution environment?"
    doc_2k = "\n\n".join([LONG_TEXT] * 4)
    doc_8k = "\n\n".join([LONG_TEXT] * 16)
    turns = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question},
            {"role": "assistant", "content": LONG_TEXT},
            {"role": "user", "content": "How does the remote party check the attestation report?"},
        ],
        "max_tokens": 512,
    }
    return [
        ("short, max 64", chat(question, 64)),
        ("short, max 256", chat(question, 256)),
        ("short, max 1024", chat(question, 1024)),
        ("short, max 4096", chat(question, 4096)),
        ("3 turns + system, max 512", turns),
        (f"doc {len(doc_2k) / 1000:.1f} KB, max 256", chat("Summarise:\n\n" + doc_2k, 256, SYSTEM)),
        (f"doc {len(doc_8k) / 1000:.1f} KB, max 1024", chat("Summarise:\n\n" + doc_8k, 1024, SYSTEM)),
        (f"doc {len(doc_8k) / 1000:.1f} KB, max 4096", chat("Summarise:\n\n" + doc_8k, 4096, SYSTEM)),
    ]


@dataclass
class Charged:
    """One upto call of the mix: the priced maximum, the amount charged, and whether that amount is
    ``charge`` of the usage the answer reports."""

    body: str
    maximum: int
    amount: int
    usage: tuple[int, int]  # prompt, completion tokens as the host reported them
    rule_holds: bool

    @property
    def ratio(self) -> float:
        return self.amount / self.maximum


@dataclass
class Mix:
    """The mix paid through one proxy: a name (catalog, host behaviour) and one ``Charged`` each."""

    name: str
    calls: list[Charged] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """Overall: all charged over all priced."""
        priced = sum(c.maximum for c in self.calls)
        return sum(c.amount for c in self.calls) / priced if priced else float("nan")


@contextlib.contextmanager
def host_writes_to_limit(standin: StandinModel) -> Iterator[None]:
    """The stand-in reports ``completion_tokens = max_tokens`` (its text stays short): a model that
    writes until the limit. Patched on this stand-in object, in this process; undone on exit."""
    original = standin._answer

    def answer(body: dict[str, Any], *, chat: bool, usage: Any = "report") -> dict[str, Any]:
        out = original(body, chat=chat, usage=usage)
        reported, limit = out.get("usage"), body.get("max_tokens")
        if isinstance(reported, dict) and isinstance(limit, int):
            reported["completion_tokens"] = limit
            reported["total_tokens"] = reported["prompt_tokens"] + limit
        return out

    standin._answer = answer  # type: ignore[method-assign]
    try:
        yield
    finally:
        del standin._answer  # the class's method again


def pay_mix(name: str, url: str, model: Model, signer: UptoSigner, moved: list[int]) -> Mix:
    mix = Mix(name)
    client = session()
    try:
        for label, body in bodies():
            decoded = challenge(url, body)
            maximum = int(entry(decoded, "upto")["amount"])
            (header,) = signer.headers(decoded, 1)
            response = client.post(url, json=body, headers=header, timeout=30)
            if response.status_code != 200:
                mix.errors.append(f"{label}: {response.status_code} {response.text[:200]}")
                continue
            amount = int(settle_answer(response)["amount"])
            moved.append(amount)
            reported = response.json()["usage"]
            usage = Usage(reported["prompt_tokens"], reported["completion_tokens"])
            holds = amount == charge(model, usage, maximum)
            mix.calls.append(
                Charged(label, maximum, amount, (usage.prompt_tokens, usage.completion_tokens), holds)
            )
    finally:
        client.close()
    return mix


def floor_one_catalog(directory: str) -> Path:
    text = DEFAULT_CATALOG.read_text()
    assert "floor = 1000" in text, "the default catalog's floor changed: update this benchmark"
    path = Path(directory) / "catalog-floor-1.toml"
    path.write_text(text.replace("floor = 1000", "floor = 1"))
    return path


@dataclass
class Sequential:
    """Parts 1 and 3: the latencies, the mixes, and the chain check over all their calls."""

    latencies: list[Latency]
    mixes: list[Mix]
    moved: int  # on chain: the payee's balance, after - before
    said: int  # what the answers said they paid, added up
    answered: int
    nonce_delta: int
    leftover: list[str] = field(default_factory=list)  # left in anvil's pool afterwards (dropped)


def sequential_parts(
    dev: Devnet, signer: UptoSigner, calls: int, slow_calls: int, delay: float
) -> Sequential:
    with tempfile.TemporaryDirectory(prefix="x402-upto-bench-") as tmp:
        floor_one = floor_one_catalog(tmp)
        default_proxy = Gunicorn("wsgi:app", dev.proxy_env())
        floor_proxy = Gunicorn("wsgi:app", dev.proxy_env(X402_CATALOG=str(floor_one)))
        with gunicorns(default_proxy, floor_proxy):
            said: list[int] = []
            balance, nonce = dev.chain.balance(dev.wallets.pay_to), dev.nonce_of(dev.wallets.relayer)
            url = default_proxy.url + CHAT_PATH
            latencies = [sequential(dev, url, signer, 0.0, calls, said)]
            if delay > 0:
                latencies.append(sequential(dev, url, signer, delay, slow_calls, said))
            models = {
                "default": load_catalog(DEFAULT_CATALOG)[MODEL],
                "floor 1": load_catalog(floor_one)[MODEL],
            }
            floor_url = floor_proxy.url + CHAT_PATH
            mixes = [
                pay_mix("default catalog (floor 1000), stand-in usage", url, models["default"], signer, said),
                pay_mix("floor-1 catalog, stand-in usage", floor_url, models["floor 1"], signer, said),
            ]
            with host_writes_to_limit(dev.standin):
                name = "floor-1 catalog, host reports max_tokens"
                mixes.append(pay_mix(name, floor_url, models["floor 1"], signer, said))
            seq = Sequential(
                latencies,
                mixes,
                dev.chain.balance(dev.wallets.pay_to) - balance,
                sum(said),
                len(said),
                dev.nonce_of(dev.wallets.relayer) - nonce,
            )
    seq.leftover = pool_leftovers(dev)
    return seq


# --- everything -----------------------------------------------------------------------------------


SETUPS = [Setup("exact", 1), Setup("upto", 1), Setup("exact", KEYS), Setup("upto", KEYS)]


@dataclass(frozen=True)
class Options:
    """What ``main``'s options set (the module docstring)."""

    seconds: float = SECONDS
    clients: int = CLIENTS
    rounds: int = ROUNDS
    calls: int = CALLS
    slow_calls: int = SLOW_CALLS
    delay: float = DELAY


@dataclass
class Results:
    seq: Sequential
    runs: dict[Setup, Run]
    options: Options


def measure_all(options: Options | None = None) -> Results:
    opts = options or Options()
    with devnet() as dev:
        keys = [dev.wallets.relayer_key, *("0x" + os.urandom(32).hex() for _ in range(KEYS - 1))]
        for key in keys[1:]:
            dev.chain.set_eth(str(Account.from_key(key).address), 10**20)
        approve_permit2(dev.chain, dev.wallets.payer)
        signer = UptoSigner(dev.wallets.payer_key)
        reset = ChainReset(dev)  # before the sequential parts: every load run starts from here
        print("... sequential calls and the charged/priced mix", file=sys.stderr, flush=True)
        seq = sequential_parts(dev, signer, opts.calls, opts.slow_calls, opts.delay)
        done: dict[Setup, list[Run]] = {s: [] for s in SETUPS}
        for round_, setup in reset.abba(SETUPS, opts.rounds):
            print(f"... {setup.name}, round {round_ + 1} of {opts.rounds}", file=sys.stderr, flush=True)
            done[setup].append(measure(dev, setup, keys, signer, opts.clients, opts.seconds))
    return Results(seq, {s: pooled(r) for s, r in done.items()}, opts)


# --- report ---------------------------------------------------------------------------------------


def rate_ratio(a: Run, b: Run) -> float:
    return a.load.rate / b.load.rate if b.load.rate else float("nan")


def lat_ms(samples: list[float], fraction: float) -> str:
    if not samples:
        return "-"
    value = median(samples) if fraction == 0.5 else percentile(samples, fraction)
    return f"{value * 1000:.1f} ms"


def table(headers: tuple[str, ...], cells: list[tuple[str, ...]]) -> str:
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)).rstrip() for c in cells]
    return "\n".join(lines)


def latency_table(seq: Sequential) -> str:
    cells = [
        (
            f"{lat.delay * 1000:.0f} ms",
            str(len(lat.samples["exact"])),
            f"{lat.p('exact', 0.5) * 1000:.1f} ms",
            f"{lat.p('exact', 0.9) * 1000:.1f} ms",
            f"{lat.p('upto', 0.5) * 1000:.1f} ms",
            f"{lat.p('upto', 0.9) * 1000:.1f} ms",
            f"{(lat.p('upto', 0.5) - lat.p('exact', 0.5)) * 1000:+.1f} ms",
            f"{lat.ratio:.2f}",
        )
        for lat in seq.latencies
    ]
    headers = (
        "model",
        "calls each",
        "exact p50",
        "exact p90",
        "upto p50",
        "upto p90",
        "upto - exact",
        "ratio",
    )
    return table(headers, cells)


def load_table(res: Results) -> str:
    cells = []
    for setup in SETUPS:
        r = res.runs[setup]
        cpu = r.cpu_used
        n = r.load.ok or 1
        cells.append(
            (
                setup.name,
                f"{r.load.rate:.1f}/s",
                ", ".join(f"{p.load.rate:.0f}" for p in r.parts or [r]),
                lat_ms(r.load.latencies, 0.5),
                lat_ms(r.load.latencies, 0.9),
                f"{max(r.load.latencies, default=0):.2f} s",
                str(r.load.ok),
                str(sum(v for k, v in r.load.statuses.items() if k != 200)),
                f"{r.expected / n:.0f}",
                "yes" if r.settled_once else "NO",
                "+".join(str(d) for d in r.nonce_deltas.values()),
                f"{cpu.get('gunicorn', 0) / n * 1000:.1f} / {cpu.get('anvil', 0) / n * 1000:.1f}",
                f"{r.queued():.2f}",
                f"{r.txs_per_block():.2f}",
            )
        )
    headers = (
        "setup",
        f"paid calls/s ({res.options.clients} clients)",
        "each run",
        "p50",
        "p90",
        "max",
        "ok",
        "not 200",
        "paid per call",
        "chain = answers",
        "settled by (nonces)",
        "CPU ms/call gunicorn / anvil",
        "txpool queued",
        "txs/block",
    )
    e1, u1, e3, u3 = (res.runs[s] for s in SETUPS)
    lines = [
        table(headers, cells),
        f"ratio upto / exact: {rate_ratio(u1, e1):.2f} (1 key), {rate_ratio(u3, e3):.2f} ({KEYS} keys)",
        f"ratio {KEYS} keys / 1 key: {rate_ratio(e3, e1):.2f} (exact), {rate_ratio(u3, u1):.2f} (upto)",
    ]
    return "\n".join(lines)


def mix_table(seq: Sequential) -> str:
    labels = [label for label, _ in bodies()]
    headers = ["body"]
    for i, _mix in enumerate(seq.mixes, 1):
        headers += [f"max {i}", f"charged {i}", f"ratio {i}"]
    cells = []
    for label in labels:
        row = [label]
        for mix in seq.mixes:
            found = [c for c in mix.calls if c.body == label]
            if found:
                c = found[0]
                row += [str(c.maximum), str(c.amount), f"{c.ratio:.3f}"]
            else:
                row += ["-", "-", "-"]
        cells.append(tuple(row))
    cells.append(
        (
            "overall (sum charged / sum max)",
            *[v for mix in seq.mixes for v in ("", "", f"{mix.ratio:.3f}")],
        )
    )
    names = "; ".join(f"{i + 1}. {mix.name}" for i, mix in enumerate(seq.mixes))
    usage = ", ".join(f"{c.body}: {c.usage[0]}+{c.usage[1]}" for c in seq.mixes[0].calls)
    legend = f"columns, left to right: {names}\nstand-in usage (prompt+completion tokens): {usage}"
    return f"{table(tuple(headers), cells)}\n{legend}"


def rows(res: Results) -> list[Row]:
    out: list[Row] = []
    seq = res.seq
    for lat in seq.latencies:
        out.append(
            Row(
                BENCH,
                f"sequential paid p50, model {lat.delay * 1000:.0f} ms (upto vs exact)",
                f"{lat.p('upto', 0.5) * 1000:.1f} ms",
                f"{lat.p('exact', 0.5) * 1000:.1f} ms exact",
                f"{lat.ratio:.2f}",
                note=f"{len(lat.samples['upto'])} calls each, p90 upto {lat.p('upto', 0.9) * 1000:.1f} ms "
                f"vs exact {lat.p('exact', 0.9) * 1000:.1f} ms",
            )
        )
    e1, u1, e3, u3 = (res.runs[s] for s in SETUPS)
    clients, rounds = res.options.clients, res.options.rounds
    figure = f"paid calls/s, {clients} clients" + (f", {rounds} runs ABBA" if rounds > 1 else "")
    out.append(
        Row(
            BENCH,
            f"{figure} (upto vs exact, 1 key)",
            f"{u1.load.rate:.1f}/s",
            f"{e1.load.rate:.1f}/s exact",
            f"{rate_ratio(u1, e1):.2f}",
            note=f"p50 {lat_ms(u1.load.latencies, 0.5)} vs {lat_ms(e1.load.latencies, 0.5)}",
        )
    )
    for a, b, what in ((e3, e1, "exact"), (u3, u1, "upto")):
        out.append(
            Row(
                BENCH,
                f"{figure} ({what}, {KEYS} keys vs 1)",
                f"{a.load.rate:.1f}/s",
                f"{b.load.rate:.1f}/s 1 key",
                f"{rate_ratio(a, b):.2f}",
                note=f"settled by {'+'.join(str(d) for d in a.nonce_deltas.values())} per key; "
                f"anvil txpool queued (nonce gaps) {a.queued():.2f} vs {b.queued():.2f} on average, "
                f"settlements per block {a.txs_per_block():.2f} vs {b.txs_per_block():.2f}",
            )
        )
    for mix in seq.mixes:
        per_body = ", ".join(f"{c.body} {c.ratio:.3f}" for c in mix.calls)
        out.append(
            Row(
                BENCH,
                f"charged/priced, mix of {len(mix.calls)} bodies ({mix.name})",
                f"{mix.ratio:.3f}",
                note=per_body,
            )
        )
    rule = all(c.rule_holds for mix in seq.mixes for c in mix.calls)
    out.append(
        Row(
            BENCH,
            "upto charge = usage rule, chain = answers (sequential)",
            "yes" if rule and seq.moved == seq.said and seq.nonce_delta == seq.answered else "NO",
            goal="all",
            passed=rule and seq.moved == seq.said and seq.nonce_delta == seq.answered,
            note=f"{seq.answered} calls: payee +{seq.moved}, answers said {seq.said}; "
            f"relayer nonce +{seq.nonce_delta}",
        )
    )
    statuses: Counter[Any] = Counter()
    for lat in seq.latencies:
        for counts in lat.statuses.values():
            statuses.update(counts)
    statuses[200] += sum(len(mix.calls) for mix in seq.mixes)
    statuses["error"] += sum(len(mix.errors) for mix in seq.mixes)
    if not statuses["error"]:
        del statuses["error"]
    examples = [e for lat in seq.latencies for e in lat.errors] + [e for m in seq.mixes for e in m.errors]
    failed = failed_answers_row(BENCH, statuses, examples)
    if failed is not None:
        failed.figure += " (sequential)"
        out.append(failed)
    leftover = seq.leftover + [t for r in res.runs.values() for t in r.leftover]
    stalled = [p for r in res.runs.values() for p in r.parts if max(p.load.latencies, default=0) > STALL]
    if leftover or stalled:
        out.append(
            Row(
                BENCH,
                "load runs stalled / transactions left in anvil's pool",
                f"{len(stalled)} / {len(leftover)}",
                goal="report",
                note=f"stalled (a call over {STALL:g} s): "
                + (", ".join(f"{p.setup.name} {p.load.rate:.0f}/s" for p in stalled) or "none")
                + "; left in the pool (dropped before the next run): "
                + ("; ".join(leftover[:6]) or "none")
                + ". See the docstring of benchmarks/upto.py.",
            )
        )
    for setup in SETUPS:
        out += settlement_rows(
            BENCH, res.runs[setup], "chain = answers under load", "exact n x price, upto sum charged"
        )
    return out


def details(res: Results) -> str:
    lines = []
    for setup in SETUPS:
        for part in res.runs[setup].parts:
            text = f"{setup.name}: {part.load.ok} calls in {part.load.elapsed:.1f} s ({part.load.rate:.1f}/s)"
            if set(part.load.statuses) - {200}:
                text += f", statuses {dict(part.load.statuses)} e.g. {part.load.errors[:2]}"
            if part.load.exhausted:
                text += ", ran out of pre-signed payments (rate over the shorter run)"
            text += f"; {cpu_per_call_text(part.cpu_used, part.load.ok)}\n    chain: {part.check_text()}"
            lines.append(text + f"\n    {part.pool_text()}")
    for setup in SETUPS:
        lines.append(f"{setup.name}, pooled: {res.runs[setup].pool_text()}")
    return "\n".join(lines)


def run(options: Options | None = None) -> list[Row]:
    return rows(measure_all(options))


def main() -> None:
    parser = LoadParser(
        __doc__,
        SECONDS,
        CLIENTS,
        ROUNDS,
        "measured seconds per load run",
        "concurrent paying clients",
        "load runs per setup, ABBA",
    )
    parser.add_argument("--calls", type=int, default=CALLS, help="sequential calls per scheme, model 0 ms")
    parser.add_argument(
        "--slow-calls", type=int, default=SLOW_CALLS, help="the same with the model at --delay"
    )
    parser.add_argument("--delay", type=float, default=DELAY, help="model delay in seconds (0: skip)")
    args = parser.parse_checked(("calls", "slow_calls"), "--rounds, --clients and the call counts")
    started = time.monotonic()
    print(f"# load average at start {os.getloadavg()[0]:.2f}", flush=True)
    res = measure_all(
        Options(args.seconds, args.clients, args.rounds, args.calls, args.slow_calls, args.delay)
    )
    print("\n1. Sequential paid calls, exact vs upto (CHAT_BODY with max_tokens 4096)\n")
    print(latency_table(res.seq))
    load = f"{args.clients} clients, {args.seconds:g} s a run, ABBA, chain reset before each"
    print(f"\n2 and 4. Paid load, {load}\n")
    print(load_table(res))
    print()
    print(details(res))
    print("\n3. Charged / priced, upto, one call per body\n")
    print(mix_table(res.seq))
    print()
    print_table(rows(res))
    print(f"\nruntime {time.monotonic() - started:.0f} s; load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
