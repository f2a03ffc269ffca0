#!/usr/bin/env python3
"""llama.cpp's llama-server and `smelt serve`, side by side on the same model and threads.

usage: scripts/bench-server-vs-llama.py [--threads 2] [--requests 8] [--max-tokens 128] [MODEL ...]
       scripts/bench-server-vs-llama.py --store-cost [--rounds 3] [MODEL ...]

For each model and server it measures, with streaming chat requests:
  - 1 client, then 8 concurrent clients: aggregate generated tokens/s, mean and p95 request
    latency, mean time to first token;
  - a ~2,500-token document asked two different questions one after the other: time to first
    token cold (first question) and warm (second question: the document is in the prefix cache).
llama-server runs with -np 8 for the client tests and -np 1 for the document test, as in the
issue's reference numbers. smelt's single-client requests alternate with `smelt bench` generation
repetitions, so the two are compared on the machine in the same state. llama-server is found
through $LLAMA_SERVER (or next to $LLAMA_BENCH, or ~/.cache/smelt-ref/llama.cpp/bin);
scripts/build-llama-cpp.sh builds it.

--store-cost measures what stored completions cost instead: smelt alone at 8 clients, with
`--store off` and `--store all` alternating for --rounds rounds (each mode a fresh server, the
database in a temporary directory), and prints both throughputs and their ratio.
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_llama_server():
    cands = [os.environ.get("LLAMA_SERVER")]
    if os.environ.get("LLAMA_BENCH"):
        cands.append(os.path.join(os.path.dirname(os.environ["LLAMA_BENCH"]), "llama-server"))
    cands += [os.path.expanduser("~/.cache/smelt-ref/llama.cpp/bin/llama-server"), shutil.which("llama-server")]
    for c in cands:
        if c and os.path.exists(c):
            return c
    sys.exit("llama-server not found: set LLAMA_SERVER (scripts/build-llama-cpp.sh builds it)")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url, proc, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited: {proc.args}")
        try:
            if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                return
        except Exception:
            pass
        time.sleep(0.3)
    sys.exit("server did not become ready")


def start(kind, path, name, threads, parallel, ctx, extra=()):
    port = free_port()
    if kind == "llama.cpp":
        cmd = [find_llama_server(), "-m", path, "-t", str(threads), "-tb", str(threads), "-np", str(parallel), "-c", str(ctx * parallel), "--port", str(port), "--host", "127.0.0.1", "--no-webui"]
    else:
        cmd = [os.path.join(ROOT, "target/release/smelt"), "serve", "-m", name, "-t", str(threads), "--ctx", str(ctx), "--max-batch", str(max(parallel, 8)), "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc)
    return proc, url


def chat(url, model, messages, max_tokens):
    """One streaming request: (time to first token, total time, tokens generated)."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    t0 = time.time()
    ttft, tokens = None, 0
    with urllib.request.urlopen(req, timeout=3600) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d.get("usage"):
                tokens = d["usage"]["completion_tokens"]
            for c in d.get("choices", []):
                if ttft is None and (c.get("delta", {}).get("content") or ""):
                    ttft = time.time() - t0
    return ttft or 0.0, time.time() - t0, tokens


def clients(url, model, n_clients, requests, max_tokens):
    results = []
    lock = threading.Lock()

    def worker(w):
        for r in range(requests):
            q = f"Write a short story about robot number {w * 100 + r}."
            res = chat(url, model, [{"role": "user", "content": q}], max_tokens)
            with lock:
                results.append(res)

    t0 = time.time()
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summarize(results, time.time() - t0)


def one_client(url, model, requests, max_tokens, before_each=None):
    """One client's requests one after another; `before_each()` runs (untimed) before each, so
    `smelt bench` repetitions can alternate with them and both see the machine in the same state."""
    results, wall = [], 0.0
    for r in range(requests):
        if before_each:
            before_each()
        t0 = time.time()
        results.append(chat(url, model, [{"role": "user", "content": f"Write a short story about robot number {r}."}], max_tokens))
        wall += time.time() - t0
    return summarize(results, wall)


def summarize(results, wall):
    lat = sorted(r[1] for r in results)
    return {
        "tps": sum(r[2] for r in results) / wall,
        "lat_mean": statistics.mean(lat),
        "lat_p95": lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))],
        "ttft": statistics.mean(r[0] for r in results),
        # Streaming speed after the first token (comparable with `smelt bench`'s tg).
        "decode": statistics.mean((r[2] - 1) / (r[1] - r[0]) for r in results if r[2] > 1 and r[1] > r[0]),
    }


def document(smelt, model, target_tokens=2500):
    """The repository's README and kernel notes, cut to `target_tokens` of the model's tokenizer."""
    text = open(os.path.join(ROOT, "README.md")).read() + "\n" + open(os.path.join(ROOT, "crates/smelt-kernels/PERF.md")).read()
    words = text.split()
    while len(words) < 4 * target_tokens:
        words += words

    def tokens(n):
        out = subprocess.run([smelt, "tokenize", "-m", model, " ".join(words[:n])], check=True, capture_output=True, text=True).stdout
        return len(json.loads(out))

    lo, hi = 1, 4 * target_tokens
    while lo < hi:  # the most words that stay within target_tokens
        mid = (lo + hi + 1) // 2
        if tokens(mid) <= target_tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo]), tokens(lo)


def doc_ttft(url, model, doc):
    cold = chat(url, model, [{"role": "user", "content": doc + "\n\nWhat is this document about?"}], 8)[0]
    warm = chat(url, model, [{"role": "user", "content": doc + "\n\nWhich models does it mention?"}], 8)[0]
    return cold, warm


def store_cost(a, smelt):
    """8-client throughput with stored completions off and on, alternating."""
    for name in a.models:
        path = subprocess.run([smelt, "pull", name], check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        tps = {"off": [], "all": []}
        for r in range(a.rounds):
            for mode in ("off", "all"):
                db = os.path.join(tempfile.mkdtemp(prefix="smelt-store-cost-"), "smelt.db")
                extra = ["--store", mode, "--database", db, "--data-dir", os.path.dirname(db)]
                proc, url = start("smelt", path, name, a.threads, 8, a.ctx, extra)
                try:
                    clients(url, name, 8, 1, 8)  # warm up
                    tps[mode].append(clients(url, name, 8, a.requests, a.max_tokens)["tps"])
                finally:
                    proc.terminate()
                    proc.wait()
                print(f"{name}: round {r + 1} --store {mode}: {tps[mode][-1]:.1f} t/s", file=sys.stderr, flush=True)
        off, on = statistics.mean(tps["off"]), statistics.mean(tps["all"])
        print(f"{name}: 8 clients x {a.requests} requests x {a.max_tokens} tokens, {a.threads} threads, {a.rounds} rounds: "
              f"--store off {off:.1f} t/s, --store all {on:.1f} t/s; storing costs {100 * (1 - on / off):.1f}%")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*", default=["gemma-3-270m", "qwen2.5-coder-0.5b-instruct"])
    ap.add_argument("--threads", "-t", type=int, default=os.cpu_count())
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--store-cost", action="store_true", help="measure stored completions' cost on smelt instead")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    smelt = os.path.join(ROOT, "target/release/smelt")
    if not os.path.exists(smelt):
        subprocess.run(["cargo", "build", "--release", "-p", "smelt"], check=True, cwd=ROOT)
    if a.store_cost:
        return store_cost(a, smelt)
    rows = []
    bench = {}
    doc_tokens = {}
    for name in a.models:
        path = subprocess.run([smelt, "pull", name], check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        samples = []

        def bench_rep():
            out = subprocess.run([smelt, "bench", "-m", name, "-t", str(a.threads), "-p", "0", "-n", str(a.max_tokens), "-r", "1", "--json", "--no-bandwidth", "--no-grammar"], check=True, capture_output=True, text=True).stdout
            samples.append(json.loads(out)[0]["avg_ts"])

        doc, doc_tokens[name] = document(smelt, name)
        for kind in ["llama.cpp", "smelt"]:
            print(f"{name}: {kind} ...", file=sys.stderr, flush=True)
            proc, url = start(kind, path, name, a.threads, 8, a.ctx)
            try:
                # smelt's single client alternates with `smelt bench` generation repetitions.
                one = one_client(url, name, a.requests, a.max_tokens, bench_rep if kind == "smelt" else None)
                eight = clients(url, name, 8, a.requests, a.max_tokens)
            finally:
                proc.terminate()
                proc.wait()
            proc, url = start(kind, path, name, a.threads, 1, a.ctx)
            try:
                cold, warm = doc_ttft(url, name, doc)
            finally:
                proc.terminate()
                proc.wait()
            rows.append((name, kind, one, eight, cold, warm))
        bench[name] = statistics.mean(samples)
    print(f"\nthreads: {a.threads}, {a.requests} requests per client, {a.max_tokens} tokens each, greedy, streaming")
    print("document: " + ", ".join(f"{n} {t} tokens" for n, t in doc_tokens.items()) + " (plus the question and chat template)\n")
    print("| model | server | 1 client t/s | latency mean / p95 s | TTFT s | 8 clients t/s | latency mean / p95 s | TTFT s | doc TTFT cold s | warm s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, kind, one, eight, cold, warm in rows:
        print(f"| {name} | {kind} | {one['tps']:.1f} | {one['lat_mean']:.2f} / {one['lat_p95']:.2f} | {one['ttft']:.3f} | {eight['tps']:.1f} | {eight['lat_mean']:.2f} / {eight['lat_p95']:.2f} | {eight['ttft']:.3f} | {cold:.2f} | {warm:.3f} |")
    print()
    by = {(r[0], r[1]): r for r in rows}
    for name in a.models:
        ll, sm = by[(name, "llama.cpp")], by[(name, "smelt")]
        print(f"{name}: 8-client throughput smelt/llama.cpp = {sm[3]['tps'] / ll[3]['tps']:.2f}; warm TTFT = {100 * sm[5] / sm[4]:.1f}% of cold (llama.cpp warm {ll[5]:.3f} s)")
        print(f"{name}: 1-client streaming decode {sm[2]['decode']:.1f} t/s vs smelt bench tg{a.max_tokens} {bench[name]:.1f} t/s (alternating; {100 * sm[2]['decode'] / bench[name]:.0f}%); llama.cpp {ll[2]['decode']:.1f} t/s")


if __name__ == "__main__":
    main()
