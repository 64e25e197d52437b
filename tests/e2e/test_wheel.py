"""The package as an operator installs it: the wheel built from a copy of the repository, installed the
Dockerfile's way (requirements/prod.lock with hashes, then the wheel without dependencies) into a
fresh venv, and run from outside any checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import requests

from app.devnet import Service, Wallets, free_port
from app.devnet.standin import StandinModel
from app.payments.keys import KEYSPACE_KEY
from tests.e2e.test_gunicorn import gunicorn_env, wait_until_up
from tests.e2e.test_logs import parsed

PROJECT_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
NOT_COPIED = shutil.ignore_patterns(
    ".git", ".venv", "node_modules", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"
)
PIP_SECONDS = 300  # one pip command: the lock's ~40 wheels from the configured index


@dataclass(frozen=True)
class Installed:
    wheel: Path
    source: Path  # the copy of the repository it was built from
    venv: Path
    workdir: Path  # not a checkout: nothing of the repository beside it

    @property
    def cli(self) -> str:
        return str(self.venv / "bin" / "x402-proxy")

    def env(self, **variables: str) -> dict[str, str]:
        """The test's environment without its Python path (the checkout), plus ``variables``."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        return {**env, "PATH": f"{self.venv / 'bin'}:{env.get('PATH', '')}", **variables}


def run(
    args: list[str], timeout: float, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``args`` to completion within ``timeout`` seconds, output captured as text."""
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("wheel")
    source, dist, venv, workdir = root / "source", root / "dist", root / "venv", root / "elsewhere"
    shutil.copytree(PROJECT_ROOT, source, ignore=NOT_COPIED)  # a clean tree: no stale build/
    workdir.mkdir()
    steps = [
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(source), "-w", str(dist)],
        [sys.executable, "-m", "venv", str(venv)],
        [
            str(venv / "bin" / "pip"),
            "install",
            "-q",
            "--require-hashes",
            "-r",
            str(source / "requirements" / "prod.lock"),
        ],
    ]
    for step in steps:
        done = run(step, PIP_SECONDS, cwd=workdir)
        assert done.returncode == 0, f"{step}: {done.stderr[-3000:]}"
    (wheel,) = dist.glob("x402_tee_proxy-*.whl")
    for step in (
        [str(venv / "bin" / "pip"), "install", "-q", "--no-deps", str(wheel)],
        [str(venv / "bin" / "pip"), "check"],  # the lock holds every dependency the wheel declares
    ):
        done = run(step, PIP_SECONDS, cwd=workdir)
        assert done.returncode == 0, f"{step}: {done.stdout[-2000:]} {done.stderr[-2000:]}"
    return Installed(wheel, source, venv, workdir)


def test_the_wheel_holds_the_package_migrations_and_catalog_and_no_solidity(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = wheel.namelist()
        metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert not [n for n in names if n.endswith(".sol") or "contracts/" in n or n.startswith("tests/")]
    assert {
        "app/migrations/__init__.py",
        "app/migrations/0001_initial.py",
        "app/catalog/catalog.toml",
        "app/tee/roots/ark_milan.pem",
        "app/tee/roots/ask_turin.pem",
    } <= set(names)
    assert {"app/gunicorn_conf.py", "app/wsgi.py", "app/logs.py"} <= set(names)
    modules = {str(p.relative_to(installed.source)) for p in (installed.source / "app").rglob("*.py")}
    assert modules <= set(names), f"modules missing (pyproject.toml's package list?): {modules - set(names)}"
    migrations = {f"app/migrations/{p.name}" for p in (installed.source / "migrations").glob("*.py")}
    assert migrations <= set(names)
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert not [line for line in requires if "web3" in line]
    assert all("extra ==" in line for line in requires if "fakeredis" in line)  # dev and test only


def test_the_installed_package_is_the_wheel_not_the_checkout(installed: Installed) -> None:
    done = run(
        [
            str(installed.venv / "bin" / "python"),
            "-c",
            "import app, app.payments.migrate as m; print(app.__file__, m.MIGRATIONS_DIR)",
        ],
        60,
        cwd=installed.workdir,
        env=installed.env(),
    )
    assert done.returncode == 0, done.stderr
    assert str(PROJECT_ROOT) not in done.stdout and done.stdout.startswith(str(installed.venv)), done.stdout


def test_migrate_dry_run_from_the_wheel(
    installed: Installed, redis_service: Service, redis_client: redis.Redis
) -> None:
    done = run(
        [installed.cli, "migrate", "--dry-run"],
        60,
        cwd=installed.workdir,
        env=installed.env(REDIS_URL=redis_service.url),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "would apply: 0001_initial, 0002_payment_shards"
    assert redis_client.get(KEYSPACE_KEY) is None  # a dry run writes nothing


def test_serve_from_the_wheel_runs_gunicorn_with_the_packaged_settings(
    installed: Installed,
    anvil: Service,
    redis_service: Service,
    redis_client: redis.Redis,
    wallets: Wallets,
    standin: StandinModel,
) -> None:
    port = free_port()
    settings = gunicorn_env(anvil, redis_service, wallets, standin.url, port)
    env = installed.env(**{k: v for k, v in settings.items() if k.startswith(("X402_", "REDIS_"))})
    process = subprocess.Popen(
        [installed.cli, "serve"],
        cwd=installed.workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until_up(process, f"http://127.0.0.1:{port}")
        ready = requests.get(f"http://127.0.0.1:{port}/readyz", timeout=10)
    finally:
        process.terminate()
        stdout, stderr = process.communicate(timeout=30)
    assert ready.status_code == 200 and ready.json()["ready"] is True, ready.text
    written = parsed(stdout) + parsed(stderr)  # the packaged logging settings: JSON lines
    server = [line["message"] for line in written if line["logger"] == "gunicorn.error"]
    assert any(m.startswith("Starting gunicorn") for m in server), server
    assert sum(m.startswith("Booting worker") for m in server) == 2  # X402_WORKERS, read by the settings
    assert [line["route"] for line in written if line["logger"] == "x402.access"] == ["/healthz", "/readyz"]


def test_serve_from_the_wheel_refuses_bad_settings_in_one_line(installed: Installed) -> None:
    env = installed.env(X402_PAY_TO="0x1234", X402_BIND=f"127.0.0.1:{free_port()}")
    done = run([installed.cli, "serve"], 60, cwd=installed.workdir, env=env)
    assert done.returncode == 4, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "refusing to start" in lines[0] and "X402_PAY_TO" in lines[0], done.stderr


def test_devnet_from_the_wheel_says_it_needs_a_checkout(installed: Installed) -> None:
    done = run([installed.cli, "devnet", "--demo"], 60, cwd=installed.workdir, env=installed.env())
    assert done.returncode == 1 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("x402-proxy devnet: ") and "checkout" in done.stderr
