"""One frozen, validated settings object built from ``X402_*`` environment variables.

Nothing else in the app reads the environment: every module receives a ``Settings``. A bad value
raises ``SettingsError`` naming the variable, so the process can refuse to start with one clear line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path

from eth_utils import to_checksum_address

from app.x402.wire import ADDRESS_RE

KEY_RE = re.compile(r"(0x)?[0-9a-fA-F]{64}")


@dataclass(frozen=True)
class Network:
    """A supported chain: its CAIP-2 id, v1 name, chain id and its USDC with the EIP-712 domain."""

    caip2: str
    v1_name: str
    chain_id: int
    usdc: str
    usdc_name: str
    usdc_version: str


NETWORKS: dict[str, Network] = {
    "eip155:8453": Network(
        "eip155:8453", "base", 8453, "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913", "USD Coin", "2"
    ),
    "eip155:84532": Network(
        "eip155:84532", "base-sepolia", 84532, "0x036CbD53842c5426634e7929541eC2318f3dCF7e", "USDC", "2"
    ),
}

DEFAULT_CATALOG = Path(__file__).with_name("catalog") / "catalog.toml"
UPSTREAM_KEY_PREFIX = "X402_UPSTREAM_API_KEY_"
VCEK_CACHE = Path("x402-tee-proxy") / "vcek"  # under the user's cache directory
REDIS_CLUSTER_MODES = ("auto", "yes", "no")  # REDIS_CLUSTER: ask the node, or say


class SettingsError(ValueError):
    """A configuration value is missing or malformed; ``variable`` names what to fix."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


@dataclass(frozen=True)
class Settings:
    """Everything the proxy is configured with. Addresses are checksummed, amounts integers."""

    pay_to: str
    relayer_key: str = field(repr=False)  # the first settling key (receipts derive from it)
    redis_url: str
    network: Network = NETWORKS["eip155:8453"]
    rpc_urls: tuple[str, ...] = ("https://mainnet.base.org",)
    asset: str = NETWORKS["eip155:8453"].usdc
    asset_name: str = NETWORKS["eip155:8453"].usdc_name
    asset_version: str = NETWORKS["eip155:8453"].usdc_version
    upstream_url: str = "https://api.libertai.io"
    upstream_api_key: str = field(default="", repr=False)
    # X402_UPSTREAM_API_KEY_<NAME>: keys of direct model hosts, named by catalog entries
    upstream_keys: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    upstream_timeout: float = 120.0
    catalog_path: Path = DEFAULT_CATALOG
    public_url: str = ""
    receipt_timeout: float = 30.0
    rpc_timeout: float = 10.0
    fee_bump_after: float = 10.0
    max_timeout_seconds: int = 120
    max_body_bytes: int = 1_000_000
    tee_only: bool = True
    facilitator_url: str = ""
    relayer_min_wei: int = 10**15  # 0.001 ETH
    log_client_ip: bool = False
    metrics_dir: str = ""  # PROMETHEUS_MULTIPROC_DIR: metrics summed over gunicorn workers
    receipt_key: str = field(default="", repr=False)  # signs X-Receipt; "" means no receipts
    settle_first: bool = False
    redis_cluster: str = "auto"  # REDIS_CLUSTER: auto (ask the node), yes, no
    # X402_SCHEMES: what a call may be paid with
    schemes: tuple[str, ...] = ("exact", "upto", "batch-settlement")
    replay_seconds: int = 600  # X402_REPLAY_SECONDS: how long an answer is kept for its payment id
    credit_seconds: int = 30 * 86400  # X402_CREDIT_SECONDS: a lot of a wallet's credit lives this long
    exact_change: bool = True  # X402_EXACT_CHANGE=credit (default) | keep: credit an exact call's change
    # batch-settlement: X402_RECEIVER_AUTHORIZER_KEY signs claims and refunds (derived from the relayer
    # key when unset, never a relayer key); X402_WITHDRAW_DELAY (seconds) a payer waits to leave a
    # channel alone; X402_MIN_DEPOSIT (atomic units, 0: ten calls' maximum) the deposit hint;
    # X402_CLAIM_INTERVAL / X402_SETTLE_INTERVAL (seconds) between the claim and settle runs
    receiver_authorizer_key: str = field(default="", repr=False)
    withdraw_delay: int = 86400
    min_deposit: int = 0
    claim_interval: int = 60
    settle_interval: int = 120
    idle_refund_seconds: int = 30 * 86400  # X402_IDLE_REFUND_SECONDS: a channel idle this long is refunded
    # X402_RELAYER_KEYS: every key that settles, in turn (empty: relayer_key alone)
    relayer_keys: tuple[str, ...] = field(default=(), repr=False)
    # SEV-SNP attestation of catalog models with ``attestation = "sev-snp"`` (issue 18):
    # X402_AMD_KDS_URL: AMD's key distribution service; X402_VCEK_CACHE_DIR: VCEKs on disk, shared by
    # the workers; X402_ATTESTATION_ROOTS: a PEM file of ARKs and ASKs replacing AMD's (only with
    # X402_ALLOW_TEST_ROOTS=1); X402_ATTESTATION_TTL: seconds a verification is trusted before it is
    # redone in the background; X402_REQUIRE_ATTESTATION: sell only attested models
    amd_kds_url: str = "https://kdsintf.amd.com"
    vcek_cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / VCEK_CACHE)
    attestation_roots: Path | None = None
    attestation_ttl: float = 600.0
    require_attestation: bool = False

    @property
    def settling_keys(self) -> tuple[str, ...]:
        """The relayer keys that settle payments, 0x-prefixed: ``relayer_keys``, else ``relayer_key``."""
        return self.relayer_keys or (self.relayer_key,)

    # Tests and the devnet pass their own Redis client (fakeredis or a prepared pool).
    redis_client: object | None = field(default=None, repr=False, compare=False)

    def with_overrides(self, **changes: object) -> Settings:
        """A copy with some fields changed (tests and the devnet use it)."""
        return replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, overrides: Mapping[str, str] | None = None
    ) -> Settings:
        """Read and validate the environment (``overrides`` win over it); raise ``SettingsError``
        on the first bad variable."""
        env = {**(os.environ if env is None else env), **(overrides or {})}

        def get(name: str, default: str = "") -> str:
            return env.get(name, default).strip()

        network_id = get("X402_NETWORK", "eip155:8453")
        if network_id not in NETWORKS:
            raise SettingsError("X402_NETWORK", f"must be one of {', '.join(NETWORKS)}")
        network = NETWORKS[network_id]

        pay_to = _address("X402_PAY_TO", get("X402_PAY_TO"), required=True)
        asset = _address("X402_ASSET", get("X402_ASSET"), required=False) or network.usdc
        relayer_key = get("X402_RELAYER_KEY")
        key_file = get("X402_RELAYER_KEY_FILE")
        if key_file and not relayer_key:
            try:
                relayer_key = Path(key_file).read_text().strip()
            except OSError as exc:
                raise SettingsError(
                    "X402_RELAYER_KEY_FILE", f"cannot read {key_file}: {exc.strerror}"
                ) from None
        relayer_keys = _relayer_keys(get("X402_RELAYER_KEYS"), get("X402_RELAYER_KEYS_FILE"))
        if relayer_keys and (relayer_key or key_file):
            raise SettingsError("X402_RELAYER_KEYS", "set it, or X402_RELAYER_KEY(_FILE), not both")
        relayer_key = relayer_keys[0] if relayer_keys else relayer_key
        facilitator_url = get("X402_FACILITATOR_URL").rstrip("/")
        if facilitator_url and not facilitator_url.startswith(("http://", "https://")):
            raise SettingsError("X402_FACILITATOR_URL", "must be an http(s) URL")
        if facilitator_url and not relayer_key:
            relayer_key = "0x" + "00" * 31 + "01"  # never used: the facilitator submits settlements
        if not KEY_RE.fullmatch(relayer_key):
            raise SettingsError(
                "X402_RELAYER_KEY", "required: 32-byte hex private key of the settling account"
            )
        default_schemes = "exact" if facilitator_url else "exact,upto,batch-settlement"
        schemes = _schemes(get("X402_SCHEMES", default_schemes), facilitator_url)
        redis_url = get("REDIS_URL")
        if not redis_url:
            raise SettingsError("REDIS_URL", "required, e.g. redis://127.0.0.1:6379/0")
        redis_cluster = get("REDIS_CLUSTER", "auto").lower()
        if redis_cluster not in REDIS_CLUSTER_MODES:
            raise SettingsError("REDIS_CLUSTER", f"must be one of {', '.join(REDIS_CLUSTER_MODES)}")
        rpc_urls = tuple(
            u.strip() for u in get("X402_RPC_URLS", "https://mainnet.base.org").split(",") if u.strip()
        )
        if not rpc_urls or not all(u.startswith(("http://", "https://")) for u in rpc_urls):
            raise SettingsError("X402_RPC_URLS", "comma-separated http(s) URLs")
        upstream_url = get("X402_UPSTREAM_URL", "https://api.libertai.io").rstrip("/")
        if not upstream_url.startswith(("http://", "https://")):
            raise SettingsError("X402_UPSTREAM_URL", "must be an http(s) URL")
        public_url = get("X402_PUBLIC_URL").rstrip("/")
        if public_url and not public_url.startswith(("http://", "https://")):
            raise SettingsError("X402_PUBLIC_URL", "must be an absolute http(s) URL")
        catalog = get("X402_CATALOG")
        catalog_path = Path(catalog) if catalog else DEFAULT_CATALOG
        if not catalog_path.is_file():
            raise SettingsError("X402_CATALOG", f"no such file: {catalog_path}")
        withdraw_delay = _withdraw_delay(get("X402_WITHDRAW_DELAY", "86400"))
        kds_url = get("X402_AMD_KDS_URL", "https://kdsintf.amd.com").rstrip("/")
        if not kds_url.startswith(("http://", "https://")):
            raise SettingsError("X402_AMD_KDS_URL", "must be an http(s) URL")
        roots = _attestation_roots(get("X402_ATTESTATION_ROOTS"), get("X402_ALLOW_TEST_ROOTS", "0"))
        claim_interval = _integer("X402_CLAIM_INTERVAL", get("X402_CLAIM_INTERVAL", "60"))
        if "batch-settlement" in schemes and 4 * claim_interval >= withdraw_delay:
            # a payer's unilateral withdrawal must never finalize before its charges are claimed
            raise SettingsError(
                "X402_CLAIM_INTERVAL",
                f"must be less than a quarter of X402_WITHDRAW_DELAY ({withdraw_delay} s): "
                f"below {-(-withdraw_delay // 4)} seconds",
            )
        return cls(
            pay_to=pay_to,
            relayer_key=relayer_key if relayer_key.startswith("0x") else "0x" + relayer_key,
            redis_url=redis_url,
            redis_cluster=redis_cluster,
            network=network,
            rpc_urls=rpc_urls,
            asset=asset,
            asset_name=get("X402_ASSET_NAME", network.usdc_name),
            asset_version=get("X402_ASSET_VERSION", network.usdc_version),
            upstream_url=upstream_url,
            upstream_api_key=get("X402_UPSTREAM_API_KEY"),
            upstream_keys={
                name.removeprefix(UPSTREAM_KEY_PREFIX): value.strip()
                for name, value in env.items()
                if name.startswith(UPSTREAM_KEY_PREFIX) and value.strip()
            },
            upstream_timeout=_number("X402_UPSTREAM_TIMEOUT", get("X402_UPSTREAM_TIMEOUT", "120")),
            catalog_path=catalog_path,
            public_url=public_url,
            receipt_timeout=_number("X402_RECEIPT_TIMEOUT", get("X402_RECEIPT_TIMEOUT", "30")),
            rpc_timeout=_number("X402_RPC_TIMEOUT", get("X402_RPC_TIMEOUT", "10")),
            fee_bump_after=_number("X402_FEE_BUMP_AFTER", get("X402_FEE_BUMP_AFTER", "10")),
            max_timeout_seconds=_integer("X402_MAX_TIMEOUT_SECONDS", get("X402_MAX_TIMEOUT_SECONDS", "120")),
            max_body_bytes=_integer("X402_MAX_BODY_BYTES", get("X402_MAX_BODY_BYTES", "1000000")),
            tee_only=_flag("X402_TEE_ONLY", get("X402_TEE_ONLY", "1")),
            facilitator_url=facilitator_url,
            relayer_min_wei=_eth_to_wei("X402_RELAYER_MIN_ETH", get("X402_RELAYER_MIN_ETH", "0.001")),
            log_client_ip=_flag("X402_LOG_CLIENT_IP", get("X402_LOG_CLIENT_IP", "0")),
            metrics_dir=get("PROMETHEUS_MULTIPROC_DIR"),
            receipt_key=_derived_key(
                "X402_RECEIPT_KEY",
                get("X402_RECEIPT_KEY"),
                relayer_keys or (relayer_key,),
                bool(facilitator_url),
                "receipt",
            ),
            receiver_authorizer_key=_derived_key(
                "X402_RECEIVER_AUTHORIZER_KEY",
                get("X402_RECEIVER_AUTHORIZER_KEY"),
                relayer_keys or (relayer_key,),
                bool(facilitator_url),
                "receiver authorizer",
            ),
            withdraw_delay=withdraw_delay,
            min_deposit=_min_deposit(get("X402_MIN_DEPOSIT")),
            claim_interval=claim_interval,
            settle_interval=_integer("X402_SETTLE_INTERVAL", get("X402_SETTLE_INTERVAL", "120")),
            idle_refund_seconds=_integer(
                "X402_IDLE_REFUND_SECONDS", get("X402_IDLE_REFUND_SECONDS", str(30 * 86400))
            ),
            settle_first=_flag("X402_SETTLE_FIRST", get("X402_SETTLE_FIRST", "0")),
            schemes=schemes,
            relayer_keys=relayer_keys,
            replay_seconds=_integer("X402_REPLAY_SECONDS", get("X402_REPLAY_SECONDS", "600")),
            credit_seconds=_integer("X402_CREDIT_SECONDS", get("X402_CREDIT_SECONDS", str(30 * 86400))),
            exact_change=_exact_change(get("X402_EXACT_CHANGE", "credit")),
            amd_kds_url=kds_url,
            vcek_cache_dir=Path(
                get("X402_VCEK_CACHE_DIR")
                or Path(get("XDG_CACHE_HOME") or Path.home() / ".cache") / VCEK_CACHE
            ),
            attestation_roots=roots,
            attestation_ttl=_number("X402_ATTESTATION_TTL", get("X402_ATTESTATION_TTL", "600")),
            require_attestation=_flag("X402_REQUIRE_ATTESTATION", get("X402_REQUIRE_ATTESTATION", "0")),
        )


def _attestation_roots(path: str, allow: str) -> Path | None:
    """X402_ATTESTATION_ROOTS, the PEM file of roots that replace AMD's: only with
    X402_ALLOW_TEST_ROOTS=1 (such roots make any enclave's evidence forgeable by whoever holds them)."""
    allowed = _flag("X402_ALLOW_TEST_ROOTS", allow)
    if not path:
        return None
    if not allowed:
        raise SettingsError(
            "X402_ATTESTATION_ROOTS",
            "replaces AMD's roots, so it is refused unless X402_ALLOW_TEST_ROOTS=1 is set too",
        )
    if not Path(path).is_file():
        raise SettingsError("X402_ATTESTATION_ROOTS", f"no such file: {path}")
    return Path(path)


def _relayer_keys(listed: str, key_file: str) -> tuple[str, ...]:
    """X402_RELAYER_KEYS (comma-separated) or X402_RELAYER_KEYS_FILE (one per line): 32-byte hex
    private keys, each once, 0x-prefixed; () when neither is set."""
    variable = "X402_RELAYER_KEYS"
    text = listed
    if key_file and not listed:
        variable = "X402_RELAYER_KEYS_FILE"
        try:
            text = Path(key_file).read_text().replace("\n", ",")
        except OSError as exc:
            raise SettingsError(variable, f"cannot read {key_file}: {exc.strerror}") from None
    keys = [part.strip() for part in text.split(",") if part.strip()]
    if not all(KEY_RE.fullmatch(key) for key in keys):
        raise SettingsError(variable, "32-byte hex private keys of the settling accounts")
    prefixed = tuple(key if key.startswith("0x") else "0x" + key for key in keys)
    if len({key.lower() for key in prefixed}) != len(prefixed):
        raise SettingsError(variable, "a key is listed twice")
    return prefixed


def _schemes(value: str, facilitator_url: str) -> tuple[str, ...]:
    """X402_SCHEMES: comma-separated, from "exact", "upto" and "batch-settlement" (default all
    three; "exact" alone with a facilitator, since ``upto`` and ``batch-settlement`` are settled by
    our own relayer and receiver authorizer)."""
    schemes = tuple(dict.fromkeys(part.strip().lower() for part in value.split(",") if part.strip()))
    if not schemes or not set(schemes) <= {"exact", "upto", "batch-settlement"}:
        raise SettingsError("X402_SCHEMES", "comma-separated, from: exact, upto, batch-settlement")
    own = [scheme for scheme in schemes if scheme != "exact"]
    if own and facilitator_url:
        raise SettingsError(
            "X402_SCHEMES",
            f"{', '.join(own)} settled by the proxy's own relayer: not with X402_FACILITATOR_URL",
        )
    return schemes


def _min_deposit(value: str) -> int:
    """X402_MIN_DEPOSIT: atomic units; unset, 0 (the hint is then ten calls' maximum)."""
    return _integer("X402_MIN_DEPOSIT", value) if value else 0


def _withdraw_delay(value: str) -> int:
    """X402_WITHDRAW_DELAY: seconds, within the escrow's bounds (900 s to 30 days)."""
    delay = _integer("X402_WITHDRAW_DELAY", value)
    if not 900 <= delay <= 2_592_000:
        raise SettingsError("X402_WITHDRAW_DELAY", "must be between 900 and 2592000 seconds")
    return delay


def redis_from_env(env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """``REDIS_URL`` and ``REDIS_CLUSTER`` alone, for commands that need only Redis (``x402-proxy
    migrate``); raises ``SettingsError`` naming the variable to fix."""
    env = os.environ if env is None else env
    url = env.get("REDIS_URL", "").strip()
    if not url:
        raise SettingsError("REDIS_URL", "required, e.g. redis://127.0.0.1:6379/0")
    mode = env.get("REDIS_CLUSTER", "auto").strip().lower()
    if mode not in REDIS_CLUSTER_MODES:
        raise SettingsError("REDIS_CLUSTER", f"must be one of {', '.join(REDIS_CLUSTER_MODES)}")
    return url, mode


def _address(variable: str, value: str, *, required: bool) -> str:
    if not value:
        if required:
            raise SettingsError(variable, "required: a 0x-prefixed 20-byte address")
        return ""
    if not ADDRESS_RE.fullmatch(value):
        raise SettingsError(variable, f"not an address: {value!r}")
    return str(to_checksum_address(value))


def _number(variable: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise SettingsError(variable, f"not a number: {value!r}") from None
    if not 0 < number < float("inf"):
        raise SettingsError(variable, "must be a positive finite number")
    return number


def _derived_key(
    variable: str, configured: str, relayer_keys: tuple[str, ...], facilitator: bool, purpose: str
) -> str:
    """``variable`` (a 32-byte hex key), or a key derived from the first relayer key for ``purpose``
    (never a relayer key itself). With a facilitator there is no relayer key to derive from: ""."""
    from app.payments.receipts import derived_key

    prefixed = [key if key.startswith("0x") else "0x" + key for key in relayer_keys]
    if configured:
        if not KEY_RE.fullmatch(configured):
            raise SettingsError(variable, "must be a 32-byte hex private key")
        key = configured if configured.startswith("0x") else "0x" + configured
        if key.lower() in {relayer.lower() for relayer in prefixed}:
            raise SettingsError(variable, "must not be a relayer key")
        return key
    return "" if facilitator else derived_key(prefixed[0], purpose)


def _eth_to_wei(variable: str, value: str) -> int:
    try:
        wei = Decimal(value) * 10**18
    except InvalidOperation:
        raise SettingsError(variable, f"not an amount of ETH: {value!r}") from None
    if not wei.is_finite() or wei < 0:
        raise SettingsError(variable, "must be a non-negative amount of ETH")
    return int(wei)


def _integer(variable: str, value: str) -> int:
    if not re.fullmatch(r"[0-9]{1,12}", value) or int(value) == 0:
        raise SettingsError(variable, f"must be a positive whole number, not {value!r}")
    return int(value)


def _exact_change(value: str) -> bool:
    """X402_EXACT_CHANGE: ``credit`` (the unused part of an exact payment becomes the wallet's
    credit) or ``keep`` (the operator keeps it)."""
    if value.strip().lower() not in ("credit", "keep"):
        raise SettingsError("X402_EXACT_CHANGE", f"must be credit or keep, not {value!r}")
    return value.strip().lower() == "credit"


def _flag(variable: str, value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise SettingsError(variable, "must be 1 or 0")
