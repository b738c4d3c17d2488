"""Drives Switchyard's front door with the official `openai` package, unchanged: only
`base_url=<switchyard>/v1` and a Switchyard API key. Run by api/tests/it/chat_completions.rs
(SWITCHYARD_BASE_URL, SWITCHYARD_API_KEY); exits non-zero on the first failed check."""

import json
import os
import sys

import openai
from openai import OpenAI

BASE = os.environ["SWITCHYARD_BASE_URL"]
KEY = os.environ["SWITCHYARD_API_KEY"]
client = OpenAI(base_url=BASE, api_key=KEY, max_retries=0, timeout=30)
MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "alpha beta gamma"},
]
EXPECTED = "Mock reply: alpha beta gamma"


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}")
        sys.exit(1)
    print(f"ok: {what}")


# models.list(): OpenAI's list shape
ids = [m.id for m in client.models.list()]
check("mock-echo" in ids, f"models.list() lists mock-echo ({ids})")

# non-streaming, with fields we ignore
r = client.chat.completions.create(
    model="mock-echo", messages=MESSAGES, user="u-1", seed=3, n=1, temperature=0.2
)
check(r.choices[0].message.content == EXPECTED, f"non-streaming text ({r.choices[0].message.content!r})")
check(r.choices[0].finish_reason == "stop", "finish_reason stop")
check(r.usage is not None and r.usage.completion_tokens > 0, "usage reported")
check(r.id.startswith("chatcmpl-"), "completion id")

# streaming with usage
stream = client.chat.completions.create(
    model="mock-echo", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
)
text, finish, usage = "", None, None
for chunk in stream:
    if chunk.choices:
        text += chunk.choices[0].delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    if chunk.usage:
        usage = chunk.usage
check(text == EXPECTED, f"streamed text ({text!r})")
check(finish == "stop", "streamed finish_reason")
check(usage is not None and usage.total_tokens > 0, "streamed usage chunk")

# tool calls
tools = [{
    "type": "function",
    "function": {"name": "lookup", "description": "find", "parameters": {"type": "object", "properties": {"text": {"type": "string"}}}},
}]
r = client.chat.completions.create(
    model="mock-tool", messages=[{"role": "user", "content": "weather?"}], tools=tools
)
call = r.choices[0].message.tool_calls[0]
check(call.function.name == "lookup", "tool call name")
check(json.loads(call.function.arguments) == {"text": "weather?"}, "tool call arguments")
check(r.choices[0].finish_reason == "tool_calls", "finish_reason tool_calls")

# errors arrive as the SDK's typed exceptions
try:
    client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    check(False, "unknown model raises")
except openai.NotFoundError as e:
    check(e.status_code == 404, "unknown model -> NotFoundError")
try:
    OpenAI(base_url=BASE, api_key="sy_wrong", max_retries=0).chat.completions.create(
        model="mock-echo", messages=MESSAGES
    )
    check(False, "bad key raises")
except openai.AuthenticationError:
    check(True, "bad key -> AuthenticationError")
try:
    client.chat.completions.create(model="mock-error-400", messages=MESSAGES)
    check(False, "provider 400 raises")
except openai.BadRequestError:
    check(True, "provider 400 -> BadRequestError")
try:
    for _ in client.chat.completions.create(model="mock-error-400", messages=MESSAGES, stream=True):
        pass
    check(False, "a provider 400 raises when streaming too")
except openai.BadRequestError:
    check(True, "a provider 400 before any output -> BadRequestError, streaming too")
try:
    for _ in client.chat.completions.create(model="mock-midstream-error", messages=MESSAGES, stream=True):
        pass
    check(False, "an error inside the stream raises")
except openai.APIError:
    check(True, "an error inside the stream -> APIError")

print("ALL OK")
