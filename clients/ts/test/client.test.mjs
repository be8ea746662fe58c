// The TypeScript client against a live eagle-grpc server (started by tests/test_ts_client.py,
// which passes its addresses): over gRPC and over the Connect protocol, binary and JSON.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import { EagleClient, EagleError } from "../dist/index.js";
import { connectTransport, grpcTransport, grpcWebTransport } from "../dist/node.js";

const { EAGLE_GRPC_URL, EAGLE_HTTP_URL, EAGLE_TOKEN, EAGLE_PHOTO } = process.env;
const token = EAGLE_TOKEN;
const transports = {
  grpc: () => grpcTransport(EAGLE_GRPC_URL),
  "connect binary": () => connectTransport(EAGLE_HTTP_URL),
  "connect json": () => connectTransport(EAGLE_HTTP_URL, { json: true }),
  "grpc-web": () => grpcWebTransport(EAGLE_HTTP_URL),
};
const photo = new Uint8Array(readFileSync(EAGLE_PHOTO));

test("chat and streamChat give the same text on every transport", async () => {
  const texts = new Set();
  for (const [name, make] of Object.entries(transports)) {
    const eagle = new EagleClient({ transport: make(), token });
    // 32 tokens: enough that a busy machine does not deliver them all in one piece
    const whole = await eagle.chat("Hi", { maxNewTokens: 32, ignoreEos: true,
                                           requestId: `ts-${name.replace(" ", "-")}` });
    assert.equal(whole.requestId, `ts-${name.replace(" ", "-")}`);
    assert.equal(whole.finishReason, "length", name);
    assert.equal(whole.usage.completionTokens, 32, name);
    const stream = eagle.streamChat("Hi", { maxNewTokens: 32, ignoreEos: true });
    const pieces = [];
    for await (const piece of stream) pieces.push(piece);
    const result = await stream.result;
    assert.ok(pieces.length > 1, `${name}: ${pieces.length} pieces`);
    assert.equal(pieces.join(""), whole.text, name);
    assert.equal(result.text, whole.text);
    assert.equal(result.usage.completionTokens, 32);
    assert.ok(result.timing.decodeMs > 0);
    texts.add(whole.text);
  }
  assert.equal(texts.size, 1, "greedy: one reply whatever the transport");
});

test("images from a Uint8Array and from a Blob", async () => {
  const eagle = new EagleClient({ transport: transports["connect binary"](), token });
  for (const image of [photo, new Blob([photo], { type: "image/jpeg" })]) {
    const r = await eagle.chat("Describe the image.", { images: [image], maxNewTokens: 2,
                                                        maxTilesPerImage: 2 });
    assert.equal(r.usage.imageTiles, 3);
    assert.equal(r.usage.visionTokens, 768);
  }
});

test("a bad request names the field, on both protocols", async () => {
  for (const make of [transports.grpc, transports["connect json"], transports["grpc-web"]]) {
    const eagle = new EagleClient({ transport: make(), token });
    await assert.rejects(eagle.chat("Hi", { maxNewTokens: 1_000_000 }), (e) => {
      assert.ok(e instanceof EagleError);
      assert.equal(e.code, "INVALID_ARGUMENT");
      assert.equal(e.fieldViolations[0].field, "generation.max_new_tokens");
      assert.match(e.message, /^InvalidArgument: generation\.max_new_tokens: /);
      assert.ok(e.requestId.length > 0);
      return true;
    });
  }
});

test("the token is required and names the tenant", async () => {
  for (const make of [transports.grpc, transports["connect binary"], transports["grpc-web"]]) {
    const anonymous = new EagleClient({ transport: make(), retries: 0 });
    await assert.rejects(anonymous.chat("Hi", { maxNewTokens: 1 }), (e) => {
      assert.equal(e.code, "UNAUTHENTICATED");
      assert.match(e.message, /authorization: Bearer <token>/);
      return true;
    });
    const info = await new EagleClient({ transport: make(), token }).modelInfo();
    assert.equal(info.tenant.name, "web");
    assert.ok(info.maxNewTokens > 0);
  }
});

test("deadlines and aborts end the call", async () => {
  for (const make of [transports.grpc, transports["connect json"]]) {
    const eagle = new EagleClient({ transport: make(), token });
    const start = Date.now();
    await assert.rejects(eagle.chat("Hi", { maxNewTokens: 4000, ignoreEos: true,
                                              timeoutMs: 300 }), (e) => {
      assert.equal(e.code, "DEADLINE_EXCEEDED");
      return true;
    });
    assert.ok(Date.now() - start < 5000);
    const abort = new AbortController();
    const stream = eagle.streamChat("Hi", { maxNewTokens: 4000, ignoreEos: true,
                                            signal: abort.signal });
    let seen = 0;
    await assert.rejects((async () => {
      for await (const _ of stream) if (++seen === 3) abort.abort();
    })(), (e) => {
      assert.equal(e.code, "CANCELLED");
      return true;
    });
    assert.equal(seen, 3);
    let inFlight = -1;
    for (let i = 0; i < 100 && inFlight !== 0; i++) {
      inFlight = (await eagle.modelInfo()).tenant.inFlight;
      if (inFlight) await new Promise((r) => setTimeout(r, 50));
    }
    assert.equal(inFlight, 0, "the server ended the aborted generation");
  }
});
