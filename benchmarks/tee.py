"""CPU of checking AMD SEV-SNP evidence, in this process (no I/O; issue 18 asks for the figure).

1. AMD's genuine Milan evidence (the public test vector in ``tests/data/sev-snp``, with the roots
   packaged in ``app/tee/roots``): the chain (three RSA-4096 PSS SHA-384 verifications: ARK
   self-signed, ASK, VCEK), the report's parse and its ECDSA P-384 signature, the VCEK's chip id and
   TCB. What a fresh certificate costs before its first paid call.
2. The whole RA-TLS bundle of a chain of our own (``tests/unit/test_ra_tls.py``): certificate
   parse and validity, the report read from its extension, chain (RSA-2048 here), signature,
   binding, terms and the bundle's hash.
3. On real sockets (an HTTPS enclave stand-in with an RA-TLS certificate, a KDS stand-in, a VCEK
   cache on disk): one whole first verification by ``Attestor`` (TLS handshake, VCEK from disk,
   verify: what a changed certificate costs the request that notices it), the cache hit path each
   attested request takes (``Attestor.evidence`` + the pinned session), and ``GET /v1/models`` over
   a pinned keep-alive connection beside the same request over an unpinned one, measured
   alternately in one run.
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
        *on_sockets(rounds),
    ]


def on_sockets(rounds: int) -> list[Row]:
    """The attestor against an HTTPS enclave stand-in and a KDS stand-in on loopback."""
    import statistics
    import tempfile

    import requests

    from app.backends.enclave import Attestor
    from app.catalog import Model
    from app.devnet.standin import StandinModel
    from app.settings import Settings
    from tests.tee_support import KdsStandin, write_enclave_files, write_roots
    from tests.unit.test_sev_snp import MEASUREMENT

    with tempfile.TemporaryDirectory() as folder, KdsStandin() as kds:
        base = Path(folder)
        certificate, key, _der = write_enclave_files(base / "enclave")
        with StandinModel(tls=(certificate, key)) as enclave:
            settings = Settings(
                pay_to="0x" + "22" * 20, relayer_key="0x" + "33" * 32, redis_url="redis://127.0.0.1:9"
            ).with_overrides(amd_kds_url=kds.url, vcek_cache_dir=base / "vcek", attestation_ttl=3600.0)
            from app.tee.amd import roots_from_pem

            trust = roots_from_pem(write_roots(base / "roots.pem").read_bytes())
            model = Model(
                name="enclave",
                description="",
                tee=True,
                pricing="per_call",
                price=1,
                upstream_url=enclave.url,
                attestation="sev-snp",
                measurements=(MEASUREMENT.hex(),),
            )
            attestor = Attestor(settings, trust)
            attestor.evidence(model)  # the VCEK is now on disk

            def first() -> None:
                Attestor(settings, trust).evidence(model)

            whole = statistics.median(_wall(first) for _ in range(max(rounds // 10, 10)))
            evidence = attestor.evidence(model)
            hit = per_call(lambda: attestor.session(model, attestor.evidence(model)), rounds * 50)
            plain = requests.Session()
            plain.trust_env, plain.verify = False, False  # the same settings, no pin
            pinned = attestor.session(model, evidence)
            url = enclave.url + "/v1/models"
            for session in (plain, pinned):
                session.get(url, timeout=5).raise_for_status()  # connections open
            plain_times: list[float] = []
            pinned_times: list[float] = []
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the unpinned session's InsecureRequestWarning
                for _ in range(rounds):
                    plain_times.append(_wall(lambda: plain.get(url, timeout=5)))
                    pinned_times.append(_wall(lambda: pinned.get(url, timeout=5)))
    p_plain, p_pinned = statistics.median(plain_times), statistics.median(pinned_times)
    wall = "wall time, loopback, p50"
    return [
        Row(
            "tee",
            "first verification by Attestor (handshake, VCEK on disk)",
            f"{whole * 1000:.2f} ms",
            note=wall,
        ),
        Row(
            "tee",
            "cache hit per attested request (evidence + pinned session)",
            f"{hit * 1e6:.1f} µs",
            note=f"{rounds * 50} rounds, time.process_time",
        ),
        Row(
            "tee",
            "GET /v1/models over a pinned keep-alive connection",
            f"{p_pinned * 1000:.3f} ms",
            f"{p_plain * 1000:.3f} ms unpinned",
            f"{p_pinned / p_plain:.2f}",
            note=f"{rounds} each, alternating, {wall}",
        ),
    ]


def _wall(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=200)
    print_table(run(parser.parse_args().rounds))


if __name__ == "__main__":
    main()
