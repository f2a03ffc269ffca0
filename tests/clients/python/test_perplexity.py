"""`smelt perplexity` against the server's prompt log-probabilities: the same chunks, scored by
another path through the engine (the scheduler's batched prompt logprobs, over HTTP), give the
same perplexity."""
import json
import math
import pathlib
import subprocess

import pytest

from conftest import BASE_MODEL, SMELT
from test_api import post

pytestmark = pytest.mark.skipif(not SMELT, reason="needs SMELT_BIN (set by the Rust test server_clients)")

README = pathlib.Path(__file__).resolve().parents[3] / "README.md"


def test_perplexity_matches_prompt_logprobs(client, tmp_path):
    # The README as plain prose: without "<", no special-token text (`<start_of_turn>`) that the
    # server's /tokenize would parse and the perplexity command (as llama-perplexity) would not.
    # A final newline is dropped by the command, as by llama.cpp's -f.
    text = README.read_text().replace("<", "(").rstrip("\n")
    path = tmp_path / "text.txt"
    path.write_text(text + "\n")
    n_ctx, chunks = 96, 3
    out = subprocess.run([SMELT, "perplexity", "-m", BASE_MODEL, "-f", str(path), "--ctx", str(n_ctx), "--chunks", str(chunks), "-t", "2", "--json"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["chunks"] == chunks and got["tokens_scored"] == chunks * (n_ctx - 1 - n_ctx // 2)
    assert got["perplexity"] > 1 and got["error"] > 0
    assert len(got["running"]) == chunks and got["running"][-1] == got["perplexity"]

    # The reference: each chunk as token ids (BOS first, as llama-perplexity does), echoed with
    # the log-probability of every prompt token; the second half of each chunk is scored.
    ids = post("/tokenize", {"model": BASE_MODEL, "content": text, "add_special": True})["tokens"]
    bos = ids[0]
    nll, count = 0.0, 0
    for c in range(chunks):
        chunk = ids[c * n_ctx:(c + 1) * n_ctx]
        chunk[0] = bos
        r = client.completions.create(model=BASE_MODEL, prompt=chunk, max_tokens=1, temperature=0, logprobs=0, echo=True)
        lps = r.choices[0].logprobs.token_logprobs[:n_ctx]
        for pos in range(n_ctx // 2 + 1, n_ctx):
            nll -= lps[pos]
            count += 1
    want = math.exp(nll / count)
    assert abs(got["perplexity"] / want - 1) < 2e-3, (got["perplexity"], want)


def test_perplexity_needs_enough_text(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words.")
    out = subprocess.run([SMELT, "perplexity", "-m", BASE_MODEL, "-f", str(short)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 1
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "needs at least 1024" in lines[0], out.stderr


def test_quantized_kv_cache_types(tmp_path):
    """--cache-type-k / -v: q8_0 keys and values stay close to f16 in perplexity, q4_0 further
    off; an unknown type is a one-line error."""
    path = tmp_path / "text.txt"
    path.write_text(README.read_text())
    ppl = {}
    for t in ["f16", "q8_0", "q4_0"]:
        out = subprocess.run([SMELT, "perplexity", "-m", BASE_MODEL, "-f", str(path), "--ctx", "256", "--chunks", "3", "-t", "2", "--json",
                              "--cache-type-k", t, "--cache-type-v", t], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        got = json.loads(out.stdout)
        assert got["type_k"] == t and got["type_v"] == t
        assert f"KV cache {t}" in out.stderr
        ppl[t] = got["perplexity"]
    assert ppl["q8_0"] != ppl["f16"], "q8_0 changed nothing"
    assert abs(ppl["q8_0"] / ppl["f16"] - 1) < 0.01, ppl
    assert abs(ppl["q4_0"] / ppl["f16"] - 1) < 0.3, ppl
    assert abs(ppl["q8_0"] / ppl["f16"] - 1) < abs(ppl["q4_0"] / ppl["f16"] - 1), ppl
    bad = subprocess.run([SMELT, "perplexity", "-m", BASE_MODEL, "-f", str(path), "--cache-type-k", "q5_1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown KV cache type" in bad.stderr, bad.stderr
