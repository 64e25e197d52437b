"""``x402-proxy verify-evidence`` as a buyer runs it (a subprocess), against a live attested proxy: the
proxy, an HTTPS enclave stand-in serving an RA-TLS certificate of our own AMD-shaped chain, a KDS
stand-in, a real chain and Redis (``tests/integration/test_attested_hosts.py``). The command trusts
nothing of the proxy's but the evidence bytes: the chain must reach AMD's packaged roots, or test roots
the buyer names and allows. Also the README's short re-verification script, run as printed."""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from app.devnet import free_port
from app.devnet.standin import StandinModel
from app.tee.ra_tls import evidence_sha256, report_of
from app.tee.sev_snp import POLICY_DEBUG, parse_report
from tests.integration.test_attested_hosts import MODEL, STATED, attested_proxy, bound_report
from tests.support import Proxy
from tests.tee_support import Enclave, KdsStandin, write_roots
from tests.unit.test_ra_tls import enclave_certificate
from tests.unit.test_sev_snp import CHAIN, MEASUREMENT, make_chain

pytestmark = pytest.mark.integration
PROJECT_ROOT = Path(__file__).resolve().parents[2]
README = PROJECT_ROOT / "README.md"


def verify_evidence(*args: str) -> tuple[int, str, str]:
    """Run ``x402-proxy verify-evidence args``; returns exit code, standard output, standard error,
    after checking that it never prints a traceback and that a failure is one line naming the
    command (and nothing on standard output)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("X402_")}
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "verify-evidence", *args],
        cwd=PROJECT_ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in done.stderr, done.stderr
    if done.returncode != 0:
        assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1, done.stdout + done.stderr
        assert done.stderr.startswith("x402-proxy verify-evidence: "), done.stderr
    return done.returncode, done.stdout, done.stderr.strip()


def reason(err: str) -> str:
    """The reason code of a failure line ``x402-proxy verify-evidence: <reason>: <words>``."""
    return err.removeprefix("x402-proxy verify-evidence: ").split(":", 1)[0]


def bundle_of(proxy: Proxy) -> dict[str, Any]:
    answer = requests.get(f"{proxy.url}/v1/attestation/{MODEL}", timeout=10)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def saved(path: Path, bundle: dict[str, Any]) -> str:
    path.write_text(json.dumps(bundle))
    return str(path)


def test_a_buyer_verifies_the_live_bundle_and_only_with_the_roots_it_allowed(
    proxy: Proxy, standin: StandinModel, enclave: Enclave, kds: KdsStandin, tmp_path: Path
) -> None:
    roots = str(write_roots(tmp_path / "buyer" / "roots.pem"))  # the buyer's own copy of the test roots
    allowed = ["--roots", roots, "--allow-test-roots"]
    with attested_proxy(proxy, tmp_path, enclave, kds) as attested:
        live = ["--proxy", attested.url, "--model", MODEL]
        bundle = bundle_of(attested)

        code, out, _ = verify_evidence(*live, *allowed, "--measurement", MEASUREMENT.hex())
        assert code == 0
        assert f"measurement   {MEASUREMENT.hex()} (one of those you gave)" in out
        assert "product       Milan" in out and f"TEST roots from {roots}" in out
        assert "reported TCB  bootloader 3, tee 0, snp 8, microcode 115" in out
        assert f"evidence      sha256 {bundle['evidence_sha256']}" in out
        assert len(out.splitlines()) == 5

        # no measurement given: verified, and it says plainly that nothing was compared
        code, out, _ = verify_evidence(*live, *allowed)
        assert code == 0 and f"{MEASUREMENT.hex()} NOT COMPARED with anything" in out

        # AMD's roots, the default: our chain is not AMD's, whatever ark and ask the bundle carries
        code, _, err = verify_evidence(*live, "--measurement", MEASUREMENT.hex())
        assert code == 1 and reason(err) == "chain_invalid" and "the VCEK" in err
        assert bundle["ark"] and bundle["ask"]  # present, and not used

        code, _, err = verify_evidence(*live, *allowed, "--measurement", "cd" * 48)
        assert code == 1 and reason(err) == "measurement_unknown"

        # test roots need the allow switch; bad options are one line, exit 2
        code, _, err = verify_evidence(*live, "--roots", roots)
        assert code == 2 and reason(err) == "roots_not_allowed" and "--allow-test-roots" in err
        code, _, err = verify_evidence(*live, *allowed, "--measurement", "abcd")
        assert code == 2 and reason(err) == "measurement_malformed"
        code, _, err = verify_evidence("--model", MODEL)
        assert code == 2 and reason(err) == "bad_options"

        # a model sold on its operator's word has nothing to verify; an unknown one is bad input
        code, _, err = verify_evidence("--proxy", attested.url, "--model", STATED)
        assert code == 1 and reason(err) == "not_attested" and "operator's statement" in err
        code, _, err = verify_evidence("--proxy", attested.url, "--model", "no-such-model")
        assert code == 2 and reason(err) == "model_not_found"

    dead = f"http://127.0.0.1:{free_port()}"
    code, _, err = verify_evidence("--proxy", dead, "--model", MODEL, *allowed)
    assert code == 3 and reason(err) == "proxy_unreachable"


def _flip_report_bit(bundle: dict[str, Any]) -> None:
    report = bytearray(base64.b64decode(bundle["report"]))
    report[0x90] ^= 0x01  # one bit of the measurement
    bundle["report"] = base64.b64encode(bytes(report)).decode()


def _other_report(bundle: dict[str, Any]) -> None:
    """A report our chain really signed, but bound to another key than the certificate's."""
    bundle["report"] = base64.b64encode(bound_report(ec.generate_private_key(ec.SECP384R1()))).decode()


def _set(path: tuple[str, ...], value: Any) -> Any:
    def edit(bundle: dict[str, Any]) -> None:
        target = bundle
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


EDITS: dict[str, tuple[Any, str]] = {
    "one flipped report bit": (_flip_report_bit, "signature_invalid"),
    "another signed report": (_other_report, "report_mismatch"),
    "evidence_sha256": (_set(("evidence_sha256",), "00" * 32), "evidence_mismatch"),
    "certificate_sha256": (_set(("certificate_sha256",), "11" * 32), "evidence_mismatch"),
    "verdict measurement": (_set(("verdict", "measurement"), "cd" * 48), "verdict_mismatch"),
    "verdict policy": (_set(("verdict", "policy"), 0x30001), "verdict_mismatch"),
    "verdict vmpl": (_set(("verdict", "vmpl"), 1), "verdict_mismatch"),
    "verdict product": (_set(("verdict", "product"), "Genoa"), "verdict_mismatch"),
    "verdict tcb": (_set(("verdict", "reported_tcb", "snp"), 9), "verdict_mismatch"),
}


def test_a_saved_bundle_verifies_offline_and_any_edit_is_refused(
    proxy: Proxy, standin: StandinModel, enclave: Enclave, kds: KdsStandin, tmp_path: Path
) -> None:
    roots = str(write_roots(tmp_path / "buyer" / "roots.pem"))
    with attested_proxy(proxy, tmp_path, enclave, kds) as attested:
        bundle = bundle_of(attested)
    # the proxy is gone: the saved bundle alone verifies
    check = ["--roots", roots, "--allow-test-roots", "--measurement", MEASUREMENT.hex()]
    code, out, _ = verify_evidence("--file", saved(tmp_path / "bundle.json", bundle), *check)
    assert code == 0 and bundle["evidence_sha256"] in out
    for name, (edit, expected) in EDITS.items():
        edited = copy.deepcopy(bundle)
        edit(edited)
        code, _, err = verify_evidence("--file", saved(tmp_path / "edited.json", edited), *check)
        assert (code, reason(err)) == (1, expected), name

    code, _, err = verify_evidence("--file", saved(tmp_path / "partial.json", {"report": "x"}), *check)
    assert code == 2 and reason(err) == "bundle_malformed"
    (tmp_path / "garbage.json").write_text("not json")
    code, _, err = verify_evidence("--file", str(tmp_path / "garbage.json"), *check)
    assert code == 2 and reason(err) == "bundle_malformed"
    code, _, err = verify_evidence("--file", str(tmp_path / "missing.json"), *check)
    assert code == 2 and reason(err) == "bundle_unreadable"


def test_the_enclave_must_serve_the_bundle_s_certificate(
    proxy: Proxy, standin: StandinModel, enclave: Enclave, kds: KdsStandin, tmp_path: Path
) -> None:
    roots = str(write_roots(tmp_path / "buyer" / "roots.pem"))
    check = ["--roots", roots, "--allow-test-roots", "--measurement", MEASUREMENT.hex()]
    with attested_proxy(proxy, tmp_path, enclave, kds) as attested:
        bundle = saved(tmp_path / "bundle.json", bundle_of(attested))
        code, out, _ = verify_evidence(
            "--proxy", attested.url, "--model", MODEL, *check, "--enclave", enclave.host.url
        )
        assert code == 0 and f"enclave       {enclave.host.url} serves this certificate now" in out

        # the enclave restarts with another certificate (valid too): the saved bundle is not its own
        enclave.restart_with("restarted")
        code, _, err = verify_evidence("--file", bundle, *check, "--enclave", enclave.host.url)
        assert code == 1 and reason(err) == "certificate_mismatch"
    code, _, err = verify_evidence("--file", bundle, *check, "--enclave", f"https://127.0.0.1:{free_port()}")
    assert code == 3 and reason(err) == "enclave_unreachable"
    code, _, err = verify_evidence("--file", bundle, *check, "--enclave", "http://127.0.0.1:1")
    assert code == 2 and reason(err) == "bad_options"


def test_the_bundle_must_be_the_one_an_answer_named(
    proxy: Proxy, standin: StandinModel, enclave: Enclave, kds: KdsStandin, tmp_path: Path
) -> None:
    roots = str(write_roots(tmp_path / "buyer" / "roots.pem"))
    check = ["--roots", roots, "--allow-test-roots", "--measurement", MEASUREMENT.hex()]
    with attested_proxy(proxy, tmp_path, enclave, kds) as attested:
        named = attested.pay(attested.payment(attested.requirement())).headers["X-TEE-Evidence"]
        code, out, _ = verify_evidence("--proxy", attested.url, "--model", MODEL, *check, "--evidence", named)
        assert code == 0 and named in out
        code, _, err = verify_evidence(
            "--proxy", attested.url, "--model", MODEL, *check, "--evidence", "0" * 64
        )
        assert code == 1 and reason(err) == "evidence_mismatch"
        code, _, err = verify_evidence("--proxy", attested.url, "--model", MODEL, *check, "--evidence", "abc")
        assert code == 2 and reason(err) == "bad_options"


def offline_bundle(der: bytes) -> dict[str, Any]:
    """A bundle as the proxy serves it, for an RA-TLS certificate of our chain (verdict: Milan)."""
    report = report_of(x509.load_der_x509_certificate(der))
    vcek = CHAIN.vcek.public_bytes(serialization.Encoding.DER)
    return {
        "certificate": base64.b64encode(der).decode(),
        "report": base64.b64encode(report).decode(),
        "vcek": base64.b64encode(vcek).decode(),
        "evidence_sha256": evidence_sha256(der, report, vcek),
        "verdict": {
            "measurement": MEASUREMENT.hex(),
            "policy": parse_report(report).policy,
            "vmpl": parse_report(report).vmpl,
            "reported_tcb": {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115, "fmc": 0},
            "product": "Milan",
        },
    }


def _certificate_of(**report: Any) -> bytes:
    key = ec.generate_private_key(ec.SECP384R1())
    return enclave_certificate(key=key, report=bound_report(key, **report))[0]


def test_a_version_2_report_names_no_product_line_and_the_chain_decides(tmp_path: Path) -> None:
    """A version-2 report carries no CPUID: each product line's roots are tried, and only the one
    the VCEK chains to verifies it (here Milan's, after Genoa's refused it)."""
    genoa = write_roots(tmp_path / "genoa.pem", make_chain(product="Genoa"))
    both = tmp_path / "both.pem"
    both.write_bytes(genoa.read_bytes() + write_roots(tmp_path / "milan.pem").read_bytes())
    path = saved(tmp_path / "bundle.json", offline_bundle(_certificate_of(version=2)))
    code, out, _ = verify_evidence("--file", path, "--roots", str(both), "--allow-test-roots")
    assert code == 0 and "product       Milan" in out
    code, _, err = verify_evidence("--file", path, "--roots", str(genoa), "--allow-test-roots")
    assert code == 1 and reason(err) == "chain_invalid"


@pytest.mark.parametrize(
    ("certificate", "expected"),
    [
        (lambda: enclave_certificate(days=-1)[0], "certificate_expired"),
        (lambda: _certificate_of(policy=0x30000 | POLICY_DEBUG), "debug_enabled"),
        (lambda: _certificate_of(vmpl=2), "vmpl"),
        (lambda: enclave_certificate(bound_to=ec.generate_private_key(ec.SECP384R1()))[0], "key_not_bound"),
    ],
    ids=["expired", "debug", "vmpl 2", "another key"],
)
def test_the_buyer_s_check_refuses_what_the_proxy_would(
    tmp_path: Path, certificate: Any, expected: str
) -> None:
    """Genuinely signed evidence of our chain that must still be refused (the bundle's own claims
    consistent with it)."""
    roots = write_roots(tmp_path / "roots.pem")
    path = saved(tmp_path / "bundle.json", offline_bundle(certificate()))
    code, _, err = verify_evidence("--file", path, "--roots", str(roots), "--allow-test-roots")
    assert (code, reason(err)) == (1, expected)


# -- the README's script ---------------------------------------------------------------------------------


def readme_script() -> str:
    """The README's re-verification script: its one ```python block that calls ``amd_roots``."""
    blocks = re.findall(r"```python\n(.*?)\n *```", README.read_text(), flags=re.DOTALL)
    (script,) = [textwrap.dedent(block) for block in blocks if "amd_roots(" in block]
    assert len(script.strip().splitlines()) <= 25
    return script


def run_script(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-", *args],
        input=script,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_readme_script_verifies_a_live_bundle_and_refuses_our_chain_with_amd_s_roots(
    proxy: Proxy, standin: StandinModel, enclave: Enclave, kds: KdsStandin, tmp_path: Path
) -> None:
    script = readme_script()
    roots = write_roots(tmp_path / "buyer" / "roots.pem")
    with attested_proxy(proxy, tmp_path, enclave, kds) as attested:
        bundle = bundle_of(attested)
        args = (attested.url, MODEL, MEASUREMENT.hex())

        # as printed: AMD's roots, which our test chain does not reach
        refused = run_script(script, *args)
        assert refused.returncode != 0 and "chain_invalid" in refused.stderr

        # the one substitution: our test roots in place of AMD's
        assert script.count("amd_roots(product)") == 1
        ours = "roots_from_pem(open(ROOTS_FILE, 'rb').read())[product]"
        prelude = f"from app.tee.amd import roots_from_pem\nROOTS_FILE = {str(roots)!r}\n"
        done = run_script(prelude + script.replace("amd_roots(product)", ours), *args)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["verified", "Milan", MEASUREMENT.hex(), bundle["evidence_sha256"]]

        wrong = run_script(
            prelude + script.replace("amd_roots(product)", ours), attested.url, MODEL, "cd" * 48
        )
        assert wrong.returncode != 0 and "measurement_unknown" in wrong.stderr
