"""The x402 protocol, pure: wire objects, header codec, the 402 builder, EIP-712 and offline checks.

Nothing in this package does I/O or imports the rest of the app, so all of it is unit-tested with
property tests and reused by the wallet client (``x402-proxy pay``).
"""
