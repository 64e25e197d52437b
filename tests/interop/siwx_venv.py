"""A virtualenv of its own for the official x402 client with its sign-in-with-x (SIWx) extension.

The SIWx client (PyPI ``x402`` 2.25, ``x402.extensions.sign_in_with_x``) builds its EIP-4361 message with
PyPI ``signinwithethereum`` (imported as ``siwe``), which requires eth-account<0.14 and web3<8: older
than the ones our test and production environments pin. We do not hold our own dependencies back
for a test client, so the interop tests run it as a peer process (``siwx_client.py``) with the
Python of this virtualenv, installed from ``requirements/siwx-client.lock`` with hashes.

The virtualenv lives in ``<project>/.cache/siwx-client-<first 12 hex of the lock's SHA-256>/`` and is
reused for as long as the lock file is unchanged; a changed lock gets a new one. It is built at most
once at a time (an exclusive file lock beside it, so parallel pytest processes wait for the first)
in a temporary directory next to it that is renamed into place only when complete, so a killed
build never leaves a half-installed virtualenv under the final name. Only its ``bin/python`` is
used: the console scripts that pip installed keep the temporary directory in their ``#!`` line.

A failed build raises :class:`SiwxVenvError` with pip's output: the lane is never skipped silently.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
LOCK_FILE = PROJECT_ROOT / "requirements" / "siwx-client.lock"
CACHE_DIR = PROJECT_ROOT / ".cache"
VENV_PREFIX = "siwx-client-"
BUILD_TIMEOUT = 600  # seconds, for `python -m venv` and again for `pip install` (a cold one takes ~20 s)
OUTPUT_TAIL = 4000  # characters of a failed command's output kept in the error


class SiwxVenvError(RuntimeError):
    """The SIWx client's virtualenv could not be built."""


def clean_env() -> dict[str, str]:
    """The environment for the virtualenv's processes: ours, less what would let our packages leak in."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _lock_digest() -> str:
    return hashlib.sha256(LOCK_FILE.read_bytes()).hexdigest()[:12]


def _run(step: str, command: list[str]) -> None:
    try:
        done = subprocess.run(
            command,
            env=clean_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        raise SiwxVenvError(f"SIWx client venv: {step} took over {BUILD_TIMEOUT} s: {command}") from exc
    if done.returncode != 0:
        output = (done.stdout + done.stderr)[-OUTPUT_TAIL:]
        raise SiwxVenvError(f"SIWx client venv: {step} failed (exit {done.returncode}): {command}\n{output}")


def _build(target: Path, digest: str) -> None:
    """Install the lock into a fresh temporary virtualenv beside ``target``, then rename it into place."""
    for stale in CACHE_DIR.glob(f".{VENV_PREFIX}{digest}-*.tmp"):  # left by a killed build; we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    building = Path(tempfile.mkdtemp(prefix=f".{VENV_PREFIX}{digest}-", suffix=".tmp", dir=CACHE_DIR))
    try:
        building.chmod(0o755)  # mkdtemp makes it private; a virtualenv is not
        _run("creating the virtualenv", [sys.executable, "-m", "venv", str(building)])
        _run(
            f"installing {LOCK_FILE.relative_to(PROJECT_ROOT)}",
            [
                str(building / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--no-input",
                "--disable-pip-version-check",
                "--require-hashes",
                "-r",
                str(LOCK_FILE),
            ],
        )
        _run(
            "importing the client",
            [str(building / "bin" / "python"), "-c", "import siwe, x402.extensions.sign_in_with_x, httpx"],
        )
        building.rename(target)
    finally:
        shutil.rmtree(building, ignore_errors=True)


def siwx_python() -> Path:
    """The Python of the SIWx client's virtualenv, built first if the current lock has none yet."""
    digest = _lock_digest()
    target = CACHE_DIR / f"{VENV_PREFIX}{digest}"
    python = target / "bin" / "python"
    if python.exists():
        return python
    CACHE_DIR.mkdir(exist_ok=True)
    with open(CACHE_DIR / f"{VENV_PREFIX}{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed, or the process dies
        if not python.exists():  # another process may have built it while we waited
            _build(target, digest)
    return python
