"""Prometheus metrics of the proxy, defined without Flask so the money path can count what it does;
``app.web.metrics`` serves them. Correct under gunicorn with several workers (prometheus-client's
multiprocess mode when ``PROMETHEUS_MULTIPROC_DIR`` is set, as ``app.gunicorn_conf`` does).

Labels never carry request content: routes are URL rules, models come from the catalog, reasons
are the stable reason codes.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("x402_requests_total", "HTTP requests by route and status", ["route", "status"])
CHALLENGES = Counter("x402_challenges_total", "402 answers by reason code", ["reason"])
PAYMENTS = Counter("x402_payments_total", "payments by outcome and reason code", ["outcome", "reason"])
REVENUE = Counter("x402_revenue_atomic_total", "settled revenue in atomic units of the asset", ["model"])
UPTO_AUTHORIZED = Counter(
    "x402_upto_authorized_atomic_total", "upto: maximum authorized by answered calls, atomic units", ["model"]
)
UPTO_CHARGED = Counter(
    "x402_upto_charged_atomic_total", "upto: charged by the host's usage, atomic units", ["model"]
)
DEBT_RECORDED = Counter(
    "x402_upto_debt_atomic_total", "upto: charges answered whose settlement failed, atomic units", ["model"]
)
DEBT_COLLECTED = Counter(
    "x402_upto_debt_collected_atomic_total", "upto: recorded debts collected later, atomic units"
)
SETTLEMENT_SECONDS = Histogram(
    "x402_settlement_seconds",
    "time from send to confirmed receipt",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
UPSTREAM_SECONDS = Histogram(
    "x402_upstream_seconds",
    "time to the model host's answer (headers)",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120),
)
STREAM_FIRST_BYTE_SECONDS = Histogram(
    "x402_stream_first_byte_seconds",
    "time from request to the first streamed byte",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RELAYER_BALANCE = Gauge(
    "x402_relayer_balance_wei",
    "relayer ETH balance (at the last readiness check)",
    multiprocess_mode="mostrecent",
)
OPEN_PAYMENTS = Gauge(
    "x402_open_payments",
    "payments pending or redeemable (at the last readiness check)",
    ["state"],
    multiprocess_mode="mostrecent",
)

CHANNELS_OPEN = Gauge(
    "x402_channels_open",
    "batch-settlement channels with a balance (at the last claim run)",
    multiprocess_mode="mostrecent",
)
CHANNELS_UNCLAIMED = Gauge(
    "x402_channels_unclaimed_atomic",
    "voucher charges not claimed on chain yet, atomic units (at the last claim run)",
    multiprocess_mode="mostrecent",
)
CLAIM_BATCHES = Counter("x402_claim_batches_total", "claimWithSignature transactions that landed")
CLAIMED = Counter("x402_claimed_atomic_total", "voucher charges claimed on chain, atomic units")
REFUNDED = Counter("x402_refunded_atomic_total", "channel balances refunded to payers, atomic units")


def payment_outcome(outcome: str, reason: str = "") -> None:
    """Count one payment in ``x402_payments_total`` under ``outcome`` and the reason code ``reason``."""
    PAYMENTS.labels(outcome, reason).inc()


ATTESTATIONS = Counter(
    "x402_attestations_total",
    "verifications of attested models' enclaves, by model and result (verified, or the reason code)",
    ["model", "result"],
)
ATTESTED = Gauge(
    "x402_attested",
    "1 while an attested model's enclave verifies, else 0 (at its last verification)",
    ["model"],
    multiprocess_mode="mostrecent",
)
