// Streams a chat answer to stdout:  node dist/examples/chat.js "What is the capital of France?"
// The service is $PAGODA_TARGET (default localhost:50052). Greedy, so the same question gets the same answer.

import { DEFAULT_TARGET, PagodaClient } from "../src/client.js";

const question = process.argv[2] ?? "What is the capital of France?";
const client = new PagodaClient(process.env.PAGODA_TARGET ?? DEFAULT_TARGET);
try {
  const stream = client.chat([{ role: "user", content: question }], { temperature: 0, maxTokens: 128 });
  for await (const delta of stream) {
    process.stdout.write(delta);
  }
  process.stdout.write("\n");
  console.error(`[${stream.usage?.completionTokens} tokens, finish reason: ${stream.finishReason}]`);
} finally {
  client.close();
}
