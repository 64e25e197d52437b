"""Fetching the measurements a publisher signed on Aleph (issue 18, part 7), for catalog models that
name ``aleph_publisher`` and ``aleph_model`` instead of pinning ``measurements``. What is believed is
decided in ``app.tee.aleph``; this module only asks an Aleph API node (``aleph_api``) and keeps the
answer:

- ``fetch(api, publisher, model)``: the publisher's AGGREGATE messages (``GET {api}/api/v0/
  messages.json?addresses=<publisher>&msgType=AGGREGATE&pagination=50&page=1``; the API lists the
  newest first), the newest verified manifest under ``confidential-inference``, then each active
  deployment's program message (``GET {api}/api/v0/messages.json?hashes=<item_hash>`` →
  ``{"messages": [...]}``), each verified as the publisher's. A program that is not served, does not
  verify or is not the one asked is passed over (a node can withhold a message, and a deleted
  program is how a publisher revokes a deployment); when none is left the first reason is raised.
- ``Measurements.terms(model, background)``: the ``Terms`` a model's report is checked against,
  from a per-model cache kept ``ttl`` seconds (``X402_ATTESTATION_TTL``, the verification's own). A
  foreground caller (a buyer's request waiting on a verification) fetches only when nothing is cached
  yet; the background verification fetches again once the cache is ``ttl`` old (a failure:
  ``RETRY_FAILED`` seconds). While the API does not answer (``aleph_unavailable``) the last verified
  list stays in force: a node can withhold an update but not forge one (it could as well serve an
  older signed manifest), and LibertAI retires a deployment by deleting its program and VM, so a
  retired enclave is gone rather than merely unlisted. Any other refusal replaces the cached list.

Errors are ``app.tee.aleph.AlephError`` (an ``EvidenceError``), which ``Attestor._verify`` turns
into ``AttestationFailed(reason, detail)``. Their words never name the API's URL (buyers read them in
503 answers).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import requests
import urllib3
from eth_utils import to_checksum_address

from app.backends.http import Sessions
from app.catalog import Model
from app.tee.aleph import (
    MANIFEST_KEY,
    PROGRAM,
    AlephError,
    Published,
    active_deployments,
    combine,
    measurements_of,
    newest_manifest_entry,
    terms_of,
    verify_message,
)
from app.tee.sev_snp import Terms

log = logging.getLogger("x402.aleph")
PAGE_SIZE = 50  # AGGREGATE messages read, newest first: the newest manifest is among them
MAX_ANSWER = 8 * 2**20  # bytes: a node's answer larger than this is not read
# a node that does not answer, or answers with an older manifest than one believed, withholds an
# update: the last verified list stays in force
WITHHELD = frozenset({"aleph_unavailable", "aleph_rollback"})
RETRY_FAILED = 5.0  # seconds: a failed lookup is tried again this soon at most (by the background check)


@dataclass
class _Cached:
    result: Published | AlephError
    fetched: float  # monotonic seconds


class Measurements:
    """Aleph-published measurements for attested models, one cache per process; thread-safe."""

    def __init__(self, ttl: float, timeout: float) -> None:
        self.ttl = ttl
        self.timeout = timeout
        self._sessions = Sessions()
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str, str], _Cached] = {}
        # (api, publisher, model) → the newest manifest time believed: an older one is a rollback
        self._manifest_times: dict[tuple[str, str, str], float] = {}

    def terms(self, model: Model, background: bool = False) -> Terms:
        """The ``Terms`` for ``model`` (which names ``aleph_publisher``): the published measurements,
        the published policy unless the catalog's ``policy`` is given (then both must be equal), the
        catalog's ``tcb_floor``. Raises ``AlephError``."""
        published = self.published(model, background)
        return terms_of(published, model.policy, model.tcb_floor)

    def published(self, model: Model, background: bool = False) -> Published:
        """What the publisher's messages accept for ``model``, from the cache when it has it (see the
        module's docstring for when it is fetched again). Raises ``AlephError``."""
        key = source(model)
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None and not (background and self._due(cached)):
            return _valid(cached.result)
        try:
            result: Published | AlephError = self.fetch(*key)
        except AlephError as exc:
            result = exc
        with self._lock:
            previous = self._cache.get(key)
            last = previous.result if previous is not None else None
            unavailable = isinstance(result, AlephError) and result.reason in WITHHELD
            if unavailable and isinstance(last, Published):
                log.warning("%s: Aleph measurements kept (%s)", model.name, result)
                return last  # not marked fresh: the next background check asks again
            self._cache[key] = _Cached(result, time.monotonic())
        if isinstance(result, Published) and result != last:
            log.info(
                "%s: Aleph measurements %s, from the programs %s",
                model.name,
                ", ".join(result.measurements),
                ", ".join(result.deployments),
            )
        return _valid(result)

    def _due(self, cached: _Cached) -> bool:
        wait = self.ttl if isinstance(cached.result, Published) else min(self.ttl, RETRY_FAILED)
        return time.monotonic() - cached.fetched >= wait

    # --- fetching -------------------------------------------------------------------------------

    def fetch(self, api: str, publisher: str, model: str) -> Published:
        """Ask ``api`` now for the manifest and ``model``'s active programs, and verify them as
        ``publisher``'s. Raises ``AlephError``."""
        query = {"addresses": publisher, "msgType": "AGGREGATE", "pagination": PAGE_SIZE, "page": 1}
        aggregates = self._messages(api, query)
        published_at, manifest = newest_manifest_entry(aggregates, publisher, MANIFEST_KEY)
        source_key = (api, publisher, model)
        with self._lock:
            accepted = self._manifest_times.get(source_key, float("-inf"))
        if published_at < accepted:  # an older signed manifest than one already believed: withheld
            raise AlephError("aleph_rollback", "the node served an older manifest than one already accepted")
        programs: dict[str, tuple[list[str], int | None]] = {}
        refused: AlephError | None = None
        for item_hash in active_deployments(manifest, model):
            try:
                programs[item_hash] = measurements_of(self._program(api, publisher, item_hash))
            except AlephError as exc:
                if exc.reason == "aleph_unavailable":
                    raise
                refused = refused or exc
        if not programs and refused is not None:
            raise AlephError(refused.reason, f"no active deployment of {model!r} is usable: {refused.detail}")
        published = combine(programs)
        with self._lock:  # believed from now on: no older manifest replaces it
            self._manifest_times[source_key] = max(
                published_at, self._manifest_times.get(source_key, published_at)
            )
        return published

    def _program(self, api: str, publisher: str, item_hash: str) -> dict[str, Any]:
        """The verified content of the program message ``item_hash``. Raises ``AlephError``
        (``aleph_program_missing`` when the node serves no such message)."""
        for message in self._messages(api, {"hashes": item_hash}):
            if isinstance(message, dict) and str(message.get("item_hash", "")).lower() == item_hash:
                return verify_message(message, publisher, PROGRAM)
        raise AlephError("aleph_program_missing", f"the program {item_hash} is not served (deleted?)")

    def _messages(self, api: str, params: dict[str, Any]) -> list[Any]:
        """The ``messages`` list of one ``GET {api}/api/v0/messages.json``. Raises ``AlephError``
        (``aleph_unavailable``: no answer, a status other than 200, not JSON, too large)."""
        try:
            with self._sessions.get().get(
                f"{api}/api/v0/messages.json", params=params, timeout=self.timeout, stream=True
            ) as answer:
                if answer.status_code != 200:
                    raise AlephError("aleph_unavailable", f"the Aleph API answered {answer.status_code}")
                body = answer.raw.read(MAX_ANSWER + 1, decode_content=True)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise AlephError(
                "aleph_unavailable", f"the Aleph API did not answer: {type(exc).__name__}"
            ) from None
        if len(body) > MAX_ANSWER:
            raise AlephError("aleph_unavailable", "the Aleph API's answer is too large")
        try:
            messages = json.loads(body).get("messages")
        except (ValueError, AttributeError, RecursionError):
            raise AlephError("aleph_unavailable", "the Aleph API's answer is not a JSON object") from None
        if not isinstance(messages, list):
            raise AlephError("aleph_unavailable", "the Aleph API's answer lists no messages")
        return messages


def source(model: Model) -> tuple[str, str, str]:
    """Where ``model``'s measurements are published: (API, publisher address checksummed, the
    model's name in the manifest)."""
    return model.aleph_api, to_checksum_address(model.aleph_publisher), model.aleph_model


def _valid(result: Published | AlephError) -> Published:
    """The published measurements; raises (a copy of) the cached failure."""
    if isinstance(result, AlephError):
        raise AlephError(result.reason, result.detail)
    return result
