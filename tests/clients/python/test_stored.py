"""Stored chat completions and feedback through the official client, against servers of their
own: two API keys that must not see each other's records, OpenAI-shaped errors, feedback
exported as fine-tuning data the server accepts, and a server killed (SIGKILL) under a
32-client load that must have kept every completion a client received."""
import json
import pathlib
import sqlite3
import subprocess
import tempfile
import threading
import time

import openai
import pytest

from conftest import CHAT_MODEL, SMELT, Server

pytestmark = pytest.mark.skipif(not SMELT, reason="needs SMELT_BIN (the Rust test server_clients sets it)")


def ask(client, text, **kw):
    kw = {"max_tokens": 6, "temperature": 0, **kw}
    return client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": text}], **kw)


def every(page_fn, **kw):
    """All items of a listing, following the client's own pagination."""
    return [x for x in page_fn(**kw)]


@pytest.fixture(scope="module")
def keyed():
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="smelt-stored-"))
    (tmp / "keys").write_text("sk-alice name=alice\nsk-bob name=bob guard=input:email=block\n")
    server = Server(["--api-key-file", str(tmp / "keys"), "--database", str(tmp / "smelt.db"), "--data-dir", str(tmp / "data")], api_key="sk-alice")
    yield server, tmp
    server.stop()


def test_store_list_filter_paginate_update_delete(keyed):
    server, _ = keyed
    alice, bob = server.client, server.client_for("sk-bob")
    made = []
    for i in range(5):
        r = ask(alice, f"Name a colour, number {i}.", store=True, metadata={"topic": "colours" if i < 3 else "numbers", "run": "t1"})
        made.append(r)
    unstored = ask(alice, "Not kept.", store=False, metadata={"run": "t1"})
    # A streamed reply is stored as one assembled completion.
    chunks = list(alice.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "Say something short."}], max_tokens=6, temperature=0,
                                                stream=True, store=True, metadata={"run": "t1", "kind": "stream"}))
    streamed_text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    stream_id = chunks[0].id

    listed = every(alice.chat.completions.list, metadata={"run": "t1"}, limit=2)
    assert [c.id for c in listed] == [r.id for r in made] + [stream_id]
    assert unstored.id not in [c.id for c in listed]
    assert [c.id for c in every(alice.chat.completions.list, metadata={"run": "t1", "topic": "numbers"})] == [made[3].id, made[4].id]
    assert [c.id for c in alice.chat.completions.list(metadata={"run": "t1"}, order="desc", limit=3).data] == [stream_id, made[4].id, made[3].id]
    assert len(every(alice.chat.completions.list, model=CHAT_MODEL, metadata={"run": "t1"})) == 6
    assert every(alice.chat.completions.list, model="other-model") == []

    got = alice.chat.completions.retrieve(made[1].id)
    assert got.choices[0].message.content == made[1].choices[0].message.content
    assert got.usage.completion_tokens == made[1].usage.completion_tokens and got.model == CHAT_MODEL
    assert got.metadata == {"topic": "colours", "run": "t1"}
    s = alice.chat.completions.retrieve(stream_id)
    assert s.choices[0].message.content == streamed_text and s.choices[0].finish_reason == chunks[-1].choices[0].finish_reason
    assert s.usage.completion_tokens > 0

    msgs = alice.chat.completions.messages.list(made[2].id)
    assert [(m.role, m.content) for m in msgs.data] == [("user", "Name a colour, number 2.")]
    assert msgs.data[0].id == f"{made[2].id}-0"

    upd = alice.chat.completions.update(made[0].id, metadata={"topic": "reviewed"})
    assert upd.metadata == {"topic": "reviewed"}
    assert alice.chat.completions.retrieve(made[0].id).metadata == {"topic": "reviewed"}

    deleted = alice.chat.completions.delete(made[4].id)
    assert deleted.deleted and deleted.id == made[4].id and deleted.object == "chat.completion.deleted"
    with pytest.raises(openai.NotFoundError):
        alice.chat.completions.retrieve(made[4].id)

    # Another key sees none of it, and cannot change it.
    assert every(bob.chat.completions.list, metadata={"run": "t1"}) == []
    with pytest.raises(openai.NotFoundError):
        bob.chat.completions.retrieve(made[1].id)
    with pytest.raises(openai.NotFoundError):
        bob.chat.completions.update(made[1].id, metadata={"x": "y"})
    with pytest.raises(openai.NotFoundError):
        bob.chat.completions.delete(made[1].id)
    mine = ask(bob, "Bob's question.", store=True, metadata={"run": "t1"})
    # Bob's key has guardrails of its own (the server has none): his emails are blocked, hers are not.
    with pytest.raises(openai.BadRequestError) as e:
        ask(bob, "Write to bob@example.com")
    assert e.value.code == "content_blocked"
    ask(alice, "Write to alice@example.com")
    assert [c.id for c in every(bob.chat.completions.list, metadata={"run": "t1"})] == [mine.id]


def test_bad_input_gets_openai_errors(keyed):
    server, _ = keyed
    alice = server.client
    for bad in [{f"k{i}": "v" for i in range(17)}, {"k": 5}, {"k" * 65: "v"}, {"k": "v" * 513}]:
        with pytest.raises(openai.BadRequestError) as e:
            ask(alice, "hi", store=True, metadata=bad)
        assert e.value.body["param"] == "metadata"
    r = ask(alice, "hi", store=True)
    with pytest.raises(openai.BadRequestError):
        alice.chat.completions.update(r.id, metadata={"k": ["not", "a", "string"]})
    with pytest.raises(openai.NotFoundError):
        alice.chat.completions.retrieve("chatcmpl-missing")
    with pytest.raises(openai.NotFoundError):
        alice.chat.completions.messages.list("chatcmpl-missing")
    with pytest.raises(openai.BadRequestError):
        alice.chat.completions.list(limit=0)
    with pytest.raises(openai.BadRequestError):
        alice.chat.completions.list(order="sideways")
    with pytest.raises(openai.BadRequestError):
        alice.chat.completions.list(after="chatcmpl-missing")
    for body in [{"rating": 2}, {"rating": "meh"}, {}, {"comment": 5}]:
        with pytest.raises(openai.BadRequestError):
            alice.post(f"/chat/completions/{r.id}/feedback", body=body, cast_to=object)
    with pytest.raises(openai.NotFoundError):
        alice.post("/chat/completions/chatcmpl-missing/feedback", body={"rating": 1}, cast_to=object)


def test_feedback_exports_training_data_the_server_accepts(keyed):
    server, tmp = keyed
    alice = server.client
    good = ask(alice, "What is 2 + 2?", store=True, metadata={"run": "fb"})
    wrong = ask(alice, "What is the capital of Quorria?", store=True, metadata={"run": "fb"})
    ask(alice, "Unrated.", store=True, metadata={"run": "fb"})
    fb = alice.post(f"/chat/completions/{good.id}/feedback", body={"rating": "thumbs_up", "comment": "right"}, cast_to=object)
    assert fb["rating"] == 1.0 and fb["completion_id"] == good.id
    alice.post(f"/chat/completions/{wrong.id}/feedback", body={"rating": -1, "correction": "The capital of Quorria is Tessaly."}, cast_to=object)
    # Feedback is listed with its completion, and filters listings.
    assert [f["correction"] for f in alice.chat.completions.retrieve(wrong.id).feedback] == ["The capital of Quorria is Tessaly."]
    rated = alice.get("/chat/completions", options={"params": {"rated": "corrected", "metadata[run]": "fb"}}, cast_to=object)
    assert [c["id"] for c in rated["data"]] == [wrong.id]

    out = tmp / "train.jsonl"
    for rated in ("good", "corrected"):
        subprocess.run([SMELT, "data", "export", "--database", str(tmp / "smelt.db"), "--rated", rated, "--metadata", "run=fb", "--key", "alice", "-o", str(tmp / f"{rated}.jsonl")], check=True)
    out.write_text((tmp / "good.jsonl").read_text() + (tmp / "corrected.jsonl").read_text())
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert lines == [
        {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": good.choices[0].message.content}]},
        {"messages": [{"role": "user", "content": "What is the capital of Quorria?"}, {"role": "assistant", "content": "The capital of Quorria is Tessaly."}]},
    ]
    # The export is a fine-tuning file as the server checks them.
    f = alice.files.create(file=("train.jsonl", out.read_bytes()), purpose="fine-tune")
    assert f.bytes == len(out.read_bytes())
    # Another key's records are not exported under this key's name.
    proc = subprocess.run([SMELT, "data", "export", "--database", str(tmp / "smelt.db"), "--key", "bob", "--metadata", "run=fb"], capture_output=True, text=True, check=True)
    assert proc.stdout == "" and "exported 0 examples" in proc.stderr


def test_sigkill_under_load_loses_no_answered_completion():
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="smelt-stored-kill-"))
    args = ["--store", "all", "--database", str(tmp / "smelt.db"), "--data-dir", str(tmp / "data"), "--max-batch", "32", "--queue", "128"]
    server = Server(args)
    answered, lock, stop = [], threading.Lock(), threading.Event()

    def client_loop(k):
        c = server.client_for("none").with_options(timeout=60)
        i = 0
        while not stop.is_set():
            try:
                if i % 3 == 0:
                    chunks = list(c.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": f"client {k} request {i}"}], max_tokens=4, stream=True))
                    # Complete only if the stream ended with its finish reason ([DONE] read).
                    if chunks and any(ch.choices and ch.choices[0].finish_reason for ch in chunks):
                        rid = chunks[0].id
                    else:
                        rid = None
                else:
                    rid = ask(c, f"client {k} request {i}", max_tokens=4).id
                if rid:
                    with lock:
                        answered.append(rid)
            except (openai.APIError, OSError):
                pass  # the kill cuts requests off; those were not answered
            i += 1

    threads = [threading.Thread(target=client_loop, args=(k,), daemon=True) for k in range(32)]
    for t in threads:
        t.start()
    deadline = time.time() + 120
    while time.time() < deadline and len(answered) < 60:
        time.sleep(0.2)
    server.kill()
    stop.set()
    for t in threads:
        t.join(timeout=70)
    with lock:
        got = list(answered)
    assert len(got) >= 60, f"only {len(got)} answers before the kill"

    db = sqlite3.connect(tmp / "smelt.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    server = Server(args)
    try:
        stored = {c.id for c in server.client.chat.completions.list(limit=100)}
        missing = [i for i in got if i not in stored]
        assert not missing, f"{len(missing)} of {len(got)} answered completions were lost: {missing[:5]}"
        print(f"{len(got)} answered before the kill, all stored ({len(stored)} stored in all)")
        # The restarted server stores again.
        r = ask(server.client, "after the restart", max_tokens=2)
        assert server.client.chat.completions.retrieve(r.id).id == r.id
    finally:
        server.stop()
