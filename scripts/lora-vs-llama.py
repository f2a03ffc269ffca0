#!/usr/bin/env python3
"""The same LoRA adapter in llama.cpp's llama-server and in `smelt serve`: do they agree?

usage: scripts/lora-vs-llama.py [--threads 2] [--rank 8] [--b-std 0.05] [--tokens 24] [--adapter FILE] [MODEL ...]

For each model (store names; default both reference models) it writes a random f16 adapter of
the given rank on every projection in llama.cpp's GGUF adapter format (smelt-model's
`random_adapter` example), unless --adapter names one, and serves the model with it in both
servers. On 8 prompts, llama-server generates greedily with the adapter (scale 1); smelt is then
teacher-forced on llama.cpp's tokens (the prompt echoed with logprobs) under the adapter. Printed:
argmax agreement (smelt's most likely token is llama.cpp's choice) and |Δ logprob| of llama.cpp's
tokens (median, p95, max), with the adapter and, for the reference spread, on the base model alone
(llama-server with the adapter's scale set to 0). llama-server is found through $LLAMA_SERVER or
~/.cache/smelt-ref/llama.cpp/bin (scripts/build-llama-cpp.sh builds it).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from importlib import import_module

bench = import_module("bench-server-vs-llama")
ROOT = bench.ROOT

PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "The three largest cities in Japan are",
    "Explain in one paragraph why the sky is blue.",
    "def fibonacci(n):",
    "List five fruits that are red:",
    "Translate 'good morning' into French, Spanish and German.",
    "SELECT name, COUNT(*) FROM orders",
    "Once upon a time, in a village by the sea,",
]


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def llama_greedy(url, ids, n):
    """llama-server's greedy continuation: [(token id, logprob)]."""
    r = post(url + "/completion", {"prompt": ids, "n_predict": n, "temperature": 0, "n_probs": 1, "cache_prompt": False, "return_tokens": True})
    out = []
    for p in r["completion_probabilities"]:
        lp = p["logprob"] if "logprob" in p else __import__("math").log(max(p["probs"][0]["prob"], 1e-30))
        out.append((p["id"], lp))
    return out


def smelt_forced(url, model, ids, cont):
    """smelt's logprob of each continuation token and its own most likely token there."""
    r = post(url + "/v1/completions", {"model": model, "prompt": ids + [t for t, _ in cont], "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1})
    lp = r["choices"][0]["logprobs"]
    n = len(ids)
    got = []
    for j in range(len(cont)):
        top = lp["top_logprobs"][n + j]
        best = max(top.items(), key=lambda kv: kv[1])[0]
        got.append((lp["token_logprobs"][n + j], best, lp["tokens"][n + j]))
    return got


def compare(pairs):
    agree = sum(1 for (_, _), (_, best, tok) in pairs if best == tok) / len(pairs)
    d = sorted(abs(l_llama - l_smelt) for (_, l_llama), (l_smelt, _, _) in pairs)
    return agree, statistics.median(d), d[int(0.95 * (len(d) - 1))], d[-1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--b-std", type=float, default=0.05)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--adapter")
    ap.add_argument("models", nargs="*", default=["qwen2.5-coder-0.5b-instruct", "gemma-3-270m"])
    a = ap.parse_args()
    llama = bench.find_llama_server()
    smelt = os.path.join(ROOT, "target/release/smelt")
    store = os.path.join(os.environ.get("SMELT_HOME", os.path.expanduser("~/.cache/smelt")), "models")
    tmp = tempfile.mkdtemp()
    for m in a.models:
        path = os.path.join(store, m + ".gguf")
        adapter = a.adapter or os.path.join(tmp, m + ".lora.gguf")
        if not a.adapter:
            subprocess.run(["cargo", "run", "-q", "--release", "-p", "smelt-model", "--example", "random_adapter", "--", path, adapter, str(a.rank), "1", str(a.b_std)], cwd=ROOT, check=True)
        lp, sp = bench.free_port(), bench.free_port()
        lproc = subprocess.Popen([llama, "-m", path, "--lora", adapter, "--port", str(lp), "-t", str(a.threads), "-c", "2048", "-np", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sproc = subprocess.Popen([smelt, "serve", "-m", path, "--lora", "a=" + adapter, "--port", str(sp), "-t", str(a.threads)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lurl, surl = f"http://127.0.0.1:{lp}", f"http://127.0.0.1:{sp}"
        try:
            bench.wait_ready(lurl, lproc)
            bench.wait_ready(surl, sproc)
            results = {}
            for label, scale, model in [("adapter", 1.0, m + ":a"), ("base", 0.0, m)]:
                post(lurl + "/lora-adapters", [{"id": 0, "scale": scale}])
                pairs = []
                changed = 0
                for text in PROMPTS:
                    ids = post(surl + "/tokenize", {"model": m, "content": text, "add_special": True})["tokens"]
                    cont = llama_greedy(lurl, ids, a.tokens)
                    pairs += list(zip(cont, smelt_forced(surl, model, ids, cont)))
                    results.setdefault(text, []).append([t for t, _ in cont])
                results[label] = compare(pairs)
            changed = sum(1 for t in PROMPTS if results[t][0] != results[t][1])
            what = f"adapter {a.adapter}" if a.adapter else f"random rank-{a.rank} adapter on every projection"
            print(f"{m}: {what}; it changes llama.cpp's greedy output on {changed} of {len(PROMPTS)} prompts")
            print("| | positions | argmax agreement | |Δ logprob| median | p95 | max |")
            print("|---|---|---|---|---|---|")
            for label in ["adapter", "base"]:
                agree, med, p95, mx = results[label]
                print(f"| {label} | {len(PROMPTS) * a.tokens} | {100 * agree:.1f}% | {med:.4f} | {p95:.3f} | {mx:.3f} |")
        finally:
            for p in (lproc, sproc):
                p.kill()
                p.wait()


if __name__ == "__main__":
    main()
