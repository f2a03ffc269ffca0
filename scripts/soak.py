#!/usr/bin/env python3
"""Soak test: mixed hostile and normal traffic from many clients against `smelt serve`.

Starts the server itself (both reference models, loopback only), runs CLIENTS threads for
MINUTES, and reports: server crashes, 5xx responses, latency of normal requests (p50/p99),
and the server's resident memory sampled every minute, with the trend after the first 5.

    python3 scripts/soak.py                       # 30 minutes, 32 clients
    python3 scripts/soak.py --minutes 5 --clients 16
    python3 scripts/soak.py --smelt target/release/smelt --threads 2

Not part of CI (it runs for half an hour); its last result is in the README.
"""
import argparse
import http.client
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import threading
import time

CHAT = "qwen2.5-coder-0.5b-instruct"
BASE = "gemma-3-270m"


def nested(o, inner, c, n):
    return o * n + inner + c * n


def ref_chain(n):
    defs = {f"a{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/a{i + 1}"}}} for i in range(n)}
    defs[f"a{n}"] = {"type": "string"}
    return {"$ref": "#/$defs/a0", "$defs": defs}


def chat(**kw):
    return {"model": CHAT, "messages": [{"role": "user", "content": "Answer briefly."}], "max_tokens": 16, **kw}


EXPONENTIAL = "\n".join(["root ::= x0"] + [f'x{i} ::= x{i + 1} x{i + 1} | "a"' for i in range(30)] + ['x30 ::= "a"'])

# (name, method, path, body bytes or JSON, abandon after seconds or None)
HOSTILE = [
    ("gbnf-deep", "/v1/chat/completions", chat(grammar="root ::= " + nested("(", '"a"', ")", 4000))),
    ("regex-deep", "/v1/completions", {"model": CHAT, "prompt": "x", "max_tokens": 4, "regex": nested("(", "a", ")", 5000)}),
    ("pattern-deep", "/v1/chat/completions", chat(response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "string", "pattern": nested("(", "a", ")", 5000)}}})),
    ("ref-chain", "/v1/chat/completions", chat(response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": ref_chain(5000)}})),
    ("ref-chain-tools", "/v1/chat/completions", chat(tools=[{"type": "function", "function": {"name": "f", "parameters": ref_chain(5000)}}], tool_choice="required")),
    ("exponential", "/v1/chat/completions", chat(grammar=EXPONENTIAL, max_tokens=64)),
    ("ambiguous-regex", "/v1/chat/completions", chat(regex="(a?){0,4970}")),
    ("ambiguous-gbnf", "/v1/chat/completions", chat(grammar='root ::= ("a"?){0,3000}')),
    ("max-length", "/v1/chat/completions", chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"s": {"type": "string", "maxLength": 100000}}}}}], tool_choice="required")),
    ("big-body", "/v1/completions", {"model": BASE, "prompt": "x " * (3 << 19), "max_tokens": 1}),
    ("malformed", "/v1/chat/completions", b'{"model": "x", "messages": [{"role": "user", "content": '),
    ("bad-utf8", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}'),
    ("max-tokens", "/v1/chat/completions", chat(max_tokens=2**63 - 1)),
    ("unique-schema", "/v1/chat/completions", None),  # a new schema each time: grammar cache churn
]
ABANDONED = [
    ("abandoned-stream", "/v1/chat/completions", chat(max_tokens=400, stream=True)),
    ("abandoned-embeddings", "/v1/embeddings", {"model": BASE, "input": [[(7 * i + j) % 20000 + 300 for j in range(3000)] for i in range(4)]}),
]
NORMAL = [
    ("chat", "/v1/chat/completions", lambda r: chat(messages=[{"role": "user", "content": f"Name a fact about the number {r.randint(1, 999)}."}], max_tokens=24)),
    ("completion", "/v1/completions", lambda r: {"model": BASE, "prompt": f"Item {r.randint(1, 999)}: the", "max_tokens": 16}),
    ("schema", "/v1/chat/completions", lambda r: chat(response_format={"type": "json_schema", "json_schema": {"name": "o", "schema": {"type": "object", "properties": {"n": {"type": "integer"}, "why": {"type": "string", "maxLength": 40}}, "required": ["n"]}}})),
    ("embeddings", "/v1/embeddings", lambda r: {"model": BASE, "input": [f"sentence {r.randint(1, 999)}"] * 4}),
    ("stream", "/v1/chat/completions", lambda r: chat(stream=True, max_tokens=24)),
]


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.status = {}
        self.latency = []
        self.errors = []

    def add(self, kind, status, took=None):
        with self.lock:
            self.status[(kind, status)] = self.status.get((kind, status), 0) + 1
            if took is not None:
                self.latency.append(took)


def send(host, port, path, body, abandon=None, timeout=600):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        if abandon is not None:
            time.sleep(abandon)
            conn.sock.shutdown(socket.SHUT_RDWR)
            return None
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


def client(i, host, port, until, stats, hostile_share):
    r = random.Random(i)
    while time.time() < until:
        roll = r.random()
        try:
            if roll < hostile_share:
                name, path, body = r.choice(HOSTILE)
                if body is None:
                    body = chat(response_format={"type": "json_schema", "json_schema": {"name": "u", "schema": {"type": "object", "properties": {f"k{r.randint(0, 10**9)}": {"type": "integer"}}}}})
                stats.add("hostile", send(host, port, path, body))
            elif roll < hostile_share + 0.05:
                name, path, body = r.choice(ABANDONED)
                send(host, port, path, body, abandon=r.uniform(0.2, 2.0))
                stats.add("abandoned", "cut")
            else:
                name, path, make = r.choice(NORMAL)
                t0 = time.perf_counter()
                status = send(host, port, path, make(r))
                stats.add("normal", status, time.perf_counter() - t0)
        except (ConnectionError, OSError, http.client.HTTPException) as e:
            stats.add("transport", type(e).__name__)
            with stats.lock:
                stats.errors.append(f"{time.strftime('%H:%M:%S')} {e!r}")
            time.sleep(0.5)


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        m = re.search(r"VmRSS:\s+(\d+) kB", f.read())
    return int(m.group(1)) / 1024


def cache_gauges(port):
    """Total bytes of the bounded caches, from /metrics (to tell cache growth from leaks)."""
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
    except (OSError, http.client.HTTPException):
        return None
    total = 0.0
    for name in ("smelt_grammar_automata_bytes", "smelt_compiled_grammars_bytes", "smelt_tokenizer_word_cache_bytes"):
        total += sum(float(m.group(1)) for m in re.finditer(r"^" + name + r"(?:\{[^}]*\})? (\S+)$", text, re.M))
    return total / 2**20


def slope(points):
    """Least-squares slope of (x, y) points."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    var = sum((p[0] - mx) ** 2 for p in points)
    return sum((p[0] - mx) * (p[1] - my) for p in points) / var if var else 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smelt", default="target/release/smelt")
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    ap.add_argument("--hostile-share", type=float, default=0.25)
    a = ap.parse_args()

    args = [a.smelt, "serve", "-m", CHAT, "-m", BASE, "--host", "127.0.0.1", "--port", str(a.port), "-t", str(a.threads), "--max-batch", "32", "--queue", "128", "--kv-memory", "512M"]
    server = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    port = None
    for line in server.stderr:
        m = re.match(r"listening on http://[^:]+:(\d+)", line)
        if m:
            port = int(m.group(1))
            break
    if port is None:
        sys.exit("the server exited before listening")
    threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
    while True:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                break
        except OSError:
            pass
        time.sleep(0.5)

    print(f"smelt pid {server.pid} on port {port}; {a.clients} clients for {a.minutes} min, {a.threads} threads, CPU: {cpu()}", flush=True)
    stats = Stats()
    start = time.time()
    until = start + a.minutes * 60
    workers = [threading.Thread(target=client, args=(i, "127.0.0.1", port, until, stats, a.hostile_share), daemon=True) for i in range(a.clients)]
    for w in workers:
        w.start()
    samples = [(0.0, rss_mb(server.pid))]
    crashed = False
    while time.time() < until:
        time.sleep(min(60, max(0, until - time.time())))
        if server.poll() is not None:
            crashed = True
            print(f"SERVER EXITED with {server.returncode}", flush=True)
            break
        m = (time.time() - start) / 60
        samples.append((m, rss_mb(server.pid)))
        with stats.lock:
            n = sum(v for (k, s), v in stats.status.items() if k == "normal")
            five = sum(v for (k, s), v in stats.status.items() if isinstance(s, int) and s >= 500)
        caches = cache_gauges(port)
        caches = f"{caches:6.1f} MiB" if caches is not None else "?"
        print(f"{m:5.1f} min  rss {samples[-1][1]:7.1f} MiB  caches {caches}  normal requests {n}  5xx {five}", flush=True)
    for w in workers:
        w.join(timeout=660)
    alive = server.poll() is None
    if alive:
        server.terminate()
        server.wait(timeout=30)

    five = sum(v for (k, s), v in stats.status.items() if isinstance(s, int) and s >= 500)
    lat = sorted(stats.latency)
    p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")
    late = [s for s in samples if s[0] >= 5]
    print("\n== result")
    print(f"crashes: {int(crashed or not alive)}")
    print(f"5xx responses: {five}")
    for (kind, status), v in sorted(stats.status.items(), key=lambda x: str(x)):
        print(f"  {kind:10} {status!s:22} {v}")
    print(f"normal requests: {len(lat)}, latency p50 {p(0.5):.2f} s, p99 {p(0.99):.2f} s")
    print("resident memory (MiB) by minute: " + ", ".join(f"{m:.0f}:{r:.0f}" for m, r in samples))
    if late:
        print(f"after minute 5: min {min(r for _, r in late):.0f} MiB, max {max(r for _, r in late):.0f} MiB, trend {slope(late):+.2f} MiB/min")
    if stats.errors:
        print(f"transport errors ({len(stats.errors)}), first: {stats.errors[:3]}")
    sys.exit(1 if crashed or five else 0)


def cpu():
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.*)", f.read())
        return f"{m.group(1)} x{os.cpu_count()}"
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
