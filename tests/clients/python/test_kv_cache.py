"""KV cache types on the server: `--cache-type-k` / `--cache-type-v` for every model or one
(`MODEL=TYPE`); a quantized pool holds more positions in the same memory, and answers, cached
prefixes included, come out as usual."""
import importlib.util
import pathlib
import re
import subprocess

import pytest

from conftest import BASE_MODEL, CHAT_MODEL, SMELT, Server

pytestmark = pytest.mark.skipif(not SMELT, reason="needs SMELT_BIN (set by the Rust test server_clients)")

ROOT = pathlib.Path(__file__).resolve().parents[3]
SERVE = ["serve", "-m", CHAT_MODEL, "-m", BASE_MODEL, "--kv-memory", "128M"]


def pool(server, model):
    """(types, positions) from the server's line about `model`'s KV cache."""
    for line in server.log:
        m = re.match(re.escape(model) + r": .*KV cache [0-9.]+ \w+ (.+) \((\d+) tokens\)", line)
        if m:
            return m.group(1), int(m.group(2))
    raise AssertionError("no KV cache line for " + model + " in:\n" + "".join(server.log))


def test_quantized_pools_hold_more_and_answer():
    plain = Server([], command=SERVE)
    try:
        f16 = {m: pool(plain, m) for m in (CHAT_MODEL, BASE_MODEL)}
    finally:
        plain.stop()
    server = Server(["--cache-type-k", "q8_0", "--cache-type-v", "q8_0", "--cache-type-k", f"{BASE_MODEL}=q4_0"], command=SERVE)
    try:
        chat, base = pool(server, CHAT_MODEL), pool(server, BASE_MODEL)
        assert f16[CHAT_MODEL][0] == "f16" and chat[0] == "q8_0" and base[0] == "k q4_0, v q8_0"
        # q8_0 takes 34 bytes per 32 values against f16's 64; q4_0 keys 18.
        assert abs(chat[1] / f16[CHAT_MODEL][1] - 64 / 34) < 0.02, (chat, f16)
        assert abs(base[1] / f16[BASE_MODEL][1] - 128 / 52) < 0.02, (base, f16)
        question = [{"role": "user", "content": "Write a Python function that returns the square of a number."}]
        first = server.client.chat.completions.create(model=CHAT_MODEL, messages=question, max_tokens=40, temperature=0)
        assert first.choices[0].message.content.strip()
        again = server.client.chat.completions.create(model=CHAT_MODEL, messages=question, max_tokens=40, temperature=0)
        assert again.choices[0].message.content == first.choices[0].message.content
        assert again.usage.prompt_tokens_details.cached_tokens > 0
        done = server.client.completions.create(model=BASE_MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
        assert done.choices[0].text.strip() and done.usage.completion_tokens == 8
    finally:
        server.stop()


def test_a_type_for_a_model_not_served_is_a_one_line_error():
    out = subprocess.run([SMELT, *SERVE, "--port", "0", "--cache-type-v", "nosuch=q8_0"], capture_output=True, text=True, timeout=120)
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert out.returncode == 1 and len(lines) == 1, out.stderr
    assert "nosuch" in lines[0] and CHAT_MODEL in lines[0], lines[0]
    out = subprocess.run([SMELT, *SERVE, "--port", "0", "--cache-type-k", "q3_k"], capture_output=True, text=True, timeout=120)
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert out.returncode == 1 and len(lines) == 1 and "unknown KV cache type" in lines[0], out.stderr


def test_passkey_found_with_q8_0_wherever_f16_finds_it():
    """scripts/passkey.py's cases at ~1,200 tokens on the base model: every key f16 keys and
    values retrieve, q8_0 ones retrieve too."""
    spec = importlib.util.spec_from_file_location("passkey", ROOT / "scripts" / "passkey.py")
    passkey = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(passkey)
    found = {"f16": set(), "q8_0": set()}
    for depth in [0.1, 0.5, 0.9]:
        text = passkey.prompt(48, depth, 61803)
        for t in found:
            out = subprocess.run([SMELT, "generate", "-m", BASE_MODEL, "--prompt-file", "-", "--max-tokens", "6", "--temperature", "0", "-t", "2",
                                  "--cache-type-k", t, "--cache-type-v", t], input=text, capture_output=True, text=True, timeout=600)
            assert out.returncode == 0, out.stderr
            if re.match(r"\D{0,3}61803", out.stdout.strip()):
                found[t].add(depth)
    assert found["f16"], "the base model found no key with f16: the test says nothing"
    assert found["f16"] <= found["q8_0"], found
