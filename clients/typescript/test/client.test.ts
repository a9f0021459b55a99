// Runs against a live tokenizer service at $PAGODA_TARGET (tests/test_compose.py starts one and runs
// `npm test` with it set); without it every test is skipped.

import assert from "node:assert/strict";
import { after, describe, test } from "node:test";

import * as grpc from "@grpc/grpc-js";

import { PagodaClient, PagodaError } from "../src/client.js";

const target = process.env.PAGODA_TARGET;

describe("PagodaClient", { skip: target ? false : "PAGODA_TARGET is not set" }, () => {
  const client = new PagodaClient(target);
  after(() => client.close());

  test("streams a chat answer in several deltas", async () => {
    const stream = client.chat([{ role: "user", content: "What is the capital of France?" }], {
      temperature: 0,
      maxTokens: 32,
    });
    const deltas: string[] = [];
    for await (const delta of stream) deltas.push(delta);
    assert.ok(deltas.length > 1, `one delta only: ${JSON.stringify(deltas)}`);
    assert.equal(deltas.join(""), stream.text);
    assert.match(stream.text, /Paris/);
    assert.equal(stream.finishReason, "stop");
    assert.ok(stream.usage && stream.usage.completionTokens > 1 && stream.usage.promptTokens > 0);
  });

  test("generates until max tokens", async () => {
    const stream = client.generate("Once upon a time", { maxTokens: 5, temperature: 0.8, seed: 1 });
    const text = await stream.read();
    assert.ok(text.length > 0);
    assert.equal(stream.finishReason, "length");
    assert.equal(stream.usage?.completionTokens, 5);
  });

  test("logitBias and allowedTokenIds reach the engine", async () => {
    // The last token of "Hello world" forced at every position; EOS is not allowed, so both run to maxTokens.
    const forced = (await client.tokenize("Hello world")).tokenIds.at(-1) as number;
    const biased = client.generate("Once upon a time", { maxTokens: 4, temperature: 0, logitBias: { [forced]: 100 } });
    const text = await biased.read();
    const unit = text.slice(0, text.length / 4);
    assert.ok(unit.length > 0 && unit.repeat(4) === text, `not one token four times: ${JSON.stringify(text)}`);
    const restricted = client.generate("Once upon a time", { maxTokens: 4, seed: 3, allowedTokenIds: [forced] });
    assert.equal(await restricted.read(), text);
    assert.equal(restricted.finishReason, "length");
    const bad = client.generate("Hello", { logitBias: { [forced]: 101 } });
    await assert.rejects(bad.read(), (error: unknown) => {
      assert.ok(error instanceof PagodaError);
      assert.equal(error.code, grpc.status.INVALID_ARGUMENT);
      assert.match(error.details, /logit_bias/);
      return true;
    });
  });

  test("structuredOutput holds the answer to a regex, a JSON schema or a choice", async () => {
    const regex = { regex: " \\d{3}-\\d{4}" };
    const phone = await client.generate("Call me at", { maxTokens: 20, seed: 5, structuredOutput: regex }).read();
    assert.match(phone, /^ \d{3}-\d{4}$/);
    const schema = { type: "object", properties: { ok: { type: "boolean" } }, required: ["ok"] };
    const options = { maxTokens: 20, temperature: 0, structuredOutput: { jsonSchema: schema } };
    const stream = client.generate("Status:", options);
    assert.equal(typeof JSON.parse(await stream.read()).ok, "boolean");
    assert.equal(stream.finishReason, "stop");
    const yesNo = { choice: ["yes", "no"] };
    const choice = await client.generate("Yes or no?", { maxTokens: 5, structuredOutput: yesNo }).read();
    assert.ok(["yes", "no"].includes(choice), choice);
    assert.throws(() => client.generate("hi", { structuredOutput: { regex: "a", jsonObject: true } }), /exactly one/);
  });

  test("logprobs and promptLogprobs come with the tokens", async () => {
    const prompt = "The sky is";
    const promptIds = (await client.tokenize(prompt)).tokenIds;
    const stream = client.generate(prompt, { maxTokens: 4, temperature: 0, logprobs: 2, promptLogprobs: 1 });
    await stream.read();
    assert.equal(stream.usage?.completionTokens, 4);
    assert.equal(stream.tokenIds.length, 4);
    // One entry per generated token, the sampled one among the top alternatives (greedy: the most likely).
    assert.deepEqual(stream.logprobs.map((entry) => entry.sampled.tokenId), stream.tokenIds);
    for (const entry of stream.logprobs) {
      assert.ok(entry.sampled.logprob <= 0 && entry.sampled.token.length > 0, JSON.stringify(entry));
      assert.equal(entry.top.length, 2);
      assert.ok(entry.top.some((top) => top.tokenId === entry.sampled.tokenId), JSON.stringify(entry));
    }
    // One entry per prompt token from the second on.
    assert.ok(promptIds.length >= 2);
    assert.deepEqual(stream.promptLogprobs.map((entry) => entry.sampled.tokenId), promptIds.slice(1));
    assert.ok(stream.promptLogprobs.every((entry) => entry.sampled.logprob <= 0 && entry.top.length === 1));
    // 0: the sampled token's logprob only; unset: none at all.
    const bare = client.generate(prompt, { maxTokens: 2, temperature: 0, logprobs: 0 });
    await bare.read();
    assert.equal(bare.logprobs.length, 2);
    assert.ok(bare.logprobs.every((entry) => entry.top.length === 0));
    assert.deepEqual(bare.promptLogprobs, []);
    const plain = client.generate(prompt, { maxTokens: 2, temperature: 0 });
    await plain.read();
    assert.deepEqual([plain.logprobs, plain.promptLogprobs], [[], []]);
    // Past the engine's cap (ModelInfo.maxLogprobs): INVALID_ARGUMENT naming the field.
    const info = (await client.modelInfo()) as { model: { maxLogprobs: number } };
    const tooMany = client.generate(prompt, { maxTokens: 1, promptLogprobs: info.model.maxLogprobs + 1 });
    await assert.rejects(tooMany.read(), (error: unknown) => {
      assert.ok(error instanceof PagodaError);
      assert.equal(error.code, grpc.status.INVALID_ARGUMENT);
      assert.match(error.details, /prompt_logprobs/);
      return true;
    });
  });

  test("tokenizes and reports the model", async () => {
    const tokens = await client.tokenize("Hello world");
    assert.ok(tokens.tokenIds.length >= 2);
    assert.equal(tokens.tokens.length, tokens.tokenIds.length);
    const info = (await client.modelInfo()) as { model: { modelName: string }; hasChatTemplate: boolean };
    assert.ok(info.model.modelName.length > 0);
    assert.equal(info.hasChatTemplate, true);
  });

  test("a bad request is a PagodaError with INVALID_ARGUMENT", async () => {
    const stream = client.generate("Hello", { stop: [""] });
    await assert.rejects(stream.read(), (error: unknown) => {
      assert.ok(error instanceof PagodaError);
      assert.equal(error.code, grpc.status.INVALID_ARGUMENT);
      return true;
    });
  });
});
