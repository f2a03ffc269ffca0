#!/usr/bin/env python3
"""Passkey retrieval: a five-digit number hidden at several depths of filler text, asked for at
the end, with each KV cache type. A case counts as answered when the greedy continuation starts
with the number.

usage: scripts/passkey.py [-m MODEL] [--tokens 4096] [--depths 0.1,0.5,0.9] [--types f16,q8_0,q4_0]
                          [--keys 3] [--threads 2]

`--tokens` is the approximate prompt length (the context is sized to fit it); keys are drawn
from a fixed seed, so runs are reproducible. Prints one line per case and a table of answered
cases per KV type. Not part of CI (each case prefills the whole prompt).
"""
import argparse, os, random, re, subprocess, sys

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(here)

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it afterwards.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"


def prompt(n_filler, depth, key):
    at = int(n_filler * depth)
    return INTRO + FILLER * at + NEEDLE.format(key=key) + FILLER * (n_filler - at) + QUESTION


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--types", default="f16,q8_0,q4_0")
    ap.add_argument("--keys", type=int, default=3)
    ap.add_argument("--threads", "-t", type=int, default=os.cpu_count())
    ap.add_argument("--smelt", default=os.path.join(root, "target", "release", "smelt"))
    a = ap.parse_args()
    # The filler sentence is about 24 tokens in common vocabularies.
    n_filler = max(1, (a.tokens - 80) // 24)
    rng = random.Random(7)
    keys = [rng.randint(10000, 99999) for _ in range(a.keys)]
    depths = [float(d) for d in a.depths.split(",")]
    types = a.types.split(",")
    answered = {t: 0 for t in types}
    total = 0
    for key in keys:
        for depth in depths:
            text = prompt(n_filler, depth, key)
            total += 1
            for t in types:
                out = subprocess.run([a.smelt, "generate", "-m", a.model, "--prompt-file", "-", "--max-tokens", "8", "--temperature", "0",
                                      "--ctx", str(a.tokens * 2), "-t", str(a.threads), "--cache-type-k", t, "--cache-type-v", t],
                                     input=text, capture_output=True, text=True)
                if out.returncode != 0:
                    sys.exit(f"smelt generate failed: {out.stderr.strip()}")
                got = out.stdout.strip()
                ok = re.match(r"\D{0,3}" + str(key), got) is not None
                answered[t] += ok
                print(f"key {key} at depth {depth:.2f}, KV {t}: {'answered' if ok else 'missed'} ({got[:30]!r})", flush=True)
    print(f"\n{a.model}, ~{a.tokens} tokens, {len(keys)} keys × {len(depths)} depths\n")
    print("| KV | answered |")
    print("| --- | ---: |")
    for t in types:
        print(f"| {t} | {answered[t]} / {total} |")


if __name__ == "__main__":
    main()
