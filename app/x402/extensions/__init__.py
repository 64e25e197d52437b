"""x402 extensions the proxy speaks, one module each (``specs/extensions/`` of the x402 repository)."""
