"""``x402-proxy``: serve · devnet · migrate · pay · reconcile · revenue · channels · catalog import ·
verify-receipt · verify-evidence.

Every command ends an ordinary failure with one line on standard error naming the command, and an
exit code: 0 done; 1 the command's own "no" (problems found, a payment refused, an invalid receipt,
a file not written); 2 bad input or settings; 3 a service it needs did not answer (Redis, the RPC
endpoints, the server to pay or ask); 4 the packaged proxy refused to start (gunicorn, ``serve``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

from app import logs
from app.amounts import USDC_DECIMALS, amount_text
from app.cli.channels import add_parser as add_channels_parser
from app.cli.channels import cmd_channels
from app.cli.common import (
    DEMO_BODY,
    EXIT_BAD_INPUT,
    EXIT_UNREACHABLE,
    MAX_DECIMALS,
    atomic_units,
    parse_amount,
    parse_usdc,
    usdc,
)
from app.cli.devnet import cmd_devnet
from app.cli.evidence import add_parser as add_evidence_parser
from app.cli.evidence import cmd_verify_evidence


def parse_address(text: str) -> str:
    """A 0x-prefixed 20-byte hex address, checksummed; a mixed-case one must carry a valid checksum."""
    from eth_utils import is_checksum_address, to_checksum_address

    from app.x402.wire import ADDRESS_RE

    if not ADDRESS_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"not an address: {text!r}")
    digits = text[2:]
    if digits not in (digits.lower(), digits.upper()) and not is_checksum_address(text):
        raise argparse.ArgumentTypeError(f"bad checksum (a mistyped address?): {text}")
    return str(to_checksum_address(text))


SERVE_ARGV = ("-m", "gunicorn", "-c", "python:app.gunicorn_conf", "app.wsgi:app")


def cmd_serve(args: argparse.Namespace) -> int:
    """gunicorn with the packaged settings and app (no checkout needed), in place of this process."""
    os.execv(sys.executable, [sys.executable, *SERVE_ARGV])
    return 0  # not reached


def cmd_migrate(args: argparse.Namespace) -> int:
    """``x402-proxy migrate [--dry-run]``: apply (or only list) the pending Redis keyspace migrations and
    print them, on one Redis or on every master of a cluster. Exit 0; 2 when ``REDIS_URL`` or
    ``REDIS_CLUSTER`` is missing or malformed; 3 (from ``main``) when Redis is down."""
    from app.backends.store import Store
    from app.payments.migrate import migrate
    from app.settings import SettingsError, redis_from_env

    try:
        store = Store(*redis_from_env())
        store.client  # noqa: B018 - connects now: a malformed URL is exit 2, not 3
    except (SettingsError, ValueError) as exc:
        print(f"x402-proxy migrate: {exc}", file=sys.stderr)
        return 2
    done = migrate(store, dry_run=args.dry_run)
    verb = "would apply" if args.dry_run else "applied"
    print(f"{verb}: {', '.join(f'{m.number:04d}_{m.name}' for m in done) or 'nothing (keyspace is current)'}")
    return 0


def _books_parts() -> tuple[Any, Any, Any]:
    """Settings, ledger and chain for the offline commands (no HTTP server)."""
    from app.backends.chain import Chain
    from app.payments.ledger import Ledger, connect
    from app.settings import Settings

    settings = Settings.from_env()
    return settings, Ledger(connect(settings)), Chain(settings)


def cmd_reconcile(args: argparse.Namespace) -> int:
    """``x402-proxy reconcile [--since]``: check recent payments against the chain, resolve the open ones
    and print the findings. Exit 0 when all match, 1 when one has a problem, 2 for bad settings or --since."""
    from app.payments.books import CHAIN_UNAVAILABLE, parse_duration, reconcile, render_findings
    from app.settings import SettingsError

    try:
        settings, ledger, chain = _books_parts()
        findings = reconcile(ledger, chain, settings, parse_duration(args.since))
    except (SettingsError, ValueError) as exc:
        print(f"x402-proxy reconcile: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(render_findings(findings))
    unchecked = [f for f in findings if f.problem.startswith(CHAIN_UNAVAILABLE)]
    if unchecked:  # not a mismatch: the chain could not be asked
        print(f"x402-proxy reconcile: the RPC did not answer for {len(unchecked)} payments", file=sys.stderr)
        return 3
    return 1 if any(f.problem for f in findings) else 0


def cmd_revenue(args: argparse.Namespace) -> int:
    """``x402-proxy revenue [--by] [--since] [--csv]``: settled revenue from the ledger stream per model,
    day (UTC), payer or scheme, as a table or CSV (credit counts once spent or expired), and the
    credit wallets may still spend. Exit 0; 2 for bad settings or --since."""
    from app.payments.books import credit_outstanding, dollars, parse_duration, render_revenue, revenue
    from app.settings import SettingsError

    try:
        _, ledger, _ = _books_parts()
        totals = revenue(ledger, parse_duration(args.since), args.by)
        owed = credit_outstanding(ledger)
    except (SettingsError, ValueError) as exc:
        print(f"x402-proxy revenue: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(render_revenue(totals, args.by, args.csv))
    if not args.csv:  # a liability, not revenue: what wallets may still spend
        print(f"credit outstanding (owed to wallets, not in the total): {dollars(owed)}")
    return 0


def cmd_verify_receipt(args: argparse.Namespace) -> int:
    """Check a receipt offline against the saved request and response bodies."""
    import requests

    from app.payments.receipts import STREAM_RECEIPT_PREFIX, Receipt, verify_receipt

    try:
        request_body = Path(args.request).read_bytes()
        response_body = Path(args.response).read_bytes()
        receipt_text = args.receipt
        tail = response_body.rfind(STREAM_RECEIPT_PREFIX)
        if tail != -1 and (tail == 0 or response_body[tail - 1 : tail] == b"\n"):  # a saved stream
            receipt_text = receipt_text or response_body[tail + len(STREAM_RECEIPT_PREFIX) :].strip().decode()
            response_body = response_body[:tail]
        if receipt_text and len(receipt_text) < 256 and Path(receipt_text).is_file():  # a file holding it
            receipt_text = Path(receipt_text).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        print(f"x402-proxy verify-receipt: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    address = args.address
    if not address and args.proxy:
        discovery = args.proxy.rstrip("/") + "/.well-known/x402"
        try:
            address = requests.get(discovery, timeout=10).json()["receiptAddress"]
        except (ValueError, KeyError, TypeError):  # not JSON, or JSON without the address
            print(f"x402-proxy verify-receipt: {discovery} names no receiptAddress", file=sys.stderr)
            return EXIT_BAD_INPUT
    if not receipt_text or not address:
        print("x402-proxy verify-receipt: need a receipt and --address or --proxy", file=sys.stderr)
        return 2
    try:
        receipt = Receipt.from_header(receipt_text)
    except ValueError as exc:
        print(f"x402-proxy verify-receipt: {exc}", file=sys.stderr)
        return 2
    verdict = verify_receipt(receipt, request_body, response_body, address)
    if not verdict:
        print(f"INVALID ({verdict.reason}): {verdict.detail}")
        return 1
    charged = (
        f" (upto: of at most {usdc(receipt.authorized)}, usage {receipt.usage})" if receipt.usage else ""
    )
    enclave = (
        f"; enclave measurement {receipt.tee_measurement}, evidence {receipt.tee_evidence}"
        if receipt.tee_evidence
        else ""
    )
    print(
        f"valid: {usdc(receipt.amount)}{charged} from {receipt.payer} for {receipt.model}, tx {receipt.tx}, "
        f"signed by {address} at {receipt.time}{enclave}"
    )
    return 0


def cmd_pay(args: argparse.Namespace) -> int:
    """``x402-proxy pay URL``: call a paid URL, paying its 402 (at most ``--max-amount`` whole tokens). Exit 0
    below HTTP 400; 1 when refused, HTTP 400+ or a bad key or --json; 2 for missing or conflicting options."""
    from app.cli.wallet import PaymentRefused, pay

    try:
        key = args.key or (Path(args.key_file).read_text().strip() if args.key_file else "")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"x402-proxy pay: --key-file: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not key:
        print("x402-proxy pay: give --key or --key-file", file=sys.stderr)
        return 2
    if (args.asset is None) != (args.decimals is None):
        print("x402-proxy pay: --asset and --decimals go together (USDC needs neither)", file=sys.stderr)
        return 2
    decimals = USDC_DECIMALS if args.decimals is None else args.decimals
    if not 0 <= decimals <= MAX_DECIMALS:
        print(f"x402-proxy pay: --decimals must be 0-{MAX_DECIMALS}", file=sys.stderr)
        return 2
    try:
        max_amount = atomic_units(args.max_amount, decimals)
    except ValueError as exc:
        print(f"x402-proxy pay: --max-amount: {exc}", file=sys.stderr)
        return 2
    try:
        saved = _saved_payment(Path(args.payment)) if args.payment else None
    except (OSError, ValueError) as exc:
        print(f"x402-proxy pay: --payment: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        body = json.loads(args.json) if args.json else DEMO_BODY
        result = pay(
            args.url, bytes.fromhex(key.removeprefix("0x")), body, max_amount, args.asset, payment=saved
        )
    except (ValueError, PaymentRefused) as exc:
        print(f"x402-proxy pay: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(result.body.decode("utf-8", "replace") + "\n")
    if args.save:
        _save_call(Path(args.save), result)
    if result.settlement:
        paid = (
            f"{amount_text(result.amount, decimals)} {args.asset or 'USDC'}"
            if result.amount
            else "paid before"
        )
        print(
            f"paid {paid} · tx {result.settlement.get('transaction')} · status {result.status}",
            file=sys.stderr,
        )
    if "X-TEE-Evidence" in result.headers:
        print(
            f"enclave measurement {result.headers.get('X-TEE-Measurement')} · evidence "
            f"{result.headers['X-TEE-Evidence']} (x402-proxy verify-evidence checks it)",
            file=sys.stderr,
        )
    if result.status >= 400 and result.settlement and result.settlement.get("success") and result.payment[0]:
        again = f"--payment {args.save}/payment.json" if args.save else "--payment FILE (saved with --save)"
        print(f"the payment settled: send it again with {again} to be served", file=sys.stderr)
    return 0 if result.status < 400 else 1


def _saved_payment(path: Path) -> tuple[str, str]:
    """A payment header saved by ``pay --save`` (``payment.json``: ``{"name", "value"}``)."""
    saved = json.loads(path.read_text())
    if not isinstance(saved, dict) or not all(isinstance(saved.get(k), str) for k in ("name", "value")):
        raise ValueError(f"{path} is not a payment saved by x402-proxy pay --save")
    return saved["name"], saved["value"]


def _save_call(directory: Path, result: Any) -> None:
    """``pay --save DIR``: the exact request bytes (``request.json``), the answer's body
    (``response.body``), its headers (``headers.json``), its ``X-Receipt`` (``receipt.txt``) and the
    payment header sent (``payment.json``, to send again with ``--payment``)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "request.json").write_bytes(result.request)
    (directory / "response.body").write_bytes(result.body)
    (directory / "headers.json").write_text(json.dumps(result.headers, indent=1))
    if "X-Receipt" in result.headers:
        (directory / "receipt.txt").write_text(result.headers["X-Receipt"])
    if result.payment[0]:
        name, value = result.payment
        (directory / "payment.json").write_text(json.dumps({"name": name, "value": value}))


def cmd_catalog_import(args: argparse.Namespace) -> int:
    """Malformed input exits 2 and writes nothing; the file is checked to load before it lands."""
    from app.catalog import CatalogError
    from app.catalog.importer import CatalogImportError, import_file, parse_margin, render_toml, write_catalog

    try:
        margin = parse_margin(args.margin)
        models = import_file(Path(args.file), margin, args.floor)
    except CatalogImportError as exc:
        print(f"x402-proxy catalog import: {exc}", file=sys.stderr)
        return 2
    text = render_toml(models, Path(args.file).name, margin)
    if not args.output:
        sys.stdout.write(text)
        return 0
    try:
        write_catalog(Path(args.output), text, models)
    except (OSError, CatalogError) as exc:
        print(f"x402-proxy catalog import: {args.output}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(models)} models to {args.output}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``x402-proxy`` argument parser: one subcommand per entry of ``COMMANDS`` (``catalog`` has
    ``import``; ``channels`` has ``list``, ``claim`` and ``settle``)."""
    parser = argparse.ArgumentParser(prog="x402-proxy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the proxy under gunicorn (configuration from X402_* variables)")
    devnet = sub.add_parser("devnet", help="anvil + Redis + stand-in model + proxy on this machine")
    devnet.add_argument("--port", type=int, default=8402)
    devnet.add_argument("--demo", action="store_true", help="make one paid call, print it and stop")
    migrate = sub.add_parser("migrate", help="apply pending Redis keyspace migrations (REDIS_URL)")
    migrate.add_argument("--dry-run", action="store_true")
    reconcile = sub.add_parser(
        "reconcile", help="check recent payments against the chain; resolve pending ones"
    )
    reconcile.add_argument("--since", default="24h", help="window, e.g. 30m, 24h, 7d (default 24h)")
    revenue = sub.add_parser("revenue", help="settled revenue from the ledger")
    revenue.add_argument("--by", choices=("model", "day", "payer", "scheme"), default="model")
    revenue.add_argument("--since", default="30d")
    revenue.add_argument("--csv", action="store_true")
    add_channels_parser(sub)
    verify = sub.add_parser("verify-receipt", help="check an X-Receipt against saved request/response bodies")
    verify.add_argument("--request", required=True, help="file with the exact request body sent")
    verify.add_argument("--response", required=True, help="file with the response body (or the whole stream)")
    verify.add_argument(
        "--receipt", help="the X-Receipt value or a file holding it (streams carry their own)"
    )
    verify.add_argument("--address", help="the proxy's receipt address")
    verify.add_argument(
        "--proxy", help="the proxy's base URL, to read the receipt address from /.well-known/x402"
    )
    add_evidence_parser(sub)
    pay = sub.add_parser("pay", help="call a paid URL, paying its 402 from a key")
    pay.add_argument("url")
    pay.add_argument("--key", help="payer private key (hex)")
    pay.add_argument("--key-file")
    pay.add_argument("--json", help="request body (default: a short chat request)")
    pay.add_argument(
        "--max-amount",
        type=parse_amount,
        default=Decimal("0.10"),
        help="the most to pay for the call, in whole tokens (USDC unless --asset; default 0.10)",
    )
    pay.add_argument(
        "--asset",
        type=parse_address,
        help="pay in this token instead of the network's USDC (any other asset is refused)",
    )
    pay.add_argument("--decimals", type=int, help="decimals of the --asset token, to read --max-amount")
    pay.add_argument(
        "--save",
        help="directory to keep the request bytes, answer, headers, receipt and payment header in "
        "(for verify-receipt, and for --payment)",
    )
    pay.add_argument(
        "--payment",
        help="send this saved payment.json again instead of paying (a call failed after it settled)",
    )
    catalog = sub.add_parser("catalog", help="manage the model catalog")
    catalog_sub = catalog.add_subparsers(dest="catalog_command", required=True)
    catalog_import = catalog_sub.add_parser(
        "import", help="LibertAI's pricing aggregate (saved JSON) → a TOML catalog"
    )
    catalog_import.add_argument("file", help="the saved aggregate (JSON)")
    catalog_import.add_argument("--margin", default="0", help="percent on the host's prices (default 0)")
    catalog_import.add_argument(
        "--floor", type=parse_usdc, default=parse_usdc("0.001"), help="minimum per call, USDC (default 0.001)"
    )
    catalog_import.add_argument("--output", help="catalog file to write (default: standard output)")
    return parser


COMMANDS = {
    "serve": cmd_serve,
    "devnet": cmd_devnet,
    "migrate": cmd_migrate,
    "pay": cmd_pay,
    "reconcile": cmd_reconcile,
    "revenue": cmd_revenue,
    "channels": cmd_channels,  # list, claim, settle, refund
    "catalog": cmd_catalog_import,  # `import` is the group's only subcommand so far
    "verify-receipt": cmd_verify_receipt,
    "verify-evidence": cmd_verify_evidence,  # an attested model's RA-TLS evidence, against AMD's roots
}


def main(argv: list[str] | None = None) -> int:
    """Run one command; a service that does not answer ends it with one line and exit code 3."""
    args = build_parser().parse_args(argv)
    logs.configure(logging.INFO if args.command == "devnet" else logging.WARNING)  # devnet: access lines too
    try:
        return COMMANDS[args.command](args)
    except _unreachable() as exc:
        group = getattr(args, "catalog_command", None) or getattr(args, "channels_command", None)
        command = " ".join(filter(None, (args.command, group)))
        print(f"x402-proxy {command}: {_what_did_not_answer(exc)}", file=sys.stderr)
        return EXIT_UNREACHABLE


def _unreachable() -> tuple[type[Exception], ...]:
    """What a command raises when Redis, the RPC endpoints or an HTTP server does not answer."""
    import requests

    from app.backends.rpc import ChainUnavailable, RpcFailure
    from app.backends.store import STORE_ERRORS

    return (*STORE_ERRORS, requests.RequestException, ChainUnavailable, RpcFailure)


def _what_did_not_answer(exc: Exception) -> str:
    import requests

    from app.backends.store import STORE_ERRORS

    if isinstance(exc, STORE_ERRORS):
        return f"Redis: {exc}"
    if isinstance(exc, requests.RequestException):
        url = exc.request.url if exc.request is not None else "the server"
        return f"no answer from {url} ({type(exc).__name__})"
    return f"RPC: {exc}"
