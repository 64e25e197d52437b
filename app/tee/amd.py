"""AMD's certificate chains for SEV-SNP, pinned: each product line's ARK and ASK (``roots/``: as AMD's
key distribution service serves them at ``/vcek/v1/{Milan,Genoa,Turin}/cert_chain``), and the SHA-256
of each ARK's SubjectPublicKeyInfo as AMD publishes them. A root whose key hash is not here is never
accepted from these files (``X402_ATTESTATION_ROOTS`` with ``X402_ALLOW_TEST_ROOTS`` is the only way
to others)."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from cryptography import x509

from .ra_tls import Roots
from .sev_snp import EvidenceError, pss_signed_by, spki_sha256

# SHA-256 of the ARKs' SubjectPublicKeyInfo (AMD's published root keys)
ARK_SPKI_SHA256 = {
    "Milan": "9f056bee44377e29308cb5ffa895bdfb62d18881fa6bed8d6f075b0204089cb9",
    "Genoa": "429a69c9422aa258ee4d8db5fcda9c6470ef15f8cd5a9cebd6cbc7d90b863831",
    "Turin": "4f125410563a2ab9a50356f9243f6fe0b6f73de98603f53f90339c70e9d7ad08",
}


@cache
def amd_roots(product: str) -> Roots:
    """The pinned chain of a product line (Milan, Genoa, Turin). Raises ``EvidenceError``
    (``root_not_pinned``) for another product, or packaged files whose ARK is not AMD's key."""
    if product not in ARK_SPKI_SHA256:
        raise EvidenceError("root_not_pinned", f"no AMD roots for {product}")
    folder = files("app.tee").joinpath("roots")
    ark = x509.load_pem_x509_certificate(folder.joinpath(f"ark_{product.lower()}.pem").read_bytes())
    ask = x509.load_pem_x509_certificate(folder.joinpath(f"ask_{product.lower()}.pem").read_bytes())
    if spki_sha256(ark) != ARK_SPKI_SHA256[product]:
        raise EvidenceError("root_not_pinned", f"the packaged {product} ARK is not AMD's")
    return Roots(product, ark, ask, frozenset({ARK_SPKI_SHA256[product]}))


def amd_trust() -> dict[str, Roots]:
    """AMD's pinned chains for every product line, by product (Milan, Genoa, Turin)."""
    return {product: amd_roots(product) for product in ARK_SPKI_SHA256}


def roots_from_pem(data: bytes) -> dict[str, Roots]:
    """Chains replacing AMD's (``X402_ATTESTATION_ROOTS``, allowed only with
    ``X402_ALLOW_TEST_ROOTS``): a PEM file of ARK and ASK certificates in any order, named as AMD
    names them (``ARK-<product>``, ``SEV-<product>``), each ARK self-signed and each ASK issued by
    its product's ARK. Each ARK is pinned as found. Raises ``ValueError`` saying what is wrong."""
    found: dict[str, dict[str, x509.Certificate]] = {}
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError("no PEM certificates could be read") from None
    for certificate in certificates:
        names = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        name = str(names[0].value) if names else ""
        kind, _, product = name.partition("-")
        if kind not in ("ARK", "SEV") or product not in ARK_SPKI_SHA256:
            raise ValueError(f"{name!r} is not named ARK-<product> or SEV-<product> (Milan, Genoa, Turin)")
        if kind in found.setdefault(product, {}):
            raise ValueError(f"two {name} certificates")
        found[product][kind] = certificate
    trust: dict[str, Roots] = {}
    for product, pair in found.items():
        ark, ask = pair.get("ARK"), pair.get("SEV")
        if ark is None or ask is None:
            raise ValueError(f"{product} needs both its ARK-{product} and SEV-{product} certificates")
        if not (pss_signed_by(ark, ark) and pss_signed_by(ask, ark)):
            raise ValueError(f"the {product} ARK must be self-signed and issue the ASK (RSA-PSS SHA-384)")
        trust[product] = Roots(product, ark, ask, frozenset({spki_sha256(ark)}))
    if not trust:
        raise ValueError("no certificates")
    return trust
