"""Launch measurements a publisher signed on Aleph, checked without I/O and without trusting the
Aleph node that served them (issue 18, part 7: the Aleph manifest path).

An Aleph message names its content by hash and is signed by its sender's Ethereum key, so whoever
hands it over (an API node, a cache) cannot alter it unnoticed. The rules, from Aleph's message format
(``aleph-message``: ``item_type``, ``item_hash``, ``item_content``; the signed "verification buffer")
and LibertAI's publication of its confidential deployments (``Libertai/confidential-inference``,
``VERIFYING.md`` and ``manifest.json``):

- Only ``item_type == "inline"`` messages carry their content; ``item_hash`` is the hex SHA-256 of
  the ``item_content`` string's UTF-8 bytes. What is read is ``json.loads(item_content)``, never the
  message's ``content`` field (the node's copy, which nothing binds).
- ``signature`` is 65 bytes in hex (``r ‖ s ‖ v``, v 27/28 or 0/1): an EIP-191 ``personal_sign``
  of the text ``"{chain}\\n{sender}\\n{type}\\n{item_hash}"``. The address recovered from it must be
  ``sender`` and the publisher expected (both compared case-insensitively).
- The manifest: AGGREGATE messages of the publisher whose content is ``{"address", "key", "time",
  "content"}``. Each publish carries the whole manifest, so the newest by content ``time`` among
  those under the key wins (the API's merged aggregate view is the node's work, not the publisher's,
  and is not used). The manifest is ``{"models": {"<model>": {"deployments": [{"item_hash": "<64
  hex>", "source_commit": "...", "status": "active" | ...}]}}}``.
- Each active deployment's ``item_hash`` names a program message (type ``V-PROGRAM``) whose content
  has ``verification: {"backend": "sev_snp", "measurements": [{"platform": "sev_snp", "registers":
  {"launch": "<96 hex>"}, "vcpu_type": "..."}, ...], "policy": <int>}``: the launch digests it may
  boot with (one per vCPU type) and the guest policy it is started with.

Every refusal is an ``AlephError``, an ``EvidenceError`` (so a ``ValueError``) with a stable
``reason``: ``aleph_malformed``, ``aleph_not_inline``, ``aleph_hash_mismatch``, ``aleph_signature``,
``aleph_sender``, ``aleph_wrong_message``, ``aleph_no_manifest``, ``aleph_model_unknown``,
``aleph_no_deployment``, ``aleph_program_missing``, ``aleph_no_measurement``,
``aleph_policy_conflict``, ``aleph_policy_mismatch`` (and ``aleph_unavailable``, raised by the
fetching side, ``app.backends.aleph``). Their words never repeat text of a message that did not
verify (buyers read them in 503 answers).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from eth_account import Account
from eth_account.messages import encode_defunct

from .sev_snp import EvidenceError, Tcb, Terms

DEFAULT_API = "https://api.aleph.im"
MANIFEST_KEY = "confidential-inference"  # LibertAI's aggregate key for its deployment manifest
AGGREGATE = "AGGREGATE"
PROGRAM = "V-PROGRAM"  # the message type of LibertAI's confidential deployments
ACTIVE = "active"

ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")  # a publisher (an Ethereum address)
ITEM_HASH = re.compile(r"[0-9a-fA-F]{64}")
LAUNCH = re.compile(r"[0-9a-fA-F]{96}")  # 48 bytes: an SEV-SNP launch digest
SIGNATURE = re.compile(r"(0x)?[0-9a-fA-F]{130}")  # 65 bytes


class AlephError(EvidenceError):
    """A message, manifest or program that cannot be believed or used; ``reason`` is a stable code
    (the module's docstring lists them), ``detail`` says why in words."""


@dataclass(frozen=True)
class Published:
    """What a publisher's signed messages accept for one model: the union of its active
    deployments' launch ``measurements`` (lowercase hex, sorted), the guest ``policy`` they publish
    (None: none published), and the ``deployments`` (program item hashes) they came from."""

    measurements: tuple[str, ...]
    policy: int | None
    deployments: tuple[str, ...]


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are unique: two readers of a repeated key could see two values."""
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise AlephError("aleph_malformed", "the content repeats a key")
    return dict(pairs)


def signed_text(message: Mapping[str, Any]) -> str:
    """The text a sender signs: ``"{chain}\\n{sender}\\n{type}\\n{item_hash}"``."""
    return f"{message['chain']}\n{message['sender']}\n{message['type']}\n{message['item_hash']}"


def recover_signer(message: Mapping[str, Any]) -> str:
    """The address (checksummed) whose key made ``message["signature"]`` over ``signed_text``.
    Raises ``AlephError`` (``aleph_signature``) for a signature that is not 65 bytes of hex with v
    27, 28, 0 or 1, or from which no key is recovered."""
    signature = message["signature"]
    if not isinstance(signature, str) or not SIGNATURE.fullmatch(signature):
        raise AlephError("aleph_signature", "the signature is not 65 bytes in hex")
    raw = bytes.fromhex(signature.removeprefix("0x"))
    if raw[64] not in (0, 1, 27, 28):
        raise AlephError("aleph_signature", f"the signature's v is {raw[64]}, not 27, 28, 0 or 1")
    standard = raw[:64] + bytes([raw[64] % 27])  # 0 or 1
    try:
        return str(Account.recover_message(encode_defunct(text=signed_text(message)), signature=standard))
    except Exception as exc:  # eth_keys' BadSignature and validation errors: no key to recover
        raise AlephError("aleph_signature", f"no signer can be recovered: {type(exc).__name__}") from None


def verify_message(message: Mapping[str, Any], publisher: str, kind: str | None = None) -> dict[str, Any]:
    """The content of ``message`` (an Aleph message as the API lists it: ``chain``, ``sender``,
    ``type``, ``item_type``, ``item_hash``, ``item_content``, ``signature``), once it is shown to be
    what ``publisher`` signed; ``kind``, when given, is the message type required. Returns
    ``json.loads(item_content)`` (a JSON object). Raises ``AlephError``: ``aleph_malformed``
    (fields missing or not text, content not a JSON object), ``aleph_not_inline``,
    ``aleph_hash_mismatch``, ``aleph_signature`` (none recovered, or not the sender's),
    ``aleph_sender`` (not ``publisher``'s), ``aleph_wrong_message`` (another type than ``kind``)."""
    if not isinstance(message, Mapping):
        raise AlephError("aleph_malformed", "the message is not a JSON object")
    fields = ("chain", "sender", "type", "item_type", "item_hash", "item_content", "signature")
    missing = [name for name in fields if not isinstance(message.get(name), str)]
    if missing:
        raise AlephError("aleph_malformed", f"the message has no {', '.join(missing)} (as text)")
    if message["item_type"] != "inline":
        raise AlephError("aleph_not_inline", "the message does not carry its content (not inline)")
    digest = hashlib.sha256(message["item_content"].encode("utf-8")).hexdigest()
    if digest != message["item_hash"].lower():
        raise AlephError("aleph_hash_mismatch", f"the content hashes to {digest}, not to its item_hash")
    signer = recover_signer(message)
    if signer.lower() != message["sender"].lower():
        raise AlephError("aleph_signature", f"signed by {signer}, not by the sender it names")
    if signer.lower() != publisher.lower():
        raise AlephError("aleph_sender", f"published by {signer}, not by {publisher}")
    if kind is not None and message["type"] != kind:
        raise AlephError("aleph_wrong_message", f"a {message['type']} message, not {kind}")
    try:
        content = json.loads(message["item_content"], object_pairs_hook=_no_duplicate_keys)
    except AlephError:
        raise
    except (ValueError, RecursionError):
        raise AlephError("aleph_malformed", "the content is not JSON (or nests too deep)") from None
    if not isinstance(content, dict):
        raise AlephError("aleph_malformed", "the content is not a JSON object")
    return content


def _claimed_key(message: Any) -> Any:
    """The aggregate key an unverified message claims (for words only: nothing else is read of it)."""
    try:
        return json.loads(message["item_content"]).get("key")
    except (TypeError, KeyError, ValueError, AttributeError, RecursionError):
        return None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def newest_manifest(messages: Iterable[Any], publisher: str, key: str = MANIFEST_KEY) -> dict[str, Any]:
    """The content of ``newest_manifest_entry``: what ``publisher`` published last under ``key``."""
    return newest_manifest_entry(messages, publisher, key)[1]


def newest_manifest_entry(
    messages: Iterable[Any], publisher: str, key: str = MANIFEST_KEY
) -> tuple[float, dict[str, Any]]:
    """The manifest ``publisher`` published last under ``key``: among ``messages`` (AGGREGATE
    messages as the API lists them), those that verify (``verify_message``, type AGGREGATE) and
    whose content is ``{"key": key, "time": <number>, "content": {...}}``, the one of the highest
    ``time`` (a tie goes to the higher item hash, so the order of ``messages`` never matters);
    returns its ``time`` (unix seconds, as published) and ``content``. A message that does not
    verify is passed over (a node that adds one can only hide an update, which it can do anyway).
    Raises ``AlephError``: the reason of the first
    refused message that claims ``key`` when none verifies, else ``aleph_no_manifest``."""
    best: tuple[float, str, dict[str, Any]] | None = None
    refused: AlephError | None = None
    for message in messages:
        try:
            content = verify_message(message, publisher, AGGREGATE)
        except AlephError as exc:
            if refused is None and _claimed_key(message) == key:
                refused = exc
            continue
        if content.get("key") != key:
            continue
        when, manifest = content.get("time"), content.get("content")
        if not _number(when) or not isinstance(manifest, dict):
            if refused is None:
                refused = AlephError("aleph_malformed", "a manifest message has no time or content")
            continue
        candidate = (float(when), str(message["item_hash"]).lower(), manifest)
        if best is None or candidate[:2] > best[:2]:
            best = candidate
    if best is not None:
        return best[0], best[2]
    if refused is not None:
        raise AlephError(refused.reason, f"no manifest under {key!r} verifies: {refused.detail}")
    raise AlephError("aleph_no_manifest", f"{publisher} published no manifest under {key!r}")


def active_deployments(manifest: Mapping[str, Any], model: str) -> list[str]:
    """The item hashes (lowercase, in the manifest's order, each once) of ``model``'s deployments
    whose ``status`` is ``"active"``. Raises ``AlephError``: ``aleph_model_unknown`` (the manifest
    does not name it), ``aleph_no_deployment`` (none active), ``aleph_malformed`` (the manifest,
    the model's entry or an active deployment is not of the published shape)."""
    models = manifest.get("models")
    if not isinstance(models, dict):
        raise AlephError("aleph_malformed", "the manifest has no models")
    entry = models.get(model)
    if entry is None:
        known = ", ".join(sorted(str(name) for name in models)) or "none"
        raise AlephError("aleph_model_unknown", f"the manifest names no {model!r} (it names: {known})")
    deployments = entry.get("deployments") if isinstance(entry, dict) else None
    if not isinstance(deployments, list):
        raise AlephError("aleph_malformed", f"the manifest's {model!r} has no deployments list")
    hashes: list[str] = []
    for deployment in deployments:
        if not isinstance(deployment, dict) or deployment.get("status") != ACTIVE:
            continue
        item_hash = deployment.get("item_hash")
        if not isinstance(item_hash, str) or not ITEM_HASH.fullmatch(item_hash):
            raise AlephError("aleph_malformed", f"an active deployment of {model!r} has no 64-hex item_hash")
        if item_hash.lower() not in hashes:
            hashes.append(item_hash.lower())
    if not hashes:
        raise AlephError("aleph_no_deployment", f"no deployment of {model!r} is active")
    return hashes


def measurements_of(program: Mapping[str, Any]) -> tuple[list[str], int | None]:
    """A program's SEV-SNP launch measurements (lowercase hex, 48 bytes each, in its order, each
    once) and the guest policy it publishes (None when it publishes none), from its content's
    ``verification``; entries of another ``platform`` are passed over. Raises ``AlephError``:
    ``aleph_no_measurement`` (no ``sev_snp`` verification, or no launch measurement in it),
    ``aleph_malformed`` (a launch value that is not 96 hex digits, a policy that is not an integer
    of 64 bits)."""
    verification = program.get("verification")
    if not isinstance(verification, dict) or verification.get("backend") != "sev_snp":
        raise AlephError("aleph_no_measurement", "the program publishes no SEV-SNP verification")
    entries = verification.get("measurements")
    launches: list[str] = []
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or entry.get("platform") != "sev_snp":
            continue
        registers = entry.get("registers")
        launch = registers.get("launch") if isinstance(registers, dict) else None
        if not isinstance(launch, str) or not LAUNCH.fullmatch(launch):
            raise AlephError("aleph_malformed", "a published launch measurement is not 48 bytes of hex")
        if launch.lower() not in launches:
            launches.append(launch.lower())
    if not launches:
        raise AlephError("aleph_no_measurement", "the program publishes no SEV-SNP launch measurement")
    policy = verification.get("policy")
    if policy is not None and (type(policy) is not int or not 0 <= policy < 2**64):
        raise AlephError("aleph_malformed", "the published policy is not a 64-bit integer")
    return launches, policy


def combine(programs: Mapping[str, tuple[list[str], int | None]]) -> Published:
    """One model's ``Published`` from its programs (item hash → ``measurements_of``): every launch
    measurement, and the one policy they publish. Raises ``AlephError``: ``aleph_program_missing``
    (no program), ``aleph_policy_conflict`` (two programs publish different policies: one exact
    policy is checked per model)."""
    if not programs:
        raise AlephError("aleph_program_missing", "no deployment's program could be read")
    policies = {policy for _, policy in programs.values() if policy is not None}
    if len(policies) > 1:
        shown = ", ".join(f"{p:#x}" for p in sorted(policies))
        raise AlephError("aleph_policy_conflict", f"the deployments publish different policies: {shown}")
    measurements = sorted({m for launches, _ in programs.values() for m in launches})
    return Published(tuple(measurements), policies.pop() if policies else None, tuple(programs))


def terms_of(published: Published, policy: int | None, tcb_floor: Tcb | None) -> Terms:
    """The ``Terms`` a report is checked against: the published measurements; the published policy
    as the exact policy, unless the catalog's own ``policy`` is given, and then the two must be
    equal; the catalog's ``tcb_floor``. Raises ``AlephError`` (``aleph_policy_mismatch``)."""
    exact = published.policy
    if policy is not None:
        if exact is not None and exact != policy:
            raise AlephError(
                "aleph_policy_mismatch",
                f"the catalog's policy {policy:#x} is not the published {exact:#x}",
            )
        exact = policy
    return Terms(frozenset(bytes.fromhex(m) for m in published.measurements), exact, tcb_floor)
