"""Every service of one proxy, built from its settings without network I/O, and the start-up checks
that do the network I/O (run by the entry points: gunicorn's app, the CLI, the devnet).

``build`` reads the catalog file and creates clients; nothing connects until a request (or
``check``) needs it, so ``create_app`` can be tested with fakes at this boundary.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from app.backends.chain import Chain, check_batch_contracts, check_startup, check_upto_contracts
from app.backends.enclave import Attestor
from app.backends.store import STORE_ERRORS
from app.backends.upstream import Upstream
from app.catalog import Catalog, catalog_models
from app.payments.gate import Gate
from app.payments.ledger import Ledger, check_keyspace, connect
from app.payments.settlement import FacilitatorSettler, LocalSettler, Settler, check_facilitator
from app.settings import Settings, SettingsError
from app.tee.amd import amd_trust, roots_from_pem
from app.tee.ra_tls import Roots

log = logging.getLogger("x402.services")


@dataclass(frozen=True)
class Services:
    settings: Settings
    catalog: Catalog
    ledger: Ledger
    chain: Chain
    settler: Settler
    upstream: Upstream
    attestor: Attestor
    gate: Gate


def build(settings: Settings) -> Services:
    """The services for ``settings``; raises ``SettingsError`` for a catalog that cannot be used."""
    catalog = Catalog(catalog_models(settings), settings.tee_only, settings.require_attestation)
    ledger = Ledger(connect(settings))
    chain = Chain(settings)
    settler: Settler = (
        FacilitatorSettler(settings, chain)
        if settings.facilitator_url
        else LocalSettler(settings, chain, ledger)
    )
    gate = Gate(settings, catalog, ledger, chain, settler)
    attestor = Attestor(settings, _trust(settings))
    return Services(settings, catalog, ledger, chain, settler, Upstream(settings), attestor, gate)


def _trust(settings: Settings) -> dict[str, Roots]:
    """The roots attested models' evidence must chain to: AMD's, pinned, unless
    ``X402_ATTESTATION_ROOTS`` (allowed by ``X402_ALLOW_TEST_ROOTS``) replaces them. Raises
    ``SettingsError`` for a roots file that cannot be used."""
    if settings.attestation_roots is None:
        return amd_trust()
    try:
        trust = roots_from_pem(settings.attestation_roots.read_bytes())
    except (OSError, ValueError) as exc:
        raise SettingsError("X402_ATTESTATION_ROOTS", f"{settings.attestation_roots}: {exc}") from None
    log.warning(
        "X402_ALLOW_TEST_ROOTS: enclaves are verified against %s, not AMD's roots (%s): for tests only",
        settings.attestation_roots,
        ", ".join(sorted(trust)),
    )
    return trust


def check(services: Services) -> None:
    """Refuse to serve on a wrong set-up (``SettingsError`` naming the variable to fix): Redis
    answers (every master of a cluster) and its keyspace is current; each RPC is on the right chain
    and the token's EIP-712 domain is the one configured; with ``upto`` offered, Permit2 and the
    x402UptoPermit2Proxy have code, with ``batch-settlement`` the escrow and its collectors; a
    facilitator settles ``exact`` on our network."""
    settings = services.settings
    try:
        check_keyspace(services.ledger.store)
    except STORE_ERRORS as exc:
        raise SettingsError("REDIS_URL", f"Redis does not answer at {settings.redis_url}: {exc}") from None
    check_startup(services.chain, settings)
    if services.gate.upto is not None:
        check_upto_contracts(services.chain)
    if services.gate.batch is not None:
        check_batch_contracts(services.chain)
    if isinstance(services.settler, FacilitatorSettler):
        check_facilitator(services.settler, settings)
