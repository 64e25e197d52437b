"""0001: the first keyspace of x402-tee-proxy.

Payment hashes ``x402:{auth:…}``, relayer nonce counters ``x402:{relayer:…}:nonce`` and the ledger
stream ``x402:{ledger}``, as ``app/payments/ledger.py`` writes them. Nothing predates it, so there is no data
to rewrite: applying it records keyspace version 1, which the proxy checks at start-up.
"""

from __future__ import annotations

from app.backends.store import Store


def up(store: Store) -> None:
    """Nothing to transform in the first keyspace; the runner records the version."""
