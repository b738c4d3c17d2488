// Drives Switchyard's front door with the official `openai` Node package, unchanged: only
// `baseURL=<switchyard>/v1` and a Switchyard API key. Run by api/tests/it/chat_completions.rs
// (SWITCHYARD_BASE_URL, SWITCHYARD_API_KEY); exits non-zero on the first failed check.
import OpenAI from "openai";

const client = new OpenAI({
  baseURL: process.env.SWITCHYARD_BASE_URL,
  apiKey: process.env.SWITCHYARD_API_KEY,
  maxRetries: 0,
  timeout: 30_000,
});
const messages = [
  { role: "system", content: "be brief" },
  { role: "user", content: "alpha beta gamma" },
];
const expected = "Mock reply: alpha beta gamma";

function check(cond, what) {
  if (!cond) {
    console.log(`FAILED: ${what}`);
    process.exit(1);
  }
  console.log(`ok: ${what}`);
}

const ids = [];
for await (const m of client.models.list()) ids.push(m.id);
check(ids.includes("mock-echo"), `models.list() lists mock-echo (${ids})`);

const r = await client.chat.completions.create({ model: "mock-echo", messages, user: "u-1", seed: 3 });
check(r.choices[0].message.content === expected, `non-streaming text (${r.choices[0].message.content})`);
check(r.usage.completion_tokens > 0, "usage reported");

const stream = await client.chat.completions.create({
  model: "mock-echo", messages, stream: true, stream_options: { include_usage: true },
});
let text = "", usage = null, finish = null;
for await (const chunk of stream) {
  if (chunk.choices.length) {
    text += chunk.choices[0].delta.content ?? "";
    finish = chunk.choices[0].finish_reason ?? finish;
  }
  if (chunk.usage) usage = chunk.usage;
}
check(text === expected, `streamed text (${text})`);
check(finish === "stop" && usage && usage.total_tokens > 0, "streamed finish and usage");

try {
  await client.chat.completions.create({ model: "no-such-model", messages });
  check(false, "unknown model throws");
} catch (e) {
  check(e instanceof OpenAI.NotFoundError, `unknown model -> NotFoundError (${e})`);
}
try {
  await new OpenAI({ baseURL: process.env.SWITCHYARD_BASE_URL, apiKey: "sy_wrong", maxRetries: 0 })
    .chat.completions.create({ model: "mock-echo", messages });
  check(false, "bad key throws");
} catch (e) {
  check(e instanceof OpenAI.AuthenticationError, `bad key -> AuthenticationError (${e})`);
}
console.log("ALL OK");
