// Pays several calls in a row with the official v2 npm client, batch-settlement scheme
// (@x402/fetch + @x402/evm/batch-settlement/client, 2.27, unmodified, defaults).
//
//   X402_URL, X402_PAYER_KEY, X402_BODY, X402_RPC_URL, X402_CALLS (default 1) in the environment;
//   X402_REFUND_URL (optional): then the client's cooperative refund of the channel, asked there
//
// One BatchSettlementEvmScheme (its default in-memory channel storage, salt zero) is registered for
// eip155:* with wrapFetchWithPaymentFromConfig; its signer is a viem local account composed with a
// public client on X402_RPC_URL (toClientEvmSigner), so the client can read channels(id) to recover a
// channel it does not know and to check a corrective 402. The same paying fetch POSTs BODY to URL
// X402_CALLS times, one after the other. Every request the wrapper sends is recorded (status, and
// for a paid one the payload's type and voucher amount), so a test can tell a deposit from a voucher
// and see a corrective 402 answered. Prints one JSON line:
//   {calls: [{status, body, paymentResponseHeader, paymentResponse, exchanges: [...]}], channel, refund}
// where body is the answer parsed as JSON (or its raw text), paymentResponse the PAYMENT-RESPONSE
// header as the SDK decodes it, exchanges the wire requests of that call
// ({status, paid, type?, maxClaimableAmount?, error?}) and channel the client's own record of the
// channel after the last call, refund the settle response of the refund (null when not asked). On a
// client-side error it prints {error} and exits 1.

import { toClientEvmSigner } from "@x402/evm";
import { BatchSettlementEvmScheme, InMemoryClientChannelStorage } from "@x402/evm/batch-settlement/client";
import { decodePaymentResponseHeader, wrapFetchWithPaymentFromConfig } from "@x402/fetch";
import { createPublicClient, http } from "viem";
import { privateKeyToAccount } from "viem/accounts";

const env = process.env;

function emit(line, code) {
  process.stdout.write(JSON.stringify(line) + "\n");
  process.exitCode = code;
}

function decodeJsonBase64(value) {
  return JSON.parse(Buffer.from(value, "base64").toString("utf8"));
}

async function main() {
  const { X402_URL: url, X402_PAYER_KEY: key, X402_BODY: bodyText, X402_RPC_URL: rpcUrl } = env;
  if (!url || !key || !bodyText || !rpcUrl) {
    emit({ error: "set X402_URL, X402_PAYER_KEY, X402_BODY and X402_RPC_URL" }, 2);
    return;
  }
  const calls = Number(env.X402_CALLS || "1");
  const account = privateKeyToAccount(key);
  const signer = toClientEvmSigner(account, createPublicClient({ transport: http(rpcUrl) }));
  const storage = new InMemoryClientChannelStorage();
  const scheme = new BatchSettlementEvmScheme(signer, { storage });

  let exchanges = [];
  const recordingFetch = async (input, init) => {
    const request = new Request(input, init);
    const header = request.headers.get("PAYMENT-SIGNATURE");
    const response = await fetch(request);
    const exchange = { status: response.status, paid: Boolean(header) };
    if (header) {
      const payload = decodeJsonBase64(header).payload;
      exchange.type = payload.type;
      exchange.maxClaimableAmount = payload.voucher?.maxClaimableAmount;
      if (payload.deposit) exchange.depositAmount = payload.deposit.amount;
    }
    const required = response.headers.get("PAYMENT-REQUIRED");
    if (response.status === 402 && required) exchange.error = decodeJsonBase64(required).error ?? null;
    exchanges.push(exchange);
    return response;
  };
  const payingFetch = wrapFetchWithPaymentFromConfig(recordingFetch, {
    schemes: [{ network: "eip155:*", client: scheme }],
  });

  const results = [];
  for (let index = 0; index < calls; index += 1) {
    exchanges = [];
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
    results.push({
      status: response.status,
      body,
      paymentResponseHeader: header,
      paymentResponse: header ? decodePaymentResponseHeader(header) : null,
      exchanges,
    });
  }
  const channels = [...storage.channels.entries()].map(([id, ctx]) => ({ id, ...ctx }));
  const refund = env.X402_REFUND_URL ? await scheme.refund(env.X402_REFUND_URL) : null;
  emit({ calls: results, channel: channels[0] ?? null, refund }, 0);
}

main().catch((error) => emit({ error: String(error?.stack || error) }, 1));
