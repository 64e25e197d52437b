"""``GET /``: a real browser sees the landing page; programs get the JSON index; nothing is paid.

The page is checked as headless Chromium renders it (``--dump-dom`` and ``--screenshot``), because
what matters is what a buyer's browser shows, not the string the view returns. Chromium is the
Debian package ``chromium``: without it the browser test is skipped on a workstation and fails under
CI (``CI`` set), since ``.ci/run`` is expected to install it. Neither the page nor the index may reach
the model host; the copy-paste snippets, run as printed, must actually pay.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import pytest
import requests

from app import create_checked_app
from app.devnet.standin import StandinModel
from app.settings import Settings
from tests.support import Proxy, serve

pytestmark = pytest.mark.integration

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_TIMEOUT = 60  # seconds per browser run
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
ARTIFACTS_ENV = "X402_TEST_ARTIFACTS"
WINDOW = (1200, 1600)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MIN_SCREENSHOT_BYTES = 10_000  # a blank 1200×1600 page compresses to a few kB
INDEX = {"name": "x402-tee-proxy", "models": "/v1/models", "discovery": "/.well-known/x402"}
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
SNIPPET_RE = re.compile(r"<pre><code>(.*?)</code></pre>", re.S)


def chromium() -> Path:
    """The browser, or a skip on a workstation without it; under CI its absence is a failure."""
    if CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    if os.environ.get("CI"):
        pytest.fail(
            f"{CHROMIUM} is missing but CI is set: .ci/run must install it "
            "(apt-get update -qq && apt-get install -y -qq chromium)"
        )
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium); the landing page was not rendered")


def run_chromium(browser: Path, profile: Path, *args: str) -> tuple[bytes, float]:
    """One headless run in its own process group, killed whole if it outlives the timeout (its
    helper processes would otherwise keep the pipes open). Returns stdout and the seconds taken."""
    command = [str(browser), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    started = time.monotonic()
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        out, err = process.communicate(timeout=CHROMIUM_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(
            f"chromium did not finish within {CHROMIUM_TIMEOUT} s: {err.decode(errors='replace')[-2000:]}"
        )
    elapsed = time.monotonic() - started
    assert process.returncode == 0, (
        f"chromium exited {process.returncode}: {err.decode(errors='replace')[-2000:]}"
    )
    return out, elapsed


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from the IHDR chunk, which a PNG must start with."""
    assert data[:8] == PNG_MAGIC, "the screenshot is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def keep_artifact(screenshot: Path) -> None:
    """Copy the screenshot out of tmp_path only when asked to (it is never committed)."""
    target = os.environ.get(ARTIFACTS_ENV)
    if not target:
        return
    directory = Path(target)
    assert directory.is_dir(), f"{ARTIFACTS_ENV}={target} is not a directory"
    shutil.copyfile(screenshot, directory / screenshot.name)


def snippets(page: str) -> list[str]:
    """The copy-paste blocks as a reader copies them: unescaped text of each <pre><code>."""
    return [html.unescape(block) for block in SNIPPET_RE.findall(page)]


def test_chromium_renders_the_landing_page(proxy: Proxy, standin: StandinModel, tmp_path: Path) -> None:
    browser = chromium()
    url = proxy.url + "/"
    screenshot = tmp_path / "landing.png"
    window = f"--window-size={WINDOW[0]},{WINDOW[1]}"

    _, shot_seconds = run_chromium(
        browser, tmp_path / "profile-shot", f"--screenshot={screenshot}", window, url
    )
    dom_bytes, dom_seconds = run_chromium(browser, tmp_path / "profile-dom", "--dump-dom", url)
    print(f"chromium: screenshot {shot_seconds:.1f} s, dump-dom {dom_seconds:.1f} s")

    dom = dom_bytes.decode("utf-8")
    assert "<code>hermes-3-8b-tee</code>" in dom
    assert "TEE (operator's statement)</span>" in dom  # the packaged catalog attests nothing
    assert "0.20 USDC per million tokens" in dom and "0.60 USDC per million tokens" in dom
    assert "0.001 USDC per call" in dom  # the floor
    assert "on Base (eip155:8453)" in dom
    python_code, shell = snippets(dom)
    assert 'pip install "x402[evm,requests]"' in python_code
    assert "register_exact_evm_client(client, EthAccountSigner(Account.from_key(KEY)))" in python_code
    assert "wrapRequestsWithPayment(requests.Session(), client)" in python_code
    assert f'URL = "{proxy.url}"' in python_code  # from the request: no X402_PUBLIC_URL here
    assert shell.startswith(f'x402-proxy pay {proxy.url}/v1/chat/completions --key "$PAYER_KEY"')
    assert "<script" not in dom.lower()

    data = screenshot.read_bytes()
    assert png_size(data) == WINDOW
    assert len(data) > MIN_SCREENSHOT_BYTES, f"screenshot is only {len(data)} bytes"
    keep_artifact(screenshot)
    assert standin.received == []  # looking is free: the model host saw nothing


def test_programs_get_the_json_index(proxy: Proxy, standin: StandinModel) -> None:
    for accept in ("application/json", "*/*", None, "text/html;q=0.5, application/json"):
        response = requests.get(proxy.url + "/", headers={"Accept": accept}, timeout=10)

        assert response.status_code == 200, accept
        assert response.headers["Content-Type"] == "application/json", accept
        assert response.json() == INDEX
        assert "Accept" in response.headers["Vary"]
    assert standin.received == []


def test_browsers_get_a_self_contained_page(proxy: Proxy, standin: StandinModel) -> None:
    response = requests.get(proxy.url + "/", headers={"Accept": BROWSER_ACCEPT}, timeout=10)

    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    assert response.headers["Cache-Control"] == "no-store"  # the snippets quote the request's Host
    page = response.text.lower()
    assert "<script" not in page and "<link" not in page and " src=" not in page
    head = requests.head(proxy.url + "/", headers={"Accept": BROWSER_ACCEPT}, timeout=10)
    assert head.status_code == 200 and head.content == b""
    assert standin.received == []


HOSTILE_CATALOG = """
[models."hermes-3-8b-tee"]
description = "<script>alert(1)</script> & \\"friends\\""
tee = true
pricing = "per_call"
price = 2500
floor = 1000

[models."plain"]
description = "not in a TEE"
pricing = "per_call"
price = 1
"""


def test_catalog_text_is_escaped_and_the_public_url_is_used(
    settings: Settings, standin: StandinModel, tmp_path: Path
) -> None:
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(HOSTILE_CATALOG, encoding="utf-8")
    server = serve(
        create_checked_app(
            settings.with_overrides(catalog_path=catalog, public_url="https://pay.example.org")
        )
    )
    try:
        url = f"http://127.0.0.1:{server.server_port}/"
        response = requests.get(url, headers={"Accept": BROWSER_ACCEPT}, timeout=10)
    finally:
        server.shutdown()

    page = response.text
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &#34;friends&#34;" in page
    assert "0.0025 USDC" in page  # per call, in dollars
    assert "not in a TEE" not in page  # TEE-only: not on sale, not shown
    python_code, shell = snippets(page)
    assert 'URL = "https://pay.example.org"' in python_code
    assert "x402-proxy pay https://pay.example.org/v1/chat/completions" in shell
    assert response.headers["Cache-Control"] == "public, max-age=300"
    assert standin.received == []


def test_the_snippets_pay_as_printed(proxy: Proxy, standin: StandinModel, tmp_path: Path) -> None:
    """Copy, paste, run: the Python snippet with the official SDK, then the CLI one."""
    page = requests.get(proxy.url + "/", headers={"Accept": BROWSER_ACCEPT}, timeout=10).text
    python_code, shell = snippets(page)
    stated = re.search(r"The example call below costs ([0-9.]+) USDC", page)
    assert stated is not None
    body = {
        "model": "hermes-3-8b-tee",
        "messages": [{"role": "user", "content": "Hello from a wallet!"}],
        "max_tokens": 64,
    }
    price = int(proxy.requirement(body)["amount"])
    assert Decimal(stated.group(1)) * 10**6 == price  # the page states what the 402 asks
    payer_before, payee_before = proxy.balances()
    env = {**os.environ, "PAYER_KEY": proxy.wallets.payer_key}
    # The x402-proxy script pip installed next to this interpreter, importing this checkout's app
    # (an editable install may point at another copy of the repository).
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))

    script = tmp_path / "pay.py"
    script.write_text(python_code, encoding="utf-8")
    ran = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.strip()
    ran = subprocess.run(["bash", "-c", shell], env=env, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert f"paid {Decimal(price) / 10**6:.6f} USDC" in ran.stderr

    payer_after, payee_after = proxy.balances()
    assert (payer_before - payer_after, payee_after - payee_before) == (2 * price, 2 * price)
    assert [r.body["max_tokens"] for r in standin.received] == [64, 64]
