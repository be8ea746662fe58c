// The playground page's script (service/static/index.html), bundled by esbuild into
// service/static/playground.js: the shipped client over the Connect protocol to the port
// that served the page.
import { EagleClient, EagleError, type ChatOptions } from "../src/index.js";
import { connectTransport } from "../src/web.js";

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;
const output = $<HTMLDivElement>("output");
const stats = $<HTMLDivElement>("stats");
const error = $<HTMLDivElement>("error");
const send = $<HTMLButtonElement>("send");
const cancel = $<HTMLButtonElement>("cancel");
const media = $<HTMLInputElement>("media");
const transport = connectTransport(location.origin);
let running: AbortController | null = null;

function client(): EagleClient {
  const token = $<HTMLInputElement>("token").value.trim();
  return new EagleClient({ transport, token: token || undefined, timeoutMs: 600_000, retries: 0 });
}

function number(id: string): number {
  return Number($<HTMLInputElement>(id).value) || 0;
}

media.addEventListener("change", () => {
  const preview = $<HTMLDivElement>("preview");
  preview.replaceChildren();
  const file = media.files?.[0];
  if (!file) return;
  const el = document.createElement(file.type.startsWith("video/") ? "video" : "img");
  el.src = URL.createObjectURL(file);
  if (el instanceof HTMLVideoElement) el.controls = true;
  preview.append(el);
});

cancel.addEventListener("click", () => running?.abort());

$<HTMLFormElement>("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  running?.abort();
  const abort = new AbortController();
  running = abort;
  output.textContent = "";
  output.dataset.pieces = "0";
  output.dataset.state = "streaming";
  stats.textContent = "";
  error.textContent = "";
  send.disabled = true;
  cancel.disabled = false;
  const file = media.files?.[0];
  const temperature = number("temperature");
  const options: ChatOptions = {
    maxNewTokens: number("maxNewTokens"), temperature: temperature || undefined,
    maxTilesPerImage: number("maxTiles"), videoFrames: number("videoFrames"),
    ignoreEos: $<HTMLInputElement>("ignoreEos").checked,
    signal: abort.signal,
  };
  if (file) (file.type.startsWith("video/") ? (options.videos = [file]) : (options.images = [file]));
  const started = performance.now();
  let first = 0;
  try {
    const stream = client().streamChat($<HTMLTextAreaElement>("prompt").value, options);
    for await (const piece of stream) {
      if (!first) first = performance.now() - started;
      output.textContent += piece;
      output.dataset.pieces = String(Number(output.dataset.pieces) + 1);
    }
    const r = await stream.result;
    const u = r.usage, t = r.timing;
    stats.textContent = `${r.finishReason} · ${u.promptTokens} prompt tokens (${u.imageTiles} tiles, ` +
      `${u.cachedPromptTokens} cached) · ${u.completionTokens} generated · first text after ` +
      `${first.toFixed(0)} ms · total ${(performance.now() - started).toFixed(0)} ms ` +
      `(preprocess ${t.preprocessMs.toFixed(0)}, prefill ${t.prefillMs.toFixed(0)}, ` +
      `decode ${t.decodeMs.toFixed(0)} ms) · request ${r.requestId}`;
    output.dataset.state = "done";
  } catch (e) {
    const err = e instanceof EagleError ? e : null;
    output.dataset.state = err?.code === "CANCELLED" ? "cancelled" : "failed";
    error.textContent = err?.code === "CANCELLED" ? "cancelled" :
      err ? `${err.code}: ${err.cause.rawMessage}` +
            err.fieldViolations.map((v) => `\n  field ${v.field}`).join("") : String(e);
  } finally {
    if (running === abort) running = null;
    send.disabled = false;
    cancel.disabled = true;
  }
});

client().modelInfo().then((info) => {
  $<HTMLSpanElement>("model").textContent = `Model: ${info.modelName} on ${info.device}.`;
}).catch(() => undefined);
