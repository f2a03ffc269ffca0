#!/usr/bin/env python3
"""How responsive is `smelt serve` while a fine-tuning job trains in it? Measures the decode
speed of single requests to the served model with no job, then while a job (started through
/v1/fine_tuning/jobs on the same model) trains at low priority, and the job's own training
speed meanwhile. Prints tokens/s with the CPU and thread count.

    python3 scripts/serve-while-training.py --smelt target/release/smelt [--threads 2]
"""
import argparse
import json
import subprocess
import tempfile
import threading
import time
import urllib.request
import uuid


def post(url, path, body, headers=None, raw=None):
    req = urllib.request.Request(url + path, data=raw if raw is not None else json.dumps(body).encode(), headers=headers or {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def get(url, path):
    with urllib.request.urlopen(url + path, timeout=600) as r:
        return json.load(r)


def decode_speed(url, model, n, tokens):
    rates = []
    for i in range(n):
        t = time.time()
        r = post(url, "/v1/completions", {"model": model, "prompt": f"# A long Python module, part {i}\nimport", "max_tokens": tokens, "temperature": 0})
        rates.append(r["usage"]["completion_tokens"] / (time.time() - t))
    rates.sort()
    return rates[len(rates) // 2]


def upload(url, name, text):
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\nContent-Type: application/jsonl\r\n\r\n").encode() + text.encode() + f"\r\n--{boundary}--\r\n".encode()
    return post(url, "/v1/files", None, {"Content-Type": f"multipart/form-data; boundary={boundary}"}, body)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smelt", default="target/release/smelt")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    a = ap.parse_args()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown CPU")
    data = tempfile.mkdtemp(prefix="smelt-swt-")
    server = subprocess.Popen([a.smelt, "serve", "-m", a.model, "--port", "0", "-t", str(a.threads), "--kv-memory", "256M", "--data-dir", data], stderr=subprocess.PIPE, text=True)
    try:
        url = next(l.split()[2] for l in server.stderr if l.startswith("listening on "))
        threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
        while True:
            try:
                get(url, "/health")
                break
            except OSError:
                time.sleep(0.3)
        idle = decode_speed(url, a.model, a.requests, a.tokens)
        print(f"{cpu}, {a.threads} threads; decode with no job: {idle:.1f} tokens/s (median of {a.requests} × {a.tokens} tokens)")
        lines = [json.dumps({"messages": [{"role": "user", "content": f"What is item {i} of the list?"}, {"role": "assistant", "content": f"Item {i} is the number {i * 7 % 13}."}]}) for i in range(200)]
        f = upload(url, "load.jsonl", "\n".join(lines) + "\n")
        job = post(url, "/v1/fine_tuning/jobs", {"model": a.model, "training_file": f["id"], "hyperparameters": {"n_epochs": 5, "batch_size": 4}})
        while get(url, f"/v1/fine_tuning/jobs/{job['id']}")["status"] != "running":
            time.sleep(0.5)
        time.sleep(8)  # past the trainer's set-up
        busy = decode_speed(url, a.model, a.requests, a.tokens)
        events = get(url, f"/v1/fine_tuning/jobs/{job['id']}/events?limit=1000")["data"]
        metrics = [e["data"] for e in events if e["type"] == "metrics"]
        rate = metrics[0]["tokens_per_second"] if metrics else 0.0
        print(f"decode while a job trains: {busy:.1f} tokens/s ({busy / idle:.0%} of idle); the job meanwhile: {len(metrics)} steps, {rate:.1f} training tokens/s")
        post(url, f"/v1/fine_tuning/jobs/{job['id']}/cancel", {})
        print(json.dumps({"cpu": cpu, "threads": a.threads, "decode_idle": round(idle, 1), "decode_training": round(busy, 1), "ratio": round(busy / idle, 3), "training_tokens_per_s": round(rate, 1)}))
    finally:
        server.kill()


if __name__ == "__main__":
    main()
