"""How an operator configures attested models (issue 18): the catalog's ``attestation`` fields, the
roots that may replace AMD's, and the settings around them. No I/O but reading temporary files."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from app.catalog import Catalog, CatalogError, QuoteError, load_catalog
from app.settings import Settings, SettingsError
from app.tee.amd import ARK_SPKI_SHA256, amd_trust, roots_from_pem
from app.tee.sev_snp import Tcb, spki_sha256
from tests.unit.test_settings import base_env, error_for
from tests.unit.test_sev_snp import CHAIN, make_chain

MEASUREMENT = "ab" * 48
ATTESTED = f"""
[models."enclave"]
description = "in an SEV-SNP VM"
tee = true
pricing = "per_call"
price = 10
upstream_url = "https://127.0.0.1:9443"
attestation = "sev-snp"
measurements = ["0x{MEASUREMENT.upper()}"]
policy = 0x30000
tcb_floor = {{ bootloader = 3, snp = 8, microcode = 115 }}

[models."stated"]
description = "a TEE on its operator's word"
tee = true
pricing = "per_call"
price = 10
"""


def catalog(tmp_path: Path, text: str = ATTESTED, attested_only: bool = False) -> Catalog:
    path = tmp_path / "catalog.toml"
    path.write_text(text)
    return Catalog(load_catalog(path), attested_only=attested_only)


def test_an_attested_entry_reads_its_terms(tmp_path: Path) -> None:
    model = catalog(tmp_path).model("enclave")
    assert model.attested and model.measurements == (MEASUREMENT,)
    assert model.terms.measurements == frozenset({bytes.fromhex(MEASUREMENT)})
    assert model.terms.policy == 0x30000
    assert model.terms.tcb_floor == Tcb(bootloader=3, tee=0, snp=8, microcode=115)
    assert "verified by the proxy" in model.trust and model.public()["attested"] is True


def test_a_turin_floor_may_name_its_fmc_level(tmp_path: Path) -> None:
    turin = catalog(tmp_path, ATTESTED.replace("bootloader = 3,", "fmc = 2, bootloader = 3,"))
    assert turin.model("enclave").terms.tcb_floor == Tcb(bootloader=3, tee=0, snp=8, microcode=115, fmc=2)


def test_a_tee_without_attestation_says_it_is_the_operator_s_statement(tmp_path: Path) -> None:
    model = catalog(tmp_path).model("stated")
    assert not model.attested
    assert model.public()["trust"] == "TEE (operator's statement)" and model.public()["attested"] is False


def test_requiring_attestation_sells_only_attested_models(tmp_path: Path) -> None:
    strict = catalog(tmp_path, attested_only=True)
    assert [m.name for m in strict.listed()] == ["enclave"]
    with pytest.raises(QuoteError) as refused:
        strict.model("stated")
    assert refused.value.code == "model_not_attested" and refused.value.status == 403


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (("https://127.0.0.1:9443", "http://127.0.0.1:9443"), "https:// upstream_url"),
        ((f'["0x{MEASUREMENT.upper()}"]', "[]"), "measurements"),
        ((f'["0x{MEASUREMENT.upper()}"]', '["abcd"]'), "measurements"),
        (('"sev-snp"', '"tdx"'), "attestation must be"),
        (("policy = 0x30000", 'policy = "0x30000"'), "policy"),
        (("bootloader = 3", "bootloader = 300"), "tcb_floor"),
        (("bootloader = 3", "vcek = 1"), "tcb_floor"),
        (("policy = 0x30000", "policy = 0xB0000"), "always refused"),
        (("policy = 0x30000", "policy = 0x70000"), "always refused"),
        (('attestation = "sev-snp"', 'attestation = "sev-snp"\nproduct = "Naples"'), "product"),
        (('attestation = "sev-snp"\n', ""), "go with attestation"),
        (('attestation = "sev-snp"', 'attestation = "sev-snp"\nattestation_url = "https://x/"'), "are gone"),
        (('description = "in an SEV-SNP VM"\ntee = true', 'description = "x"\ntee = false'), "tee = true"),
    ],
    ids=[
        "plain http",
        "no measurement",
        "short measurement",
        "another tee",
        "policy as text",
        "tcb out of range",
        "unknown tcb level",
        "debug policy",
        "migration agent policy",
        "unknown product",
        "terms without attestation",
        "the old report url",
        "attested but not tee",
    ],
)
def test_a_wrong_attested_entry_is_refused_with_its_words(
    tmp_path: Path, change: tuple[str, str], words: str
) -> None:
    with pytest.raises(CatalogError) as refused:
        catalog(tmp_path, ATTESTED.replace(*change, 1))
    assert words in str(refused.value)


def _pem(chain_part: object) -> bytes:
    return chain_part.public_bytes(serialization.Encoding.PEM)  # type: ignore[attr-defined]


def test_roots_replacing_amd_s_are_read_in_any_order_and_pinned_as_found() -> None:
    genoa = make_chain(product="Genoa")
    trust = roots_from_pem(_pem(CHAIN.ask) + _pem(genoa.ark) + _pem(CHAIN.ark) + _pem(genoa.ask))
    assert set(trust) == {"Milan", "Genoa"}
    assert trust["Milan"].ark == CHAIN.ark and trust["Milan"].ask == CHAIN.ask
    assert trust["Milan"].pinned == frozenset({spki_sha256(CHAIN.ark)})
    assert trust["Genoa"].ask == genoa.ask


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (lambda: _pem(CHAIN.ask), "needs both"),
        (lambda: _pem(CHAIN.ark) + _pem(make_chain().ask), "issue the ASK"),
        (lambda: _pem(CHAIN.ark) + _pem(CHAIN.ark), "two ARK-Milan"),
        (lambda: _pem(make_chain(product="Test").ark), "is not named"),
        (lambda: b"", "no PEM certificates"),
    ],
    ids=["ask alone", "another ark's ask", "twice", "unnamed product", "empty"],
)
def test_unusable_roots_are_refused(text: object, words: str) -> None:
    with pytest.raises(ValueError) as refused:
        roots_from_pem(text())  # type: ignore[operator]
    assert words in str(refused.value)


def test_amd_s_roots_are_the_default_trust() -> None:
    trust = amd_trust()
    assert {product: spki_sha256(roots.ark) for product, roots in trust.items()} == ARK_SPKI_SHA256


def test_other_roots_need_the_allow_switch_named_in_one_line(tmp_path: Path) -> None:
    roots = tmp_path / "roots.pem"
    roots.write_bytes(_pem(CHAIN.ark) + _pem(CHAIN.ask))
    refused = error_for(base_env(X402_ATTESTATION_ROOTS=str(roots)))
    assert refused.variable == "X402_ATTESTATION_ROOTS" and "X402_ALLOW_TEST_ROOTS=1" in str(refused)
    assert "\n" not in str(refused)
    allowed = Settings.from_env(base_env(X402_ATTESTATION_ROOTS=str(roots), X402_ALLOW_TEST_ROOTS="1"))
    assert allowed.attestation_roots == roots
    missing = error_for(base_env(X402_ATTESTATION_ROOTS=str(tmp_path / "no.pem"), X402_ALLOW_TEST_ROOTS="1"))
    assert missing.variable == "X402_ATTESTATION_ROOTS"


def test_attestation_settings_and_their_defaults(tmp_path: Path) -> None:
    defaults = Settings.from_env(base_env(XDG_CACHE_HOME=str(tmp_path)))
    assert defaults.amd_kds_url == "https://kdsintf.amd.com" and defaults.attestation_ttl == 600
    assert defaults.vcek_cache_dir == tmp_path / "x402-tee-proxy" / "vcek"
    assert defaults.attestation_roots is None and defaults.require_attestation is False
    chosen = Settings.from_env(
        base_env(
            X402_AMD_KDS_URL="http://127.0.0.1:9/",
            X402_VCEK_CACHE_DIR=str(tmp_path / "v"),
            X402_ATTESTATION_TTL="2",
            X402_REQUIRE_ATTESTATION="1",
        )
    )
    assert chosen.amd_kds_url == "http://127.0.0.1:9" and chosen.vcek_cache_dir == tmp_path / "v"
    assert chosen.attestation_ttl == 2 and chosen.require_attestation is True
    with pytest.raises(SettingsError):
        Settings.from_env(base_env(X402_AMD_KDS_URL="kdsintf.amd.com"))


def test_test_roots_are_announced_in_the_log_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from app.services import _trust

    roots = tmp_path / "roots.pem"
    roots.write_bytes(_pem(CHAIN.ark) + _pem(CHAIN.ask))
    settings = Settings.from_env(base_env(X402_ATTESTATION_ROOTS=str(roots), X402_ALLOW_TEST_ROOTS="1"))
    with caplog.at_level("WARNING", logger="x402.services"):
        assert set(_trust(settings)) == {"Milan"}
    assert any("not AMD's roots" in record.getMessage() for record in caplog.records)
