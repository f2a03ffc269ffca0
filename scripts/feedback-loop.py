#!/usr/bin/env python3
"""The feedback loop on a real model: usage → corrections → training data → adapter → eval.

1. `smelt serve --store all` answers questions about N made-up facts (three wordings each),
   and every answer is stored;
2. a "user" corrects each answer through the feedback route (the fact's true sentence);
3. `smelt data export --rated corrected` writes the corrections as fine-tuning JSONL;
4. `smelt tune` trains a LoRA adapter on it;
5. `smelt eval` asks the held-out fourth wording of every fact, base model against
   base + adapter, and prints the side-by-side table (pass = the answer names the fact's value).

    python3 scripts/feedback-loop.py --smelt target/release/smelt [--facts 20 --threads 2]
"""
import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = pathlib.Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("tune_facts", HERE / "tune-facts.py")
tune_facts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tune_facts)


def post(url, path, body):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smelt", default="target/release/smelt")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--facts", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--dir", help="where to keep the database, data and adapter (default: a temporary directory)")
    a = ap.parse_args()
    work = pathlib.Path(a.dir or tempfile.mkdtemp(prefix="smelt-loop-"))
    work.mkdir(parents=True, exist_ok=True)
    db = work / "smelt.db"
    facts = tune_facts.make_facts(a.facts, a.seed)
    tag = f"loop-{os.getpid()}"
    print(f"CPU: {tune_facts.cpu()}, {a.threads} threads; {a.facts} made-up facts; working in {work}", flush=True)

    # 1-2. Usage and corrections.
    proc = subprocess.Popen([a.smelt, "serve", "-m", a.model, "--port", "0", "-t", str(a.threads), "--store", "all", "--database", str(db), "--data-dir", str(work / "data")],
                            stderr=subprocess.PIPE, text=True)
    url = None
    for line in proc.stderr:
        if line.startswith("listening on "):
            url = line.split()[2]
            break
    # Keep reading the server's log (one line per request) so that it never blocks on the pipe.
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    while True:
        try:
            if urllib.request.urlopen(url + "/health").status == 200:
                break
        except OSError:
            time.sleep(0.3)
    t0 = time.time()
    asked = 0
    try:
        for f in facts:
            for q in f["questions"][:3]:
                r = post(url, "/v1/chat/completions", {"model": a.model, "messages": [{"role": "user", "content": q}], "max_tokens": 40, "temperature": 0, "metadata": {"loop": tag}})
                post(url, f"/v1/chat/completions/{r['id']}/feedback", {"rating": -1, "comment": "wrong", "correction": f["answer"]})
                asked += 1
    finally:
        proc.terminate()
        proc.wait()
    print(f"1-2. {asked} questions answered and stored, each corrected ({time.time() - t0:.0f} s)", flush=True)

    # 3. Export.
    data = work / "train.jsonl"
    subprocess.run([a.smelt, "data", "export", "--database", str(db), "--rated", "corrected", "--metadata", f"loop={tag}", "-o", str(data)], check=True)

    # 4. Tune.
    adapter = work / "corrections.gguf"
    t0 = time.time()
    subprocess.run([a.smelt, "tune", "-m", a.model, "--data", str(data), "--out", str(adapter), "--epochs", str(a.epochs), "--lr", "1e-3", "--rank", "16",
                    "--batch-size", "4", "-t", str(a.threads), "--seed", "1"], check=True, stdout=subprocess.DEVNULL)
    print(f"4. smelt tune: {time.time() - t0:.0f} s", flush=True)

    # 5. Eval on the held-out wordings.
    suite = work / "held-out.jsonl"
    header = {"eval": {"name": "held-out facts", "max_tokens": 40, "testing_criteria": [
        {"type": "string_check", "name": "names the value", "input": "{{sample.output_text}}", "reference": "{{item.value}}", "operation": "ilike"}]}}
    with open(suite, "w") as out:
        out.write(json.dumps(header) + "\n")
        for f in facts:
            out.write(json.dumps({"messages": [{"role": "user", "content": f["questions"][3]}], "value": f["value"]}) + "\n")
    subprocess.run([a.smelt, "eval", str(suite), "-m", a.model, "-m", f"{a.model}+{adapter}", "-t", str(a.threads), "--json", str(work / "eval.json"), "--html", str(work / "eval.html")], check=True)


if __name__ == "__main__":
    sys.exit(main())
