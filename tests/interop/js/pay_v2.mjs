// Pays one call with the official v2 npm client (@x402/fetch + @x402/evm, a viem local account).
//
//   node pay_v2.mjs URL [KEY [BODY_JSON]]       (or X402_URL, X402_PAYER_KEY, X402_BODY in the environment)
//
// POSTs BODY_JSON to URL through wrapFetchWithPaymentFromConfig with one EVM scheme registered,
// X402_SCHEME: "exact" (default; a signed EIP-3009 authorization) or "upto" (a Permit2
// PermitWitnessTransferFrom for the priced maximum, spender x402UptoPermit2Proxy; the payer must have
// approved Permit2 beforehand). Prints one JSON line:
//   {status, body, paymentResponseHeader, paymentResponse}
// where body is the answer parsed as JSON, or its raw text (a stream's SSE) when it is not JSON, and
// paymentResponse is the PAYMENT-RESPONSE header as the SDK itself decodes it (null if absent).
// On a client-side error it prints {error} and exits 1. The client only signs: it makes no RPC call.

import { ExactEvmScheme } from "@x402/evm";
import { UptoEvmScheme } from "@x402/evm/upto/client";
import { decodePaymentResponseHeader, wrapFetchWithPaymentFromConfig } from "@x402/fetch";
import { privateKeyToAccount } from "viem/accounts";

const [url = process.env.X402_URL, key = process.env.X402_PAYER_KEY, bodyText = process.env.X402_BODY] =
  process.argv.slice(2);

const SCHEMES = { exact: (account) => new ExactEvmScheme(account), upto: (account) => new UptoEvmScheme(account) };

function emit(line, code) {
  process.stdout.write(JSON.stringify(line) + "\n");
  process.exitCode = code;
}

async function main() {
  if (!url || !key || !bodyText) {
    emit({ error: "usage: pay_v2.mjs URL KEY BODY_JSON (or X402_URL, X402_PAYER_KEY, X402_BODY)" }, 2);
    return;
  }
  const account = privateKeyToAccount(key);
  const payingFetch = wrapFetchWithPaymentFromConfig(fetch, {
    schemes: [{ network: "eip155:*", client: SCHEMES[process.env.X402_SCHEME || "exact"](account) }],
  });
  const response = await payingFetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: bodyText,
  });
  const text = await response.text();
  let body;
  try {
    body = JSON.parse(text);
  } catch {
    body = text;
  }
  const header = response.headers.get("PAYMENT-RESPONSE");
  emit(
    {
      status: response.status,
      body,
      paymentResponseHeader: header,
      paymentResponse: header ? decodePaymentResponseHeader(header) : null,
    },
    0,
  );
}

main().catch((error) => emit({ error: String(error?.stack || error) }, 1));
