// A small TypeScript client for Pagoda's tokenizer service (pagoda.v1.Tokenizer, the public text API).
//
// The contracts are loaded from the repository's protos/ at run time with @grpc/proto-loader, so there is
// no generated code to keep in step: a field added to a .proto is usable at once (by its camelCase name).
//
//   const client = new PagodaClient("localhost:50052");
//   for await (const delta of client.chat([{ role: "user", content: "Hi!" }], { maxTokens: 64 })) {
//     process.stdout.write(delta);
//   }

import path from "node:path";
import { fileURLToPath } from "node:url";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

// From dist/src/ (the compiled file) up to the repository root; PAGODA_PROTOS overrides it.
const DEFAULT_PROTOS = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../../../protos");

export const DEFAULT_TARGET = "localhost:50052";

export interface ChatMessage {
  role: string;
  content: string;
}

// The common knobs of SamplingParams (engine.proto); unset ones keep the service's defaults.
export interface GenerateOptions {
  maxTokens?: number;
  temperature?: number;
  topP?: number;
  topK?: number;
  seed?: number;
  // Token id -> bias added to its logit, in [-100, 100] (OpenAI's logit_bias).
  logitBias?: Record<number, number>;
  // Only these token ids may be drawn; EOS is not implied (list it to let the answer stop).
  allowedTokenIds?: number[];
  // Each generated token's logprob and its k most likely alternatives (0: the token's only), in
  // TextStream.logprobs; at most ModelInfo.maxLogprobs (the engine's --max-logprobs, 20 by default).
  logprobs?: number;
  // The same for every prompt token from the second on (vLLM's prompt_logprobs), in TextStream.promptLogprobs.
  promptLogprobs?: number;
  // Hold the answer to a regular language (engine.proto's StructuredOutput): set one of its fields.
  structuredOutput?: StructuredOutput;
  // Strings that end the answer; the text is cut before the match.
  stop?: string[];
  // Deadline of the whole stream, in milliseconds.
  timeoutMs?: number;
}

// What the answer must be: exactly one field.
export interface StructuredOutput {
  // A whole match of this regex (Python `re` syntax without backreferences, lookarounds or flags).
  regex?: string;
  // A JSON instance of this JSON Schema (an object, or its JSON text).
  jsonSchema?: object | string;
  // Exactly one of these strings.
  choice?: string[];
  // Any JSON object.
  jsonObject?: boolean;
}

export interface Usage {
  promptTokens: number;
  completionTokens: number;
  cachedPromptTokens: number;
}

// One token's log-probability (pagoda.v1.Logprob).
export interface Logprob {
  tokenId: number;
  // Natural log of its probability under the model's raw distribution (before temperature, penalties,
  // logitBias, allowedTokenIds and the top-k/top-p/min-p filters).
  logprob: number;
  // The token's text decoded on its own (may hold U+FFFD for part of a multi-byte character).
  token: string;
}

// The log-probabilities at one position (pagoda.v1.TokenLogprobs): the sampled (or prompt) token, and the
// `logprobs` (or `promptLogprobs`) most likely tokens, most likely first (may include the sampled one).
export interface TokenLogprobs {
  sampled: Logprob;
  top: Logprob[];
}

export interface ClientOptions {
  // Default: insecure (plain TCP). grpc.credentials.createSsl() for TLS.
  credentials?: grpc.ChannelCredentials;
  // Sent as "authorization: Bearer <token>" on every call.
  token?: string;
  // Where pagoda/v1/*.proto live (default: $PAGODA_PROTOS, else the repository's protos/).
  protosDir?: string;
}

// A failed call: `code` is the gRPC status (grpc.status.INVALID_ARGUMENT, UNAVAILABLE, ...).
export class PagodaError extends Error {
  constructor(
    readonly code: grpc.status,
    readonly details: string,
  ) {
    super(`${grpc.status[code]}: ${details}`);
    this.name = "PagodaError";
  }
}

// The wire messages as proto-loader decodes them (camelCase fields, enums as their names).
interface TextGenerateResponse {
  requestId: string;
  text: string;
  tokenIds: number[];
  logprobs: WireTokenLogprobs[];
  finishReason: string;
  usage?: Usage | null;
  promptLogprobs: WireTokenLogprobs[];
}

// A message field is null when unset; the service always sets `sampled`.
interface WireTokenLogprobs {
  sampled?: Logprob | null;
  top: Logprob[];
}

type Callback<T> = (error: grpc.ServiceError | null, value?: T) => void;

interface TokenizerStub extends grpc.Client {
  Generate(request: object, metadata: grpc.Metadata, options: grpc.CallOptions): grpc.ClientReadableStream<TextGenerateResponse>;
  Chat(request: object, metadata: grpc.Metadata, options: grpc.CallOptions): grpc.ClientReadableStream<TextGenerateResponse>;
  Tokenize(request: object, metadata: grpc.Metadata, callback: Callback<TokenizeResponse>): void;
  GetModelInfo(request: object, metadata: grpc.Metadata, callback: Callback<Record<string, unknown>>): void;
}

export interface TokenizeResponse {
  tokenIds: number[];
  tokens: string[];
  prompt: string;
  maxModelLen: number;
}

// The text deltas of one answer, as an async iterable; `text`, `tokenIds`, `logprobs`, `promptLogprobs`,
// `finishReason` and `usage` fill in as it is read.
export class TextStream implements AsyncIterable<string> {
  requestId = "";
  text = "";
  // The generated tokens (the stop token included), as usage.completionTokens counts them.
  tokenIds: number[] = [];
  // With the `logprobs` option: one entry per token of tokenIds, in the same order.
  logprobs: TokenLogprobs[] = [];
  // With the `promptLogprobs` option: one entry per prompt token from the second on (entry i is for prompt
  // token i + 1, so a prompt of P tokens gets P - 1), gathered from the messages up to the first token.
  promptLogprobs: TokenLogprobs[] = [];
  // "stop", "length" or "abort" once the stream has ended.
  finishReason: string | undefined;
  usage: Usage | undefined;

  constructor(private readonly call: grpc.ClientReadableStream<TextGenerateResponse>) {}

  async *[Symbol.asyncIterator](): AsyncIterator<string> {
    try {
      for await (const response of this.call as AsyncIterable<TextGenerateResponse>) {
        this.requestId = response.requestId;
        this.text += response.text;
        this.tokenIds.push(...response.tokenIds);
        this.logprobs.push(...response.logprobs.map(tokenLogprobs));
        this.promptLogprobs.push(...response.promptLogprobs.map(tokenLogprobs));
        if (response.finishReason !== "FINISH_REASON_UNSPECIFIED") {
          this.finishReason = response.finishReason.replace("FINISH_REASON_", "").toLowerCase();
          this.usage = response.usage ?? undefined;
        }
        // Text lags tokens while a character or a possible stop string is incomplete.
        if (response.text) yield response.text;
      }
    } catch (error) {
      throw toPagodaError(error);
    } finally {
      // A `break` out of `for await` lands here with the answer unfinished: stop it on the server too.
      if (this.finishReason === undefined) this.call.cancel();
    }
  }

  // Reads the rest of the answer and returns its whole text.
  async read(): Promise<string> {
    for await (const _ of this);
    return this.text;
  }

  // Stops the generation on the server at once.
  cancel(): void {
    this.call.cancel();
  }
}

export class PagodaClient {
  private readonly stub: TokenizerStub;
  private readonly token: string | undefined;

  constructor(target: string = DEFAULT_TARGET, options: ClientOptions = {}) {
    const protosDir = options.protosDir ?? process.env.PAGODA_PROTOS ?? DEFAULT_PROTOS;
    const definition = protoLoader.loadSync("pagoda/v1/tokenizer.proto", {
      includeDirs: [protosDir],
      longs: Number, // uint64 fields (seed, kv_capacity_tokens) fit a double for any value they take
      enums: String,
      defaults: true,
      oneofs: true,
    });
    const pagoda = grpc.loadPackageDefinition(definition).pagoda as grpc.GrpcObject;
    const Tokenizer = (pagoda.v1 as grpc.GrpcObject).Tokenizer as grpc.ServiceClientConstructor;
    this.stub = new Tokenizer(target, options.credentials ?? grpc.credentials.createInsecure()) as unknown as TokenizerStub;
    this.token = options.token;
  }

  // Completes a text prompt.
  generate(prompt: string, options: GenerateOptions = {}): TextStream {
    const request = { prompt, stop: options.stop ?? [], samplingParams: samplingParams(options) };
    return new TextStream(this.stub.Generate(request, this.metadata(), callOptions(options)));
  }

  // Answers a conversation (oldest message first) using the model's chat template.
  chat(messages: ChatMessage[], options: GenerateOptions = {}): TextStream {
    const request = { messages, stop: options.stop ?? [], samplingParams: samplingParams(options) };
    return new TextStream(this.stub.Chat(request, this.metadata(), callOptions(options)));
  }

  tokenize(text: string): Promise<TokenizeResponse> {
    return this.unary((callback) => this.stub.Tokenize({ text }, this.metadata(), callback));
  }

  // pagoda.v1.TokenizerModelInfo, e.g. `(await client.modelInfo()).model.modelName`.
  modelInfo(): Promise<Record<string, unknown>> {
    return this.unary((callback) => this.stub.GetModelInfo({}, this.metadata(), callback));
  }

  close(): void {
    this.stub.close();
  }

  private metadata(): grpc.Metadata {
    const metadata = new grpc.Metadata();
    if (this.token) metadata.set("authorization", `Bearer ${this.token}`);
    return metadata;
  }

  private unary<T>(call: (callback: Callback<T>) => void): Promise<T> {
    return new Promise((resolve, reject) =>
      call((error, value) => (error ? reject(toPagodaError(error)) : resolve(value as T))),
    );
  }
}

function samplingParams(options: GenerateOptions): Record<string, unknown> {
  // proto3 `optional` fields are sent only when present, so an unset key keeps the service's default.
  const params: Record<string, unknown> = {};
  const keys = ["maxTokens", "temperature", "topP", "topK", "seed", "logitBias", "allowedTokenIds", "logprobs",
    "promptLogprobs"] as const;
  for (const key of keys) {
    const value = options[key];
    if (value !== undefined) params[key] = value;
  }
  if (options.structuredOutput !== undefined) params.structuredOutput = structuredOutput(options.structuredOutput);
  return params;
}

function structuredOutput(spec: StructuredOutput): Record<string, unknown> {
  const kinds = Object.entries(spec).filter(([, value]) => value !== undefined && value !== false);
  if (kinds.length !== 1) throw new Error(`structuredOutput needs exactly one field, got ${kinds.length}`);
  const { regex, jsonSchema, choice } = spec;
  if (regex !== undefined) return { regex };
  if (jsonSchema !== undefined) {
    return { jsonSchema: typeof jsonSchema === "string" ? jsonSchema : JSON.stringify(jsonSchema) };
  }
  if (choice !== undefined) return { choice: { choices: choice } };
  return { jsonObject: true };
}

// The service fills `sampled` in every entry; the fallback only keeps the type honest.
function tokenLogprobs(entry: WireTokenLogprobs): TokenLogprobs {
  return { sampled: entry.sampled ?? { tokenId: 0, logprob: 0, token: "" }, top: entry.top };
}

function callOptions(options: GenerateOptions): grpc.CallOptions {
  return options.timeoutMs === undefined ? {} : { deadline: Date.now() + options.timeoutMs };
}

function toPagodaError(error: unknown): Error {
  const status = error as Partial<grpc.ServiceError>;
  if (typeof status.code === "number") return new PagodaError(status.code, status.details ?? String(error));
  return error as Error;
}
