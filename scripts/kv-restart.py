#!/usr/bin/env python3
"""Time to first token for a question about a long document, cold and after a restart with the
persistent prefix cache (`smelt serve --kv-cache-dir`).

usage: scripts/kv-restart.py [--model M] [--tokens 16384] [--threads 2] [--cache-type f16] [-f TEXT]

Starts `smelt serve` with a fresh cache directory, asks one question about the first ~TOKENS
tokens of TEXT (default tests/data/state-of-the-union.txt) as a system message (greedy,
streaming), stops the server (SIGINT: it writes its cached blocks to disk), starts it again on
the same directory and asks the same question. Prints both times, their ratio, the cached
tokens, and whether the answers are identical.
"""
import argparse, json, os, shutil, signal, subprocess, sys, tempfile, time

import openai

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(here)


def count(smelt, model, text):
    out = subprocess.run([smelt, "tokenize", "-m", model, "-f", "-"], input=text, check=True, capture_output=True, text=True).stdout
    return len(json.loads(out))


def document(smelt, model, path, tokens):
    """The longest start of the text (cut at a space) of at most `tokens` tokens."""
    text = open(path).read()
    n = count(smelt, model, text)
    while n > tokens:
        text = text[: int(len(text) * tokens / n * 0.995)].rsplit(" ", 1)[0]
        n = count(smelt, model, text)
    return text


def serve(smelt, a, cache, port):
    cmd = [smelt, "serve", "-m", a.model, "--port", str(port), "-t", str(a.threads), "--ctx", str(a.tokens + 2048), "--store", "off",
           "--data-dir", os.path.join(cache, "server"), "--kv-cache-dir", os.path.join(cache, "kv"),
           "--cache-type-k", a.cache_type, "--cache-type-v", a.cache_type, "--kv-memory", "2G"]
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        if line.startswith("ready"):
            return p
    sys.exit("the server stopped before it was ready")


def ask(port, model, doc, question):
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=3600, max_retries=0)
    messages = [{"role": "system", "content": "Answer from this document.\n" + doc}, {"role": "user", "content": question}]
    t = time.time()
    ttft, text, usage = None, "", None
    for ch in c.chat.completions.create(model=model, messages=messages, max_tokens=32, temperature=0, stream=True, stream_options={"include_usage": True}):
        if ch.choices and ch.choices[0].delta.content:
            ttft = ttft or time.time() - t
            text += ch.choices[0].delta.content
        if ch.usage:
            usage = ch.usage
    return ttft, text, usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", "-m", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--threads", "-t", type=int, default=2)
    ap.add_argument("--cache-type", default="f16")
    ap.add_argument("--question", default="What does the document say about energy?")
    ap.add_argument("-f", "--file", default=os.path.join(root, "tests", "data", "state-of-the-union.txt"))
    ap.add_argument("--port", type=int, default=8391)
    a = ap.parse_args()
    smelt = os.path.join(root, "target", "release", "smelt")
    doc = document(smelt, a.model, a.file, a.tokens)
    cache = tempfile.mkdtemp(prefix="smelt-kv-restart-")
    runs = []
    try:
        for label in ["cold", "after restart"]:
            p = serve(smelt, a, cache, a.port)
            try:
                runs.append(ask(a.port, a.model, doc, a.question))
            finally:
                p.send_signal(signal.SIGINT)
                rest = p.stderr.read()
                p.wait()
            ttft, text, prompt, cached = runs[-1]
            written = [l for l in rest.splitlines() if "written to the disk cache" in l]
            print(f"{label}: time to first token {ttft:.2f} s, prompt {prompt} tokens, {cached} cached; {'; '.join(written)}", flush=True)
        (cold, a_text, _, _), (warm, b_text, _, _) = runs
        print(f"{a.model}, {a.cache_type} KV, {a.threads} threads: after restart {warm:.2f} s = {100 * warm / cold:.2f}% of cold {cold:.2f} s; "
              f"answers identical: {a_text == b_text}")
    finally:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
