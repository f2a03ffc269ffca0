"""The server driven by the official `openai` Python package."""
import base64
import json
import struct
import urllib.request

import openai
import pytest

from conftest import BASE_MODEL, CHAT_MODEL, URL, golden


def post(path, body):
    req = urllib.request.Request(URL + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req))


def test_models(client):
    ids = [m.id for m in client.models.list().data]
    assert CHAT_MODEL in ids and BASE_MODEL in ids
    assert client.models.retrieve(CHAT_MODEL).id == CHAT_MODEL


def test_chat_matches_llama_cpp_greedy_answers(client):
    """llama.cpp's greedy answers to the golden chats, token for token, with exact usage."""
    for case in golden("qwen2.5-coder-0.5b-instruct.chat.jsonl"):
        kw = {"tools": case["tools"]} if "tools" in case else {}
        r = client.chat.completions.create(model=CHAT_MODEL, messages=case["messages"], max_tokens=48, temperature=0, logprobs=True, **kw)
        c = r.choices[0]
        if "tools" in case:
            # llama.cpp's answer is a call written as fenced JSON: it comes back as a tool call.
            expected = json.loads(case["output_text"].strip().removeprefix("```json").removesuffix("```"))
            call = c.message.tool_calls[0].function
            assert c.message.content is None and c.finish_reason == "tool_calls"
            assert (call.name, json.loads(call.arguments)) == (expected["name"], expected["arguments"])
        else:
            assert c.message.content == case["output_text"]
        assert r.usage.completion_tokens == len(case["output_ids"]) == len(c.logprobs.content)
        rendered = post("/tokenize", {"model": CHAT_MODEL, "content": case["rendered_prompt"], "add_special": True})["tokens"]
        assert r.usage.prompt_tokens == len(rendered)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        if "tools" not in case:
            assert c.finish_reason == ("length" if len(case["output_ids"]) == 48 else "stop")


def test_multi_turn_system_and_content_parts(client):
    r = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[
            {"role": "system", "content": "You answer with one word."},
            {"role": "user", "content": [{"type": "text", "text": "What color is the sky?"}]},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "And grass?"},
        ],
        max_completion_tokens=8,
        temperature=0,
    )
    assert r.choices[0].message.content.strip()
    assert r.usage.completion_tokens <= 8


def test_streaming_assembles_to_the_same_answer(client):
    msgs = [{"role": "user", "content": "List three fruits."}]
    full = client.chat.completions.create(model=CHAT_MODEL, messages=msgs, max_tokens=30, temperature=0)
    stream = client.chat.completions.create(model=CHAT_MODEL, messages=msgs, max_tokens=30, temperature=0, stream=True, stream_options={"include_usage": True})
    text, finish, usage, chunks = "", None, None, 0
    for chunk in stream:
        chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    assert chunks > 3
    assert text == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason
    assert usage.completion_tokens == full.usage.completion_tokens and usage.prompt_tokens == full.usage.prompt_tokens
    # The same prompt again: its tokens come from the prefix cache, and the streamed usage says so.
    assert usage.prompt_tokens_details.cached_tokens > 0


def test_length_stop_seed_n_and_logit_bias(client):
    msgs = [{"role": "user", "content": "Write a short poem about the sea."}]
    r = client.chat.completions.create(model=CHAT_MODEL, messages=msgs, max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    r = client.chat.completions.create(model=CHAT_MODEL, messages=msgs, max_tokens=60, temperature=0, stop=["\n"])
    assert "\n" not in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    a = client.chat.completions.create(model=CHAT_MODEL, messages=msgs, max_tokens=12, temperature=1.0, seed=7, n=2)
    b = client.chat.completions.create(model=CHAT_MODEL, messages=msgs, max_tokens=12, temperature=1.0, seed=7, n=2)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1]
    assert a.usage.completion_tokens == 24
    g = client.chat.completions.create(model=CHAT_MODEL, messages=msgs, max_tokens=1, temperature=0, logprobs=True, top_logprobs=2)
    first = g.choices[0].logprobs.content[0]
    assert len(first.top_logprobs) == 2 and first.top_logprobs[0].token == first.token
    banned_id = post("/tokenize", {"model": CHAT_MODEL, "content": first.token})["tokens"][0]
    h = client.chat.completions.create(model=CHAT_MODEL, messages=msgs, max_tokens=1, temperature=0, logit_bias={str(banned_id): -100}, presence_penalty=0.5, frequency_penalty=0.5)
    assert h.choices[0].message.content != first.token


def test_completions_with_logprobs_and_echo(client):
    prompt = "The capital of France is"
    r = client.completions.create(model=BASE_MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=3, echo=True)
    c = r.choices[0]
    assert c.text.startswith(prompt) and len(c.text) > len(prompt)
    n_prompt = r.usage.prompt_tokens
    # Gemma's BOS (added by the tokenizer, not in the text) is not echoed: the tokens spell the
    # text, and each offset points at its token. The first echoed token follows BOS, so it has
    # a log-probability too.
    assert len(c.logprobs.tokens) == n_prompt - 1 + 5 == len(c.logprobs.token_logprobs)
    assert "".join(c.logprobs.tokens) == c.text
    assert all(c.text[o:o + len(t)] == t for o, t in zip(c.logprobs.text_offset, c.logprobs.tokens))
    assert all(lp <= 0 for lp in c.logprobs.token_logprobs)
    assert all(len(t) <= 3 for t in c.logprobs.top_logprobs)
    # A model without BOS: the first token has nothing before it, so no log-probability; special
    # tokens written in the prompt are echoed as written.
    chat = "<|im_start|>user\nHi<|im_end|>\n"
    q = client.completions.create(model=CHAT_MODEL, prompt=chat, max_tokens=2, temperature=0, logprobs=1, echo=True).choices[0]
    assert q.text.startswith(chat) and "".join(q.logprobs.tokens) == q.text
    assert q.logprobs.tokens[0] == "<|im_start|>" and q.logprobs.token_logprobs[0] is None
    assert all(q.text[o:o + len(t)] == t for o, t in zip(q.logprobs.text_offset, q.logprobs.tokens))
    # A BOS the prompt writes itself is part of its text, so it is echoed.
    b = client.completions.create(model=BASE_MODEL, prompt="<bos>" + prompt, max_tokens=1, temperature=0, logprobs=1, echo=True).choices[0]
    assert b.text.startswith("<bos>" + prompt) and b.logprobs.tokens[0] == "<bos>"
    # With a suffix the model sees fill-in-the-middle tokens, not the prompt: no echo.
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=CHAT_MODEL, prompt="def f(", suffix=")", max_tokens=2, echo=True)
    assert e.value.body["param"] == "echo"
    # The golden prompt ids (BOS added as Gemma asks) and llama.cpp's first greedy token.
    g = golden("gemma-3-270m.greedy.jsonl")[0]
    assert n_prompt == len(g["prompt_ids"])
    r2 = client.completions.create(model=BASE_MODEL, prompt=g["prompt_ids"], max_tokens=1, temperature=0)
    first = post("/detokenize", {"model": BASE_MODEL, "tokens": [g["output_ids"][0]]})["content"]
    assert r2.choices[0].text == first


def test_completions_batches_and_streams(client):
    r = client.completions.create(model=BASE_MODEL, prompt=["Once upon a time", "def main():"], max_tokens=4, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text  # greedy: identical choices
    text = "".join(ch.choices[0].text for ch in client.completions.create(model=BASE_MODEL, prompt="Once upon a time", max_tokens=4, temperature=0, stream=True) if ch.choices)
    assert text == r.choices[0].text


def test_fill_in_the_middle_with_suffix(client):
    # Qwen2.5-Coder has fill-in-the-middle tokens: the completion goes between prompt and suffix.
    r = client.completions.create(model=CHAT_MODEL, prompt="def add(a, b):\n    return ", suffix="\n\nprint(add(1, 2))\n", max_tokens=8, temperature=0)
    assert r.choices[0].text.strip() and r.usage.completion_tokens <= 8


def test_embeddings(client):
    e = client.embeddings.create(model=BASE_MODEL, input=["hello world", "hello world", "a completely different sentence"])
    v = [d.embedding for d in e.data]
    assert len(v) == 3 and len(v[0]) == 640
    assert abs(sum(x * x for x in v[0]) - 1) < 1e-3
    assert v[0] == v[1] and v[0] != v[2]
    assert e.usage.prompt_tokens > 0
    raw = post("/v1/embeddings", {"model": BASE_MODEL, "input": "hello world", "encoding_format": "base64"})
    decoded = struct.unpack("<640f", base64.b64decode(raw["data"][0]["embedding"]))
    assert max(abs(a - b) for a, b in zip(decoded, v[0])) < 1e-6
    ids = client.embeddings.create(model=BASE_MODEL, input=[[2, 9259, 1902]])
    assert len(ids.data[0].embedding) == 640


def test_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}], temperature=5)
    assert "temperature" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=BASE_MODEL, prompt="word " * 5000, max_tokens=1)
    assert "maximum context length" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=BASE_MODEL, prompt="x", suffix="y")
