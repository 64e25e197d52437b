"""The model catalog: what each model costs for a given request body, and where it is served.

``quote`` is a pure function of (model entry, request body), so the 402 and the paid retry of the
same body always name the same amount. The request policy (``policy.read``) decides what every field
of the body costs and builds the body that is forwarded, so nobody receives more than they paid for.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_utils import is_checksum_address

from app.catalog.policy import read
from app.catalog.reading import IMAGE, MODALITIES, TEXT, Limits, PolicyError, Work
from app.settings import Settings, SettingsError
from app.tee.aleph import ADDRESS as ALEPH_ADDRESS
from app.tee.aleph import DEFAULT_API as ALEPH_API
from app.tee.sev_snp import POLICY_DEBUG, POLICY_MIGRATE_MA, PRODUCTS, Tcb, Terms


class CatalogError(ValueError):
    """The catalog file is malformed."""


# A body the catalog cannot price: ``code`` is a stable reason, ``status`` the HTTP status.
QuoteError = PolicyError


@dataclass(frozen=True)
class Model:
    name: str
    description: str
    tee: bool
    pricing: str  # "per_token" or "per_call"
    price: int = 0
    input_per_million: int = 0
    output_per_million: int = 0
    floor: int = 1
    default_max_tokens: int = 512
    max_tokens_cap: int = 4096
    context_length: int = 131072  # tokens the model's context holds: input bound + max_tokens
    max_choices: int = 8  # answers one call may generate (n, prompts × best_of)
    modalities: frozenset[str] = frozenset({TEXT})  # what the model reads: "text", "image"
    message_overhead: int = 8  # chat template tokens per message (and for the assistant's turn)
    tools_overhead: int = 512  # chat template tokens for the tool instructions, when tools are sent
    image_tokens: int = 0  # input tokens one image costs (models with "image" in modalities)
    vocab_size: int = 128256  # token ids (prompts, logit_bias) are below this
    tools_factor: int = 3  # times the chat template prints a tool definition's text
    schema_key_overhead: int = 32  # template bytes per key of a tool's parameters schema
    upstream_url: str = ""
    upstream_key: str = ""  # names X402_UPSTREAM_API_KEY_<NAME>: a direct TEE host's own key
    # attestation = "sev-snp": the host at ``upstream_url`` (https) is an AMD SEV-SNP confidential VM
    # serving an RA-TLS certificate; its report must show one of ``measurements`` (48-byte launch
    # digests, hex), exactly ``policy`` when set, and a reported TCB at or above ``tcb_floor``.
    # ``product`` (Milan, Genoa, Turin) names the chip line of a version 2 report, which does not.
    attestation: str = ""
    measurements: tuple[str, ...] = ()
    policy: int | None = None
    tcb_floor: Tcb | None = None
    product: str = ""
    # Instead of ``measurements``: the launch measurements the publisher at ``aleph_publisher`` (an
    # Ethereum address) signed for ``aleph_model`` in its Aleph manifest, read from ``aleph_api``
    # (``app.tee.aleph``, ``app.backends.aleph``).
    aleph_publisher: str = ""
    aleph_model: str = ""
    aleph_api: str = ""

    @property
    def attested(self) -> bool:
        """Sold on evidence the proxy verifies (``attestation`` set), not on the operator's word."""
        return bool(self.attestation)

    @property
    def trust(self) -> str:
        """What the TEE label rests on, in words: the buyer's view in ``/v1/models``, the 402 and
        discovery."""
        if self.attested:
            return f"TEE (AMD SEV-SNP, verified by the proxy: GET /v1/attestation/{self.name})"
        return "TEE (operator's statement)" if self.tee else "not a TEE"

    @property
    def terms(self) -> Terms:
        """What the attestation report must show (``app.tee.sev_snp.check_terms``)."""
        return Terms(frozenset(bytes.fromhex(m) for m in self.measurements), self.policy, self.tcb_floor)

    @property
    def limits(self) -> Limits:
        """What the request policy needs to know of this model."""
        return Limits(
            context_length=self.context_length,
            default_max_tokens=self.default_max_tokens,
            max_tokens_cap=self.max_tokens_cap,
            max_choices=self.max_choices,
            modalities=self.modalities,
            message_overhead=self.message_overhead,
            tools_overhead=self.tools_overhead,
            image_tokens=self.image_tokens,
            vocab_size=self.vocab_size,
            tools_factor=self.tools_factor,
            schema_key_overhead=self.schema_key_overhead,
        )

    def public(self) -> dict[str, Any]:
        """The entry as ``/v1/models`` shows it."""
        entry: dict[str, Any] = {"id": self.name, "object": "model", "description": self.description}
        entry["tee"] = self.tee
        entry["attested"] = self.attested
        entry["trust"] = self.trust
        entry["context_length"] = self.context_length
        entry["modalities"] = sorted(self.modalities)
        entry["max_choices"] = self.max_choices
        entry["pricing"] = {"scheme": self.pricing, "floor": self.floor}
        if self.pricing == "per_call":
            entry["pricing"]["per_call"] = self.price
        else:
            entry["pricing"].update(
                input_per_million=self.input_per_million,
                output_per_million=self.output_per_million,
                default_max_tokens=self.default_max_tokens,
                max_tokens_cap=self.max_tokens_cap,
                message_overhead=self.message_overhead,
                tools_overhead=self.tools_overhead,
                tools_factor=self.tools_factor,
                schema_key_overhead=self.schema_key_overhead,
            )
            if IMAGE in self.modalities:
                entry["pricing"]["image_tokens"] = self.image_tokens
        return entry


@dataclass(frozen=True)
class Quote:
    """A priced call: ``amount`` in atomic units of the asset; ``work`` what the body asks for
    (``None`` for the paid ping); ``body`` what is forwarded upstream."""

    model: Model
    amount: int
    body: dict[str, Any]
    work: Work | None = None


def _positive_int(entry: dict[str, Any], key: str, name: str, default: int | None = None) -> int:
    value = entry.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CatalogError(f"model {name!r}: {key} must be a non-negative integer")
    return value


def _modalities(entry: dict[str, Any], name: str) -> frozenset[str]:
    value = entry.get("modalities", [TEXT])
    if not isinstance(value, list) or TEXT not in value or not set(value) <= MODALITIES:
        raise CatalogError(f"model {name!r}: modalities must list text, and may add image")
    return frozenset(value)


HEX_MEASUREMENT = re.compile(r"(0x)?[0-9a-fA-F]{96}")
TCB_LEVELS = ("bootloader", "tee", "snp", "microcode", "fmc")  # fmc: Turin only
RETIRED = ("attestation_url", "measurement", "attestation_max_age")  # the JSON report format, gone
ALEPH_KEYS = ("aleph_publisher", "aleph_model", "aleph_api")


def _attestation(entry: dict[str, Any], name: str) -> dict[str, Any]:
    """The attestation fields of an entry: ``attestation`` ("sev-snp" or absent), ``measurements``
    (hex, 48 bytes each) or else ``aleph_publisher`` (an address) and ``aleph_model`` (its name in
    the publisher's manifest) with ``aleph_api`` (default ``app.tee.aleph.DEFAULT_API``), ``policy``
    (integer), ``tcb_floor`` (a table of ``bootloader``, ``tee``, ``snp``, ``microcode``, each
    0–255), ``product`` (for version 2 reports). Raises ``CatalogError``."""
    retired = [key for key in RETIRED if key in entry]
    if retired:
        raise CatalogError(
            f"model {name!r}: the keys {', '.join(retired)} are gone: an attested host is checked with "
            'attestation = "sev-snp", measurements = [...] and an https upstream_url (README, "TEE evidence")'
        )
    attestation = entry.get("attestation", "")
    keys = [key for key in ("measurements", "policy", "tcb_floor", "product", *ALEPH_KEYS) if key in entry]
    if attestation == "":
        if keys:
            raise CatalogError(f'model {name!r}: the keys {", ".join(keys)} go with attestation = "sev-snp"')
        return {}
    if attestation != "sev-snp":
        raise CatalogError(f'model {name!r}: attestation must be "sev-snp"')
    if not str(entry.get("upstream_url", "")).startswith("https://"):
        raise CatalogError(f"model {name!r}: an attested model needs its enclave's https:// upstream_url")
    aleph = _aleph(entry, name)
    measurements = entry.get("measurements", [] if aleph else None)
    if (
        not isinstance(measurements, list)
        or not (measurements or aleph)
        or not all(isinstance(m, str) and HEX_MEASUREMENT.fullmatch(m) for m in measurements)
    ):
        raise CatalogError(
            f"model {name!r}: measurements must list 48-byte launch measurements in hex "
            "(or name aleph_publisher and aleph_model instead)"
        )
    policy = entry.get("policy")
    if policy is not None and (type(policy) is not int or not 0 <= policy < 2**64):
        raise CatalogError(f"model {name!r}: policy must be the guest policy as an integer (e.g. 0x30000)")
    if policy is not None and policy & (POLICY_DEBUG | POLICY_MIGRATE_MA):
        raise CatalogError(
            f"model {name!r}: policy {policy:#x} allows debugging or a migration agent: always refused"
        )
    product = entry.get("product", "")
    if product not in ("", *PRODUCTS):
        raise CatalogError(f"model {name!r}: product must be one of {', '.join(PRODUCTS)}")
    return {
        "attestation": attestation,
        "measurements": tuple(m.lower().removeprefix("0x") for m in measurements),
        "policy": policy,
        "tcb_floor": _tcb_floor(entry.get("tcb_floor"), name),
        "product": product,
        **aleph,
    }


def _aleph(entry: dict[str, Any], name: str) -> dict[str, str]:
    """The Aleph source of an attested entry's measurements (``app.tee.aleph``), {} when it pins
    ``measurements`` itself: ``aleph_publisher`` (0x and 40 hex digits; mixed case must be its
    EIP-55 checksum), ``aleph_model`` (text), ``aleph_api`` (an http(s) URL, default Aleph's public
    API). Exactly one source per entry. Raises ``CatalogError``."""
    named = [key for key in ALEPH_KEYS if key in entry]
    if not named:
        return {}
    if "measurements" in entry:
        raise CatalogError(
            f"model {name!r}: name either measurements or aleph_publisher and aleph_model, not both"
        )
    publisher, model = entry.get("aleph_publisher"), entry.get("aleph_model")
    if not isinstance(publisher, str) or not ALEPH_ADDRESS.fullmatch(publisher):
        raise CatalogError(f"model {name!r}: aleph_publisher must be the publisher's address (0x and 40 hex)")
    if publisher[2:] not in (publisher[2:].lower(), publisher[2:].upper()) and not is_checksum_address(
        publisher
    ):
        raise CatalogError(f"model {name!r}: aleph_publisher is not a valid EIP-55 checksummed address")
    if not isinstance(model, str) or not model:
        raise CatalogError(f"model {name!r}: aleph_model must name the model in the publisher's manifest")
    api = entry.get("aleph_api", ALEPH_API)
    if not isinstance(api, str) or not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", api):
        raise CatalogError(f"model {name!r}: aleph_api must be an http(s) URL (default {ALEPH_API})")
    return {"aleph_publisher": publisher, "aleph_model": model, "aleph_api": api.rstrip("/")}


def _tcb_floor(value: Any, name: str) -> Tcb | None:
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or not set(value) <= set(TCB_LEVELS)
        or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value.values())
    ):
        raise CatalogError(f"model {name!r}: tcb_floor is a table of {', '.join(TCB_LEVELS)}, each 0 to 255")
    return Tcb(**{level: value.get(level, 0) for level in TCB_LEVELS})


def load_catalog(path: Path) -> dict[str, Model]:
    """Read and validate a TOML catalog."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CatalogError(f"{path}: {exc}") from None
    models: dict[str, Model] = {}
    entries = data.get("models", {})
    if not isinstance(entries, dict):
        raise CatalogError(f"{path}: `models` must be a table of [models.NAME] entries")
    for name, entry in entries.items():
        if not isinstance(entry, dict):
            raise CatalogError(f"{path}: models.{name} must be a table")
        pricing = entry.get("pricing")
        if pricing not in ("per_token", "per_call"):
            raise CatalogError(f"model {name!r}: pricing must be per_token or per_call")
        model = Model(
            name=name,
            description=str(entry.get("description", "")),
            tee=bool(entry.get("tee", False)),
            pricing=pricing,
            price=_positive_int(entry, "price", name, 0),
            input_per_million=_positive_int(entry, "input_per_million", name, 0),
            output_per_million=_positive_int(entry, "output_per_million", name, 0),
            floor=max(1, _positive_int(entry, "floor", name, 1)),
            default_max_tokens=_positive_int(entry, "default_max_tokens", name, 512),
            max_tokens_cap=_positive_int(entry, "max_tokens_cap", name, 4096),
            context_length=_positive_int(entry, "context_length", name, 131072),
            max_choices=max(1, _positive_int(entry, "max_choices", name, 8)),
            modalities=_modalities(entry, name),
            message_overhead=_positive_int(entry, "message_overhead", name, 8),
            tools_overhead=_positive_int(entry, "tools_overhead", name, 512),
            image_tokens=_positive_int(entry, "image_tokens", name, 0),
            vocab_size=max(1, _positive_int(entry, "vocab_size", name, 128256)),
            tools_factor=max(1, _positive_int(entry, "tools_factor", name, 3)),
            schema_key_overhead=_positive_int(entry, "schema_key_overhead", name, 32),
            upstream_url=str(entry.get("upstream_url", "")).rstrip("/"),
            upstream_key=str(entry.get("upstream_key", "")),
            **_attestation(entry, name),
        )
        if model.attested and not model.tee:
            raise CatalogError(f"model {name!r}: an attested model is a TEE model (tee = true)")
        if model.default_max_tokens > model.max_tokens_cap or model.default_max_tokens < 1:
            raise CatalogError(f"model {name!r}: default_max_tokens must be within 1..max_tokens_cap")
        if model.max_tokens_cap >= model.context_length:
            raise CatalogError(f"model {name!r}: max_tokens_cap must be below context_length")
        if (IMAGE in model.modalities) != (model.image_tokens > 0):
            raise CatalogError(f"model {name!r}: image_tokens (> 0) goes with modalities including image")
        models[name] = model
    if not models:
        raise CatalogError(f"{path}: no [models.*] entries")
    return models


def price(model: Model, work: Work) -> int:
    """The amount for ``work`` in atomic units: integer, rounded up, never below the model's floor.

    per_token: ``ceil((input_tokens × input_per_million + max_tokens × choices × output_per_million)
    / 10⁶)``; per_call: ``price``.
    """
    if model.pricing == "per_call":
        return max(model.price, model.floor)
    numerator = work.input_tokens * model.input_per_million + work.output_tokens * model.output_per_million
    return max(-(-numerator // 1_000_000), model.floor)


def quote_for(model: Model, route: str, body: dict[str, Any]) -> Quote:
    """Price ``body`` for ``model`` on ``route``; raises ``QuoteError`` when the policy refuses it."""
    work = read(route, body, model.limits)
    return Quote(model=model, amount=price(model, work), body=work.body, work=work)


def catalog_models(settings: Settings) -> dict[str, Model]:
    """The models of ``X402_CATALOG``; raises ``SettingsError`` for a catalog that cannot be used (a
    malformed file, or a model naming a host key that is not configured)."""
    try:
        models = load_catalog(settings.catalog_path)
    except CatalogError as exc:
        raise SettingsError("X402_CATALOG", str(exc)) from None
    for model in models.values():
        if model.upstream_key and model.upstream_key not in settings.upstream_keys:
            raise SettingsError(
                f"X402_UPSTREAM_API_KEY_{model.upstream_key}",
                f"required by model {model.name!r} in the catalog",
            )
    return models


class Catalog:
    """The loaded catalog, one per app."""

    def __init__(self, models: dict[str, Model], tee_only: bool = True, attested_only: bool = False) -> None:
        self.models = models
        self.tee_only = tee_only
        self.attested_only = attested_only

    def listed(self) -> list[Model]:
        """The models on sale: only TEE ones when ``X402_TEE_ONLY`` is on, only attested ones when
        ``X402_REQUIRE_ATTESTATION`` is."""
        return [
            m
            for m in self.models.values()
            if (m.tee or not self.tee_only) and (m.attested or not self.attested_only)
        ]

    def model(self, name: Any) -> Model:
        """The model on sale under ``name`` (404 unknown, 403 not a TEE model under TEE-only)."""
        if not isinstance(name, str) or not name:
            raise QuoteError("invalid_request", "model is required")
        model = self.models.get(name)
        if model is None:
            raise QuoteError("model_not_found", f"no model named {name!r}; see GET /v1/models", 404)
        if self.tee_only and not model.tee:
            raise QuoteError(
                "model_not_tee", f"{name} does not run in a TEE and this proxy sells TEE models only", 403
            )
        if self.attested_only and not model.attested:
            raise QuoteError(
                "model_not_attested",
                f"{name} is a TEE on its operator's word only, and this proxy sells attested models only",
                403,
            )
        return model

    def quote_ping(self, name: str) -> Quote:
        """The paid liveness probe of a model costs its floor price."""
        model = self.model(name)
        return Quote(model=model, amount=model.floor, body={})

    def quote(self, route: str, body: Any) -> Quote:
        """Price a request body for a route ("chat" or "completions").

        Raises ``QuoteError`` (400, or 404/403 for the model) when the request policy refuses it.
        """
        if not isinstance(body, dict):
            raise QuoteError("invalid_request", "the body must be a JSON object")
        return quote_for(self.model(body.get("model")), route, body)
