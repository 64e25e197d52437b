"""``x402-proxy channels list|claim|settle|refund``: the ``batch-settlement`` channels the proxy holds
in Redis, one claim or settle cycle now (``app.payments.claims``), and refunds, for an operator.

``list`` reads Redis only (the chain's view as last recorded); ``claim`` and ``settle`` take the
deployment's claims lock like the background loop does, so they never run beside it. Exit codes as
``reconcile``: 0 done; 1 a transaction reverted, stayed pending or was not sent, or another process
holds the lock; 2 bad settings; 3 Redis or every RPC endpoint did not answer (``main``).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from app.cli.common import usdc

EXIT_OK, EXIT_FAILED, EXIT_BAD_SETTINGS = 0, 1, 2


def add_parser(sub: Any) -> None:
    """``channels`` and its three subcommands, on the ``x402-proxy`` subparsers ``sub``."""
    channels = sub.add_parser("channels", help="batch-settlement channels: list, claim and settle now")
    channels_sub = channels.add_subparsers(dest="channels_command", required=True)
    channels_sub.add_parser("list", help="every channel: charged, claimed, unclaimed, balance, withdrawal")
    channels_sub.add_parser("claim", help="claim every unclaimed charge on chain now (one cycle)")
    channels_sub.add_parser("settle", help="send what was claimed to payTo now (one cycle)")
    refund = channels_sub.add_parser(
        "refund", help="claim a channel's charges and give the rest back to its payer now"
    )
    which = refund.add_mutually_exclusive_group(required=True)
    which.add_argument("channel", nargs="?", help="the channel id (0x and 64 hex digits)")
    which.add_argument("--idle", action="store_true", help="every channel idle for X402_IDLE_REFUND_SECONDS")


def _loop() -> Any:
    """The claims of the configured proxy (no network I/O until used): a ``ClaimLoop``. Raises
    ``SettingsError``."""
    from app.payments.claims import ClaimLoop
    from app.settings import Settings, SettingsError

    settings = Settings.from_env()
    try:
        return ClaimLoop.for_settings(settings)
    except ValueError as exc:
        raise SettingsError("X402_FACILITATOR_URL", str(exc)) from None


def cmd_channels(args: argparse.Namespace) -> int:
    """``x402-proxy channels list|claim|settle|refund``: see the module docstring for the exit
    codes (``refund``: 1 when it was not refunded)."""
    from app.payments.claims import ClaimsLockLost
    from app.settings import SettingsError

    command = f"x402-proxy channels {args.channels_command}"
    try:
        loop = _loop()
    except SettingsError as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    if args.channels_command == "list":
        sys.stdout.write(render_channels(loop.claims.channels.every()))
        return EXIT_OK
    if args.channels_command == "refund":
        return _refund(command, loop, args)
    claim = args.channels_command == "claim"
    try:
        cycle = loop.run(claim=claim, settle=not claim, force=True)
    except ClaimsLockLost as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if cycle.status == "busy":
        owner = f" ({cycle.owner})" if cycle.owner else ""
        print(f"{command}: another process is running a claim cycle{owner}; try again", file=sys.stderr)
        return EXIT_FAILED
    sys.stdout.write(render_claim(cycle.claimed) if claim else render_settle(cycle.settled))
    if cycle.failed:
        print(f"{command}: a transaction did not land (see above)", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _refund(command: str, loop: Any, args: argparse.Namespace) -> int:
    """``channels refund CHANNEL`` or ``--idle``: what went back to whom, one line each."""
    from app.payments.errors import ApiError
    from app.payments.outcomes import PaymentRequired

    if args.idle:
        refunds = loop.claims.refund_idle()
        for refund in refunds:
            sys.stdout.write(f"refunded 0x{refund.channel.hex()}  {usdc(refund.amount)}  {refund.tx}\n")
        sys.stdout.write(f"total: {len(refunds)} idle channels refunded\n")
        return EXIT_OK
    channel = str(args.channel).lower()
    if len(channel) != 66 or not channel.startswith("0x"):
        print(f"{command}: a channel id is 0x and 64 hex digits", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    matches = [c for c in loop.claims.channels.every() if "0x" + c.channel_id.hex() == channel]
    if not matches:
        print(f"{command}: no such channel in Redis ({channel})", file=sys.stderr)
        return EXIT_FAILED
    stored = matches[0]
    try:
        refunded = loop.claims.refund(stored)
    except (PaymentRequired, ApiError, ValueError) as exc:
        reason = exc.verdict.detail if isinstance(exc, PaymentRequired) else str(exc)
        print(f"{command}: not refunded: {reason}", file=sys.stderr)
        return EXIT_FAILED
    sys.stdout.write(f"refunded {channel}  {usdc(refunded.amount)}  {refunded.tx}\n")
    return EXIT_OK


def render_channels(channels: list[Any]) -> str:
    """One line per channel (``StoredChannel``: id, payer, charged, claimed, unclaimed, balance (what
    the escrow holds for it: deposits less withdrawals and refunds, claims included), refundable
    (balance less what was charged), withdrawal pending since when) and a total line; amounts in
    USDC (6 decimals)."""
    lines: list[str] = []
    for c in sorted(channels, key=lambda c: (-c.unclaimed, c.channel_id)):
        withdraw = (
            time.strftime("withdraw pending since %Y-%m-%dT%H:%M:%SZ", time.gmtime(c.withdraw_at))
            if c.withdraw_at
            else "no withdrawal"
        )
        refundable = max(c.balance - max(c.charged, c.claimed), 0)
        lines.append(
            f"0x{c.channel_id.hex()}  payer {c.payer}  charged {usdc(c.charged)}  claimed {usdc(c.claimed)}  "
            f"unclaimed {usdc(c.unclaimed)}  balance {usdc(c.balance)}  refundable {usdc(refundable)}  "
            f"{withdraw}\n"
        )
    charged = sum(c.charged for c in channels)
    claimed = sum(c.claimed for c in channels)
    unclaimed = sum(c.unclaimed for c in channels)
    withdrawing = sum(1 for c in channels if c.withdraw_at)
    lines.append(
        f"total: {len(channels)} channels, charged {usdc(charged)}, claimed {usdc(claimed)}, "
        f"unclaimed {usdc(unclaimed)}, {withdrawing} with a withdrawal pending\n"
    )
    return "".join(lines)


def render_claim(run: Any) -> str:
    """What a ``ClaimRun`` moved: one line per transaction, per channel skipped, and a total."""
    if run is None:
        return "nothing claimed\n"
    lines = [f"waiting: {run.waiting}\n"] if run.waiting else []
    for tx in run.transactions:
        detail = f"{tx.channels} channels, {usdc(tx.amount)}" if tx.outcome == "settled" else tx.reason
        lines.append(f"claim {tx.outcome}: {tx.tx_hash or '-'}  {detail}  gas {tx.gas_used}\n")
    lines += [f"skipped {line}\n" for line in run.skipped]
    if not run.transactions and not run.waiting:
        lines.append("nothing to claim\n")
    lines.append(f"total: claimed {run.channels} channels, {usdc(run.amount)}, gas {run.gas_used}\n")
    return "".join(lines)


def render_settle(run: Any) -> str:
    """What a ``SettleRun`` moved to payTo, or that nothing was outstanding."""
    if run is None or run.transaction is None:
        return "nothing to settle\n"
    tx = run.transaction
    if tx.outcome == "settled":
        return f"settled {usdc(run.amount)} to payTo: {tx.tx_hash}  gas {tx.gas_used}\n"
    return f"settle {tx.outcome}: {tx.tx_hash or '-'}  {tx.reason}  gas {tx.gas_used}\n"
