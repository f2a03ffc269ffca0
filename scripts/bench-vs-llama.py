#!/usr/bin/env python3
"""Side-by-side speed of llama.cpp and smelt on the same machine, models and threads.

usage: scripts/bench-vs-llama.py [--threads 2] [--reps 3] [-p 512] [-n 128] [-d 0] [--cache-type f16] [MODEL ...]

MODEL is a store name or .gguf path (default: the two reference models). llama.cpp's llama-bench
is found through $LLAMA_BENCH (or $LLAMA_CPP_DIR/bin/llama-bench, or
~/.cache/smelt-ref/llama.cpp/bin/llama-bench; README says how to build it). The two programs run
alternately, one repetition each at a time, so both see the same machine conditions, and the
table gives mean t/s and the ratio smelt / llama.cpp. `-d DEPTH` measures both after DEPTH
tokens of context (llama-bench's -d; each program fills its cache, untimed, in every run).
`--cache-type T` stores keys and values as T (f16, q8_0, q4_0) in both programs (llama.cpp
needs flash attention for a quantized V cache, so it runs with -fa 1 then).
"""
import argparse, json, os, shutil, statistics, subprocess, sys

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(here)

def find_llama_bench():
    for cand in [os.environ.get("LLAMA_BENCH"),
                 os.environ.get("LLAMA_CPP_DIR") and os.path.join(os.environ["LLAMA_CPP_DIR"], "bin", "llama-bench"),
                 os.path.expanduser("~/.cache/smelt-ref/llama.cpp/bin/llama-bench"),
                 shutil.which("llama-bench")]:
        if cand and os.path.exists(cand):
            return cand
    sys.exit("llama-bench not found: set LLAMA_BENCH (see README, 'Benchmarks')")

def model_path(smelt, name):
    if os.path.exists(name):
        return name
    out = subprocess.run([smelt, "pull", name], check=True, capture_output=True, text=True).stdout.strip()
    return out.splitlines()[-1]

def llama_rep(bench, path, threads, p, n, d, kv):
    types = [] if kv == "f16" else ["-ctk", kv, "-ctv", kv, "-fa", "1"]
    out = subprocess.run([bench, "-m", path, "-t", str(threads), "-p", str(p), "-n", str(n), "-d", str(d), "-r", "1", "-o", "json"] + types,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)[0]["avg_ts"]

def smelt_rep(smelt, path, threads, p, n, d, kv):
    out = subprocess.run([smelt, "bench", "-m", path, "-t", str(threads), "-p", str(p), "-n", str(n), "-d", str(d), "-r", "1", "--json", "--no-bandwidth", "--no-grammar",
                          "--cache-type-k", kv, "--cache-type-v", kv],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)[0]["avg_ts"]

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*", default=["gemma-3-270m", "qwen2.5-coder-0.5b-instruct"])
    ap.add_argument("--threads", "-t", type=int, default=os.cpu_count())
    ap.add_argument("--reps", "-r", type=int, default=3)
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-d", type=int, default=0, help="context depth before each test")
    ap.add_argument("--cache-type", default="f16", choices=["f16", "q8_0", "q4_0"], help="KV cache type for keys and values")
    a = ap.parse_args()
    smelt = os.path.join(root, "target", "release", "smelt")
    if not os.path.exists(smelt):
        subprocess.run(["cargo", "build", "--release", "-p", "smelt"], check=True, cwd=root)
    bench = find_llama_bench()
    rows = []
    for name in a.models:
        path = model_path(smelt, name)
        at = f" @ d{a.d}" if a.d else ""
        for test, p, n in [(f"pp{a.p}{at}", a.p, 0), (f"tg{a.n}{at}", 0, a.n)]:
            ll, sm = [], []
            for rep in range(a.reps):
                print(f"{name} {test}: repetition {rep + 1}/{a.reps}", file=sys.stderr, flush=True)
                ll.append(llama_rep(bench, path, a.threads, p, n, a.d, a.cache_type))
                sm.append(smelt_rep(smelt, path, a.threads, p, n, a.d, a.cache_type))
            rows.append((name, test, statistics.mean(ll), statistics.mean(sm)))
    print(f"\nthreads: {a.threads}, repetitions: {a.reps} (alternating), KV cache {a.cache_type}\n")
    print("| model | test | llama.cpp t/s | smelt t/s | ratio |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, test, ll, sm in rows:
        print(f"| {name} | {test} | {ll:.1f} | {sm:.1f} | {sm / ll:.2f} |")

if __name__ == "__main__":
    main()
