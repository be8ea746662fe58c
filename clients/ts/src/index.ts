// The eagle-grpc client for TypeScript: chat and streamChat over any Connect transport
// (gRPC from Node, Connect or gRPC-Web from Node and browsers), with images from bytes or
// Blobs, the bearer token, deadlines, retries of refusals the server asks to be retried,
// and errors that say which field was wrong and how long to wait.
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { BinaryReader, WireType } from "@bufbuild/protobuf/wire";
import {
  Code,
  ConnectError,
  createClient,
  type Client,
  type Transport,
} from "@connectrpc/connect";
import {
  ChatService,
  ChatRequestSchema,
  FinishReason,
  MessageSchema,
  PartSchema,
  Priority,
  Role,
  StreamChatRequestSchema,
  type ChatResponse,
  type GetModelInfoResponse,
  type Message,
  type StreamChatResponse,
} from "./gen/eagle/v1/chat_pb.js";

export * from "./gen/eagle/v1/chat_pb.js";
export { Code } from "@connectrpc/connect";

/** An image: its encoded bytes (JPEG, PNG, WebP...), as a Uint8Array or a Blob/File. */
export type ImageInput = Uint8Array | Blob;

export interface ClientOptions {
  /** From `./node.js` (grpcTransport, connectTransport) or `./web.js` (browsers). */
  transport: Transport;
  /** The bearer token, sent as `authorization: Bearer <token>` on every call. */
  token?: string;
  /** Each call's deadline unless the call gives its own (ms; default 60 000). */
  timeoutMs?: number;
  /** Attempts after a refusal the server marks as retryable (default 2). */
  retries?: number;
}

export interface ChatOptions {
  images?: ImageInput[];
  /** Short videos as encoded files (MP4, WebM...), sampled into frames by the server. */
  videos?: ImageInput[];
  /** Frames to sample from each video (0: the server's default). */
  videoFrames?: number;
  /** An optional system message before the prompt. */
  system?: string;
  maxNewTokens?: number;
  temperature?: number;
  topP?: number;
  topK?: number;
  seed?: bigint | number;
  stop?: string[];
  /** Generate all maxNewTokens even past the end of the turn (benchmarks, tests). */
  ignoreEos?: boolean;
  maxTilesPerImage?: number;
  requestId?: string;
  priority?: "interactive" | "batch";
  cacheSalt?: string;
  timeoutMs?: number;
  /** Aborts the call (and the generation on the server). */
  signal?: AbortSignal;
}

export interface ChatResult {
  requestId: string;
  text: string;
  finishReason: "stop" | "length" | "stop_sequence" | "unspecified";
  usage: { promptTokens: number; completionTokens: number; imageTiles: number;
           visionTokens: number; cachedPromptTokens: number };
  timing: { queueMs: number; preprocessMs: number; prefillMs: number; decodeMs: number };
}

export interface FieldViolation { field: string; description: string }

/** A failed call: the status code's name, the server's message, the fields it named, the
 * wait it asked for before a retry (undefined: none given; negative: do not retry). */
export class EagleError extends Error {
  readonly code: string;
  readonly fieldViolations: FieldViolation[];
  readonly retryAfterMs: number | undefined;
  readonly requestId: string;
  readonly cause: ConnectError;

  constructor(err: ConnectError) {
    super(`${Code[err.code] ?? err.code}: ${err.rawMessage}`);
    this.name = "EagleError";
    this.cause = err;
    this.code = codeName(err.code);
    this.fieldViolations = [];
    let retry: number | undefined;
    for (const d of err.details) {
      if (!("type" in d)) continue;  // a detail this client made, not one received
      if (d.type === "google.rpc.BadRequest") this.fieldViolations.push(...badRequest(d.value));
      if (d.type === "google.rpc.RetryInfo") retry = retryInfo(d.value);
    }
    const pushback = err.metadata.get("grpc-retry-pushback-ms");
    if (pushback !== null && pushback !== "") retry = Number(pushback);
    this.retryAfterMs = retry;
    this.requestId = err.metadata.get("x-request-id") ?? "";
  }
}

function codeName(code: Code): string {
  // gRPC's spelling of the names, as every other client of this service sees them
  const name = Code[code] ?? "Unknown";
  return name === "Canceled" ? "CANCELLED"
    : name.replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase();
}

function badRequest(bytes: Uint8Array): FieldViolation[] {
  const out: FieldViolation[] = [];
  const reader = new BinaryReader(bytes);
  while (reader.pos < reader.len) {
    const [no, wire] = reader.tag();
    if (no !== 1 || wire !== WireType.LengthDelimited) { reader.skip(wire); continue; }
    const inner = new BinaryReader(reader.bytes());
    const v: FieldViolation = { field: "", description: "" };
    while (inner.pos < inner.len) {
      const [n, w] = inner.tag();
      if (n === 1) v.field = inner.string();
      else if (n === 2) v.description = inner.string();
      else inner.skip(w);
    }
    out.push(v);
  }
  return out;
}

function retryInfo(bytes: Uint8Array): number | undefined {
  const reader = new BinaryReader(bytes);
  let ms: number | undefined;
  while (reader.pos < reader.len) {
    const [no, wire] = reader.tag();
    if (no !== 1 || wire !== WireType.LengthDelimited) { reader.skip(wire); continue; }
    const d = new BinaryReader(reader.bytes());
    let seconds = 0, nanos = 0;
    while (d.pos < d.len) {
      const [n, w] = d.tag();
      if (n === 1) seconds = Number(d.int64());
      else if (n === 2) nanos = d.int32();
      else d.skip(w);
    }
    ms = seconds * 1000 + Math.round(nanos / 1e6);
  }
  return ms;
}

const REASONS: Record<number, ChatResult["finishReason"]> = {
  [FinishReason.STOP]: "stop", [FinishReason.LENGTH]: "length",
  [FinishReason.STOP_SEQUENCE]: "stop_sequence",
};

function result(r: ChatResponse | StreamChatResponse, text: string): ChatResult {
  const u = r.usage, t = r.timing;
  return {
    requestId: r.requestId, text, finishReason: REASONS[r.finishReason] ?? "unspecified",
    usage: { promptTokens: u?.promptTokens ?? 0, completionTokens: u?.completionTokens ?? 0,
             imageTiles: u?.imageTiles ?? 0, visionTokens: u?.visionTokens ?? 0,
             cachedPromptTokens: u?.cachedPromptTokens ?? 0 },
    timing: { queueMs: t?.queueMs ?? 0, preprocessMs: t?.preprocessMs ?? 0,
              prefillMs: t?.prefillMs ?? 0, decodeMs: t?.decodeMs ?? 0 },
  };
}

async function bytesOf(image: ImageInput): Promise<Uint8Array> {
  return image instanceof Uint8Array ? image : new Uint8Array(await image.arrayBuffer());
}

async function messages(prompt: string, o: ChatOptions): Promise<MessageInitShape<typeof MessageSchema>[]> {
  const out: MessageInitShape<typeof MessageSchema>[] = [];
  if (o.system) out.push({ role: Role.SYSTEM, parts: [{ kind: { case: "text", value: o.system } }] });
  const parts: MessageInitShape<typeof PartSchema>[] = [];
  for (const image of o.images ?? []) {
    parts.push({ kind: { case: "image", value: { source: { case: "data", value: await bytesOf(image) } } } });
  }
  for (const video of o.videos ?? []) {
    parts.push({ kind: { case: "video", value: { source: { case: "data", value: await bytesOf(video) },
                                                 numFrames: o.videoFrames ?? 0 } } });
  }
  parts.push({ kind: { case: "text", value: prompt } });
  out.push({ role: Role.USER, parts });
  return out;
}

async function request(prompt: string, o: ChatOptions) {
  return {
    requestId: o.requestId ?? "",
    messages: await messages(prompt, o),
    generation: {
      maxNewTokens: o.maxNewTokens ?? 0, temperature: o.temperature, topP: o.topP,
      topK: o.topK ?? 0, seed: o.seed === undefined ? undefined : BigInt(o.seed),
      stop: o.stop ?? [], ignoreEos: o.ignoreEos ?? false,
    },
    vision: { maxTilesPerImage: o.maxTilesPerImage ?? 0 },
    cacheSalt: o.cacheSalt ?? "",
    priority: o.priority === "batch" ? Priority.BATCH
      : o.priority === "interactive" ? Priority.INTERACTIVE : Priority.UNSPECIFIED,
  };
}

/** A reply as it streams: iterate for the text pieces; `result` once it has ended. */
export interface ChatStream extends AsyncIterable<string> {
  readonly result: Promise<ChatResult>;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export class EagleClient {
  private readonly client: Client<typeof ChatService>;
  private readonly timeoutMs: number;
  private readonly retries: number;
  private readonly headers: Record<string, string>;

  constructor(options: ClientOptions) {
    this.client = createClient(ChatService, options.transport);
    this.headers = options.token ? { authorization: `Bearer ${options.token}` } : {};
    this.timeoutMs = options.timeoutMs ?? 60_000;
    this.retries = options.retries ?? 2;
  }

  private call(options: { timeoutMs?: number; signal?: AbortSignal }) {
    return { timeoutMs: options.timeoutMs ?? this.timeoutMs, signal: options.signal,
             headers: this.headers };
  }

  /** The whole reply once generation has ended. */
  async chat(prompt: string, options: ChatOptions = {}): Promise<ChatResult> {
    const req = create(ChatRequestSchema, await request(prompt, options));
    for (let attempt = 0; ; attempt++) {
      try {
        const r = await this.client.chat(req, this.call(options));
        return result(r, r.text);
      } catch (e) {
        const err = wrap(e);
        const wait = retryWait(err, attempt, this.retries);
        if (wait === undefined) throw err;
        await sleep(wait);
      }
    }
  }

  /** The reply as text pieces while it is generated; `result` has usage and timing. */
  streamChat(prompt: string, options: ChatOptions = {}): ChatStream {
    let resolve!: (r: ChatResult) => void, reject!: (e: unknown) => void;
    const done = new Promise<ChatResult>((a, b) => { resolve = a; reject = b; });
    done.catch(() => undefined);  // also raised by the iteration: not unhandled
    const self = this;
    async function* pieces(): AsyncGenerator<string> {
      const req = create(StreamChatRequestSchema, await request(prompt, options));
      let text = "";
      try {
        for await (const chunk of self.client.streamChat(req, self.call(options))) {
          if (chunk.text) { text += chunk.text; yield chunk.text; }
          if (chunk.finishReason !== FinishReason.UNSPECIFIED) resolve(result(chunk, text));
        }
      } catch (e) {
        const err = wrap(e);
        reject(err);
        throw err;
      }
    }
    const iterable = pieces();
    return { [Symbol.asyncIterator]: () => iterable, result: done };
  }

  /** The model, its limits, and what the caller's tenant may use. */
  async modelInfo(options: { timeoutMs?: number } = {}): Promise<GetModelInfoResponse> {
    try {
      return await this.client.getModelInfo({}, this.call(options));
    } catch (e) {
      throw wrap(e);
    }
  }
}

function wrap(e: unknown): EagleError {
  return e instanceof EagleError ? e : new EagleError(ConnectError.from(e));
}

/** How long to wait before the next attempt, or undefined to give up: UNAVAILABLE and
 * RESOURCE_EXHAUSTED are retried after the wait the server asked for (RetryInfo, or the
 * pushback trailer; a negative one means never), the others never. */
function retryWait(err: EagleError, attempt: number, retries: number): number | undefined {
  if (attempt >= retries) return undefined;
  if (err.code !== "UNAVAILABLE" && err.code !== "RESOURCE_EXHAUSTED") return undefined;
  const wait = err.retryAfterMs ?? 200 * 2 ** attempt;
  return wait < 0 ? undefined : Math.min(wait, 10_000);
}

export type { Message };
