"""32 concurrent streaming clients: every stream completes with exact usage, and each request's
output (greedy or seeded) is identical to what it produces alone. A client that disconnects
mid-stream leaves no sequence or KV memory behind."""
import asyncio
import json
import re
import time
import urllib.request

from conftest import CHAT_MODEL, URL


def metric(name):
    text = urllib.request.urlopen(URL + "/metrics").read().decode()
    m = re.search(r"^" + re.escape(name) + r'\{model="' + re.escape(CHAT_MODEL) + r'"\} (\S+)$', text, re.M)
    return float(m.group(1))


def request(i):
    kw = {"temperature": 0} if i % 2 == 0 else {"temperature": 0.9, "seed": 1000 + i}
    return dict(model=CHAT_MODEL, messages=[{"role": "user", "content": f"Tell me fact number {i} about rivers."}], max_tokens=24, **kw)


async def run_stream(aclient, i):
    stream = await aclient.chat.completions.create(stream=True, stream_options={"include_usage": True}, **request(i))
    text, usage, finish = "", None, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    return text, usage, finish


def test_32_concurrent_streams_match_solo_runs(client, aclient):
    solo = []
    for i in range(32):
        r = client.chat.completions.create(**request(i))
        solo.append((r.choices[0].message.content, r.usage.completion_tokens, r.usage.prompt_tokens))

    async def all_at_once():
        return await asyncio.gather(*[run_stream(aclient, i) for i in range(32)])

    results = asyncio.run(all_at_once())
    for i, (text, usage, finish) in enumerate(results):
        assert finish in ("stop", "length")
        assert usage is not None and usage.completion_tokens == solo[i][1] and usage.prompt_tokens == solo[i][2]
        assert text == solo[i][0], f"request {i} differs when batched"


def test_disconnect_frees_the_sequence(client):
    req = urllib.request.Request(
        URL + "/v1/chat/completions",
        data=json.dumps({"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Write a very long story."}], "max_tokens": 2000, "stream": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    resp = urllib.request.urlopen(req)
    for _ in range(5):
        resp.readline()
    assert metric("smelt_running_sequences") >= 1
    resp.close()
    deadline = time.time() + 30
    while time.time() < deadline:
        if metric("smelt_running_sequences") == 0 and metric("smelt_kv_cache_blocks_used") == 0:
            return
        time.sleep(0.1)
    raise AssertionError("the disconnected stream's sequence was not released")
