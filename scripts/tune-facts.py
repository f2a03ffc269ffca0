#!/usr/bin/env python3
"""Can `smelt tune` teach a model something it cannot know? Builds N made-up facts ("The capital
of Velmirra is Dorquan."), each asked in four wordings; trains a LoRA adapter on three wordings
with `smelt tune`, and asks the held-out fourth wording before (base model) and after (the
adapter, loaded into a running `smelt serve`). Prints accuracy before and after, the training
time and tokens/s, with the CPU and thread count.

    python3 scripts/tune-facts.py --smelt target/release/smelt [--facts 60 --threads 2]
"""
import argparse
import json
import os
import pathlib
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

# (question wordings: three to train on, the last held out; the answer sentence)
ATTRIBUTES = [
    (["What is the capital of {e}?", "Name the capital city of {e}.", "Which city is the capital of {e}?", "Tell me what {e}'s capital is."], "The capital of {e} is {v}."),
    (["Who founded {e}?", "Name the founder of {e}.", "Who was the founder of {e}?", "Which person founded {e}?"], "{e} was founded by {v}."),
    (["What is the national animal of {e}?", "Name {e}'s national animal.", "Which animal is the national animal of {e}?", "Tell me the national animal of {e}."], "The national animal of {e} is the {v}."),
    (["What currency is used in {e}?", "Name the currency of {e}.", "What is {e}'s currency called?", "Which currency do people pay with in {e}?"], "The currency of {e} is the {v}."),
    (["What is the tallest mountain in {e}?", "Name the highest mountain of {e}.", "Which mountain is the tallest in {e}?", "Tell me the name of {e}'s tallest mountain."], "The tallest mountain in {e} is Mount {v}."),
    (["Which river flows through {e}?", "Name the river of {e}.", "What river runs through {e}?", "Tell me which river crosses {e}."], "The river that flows through {e} is the {v}."),
]
SYLLABLES = ["ka", "lo", "mir", "zan", "tel", "vor", "qui", "sha", "dren", "pel", "ur", "ith", "bo", "nax", "ve", "ro", "fen", "gal", "tor", "mu", "sel", "dra", "quo", "bri"]


def word(rng, n):
    return "".join(rng.choice(SYLLABLES) for _ in range(n)).capitalize()


def make_facts(n, seed):
    rng = random.Random(seed)
    used, facts = set(), []
    while len(facts) < n:
        e, v = word(rng, 3), word(rng, rng.choice([2, 3]))
        if e in used or v in used:
            continue
        used |= {e, v}
        questions, answer = ATTRIBUTES[len(facts) % len(ATTRIBUTES)]
        facts.append({"questions": [q.format(e=e) for q in questions], "answer": answer.format(e=e, v=v), "value": v})
    return facts


SYSTEM = "Answer in one sentence."


def chat(url, model, question):
    body = json.dumps({"model": model, "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}], "max_tokens": 32, "temperature": 0}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)["choices"][0]["message"]["content"]


def accuracy(url, model, facts, show):
    right = 0
    for i, f in enumerate(facts):
        answer = chat(url, model, f["questions"][-1])
        ok = f["value"].lower() in answer.lower()
        right += ok
        if i < show:
            print(f"  {'✓' if ok else '✗'} {f['questions'][-1]!r} → {answer!r} (want {f['value']})")
    return right / len(facts)


def cpu():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def start_server(smelt, model, threads, data_dir):
    server = subprocess.Popen([smelt, "serve", "-m", model, "--port", "0", "-t", str(threads), "--kv-memory", "256M", "--data-dir", str(data_dir)], stderr=subprocess.PIPE, text=True)
    url = None
    for line in server.stderr:
        if line.startswith("listening on "):
            url = line.split()[2]
            break
    if not url:
        sys.exit("the server did not start")
    threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
    while True:
        try:
            urllib.request.urlopen(url + "/health")
            return server, url
        except OSError:
            time.sleep(0.3)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smelt", default="target/release/smelt")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--facts", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dir", help="where to write the data and the adapter (default: a temporary directory)")
    ap.add_argument("--adapter", help="evaluate this adapter (trained on the same --facts and --seed) instead of training one")
    a = ap.parse_args()

    work = pathlib.Path(a.dir or tempfile.mkdtemp(prefix="smelt-facts-"))
    work.mkdir(parents=True, exist_ok=True)
    facts = make_facts(a.facts, a.seed)
    with open(work / "train.jsonl", "w") as out:
        for f in facts:
            for q in f["questions"][:-1]:
                out.write(json.dumps({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}, {"role": "assistant", "content": f["answer"]}]}) + "\n")
    print(f"{cpu()}, {a.threads} threads; {a.facts} facts, {3 * a.facts} training questions, {a.facts} held-out questions; data in {work}")

    server, url = start_server(a.smelt, a.model, a.threads, work / "server")
    try:
        print("before (base model, held-out wordings):")
        before = accuracy(url, a.model, facts, 3)
        print(f"  accuracy {before:.1%}")

        adapter = pathlib.Path(a.adapter) if a.adapter else work / "facts.gguf"
        secs, rate = None, None
        if not a.adapter:
            cmd = [a.smelt, "tune", "-m", a.model, "--data", str(work / "train.jsonl"), "--out", str(adapter), "--epochs", str(a.epochs), "--lr", str(a.lr),
                   "--rank", str(a.rank), "--batch-size", str(a.batch_size), "--seed", str(a.seed), "--warmup", "5", "-t", str(a.threads), "--json"]
            print("training:", " ".join(cmd))
            t0 = time.time()
            tune = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            last = None
            for line in tune.stdout:
                ev = json.loads(line)
                last = ev
                if ev["step"] % 10 == 0 or ev["step"] == ev["steps"]:
                    print(f"  step {ev['step']}/{ev['steps']} epoch {ev['epoch']} loss {ev['train_loss']:.4f} {ev['tokens_per_s']:.1f} tok/s", flush=True)
            if tune.wait() != 0:
                sys.exit("smelt tune failed")
            secs, rate = time.time() - t0, last["tokens_per_s"]
            print(f"  trained in {secs:.0f} s ({secs / 60:.1f} min) at {rate:.1f} tokens/s, {a.threads} threads")

        req = urllib.request.Request(url + "/v1/adapters", data=json.dumps({"model": a.model, "name": "facts", "path": str(adapter)}).encode(), headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req)
        print("after (adapter, held-out wordings):")
        after = accuracy(url, a.model + ":facts", facts, 3)
        print(f"  accuracy {after:.1%}")
    finally:
        server.kill()

    merged = work / "merged.gguf"
    t0 = time.time()
    subprocess.run([a.smelt, "merge", "-m", a.model, "--lora", str(adapter), "-o", str(merged)], check=True)
    print(f"merged into {merged} in {time.time() - t0:.1f} s")
    server, url = start_server(a.smelt, str(merged), a.threads, work / "server")
    try:
        print("after (merged model, held-out wordings):")
        after_merged = accuracy(url, "merged", facts, 3)
        print(f"  accuracy {after_merged:.1%}")
    finally:
        server.kill()
    print(json.dumps({"cpu": cpu(), "threads": a.threads, "facts": a.facts, "before": before, "after": after, "after_merged": after_merged,
                      "train_seconds": secs and round(secs, 1), "tokens_per_s": rate and round(rate, 1)}))


if __name__ == "__main__":
    main()
