"""CPU of checking AMD SEV-SNP evidence, in this process (no I/O; issue 18 asks for the figure).

1. AMD's genuine Milan evidence (the public test vector in ``tests/data/sev-snp``, with the roots
   packaged in ``app/tee/roots``): the chain (three RSA-4096 PSS SHA-384 verifications: ARK
   self-signed, ASK, VCEK), the report's parse and its ECDSA P-384 signature, the VCEK's chip id and
   TCB. What a fresh certificate costs before its first paid call.
2. The whole RA-TLS bundle of a chain of our own (``tests/unit/test_ra_tls.py``): certificate
   parse and validity, the report read from its extension, chain (RSA-2048 here), signature,
   binding, terms and the bundle's hash.
Reported without goals (the issue asks for the numbers).

    python -m benchmarks.tee [--rounds 200]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

from app.tee.amd import amd_roots
from app.tee.ra_tls import Roots, verify
from app.tee.sev_snp import Terms, load_vcek, parse_report, verify_chain, verify_report_signature

from .harness import Row, print_table

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "sev-snp"


def per_call(work: Callable[[], object], rounds: int) -> float:
    """CPU seconds per call of ``work`` (``time.process_time`` over ``rounds`` calls, after 3)."""
    for _ in range(3):
        work()
    started = time.process_time()
    for _ in range(rounds):
        work()
    return (time.process_time() - started) / rounds


def run(rounds: int = 200) -> list[Row]:
    from cryptography.hazmat.primitives import serialization

    from tests.unit.test_ra_tls import NOW, enclave_certificate
    from tests.unit.test_sev_snp import CHAIN, MEASUREMENT

    raw = (DATA / "milan_report.bin").read_bytes()
    vcek = load_vcek((DATA / "milan_vcek.der").read_bytes())
    milan = amd_roots("Milan")

    def genuine() -> None:
        verify_chain(milan.ark, milan.ask, vcek, set(milan.pinned))
        verify_report_signature(parse_report(raw), vcek, "Milan")

    der, _key = enclave_certificate()
    vcek_der = CHAIN.vcek.public_bytes(serialization.Encoding.DER)
    roots = Roots("Milan", CHAIN.ark, CHAIN.ask, frozenset(CHAIN.pinned))
    terms = Terms(frozenset({MEASUREMENT}))

    amd = per_call(genuine, rounds)
    bundle = per_call(lambda: verify(der, CHAIN.vcek, vcek_der, roots, terms, NOW), rounds)
    note = f"{rounds} rounds, time.process_time, one core"
    return [
        Row("tee", "AMD Milan evidence: chain + report signature", f"{amd * 1000:.2f} ms", note=note),
        Row("tee", "RA-TLS bundle of our chain: verify()", f"{bundle * 1000:.2f} ms", note=note),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=200)
    print_table(run(parser.parse_args().rounds))


if __name__ == "__main__":
    main()
