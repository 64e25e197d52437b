// One chat completion through the official `openai` npm package, paid by @x402/fetch + @x402/evm.
//
//   node openai_chat.mjs BASE_URL KEY BODY_JSON      (or X402_URL, X402_PAYER_KEY, X402_BODY)
//
// BASE_URL is the proxy's `/v1`. The OpenAI client gets the paying fetch as its `fetch` option and
// sends BODY_JSON as `chat.completions.create` parameters (streamed when the body says stream: true).
// Prints one JSON line: {status, paymentResponse, choices, content}, where choices counts the answers
// (distinct choice indexes when streamed) and paymentResponse is PAYMENT-RESPONSE as the x402 SDK
// decodes it; an error answer the SDK raises prints {status, apiError}. Any other error prints
// {error} and exits 1.

import { ExactEvmScheme } from "@x402/evm";
import { decodePaymentResponseHeader, wrapFetchWithPaymentFromConfig } from "@x402/fetch";
import OpenAI from "openai";
import { privateKeyToAccount } from "viem/accounts";

const [baseURL = process.env.X402_URL, key = process.env.X402_PAYER_KEY, bodyText = process.env.X402_BODY] =
  process.argv.slice(2);

function emit(line, code) {
  process.stdout.write(JSON.stringify(line) + "\n");
  process.exitCode = code;
}

async function main() {
  if (!baseURL || !key || !bodyText) {
    emit({ error: "usage: openai_chat.mjs BASE_URL KEY BODY_JSON" }, 2);
    return;
  }
  const payingFetch = wrapFetchWithPaymentFromConfig(fetch, {
    schemes: [{ network: "eip155:*", client: new ExactEvmScheme(privateKeyToAccount(key)) }],
  });
  // No API key is needed by the proxy; the SDK insists on one, and the proxy never forwards it.
  // The SDK's default retries (2) stay on: a paid error answer must stop them by itself.
  const openai = new OpenAI({ baseURL, apiKey: "no-key-needed", fetch: payingFetch });
  const body = JSON.parse(bodyText);
  let data, response;
  try {
    ({ data, response } = await openai.chat.completions.create(body).withResponse());
  } catch (error) {
    if (!(error instanceof OpenAI.APIError)) throw error;
    emit({ status: error.status, apiError: error.error ?? null, paymentResponse: null, choices: 0 }, 0);
    return;
  }
  const header = response.headers.get("PAYMENT-RESPONSE");
  const indexes = new Set();
  let content = "";
  if (body.stream) {
    for await (const chunk of data) {
      for (const choice of chunk.choices) {
        indexes.add(choice.index);
        content += choice.delta?.content ?? "";
      }
    }
  } else {
    for (const choice of data.choices) indexes.add(choice.index);
    content = data.choices[0]?.message?.content ?? "";
  }
  emit(
    {
      status: response.status,
      paymentResponse: header ? decodePaymentResponseHeader(header) : null,
      choices: indexes.size,
      content,
    },
    0,
  );
}

main().catch((error) => emit({ error: String(error?.stack || error) }, 1));
