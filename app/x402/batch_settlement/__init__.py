"""The x402 ``batch-settlement`` scheme on EVM. Source: the x402 repository's
``specs/schemes/batch-settlement/scheme_batch_settlement_evm.md``, with wire shapes, EIP-712 domain,
contract addresses and reason codes as the PyPI ``x402`` 2.25 client
``x402.mechanisms.evm.batch_settlement`` speaks them. The payer deposits once into an escrow channel
of ``x402BatchSettlement`` and pays each call with a signed cumulative voucher; the receiver claims
many channels' vouchers in one transaction and sweeps them to payTo.

Pure: parsing, the channel id, the EIP-712 digests and the offline voucher checks. Channel state
(charged so far, balance, claims) lives elsewhere and is given to the checks as integers.
"""

from .checks import ChannelTerms, check_amounts, check_config, check_signed, check_voucher
from .payload import (
    BATCH_SETTLEMENT_ADDRESS,
    DOMAIN_NAME,
    DOMAIN_VERSION,
    ERC3009_DEPOSIT_COLLECTOR_ADDRESS,
    MAX_WITHDRAW_DELAY,
    MIN_WITHDRAW_DELAY,
    PERMIT2_DEPOSIT_COLLECTOR_ADDRESS,
    SCHEME,
    ZERO_ADDRESS,
    BatchPayment,
    ChannelConfig,
    Deposit,
    Erc3009Deposit,
    Permit2Deposit,
    Voucher,
    batch_domain_separator,
    channel_id,
    claim_batch_digest,
    erc3009_deposit_nonce,
    parse_batch_payment,
    payload_of,
    permit2_deposit_digest,
    receive_authorization_digest,
    refund_digest,
    voucher_digest,
)

__all__ = [
    "BATCH_SETTLEMENT_ADDRESS",
    "DOMAIN_NAME",
    "DOMAIN_VERSION",
    "ERC3009_DEPOSIT_COLLECTOR_ADDRESS",
    "MAX_WITHDRAW_DELAY",
    "MIN_WITHDRAW_DELAY",
    "PERMIT2_DEPOSIT_COLLECTOR_ADDRESS",
    "SCHEME",
    "ZERO_ADDRESS",
    "BatchPayment",
    "ChannelConfig",
    "ChannelTerms",
    "Deposit",
    "Erc3009Deposit",
    "Permit2Deposit",
    "Voucher",
    "batch_domain_separator",
    "channel_id",
    "check_amounts",
    "check_config",
    "check_signed",
    "check_voucher",
    "claim_batch_digest",
    "erc3009_deposit_nonce",
    "parse_batch_payment",
    "payload_of",
    "permit2_deposit_digest",
    "receive_authorization_digest",
    "refund_digest",
    "voucher_digest",
]
