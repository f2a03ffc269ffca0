"""The persistent prefix cache (`--kv-cache-dir`): a document processed once is read back from
disk after a restart, with the same answer; damaged cache files are ignored, never used."""
import pathlib
import subprocess
import tempfile
import urllib.request

import pytest

from conftest import BASE_MODEL, CHAT_MODEL, SMELT, Server

pytestmark = pytest.mark.skipif(not SMELT, reason="needs SMELT_BIN (set by the Rust test server_clients)")


def document(n):
    return "\n".join(f"Record {i}: the depot in district {i % 13} sent {i * 41 % 997} boxes of part {i * 7919 % 509} on day {i % 28 + 1}."
                     for i in range(n))


def ask(server, doc, question):
    messages = [{"role": "system", "content": "Answer from these records.\n" + doc}, {"role": "user", "content": question}]
    r = server.client.chat.completions.create(model=CHAT_MODEL, messages=messages, max_tokens=16, temperature=0)
    return r.choices[0].message.content, r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens


def metric(server, name):
    with urllib.request.urlopen(server.url + "/metrics") as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.split()[-1])
    raise AssertionError(name + " not in /metrics")


def test_a_document_is_read_back_from_disk_after_a_restart_and_damage_is_ignored():
    cache = pathlib.Path(tempfile.mkdtemp(prefix="smelt-kv-disk-"))
    doc = document(50)
    question = "How many boxes did record 21 send?"
    # Without a disk cache: the reference answer.
    plain = Server([])
    try:
        want, prompt_tokens, cached = ask(plain, doc, question)
        assert cached == 0 and prompt_tokens > 1000
    finally:
        plain.stop()

    args = ["--kv-cache-dir", str(cache)]
    first = Server(args)
    try:
        assert ask(first, doc, question) == (want, prompt_tokens, 0)
    finally:
        first.stop()
    # Written when the server stopped (nothing was evicted from memory before).
    assert any("KV blocks written to the disk cache" in l for l in first.log), "".join(first.log)
    files = sorted(cache.glob("*/*.kv"))
    assert len(files) >= prompt_tokens // 16

    second = Server(args)
    try:
        answer, _, cached = ask(second, doc, question)
        assert answer == want, "the answer changed with KV read from disk"
        assert cached >= prompt_tokens - 16, (cached, prompt_tokens)
        assert metric(second, "smelt_prefix_cache_disk_hit_tokens_total") == cached
        # Another question about the same document shares its KV too.
        _, _, cached = ask(second, doc, "Which part did record 7 send?")
        assert cached >= prompt_tokens - 32
    finally:
        second.stop()

    # Damage while stopped: a flipped byte in every third file, every fifth file truncated.
    files = sorted(cache.glob("*/*.kv"))
    for i, f in enumerate(files):
        b = bytearray(f.read_bytes())
        if i % 3 == 1:
            b[len(b) // 2] ^= 0x10
            f.write_bytes(bytes(b))
        elif i % 5 == 2:
            f.write_bytes(bytes(b[: len(b) // 3]))
    third = Server(args)
    try:
        answer, _, cached = ask(third, doc, question)
        assert answer == want, "damaged cache files changed the answer"
        assert cached < prompt_tokens - 16, "a damaged block was used"
        assert metric(third, "smelt_kv_disk_rejected_blocks_total") >= 1
        # Recomputed blocks replace the damaged ones on the next stop.
    finally:
        third.stop()
    assert any("ignoring the damaged KV cache file" in l for l in third.log), "".join(third.log)


def test_an_unusable_cache_directory_is_a_one_line_error():
    not_a_dir = tempfile.NamedTemporaryFile(prefix="smelt-kv-disk-file-", delete=False).name
    out = subprocess.run([SMELT, "serve", "-m", CHAT_MODEL, "--port", "0", "--store", "off", "--kv-cache-dir", not_a_dir], capture_output=True, text=True, timeout=120)
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert out.returncode == 1 and len(lines) == 1 and "--kv-cache-dir" in lines[0] and "not a directory" in lines[0], out.stderr


def test_the_cli_and_the_server_share_the_cache_directory():
    cache = tempfile.mkdtemp(prefix="smelt-kv-disk-cli-")
    prompt = document(40) + "\nQuestion: how many boxes did record 21 send? Answer:"
    runs = []
    for _ in range(2):
        out = subprocess.run([SMELT, "generate", "-m", BASE_MODEL, "--prompt-file", "-", "-n", "8", "--temperature", "0", "-t", "2", "--kv-cache-dir", cache],
                             input=prompt, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        runs.append(out)
    assert runs[0].stdout == runs[1].stdout
    assert "read from the KV disk cache" not in runs[0].stderr and "read from the KV disk cache" in runs[1].stderr, runs[1].stderr
    # Blocks the CLI wrote serve the server's requests for the same text.
    server = Server(["--kv-cache-dir", cache], command=["serve", "-m", BASE_MODEL, "--kv-memory", "128M"])
    try:
        r = server.client.completions.create(model=BASE_MODEL, prompt=prompt, max_tokens=8, temperature=0)
        assert r.choices[0].text == runs[0].stdout.rstrip("\n")
        assert metric(server, "smelt_prefix_cache_disk_hit_tokens_total") >= r.usage.prompt_tokens - 16
    finally:
        server.stop()
