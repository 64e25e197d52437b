"""``x402-proxy channels list|claim|settle``: the ``batch-settlement`` channels the proxy holds in
Redis, and one claim or settle cycle now (``app.payments.claims``), for an operator.

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
    """``x402-proxy channels list|claim|settle``: see the module docstring for the exit codes."""
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


def render_channels(channels: list[Any]) -> str:
    """One line per channel (``StoredChannel``: id, payer, charged, claimed, unclaimed, balance,
    withdrawal pending since when) and a total line; amounts in USDC (6 decimals)."""
    lines: list[str] = []
    for c in sorted(channels, key=lambda c: (-c.unclaimed, c.channel_id)):
        withdraw = (
            time.strftime("withdraw pending since %Y-%m-%dT%H:%M:%SZ", time.gmtime(c.withdraw_at))
            if c.withdraw_at
            else "no withdrawal"
        )
        lines.append(
            f"0x{c.channel_id.hex()}  payer {c.payer}  charged {usdc(c.charged)}  claimed {usdc(c.claimed)}  "
            f"unclaimed {usdc(c.unclaimed)}  balance {usdc(c.balance)}  {withdraw}\n"
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
