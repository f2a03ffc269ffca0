"""LoRA adapters through the official client: the server runs the chat model with a random
adapter `rnd` (`--lora`, made by the Rust test that starts it). An adapter is a model id
`BASE:NAME`; requests on the base and on adapters are batched together and each gets what it
gets alone; adapters load and unload while serving."""
import asyncio
import json
import os
import urllib.error
import urllib.request

import openai
import pytest

from conftest import CHAT_MODEL, URL

ADAPTER = os.environ.get("SMELT_ADAPTER", CHAT_MODEL + ":rnd")
ADAPTER_FILE = os.environ.get("SMELT_ADAPTER_FILE")
MESSAGES = [{"role": "user", "content": "Write a Python function that reverses a string."}]


def admin(method, path, body=None):
    req = urllib.request.Request(URL + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": "Bearer " + os.environ.get("SMELT_API_KEY", "none")})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def greedy(client, model, messages=MESSAGES, n=24):
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=n, temperature=0)
    return r


def test_adapters_are_listed_with_their_base(client):
    models = {m.id: m for m in client.models.list().data}
    assert ADAPTER in models
    extra = models[ADAPTER].model_extra
    assert extra["parent"] == CHAT_MODEL and extra["root"] == CHAT_MODEL
    assert client.models.retrieve(ADAPTER).id == ADAPTER


def test_a_chat_under_an_adapter_differs_from_the_base_and_streams_the_same(client):
    base, tuned = greedy(client, CHAT_MODEL), greedy(client, ADAPTER)
    assert tuned.model == ADAPTER
    assert tuned.choices[0].message.content != base.choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=ADAPTER, messages=MESSAGES, max_tokens=24, temperature=0, stream=True) if c.choices)
    assert streamed == tuned.choices[0].message.content


def test_unknown_adapters_and_bases_are_404(client):
    for model in [CHAT_MODEL + ":nope", "no-such-base:rnd"]:
        with pytest.raises(openai.NotFoundError) as e:
            greedy(client, model)
        assert e.value.body["code"] == "model_not_found"


def test_base_and_adapters_batched_together_match_their_solo_runs(client):
    status, loaded = admin("POST", "/v1/adapters", {"model": CHAT_MODEL, "name": "rnd-copy", "path": ADAPTER_FILE})
    assert status == 201, loaded
    copy = loaded["id"]
    try:
        prompts = [[{"role": "user", "content": f"Give me fact number {i} about the number {i * 7}."}] for i in range(6)]
        models = [CHAT_MODEL, ADAPTER, copy]
        solo = {(m, i): greedy(client, m, p, 16).choices[0].message.content for i, p in enumerate(prompts) for m in models}

        async def all_at_once():
            # A client of its own: the shared async client must not be tied to this event loop.
            aclient = openai.AsyncOpenAI(base_url=URL + "/v1", api_key=os.environ.get("SMELT_API_KEY", "none"), max_retries=0, timeout=600)
            reqs = [aclient.chat.completions.create(model=m, messages=p, max_tokens=16, temperature=0) for i, p in enumerate(prompts) for m in models]
            return await asyncio.gather(*reqs)

        got = asyncio.run(all_at_once())
        k = 0
        for i in range(len(prompts)):
            for m in models:
                assert got[k].choices[0].message.content == solo[(m, i)], (m, i)
                k += 1
        # The same file loaded under two names gives the same outputs.
        assert all(solo[(ADAPTER, i)] == solo[(copy, i)] for i in range(len(prompts)))
    finally:
        status, body = admin("DELETE", "/v1/adapters/" + copy)
        assert status == 200 and body["deleted"], body
    with pytest.raises(openai.NotFoundError):
        greedy(client, copy)


def test_loading_a_bad_adapter_is_a_clear_400():
    status, body = admin("POST", "/v1/adapters", {"model": CHAT_MODEL, "name": "bad", "path": "/nonexistent/adapter.gguf"})
    assert status == 400 and "adapter" in body["error"]["message"], body
    status, body = admin("POST", "/v1/adapters", {"model": CHAT_MODEL, "name": "rnd", "path": ADAPTER_FILE})
    assert status == 409, body
