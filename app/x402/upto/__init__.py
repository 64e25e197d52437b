"""The x402 ``upto`` scheme on EVM (``specs/schemes/upto/scheme_upto_evm.md``): the payer signs a
Permit2 ``PermitWitnessTransferFrom`` for a maximum; the settling account named in the witness later
pulls what the call cost, at most that maximum, through the ``x402UptoPermit2Proxy``.

Pure: parsing, the EIP-712 digest and the offline checks. The chain checks (allowance, balance,
Permit2 nonce, simulation) are in ``app.backends.chain``.
"""

from .checks import check_permit
from .payload import (
    EIP2612_GAS_SPONSORING,
    PERMIT2_ADDRESS,
    UPTO_PROXY_ADDRESS,
    Permit2Authorization,
    Permit2612,
    UptoPayment,
    eip2612_declaration,
    parse_upto_payment,
    permit_digest,
    upto_payment_of,
)

__all__ = [
    "EIP2612_GAS_SPONSORING",
    "PERMIT2_ADDRESS",
    "UPTO_PROXY_ADDRESS",
    "Permit2Authorization",
    "Permit2612",
    "UptoPayment",
    "check_permit",
    "eip2612_declaration",
    "parse_upto_payment",
    "permit_digest",
    "upto_payment_of",
]
