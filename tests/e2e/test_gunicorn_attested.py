"""An attested model as operators run it: gunicorn workers verifying the enclave each, sharing the
VCEK cache on disk, and the start-up refusal of roots other than AMD's without the allow switch."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from app.devnet import DevChain, Service, Wallets, free_port
from app.devnet.standin import StandinModel
from app.settings import Settings
from tests.e2e.test_gunicorn import gunicorn_env, start_gunicorn, wait_until_up
from tests.support import Proxy
from tests.tee_support import Enclave, KdsStandin, attested_catalog, write_roots
from tests.unit.test_sev_snp import MEASUREMENT

pytestmark = pytest.mark.integration


def attested_env(
    anvil: Service, redis_service: Service, wallets: Wallets, standin: StandinModel, tmp_path: Path
) -> dict[str, str]:
    return {
        **gunicorn_env(anvil, redis_service, wallets, standin.url, free_port()),
        "X402_ATTESTATION_ROOTS": str(write_roots(tmp_path / "roots.pem")),
        "X402_ALLOW_TEST_ROOTS": "1",
        "X402_VCEK_CACHE_DIR": str(tmp_path / "vcek"),
        "X402_ATTESTATION_TTL": "2",
    }


def test_gunicorn_workers_verify_the_enclave_and_share_its_vcek(
    anvil: Service,
    redis_service: Service,
    redis_client: object,
    wallets: Wallets,
    chain: DevChain,
    standin: StandinModel,
    settings: Settings,
    enclave: Enclave,
    kds: KdsStandin,
    tmp_path: Path,
) -> None:
    env = attested_env(anvil, redis_service, wallets, standin, tmp_path)
    env["X402_AMD_KDS_URL"] = kds.url
    catalog = attested_catalog(tmp_path / "catalog.toml", enclave.host.url, MEASUREMENT.hex())
    env["X402_CATALOG"] = str(catalog)
    process = start_gunicorn(env)
    url = "http://" + env["X402_BIND"]
    try:
        wait_until_up(process, url)
        proxy = Proxy(url, settings, wallets, chain)
        requirement = proxy.requirement()
        payments = [proxy.payment(requirement) for _ in range(6)]
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(proxy.pay, payments))
    finally:
        process.terminate()
        process.wait(timeout=20)
    assert [a.status_code for a in answers] == [200] * 6
    assert len({a.headers["X-TEE-Evidence"] for a in answers}) == 1
    assert len([r for r in enclave.host.received if r.path == "/v1/chat/completions"]) == 6
    assert standin.received == []
    assert 1 <= len(kds.asked) <= 2  # at most once per worker; then the shared disk cache
    assert len(list((tmp_path / "vcek").glob("*.der"))) == 1


def test_test_roots_without_the_allow_switch_refuse_the_start_in_one_line(
    anvil: Service, redis_service: Service, wallets: Wallets, standin: StandinModel, tmp_path: Path
) -> None:
    env = attested_env(anvil, redis_service, wallets, standin, tmp_path)
    del env["X402_ALLOW_TEST_ROOTS"]
    process = start_gunicorn(env)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode != 0
    lines = [line for line in stderr.splitlines() if "refusing to start" in line]
    assert lines and all(
        "X402_ATTESTATION_ROOTS" in line and "X402_ALLOW_TEST_ROOTS=1" in line for line in lines
    )
    assert "Traceback" not in stderr
