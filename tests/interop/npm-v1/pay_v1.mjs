// Pays one call with the legacy v1 npm client (x402-fetch 1.2.0) and a viem wallet client on Base.
//
//   node pay_v1.mjs URL [KEY [BODY_JSON [MAX_ATOMIC]]]   (or X402_URL, X402_PAYER_KEY, X402_BODY, X402_MAX_ATOMIC)
//
// POSTs BODY_JSON to URL through wrapFetchWithPayment(fetch, walletClient, maxValue), which reads the v1
// 402 body, signs an EIP-3009 authorization and retries with X-PAYMENT. Prints one JSON line:
//   {status, body, paymentResponseHeader, paymentResponse}
// (paymentResponse: X-PAYMENT-RESPONSE as the SDK itself decodes it, or null). On a client-side error
// it prints {error} and exits 1. The wallet's transport refuses every RPC call: the client must only sign.

import { custom, createWalletClient } from "viem";
import { privateKeyToAccount } from "viem/accounts";
import { base } from "viem/chains";
import { decodeXPaymentResponse, wrapFetchWithPayment } from "x402-fetch";

const args = process.argv.slice(2);
const url = args[0] ?? process.env.X402_URL;
const key = args[1] ?? process.env.X402_PAYER_KEY;
const bodyText = args[2] ?? process.env.X402_BODY;
const maxAtomic = args[3] ?? process.env.X402_MAX_ATOMIC ?? "100000"; // 0.10 USDC, the client's own default

function emit(line, code) {
  process.stdout.write(JSON.stringify(line) + "\n");
  process.exitCode = code;
}

async function main() {
  if (!url || !key || !bodyText) {
    emit({ error: "usage: pay_v1.mjs URL KEY BODY_JSON [MAX_ATOMIC]" }, 2);
    return;
  }
  const noRpc = custom({
    async request({ method }) {
      throw new Error(`the payer made an RPC call (${method}); it should only sign`);
    },
  });
  const walletClient = createWalletClient({ account: privateKeyToAccount(key), chain: base, transport: noRpc });
  const payingFetch = wrapFetchWithPayment(fetch, walletClient, BigInt(maxAtomic));
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
  const header = response.headers.get("X-PAYMENT-RESPONSE");
  emit(
    {
      status: response.status,
      body,
      paymentResponseHeader: header,
      paymentResponse: header ? decodeXPaymentResponse(header) : null,
    },
    0,
  );
}

main().catch((error) => emit({ error: String(error?.stack || error) }, 1));
