"""0002: payments move under shard hash tags, beside the outbox of their ledger events.

Version 1 kept each payment at ``x402:{auth:<chain id>:<asset>:<payer>:0x<nonce>}``, alone in its
slot, so on a Redis Cluster a transition could not write its ledger event atomically. Version 2 keeps
it at ``x402:{p<n>}:auth:…`` (``app.payments.keys.payment_key``). Each old hash is copied to its new
name with its remaining time to live (``DUMP``/``RESTORE``: the two names are in different slots,
where ``RENAME`` is refused) and then deleted. The relayer counters' ``…:nonce:reserved_at`` keys,
replaced by ``…:nonce:chain``, are deleted. Run it with the proxies stopped; a run cut short is
resumed by running it again (a payment already copied is not overwritten).
"""

from __future__ import annotations

import re

from app.backends.store import Store
from app.payments.keys import payment_key

OLD_KEYS = "x402:{auth:*}"
OLD_KEY_RE = re.compile(r"^x402:\{auth:([0-9]+):(0x[0-9a-f]{40}):(0x[0-9a-f]{40}):0x([0-9a-f]{64})\}$")


def up(store: Store) -> None:
    """Move every version-1 payment hash on every master to its version-2 key."""
    client = store.client
    for old in list(store.scan(OLD_KEYS)):
        match = OLD_KEY_RE.match(old)
        if match is None:
            continue  # not ours
        new = payment_key(int(match.group(1)), match.group(2), match.group(3), bytes.fromhex(match.group(4)))
        dump, ttl = client.dump(old), client.pttl(old)
        if dump is not None and not client.exists(new):
            client.restore(new, max(ttl, 0), dump)
        client.delete(old)
    for obsolete in list(store.scan("x402:{relayer:*}:nonce:reserved_at")):
        client.delete(obsolete)
