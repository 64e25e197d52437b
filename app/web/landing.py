"""``GET /``: a small, free landing page for people, and a JSON index for programs.

A browser (``Accept: text/html``) gets one server-rendered page — the models on sale with their
price rule, how to pay with two copy-paste snippets, and what the proxy does and cannot prove —
with inline CSS only: no script, no external asset, so a strict Content-Security-Policy holds and
nothing the page loads can be swapped under a buyer. Everything else gets a JSON index. Neither
touches the gate or the model host: looking is free.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from markupsafe import escape

from app.amounts import amount_text
from app.catalog import Model, quote_for
from app.settings import Settings
from app.web import services

bp = Blueprint("landing", __name__)

INDEX = {"name": "x402-tee-proxy", "models": "/v1/models", "discovery": "/.well-known/x402"}
HTML_TYPES = ("text/html", "application/xhtml+xml")
NETWORK_NAMES = {"base": "Base", "base-sepolia": "Base Sepolia"}
EXAMPLE_MAX_TOKENS = 64
# No script may run and nothing may load from elsewhere; the inline <style> is the one exception.
CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'none'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)

STYLE = """
:root { color-scheme: light; --ink: #1c2330; --mute: #5b6473; --line: #dde2ea; --tee: #0a7a4f; }
* { box-sizing: border-box; }
body { margin: 0; font: 16px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--ink);
  background: #f6f8fb; }
main { max-width: 940px; margin: 0 auto; padding: 32px 20px 48px; }
h1 { margin: 0 0 4px; font-size: 28px; }
h2 { margin: 36px 0 12px; font-size: 20px; border-bottom: 1px solid var(--line); padding-bottom: 6px; }
h3 { margin: 0; font-size: 17px; }
.lead { color: var(--mute); margin: 0; }
.model { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 16px 18px;
  margin: 0 0 12px; }
.model p { margin: 6px 0 10px; color: var(--mute); }
.badge { display: inline-block; font-size: 12px; font-weight: 700; letter-spacing: .04em;
  border-radius: 4px; padding: 1px 7px; margin-left: 8px; vertical-align: 2px; }
.badge.tee { background: var(--tee); color: #fff; }
.badge.plain { background: #e6e9ef; color: var(--mute); }
.badge.stated { background: #fff4d6; color: #6b4e00; }
.badge a { color: inherit; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 4px 16px; margin: 0; }
dt { color: var(--mute); }
dd { margin: 0; }
code, pre { font: 13.5px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
pre { background: #0f1623; color: #e8edf5; padding: 14px 16px; border-radius: 8px; overflow-x: auto;
  white-space: pre; }
.note { color: var(--mute); font-size: 14px; }
ol li { margin-bottom: 8px; }
footer { margin-top: 40px; color: var(--mute); font-size: 14px; }
a { color: #1f5fbf; }
"""


def usdc_text(amount: int) -> str:
    """Atomic units as a USDC amount a person reads: exact, at least two decimals, no float."""
    return amount_text(amount, min_places=2)


def _base_url(settings: Settings) -> str:
    return settings.public_url or request.host_url.rstrip("/")


def _wants_html() -> bool:
    """HTML only for a client that names it (browsers do); ``*/*``, JSON or no Accept get the index."""
    accept = request.accept_mimetypes
    html = max((q for mime, q in accept if mime in HTML_TYPES), default=0)
    as_json = max((q for mime, q in accept if mime == "application/json"), default=0)
    return html > 0 and html >= as_json


def _price_rows(model: Model) -> list[tuple[str, str]]:
    """The price rule of one model, as (label, text) rows."""
    if model.pricing == "per_call":
        rows = [("per call", f"{usdc_text(max(model.price, model.floor))} USDC")]
    else:
        rows = [
            ("input", f"{usdc_text(model.input_per_million)} USDC per million tokens"),
            ("output", f"{usdc_text(model.output_per_million)} USDC per million tokens"),
            (
                "max_tokens",
                f"charged in full per answer; default {model.default_max_tokens}, "
                f"at most {model.max_tokens_cap}",
            ),
            ("context", f"{model.context_length} tokens; at most {model.max_choices} answers per call"),
        ]
    rows.append(("minimum", f"{usdc_text(model.floor)} USDC per call"))
    return rows


def _model_card(model: Model) -> str:
    if model.attested:
        badge = (
            '<span class="badge tee" title="AMD SEV-SNP evidence verified by this proxy before each sale">'
            f'<a href="/v1/attestation/{escape(model.name)}">TEE, verified</a></span>'
        )
    elif model.tee:
        badge = (
            '<span class="badge stated" title="a confidential VM on its operator&#39;s word">'
            "TEE (operator&#39;s statement)</span>"
        )
    else:
        badge = '<span class="badge plain" title="not a confidential VM">no TEE</span>'
    rows = "".join(f"<dt>{escape(label)}</dt><dd>{escape(text)}</dd>" for label, text in _price_rows(model))
    return (
        f'<article class="model"><h3><code>{escape(model.name)}</code>{badge}</h3>'
        f"<p>{escape(model.description)}</p><dl>{rows}</dl></article>"
    )


def _example_body(model_name: str) -> dict[str, Any]:
    return {
        "model": model_name,
        "messages": [{"role": "user", "content": "Hello from a wallet!"}],
        "max_tokens": EXAMPLE_MAX_TOKENS,
    }


def python_snippet(base_url: str, model_name: str) -> str:
    """The official PyPI client, as tested in tests/interop: it signs and retries the 402 itself."""
    example = _example_body(model_name)
    return f"""# pip install "x402[evm,requests]"
import os

import requests
from eth_account import Account
from x402 import x402ClientSync
from x402.http.clients import wrapRequestsWithPayment
from x402.mechanisms.evm import EthAccountSigner
from x402.mechanisms.evm.exact import register_exact_evm_client

URL = {json.dumps(base_url)}
KEY = os.environ["PAYER_KEY"]  # a wallet holding USDC; it needs no ETH

client = x402ClientSync()  # by default it pays known assets only, at most $1 a call
register_exact_evm_client(client, EthAccountSigner(Account.from_key(KEY)))
session = wrapRequestsWithPayment(requests.Session(), client)
body = {{
    "model": {json.dumps(example["model"])},
    "messages": {json.dumps(example["messages"])},
    "max_tokens": {example["max_tokens"]},
}}
answer = session.post(URL + "/v1/chat/completions", json=body)
answer.raise_for_status()
print(answer.json()["choices"][0]["message"]["content"])
"""


def cli_snippet(base_url: str, model_name: str) -> str:
    """This project's own payer; ``--max-amount`` caps what it will sign. Shell-quoted, so a
    catalog name can't break the command."""
    url = shlex.quote(base_url + "/v1/chat/completions")
    body = shlex.quote(json.dumps(_example_body(model_name)))
    lines = [f'x402-proxy pay {url} --key "$PAYER_KEY"', f"  --json {body}", "  --max-amount 0.10"]
    return " \\\n".join(lines) + "\n"


def _network_text(settings: Settings) -> str:
    network = settings.network
    name = NETWORK_NAMES.get(network.v1_name, network.v1_name)
    asset = "USDC" if settings.asset.lower() == network.usdc.lower() else "token"
    return f"{asset} ({settings.asset}) on {name} ({network.caip2})"


def render(settings: Settings, models: list[Model], base_url: str) -> str:
    """The whole page; every value from settings, catalog or request is escaped here."""
    example = models[0].name if models else "MODEL"
    cards = "".join(_model_card(m) for m in models) or "<p>No model is on sale right now.</p>"
    example_price = ""
    if models:
        amount = quote_for(models[0], "chat", _example_body(example)).amount
        example_price = f"The example call below costs {usdc_text(amount)} USDC."
    example_price = escape(example_price)
    token_rule = ""
    if any(m.pricing == "per_token" for m in models):
        token_rule = (
            " Input tokens are counted as the UTF-8 bytes of every text the model reads (tools"
            " included: an upper bound for any byte-level tokenizer) plus the chat template's tokens,"
            " and, paid with <code>exact</code>, the requested <code>max_tokens</code> is charged for"
            " each of the <code>n</code> answers, whether or not it is used."
        )
    upto_rule = ""
    if "upto" in settings.schemes and not settings.facilitator_url:
        upto_rule = (
            " Or pay with the <code>upto</code> scheme: sign a Permit2 permit for that amount as a"
            " maximum, and the proxy charges only what the model reports it used (the wallet approves"
            " Permit2 once, or adds an EIP-2612 permit to its payment); a streamed answer is charged"
            " at its end."
        )
    chain = escape(NETWORK_NAMES.get(settings.network.v1_name, settings.network.v1_name))
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>x402-tee-proxy: confidential models, paid per call</title>
<style>{STYLE}</style>
</head>
<body>
<main>
<header>
<h1>x402-tee-proxy</h1>
<p class="lead">OpenAI-compatible models running in confidential VMs, paid per call in USDC with
<a href="https://x402.org">x402</a>. No account and no API key: a wallet is enough.</p>
</header>

<section id="models">
<h2>Models on sale</h2>
{cards}
<p class="note">Paid in {escape(_network_text(settings))}.{token_rule} A price is rounded up to the
next atomic unit (0.000001 USDC) and never below the minimum. {example_price}
Machine-readable: <a href="/v1/models">/v1/models</a>.</p>
</section>

<section id="pay">
<h2>How to pay</h2>
<p>Send an ordinary OpenAI request to <code>{escape(base_url)}/v1/chat/completions</code> (or
<code>/v1/completions</code>). The proxy answers <code>402 Payment Required</code> with the price; an
x402 client signs a USDC transfer authorization (EIP-3009) for exactly that amount and sends the
request again. Your wallet needs USDC only: the proxy pays the gas.{upto_rule}</p>
<h3>Python, with the official x402 client</h3>
<pre><code>{escape(python_snippet(base_url, example))}</code></pre>
<h3>Command line, with this project's <code>x402-proxy</code></h3>
<pre><code>{escape(cli_snippet(base_url, example))}</code></pre>
</section>

<section id="trust">
<h2>What you are trusting</h2>
<ol>
<li>The proxy checks each payment against the chain and settles it on {chain}
before it releases the answer; a refused payment moves no money and gets no answer.</li>
<li>Models marked <em>TEE, verified</em> run in an AMD SEV-SNP confidential VM whose attestation
the proxy verifies to AMD's root before it quotes a price, and your request reaches that VM only over
a connection pinned to the certificate its report is bound to. Each answer names the evidence
(<code>X-TEE-Evidence</code>); fetch it at <code>/v1/attestation/&lt;model&gt;</code> and verify it
yourself with <code>x402-proxy verify-evidence</code>.</li>
<li>Models marked <em>TEE (operator's statement)</em> run in a confidential VM on the operator's word
only: nothing here checks it.</li>
<li>The proxy never logs or stores prompts or completions, though it does read them in transit to
forward them.</li>
</ol>
<p class="note">What it cannot prove to you: the proxy itself is not in the enclave, so it reads your
prompt and the answer on the way, and the no-logging promise above is the operator's word; the
measurements it accepts are the operator's choice (compare them with the ones the model's publisher
signs). To take the proxy out of the path, talk to the enclave directly.</p>
</section>

<footer>Free endpoints: <a href="/v1/models">/v1/models</a> ·
<a href="/.well-known/x402">/.well-known/x402</a> · <a href="/healthz">/healthz</a></footer>
</main>
</body>
</html>
"""


@bp.get("/")
def index() -> Response:
    """Free: content negotiation only; no gate, no upstream."""
    settings: Settings = current_app.config["X402_SETTINGS"]
    if not _wants_html():
        response = jsonify(INDEX)
    else:
        page = render(settings, services().catalog.listed(), _base_url(settings))
        response = Response(page, mimetype="text/html")
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Vary"] = "Accept"
    # Without X402_PUBLIC_URL the snippets quote the request's Host: never let a cache keep them.
    response.headers["Cache-Control"] = "public, max-age=300" if settings.public_url else "no-store"
    return response


def init_app(app: Flask) -> None:
    """Register the landing blueprint: ``GET /`` (free)."""
    app.register_blueprint(bp)
