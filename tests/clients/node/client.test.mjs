// The server driven by the official `openai` Node package (started by the Rust test
// `server_clients`, which passes its address and model ids in the environment).
import { test } from "node:test";
import assert from "node:assert/strict";
import OpenAI from "openai";

const URL = process.env.SMELT_URL ?? "http://127.0.0.1:8080";
const CHAT = process.env.SMELT_CHAT_MODEL ?? "qwen2.5-coder-0.5b-instruct";
const BASE = process.env.SMELT_BASE_MODEL ?? "gemma-3-270m";
const client = new OpenAI({ baseURL: `${URL}/v1`, apiKey: process.env.SMELT_API_KEY ?? "none", maxRetries: 0, timeout: 600_000 });

test("models", async () => {
  const ids = [];
  for await (const m of client.models.list()) ids.push(m.id);
  assert.ok(ids.includes(CHAT) && ids.includes(BASE));
  assert.equal((await client.models.retrieve(BASE)).id, BASE);
});

test("chat, then the same chat streamed", async () => {
  const messages = [{ role: "user", content: "Name two planets." }];
  const full = await client.chat.completions.create({ model: CHAT, messages, max_tokens: 20, temperature: 0 });
  assert.ok(full.choices[0].message.content.length > 0);
  assert.equal(full.usage.total_tokens, full.usage.prompt_tokens + full.usage.completion_tokens);
  const stream = await client.chat.completions.create({ model: CHAT, messages, max_tokens: 20, temperature: 0, stream: true, stream_options: { include_usage: true } });
  let text = "";
  let usage = null;
  for await (const chunk of stream) {
    if (chunk.usage) usage = chunk.usage;
    for (const c of chunk.choices) text += c.delta?.content ?? "";
  }
  assert.equal(text, full.choices[0].message.content);
  assert.equal(usage.completion_tokens, full.usage.completion_tokens);
});

test("completions with logprobs and echo", async () => {
  const prompt = "The three primary colors are";
  const r = await client.completions.create({ model: BASE, prompt, max_tokens: 4, temperature: 0, logprobs: 2, echo: true });
  const c = r.choices[0];
  assert.ok(c.text.startsWith(prompt));
  // Gemma's BOS is not in the text, so it is not echoed; the tokens spell the text.
  assert.equal(c.logprobs.tokens.length, r.usage.prompt_tokens - 1 + 4);
  assert.equal(c.logprobs.tokens.join(""), c.text);
  assert.equal(c.logprobs.text_offset[1], c.logprobs.tokens[0].length);
});

test("embeddings", async () => {
  const e = await client.embeddings.create({ model: BASE, input: ["hello", "hello"], encoding_format: "float" });
  assert.equal(e.data.length, 2);
  assert.equal(e.data[0].embedding.length, 640);
  assert.deepEqual(e.data[0].embedding, e.data[1].embedding);
  // The Node client asks for base64 by default and decodes it itself.
  const b = await client.embeddings.create({ model: BASE, input: "hello" });
  assert.ok(Math.abs(b.data[0].embedding[0] - e.data[0].embedding[0]) < 1e-6);
});

test("errors", async () => {
  await assert.rejects(client.chat.completions.create({ model: "nope", messages: [{ role: "user", content: "x" }] }), OpenAI.NotFoundError);
  await assert.rejects(client.chat.completions.create({ model: CHAT, messages: [{ role: "user", content: "x" }], top_p: 7 }), OpenAI.BadRequestError);
});
