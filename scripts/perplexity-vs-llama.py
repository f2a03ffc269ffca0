#!/usr/bin/env python3
"""Perplexity from llama.cpp's llama-perplexity and from `smelt perplexity` on the same text,
models, context and chunks, side by side.

usage: scripts/perplexity-vs-llama.py [-f TEXT] [--ctx 512] [--chunks 20] [--threads 2]
                                     [--cache-type f16,q8_0,q4_0] [--llama-types f16] [MODEL ...]

TEXT defaults to tests/data/state-of-the-union.txt (public domain, ~55k tokens). --cache-type
runs each KV cache type in turn (keys and values alike; llama.cpp with flash attention, which it
needs for a quantized V cache) and adds each type's change from f16.

MODEL is a store name or .gguf path (default: the two reference models). llama-perplexity is
found through $LLAMA_PERPLEXITY (or $LLAMA_CPP_DIR/bin, or ~/.cache/smelt-ref/llama.cpp/bin;
scripts/build-llama-cpp.sh builds it). The table gives both estimates with their standard errors,
the relative difference, and each program's time.
"""
import argparse, json, os, re, shutil, subprocess, sys, time

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(here)


def find_llama_perplexity():
    for cand in [os.environ.get("LLAMA_PERPLEXITY"),
                 os.environ.get("LLAMA_CPP_DIR") and os.path.join(os.environ["LLAMA_CPP_DIR"], "bin", "llama-perplexity"),
                 os.path.expanduser("~/.cache/smelt-ref/llama.cpp/bin/llama-perplexity"),
                 shutil.which("llama-perplexity")]:
        if cand and os.path.exists(cand):
            return cand
    sys.exit("llama-perplexity not found: set LLAMA_PERPLEXITY or run scripts/build-llama-cpp.sh")


def model_path(smelt, name):
    if os.path.exists(name):
        return name
    out = subprocess.run([smelt, "pull", name], check=True, capture_output=True, text=True).stdout.strip()
    return out.splitlines()[-1]


def llama(binary, path, text, ctx, chunks, threads, kv):
    t = time.time()
    extra = [] if kv == "f16" else ["-fa", "on", "--cache-type-k", kv, "--cache-type-v", kv]
    out = subprocess.run([binary, "-m", path, "-f", text, "-c", str(ctx), "-b", str(ctx), "--chunks", str(chunks), "-t", str(threads), *extra],
                         capture_output=True, text=True)
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out.stdout + out.stderr)
    if not m:
        sys.exit(f"llama-perplexity failed on {path}:\n{out.stderr[-2000:]}")
    return float(m.group(1)), float(m.group(2)), time.time() - t


def smelt_ppl(smelt, path, text, ctx, chunks, threads, kv):
    t = time.time()
    out = subprocess.run([smelt, "perplexity", "-m", path, "-f", text, "--ctx", str(ctx), "-b", str(ctx), "--chunks", str(chunks), "-t", str(threads), "--json",
                          "--cache-type-k", kv, "--cache-type-v", kv],
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"smelt perplexity failed on {path}:\n{out.stderr[-2000:]}")
    r = json.loads(out.stdout)
    return r["perplexity"], r["error"], time.time() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*", default=["gemma-3-270m", "qwen2.5-coder-0.5b-instruct"])
    ap.add_argument("-f", "--file", default=os.path.join(root, "tests", "data", "state-of-the-union.txt"))
    ap.add_argument("--cache-type", default="f16", help="comma-separated KV cache types")
    ap.add_argument("--llama-types", help="the KV types llama-perplexity runs too (default: all of --cache-type)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--threads", "-t", type=int, default=os.cpu_count())
    a = ap.parse_args()
    smelt = os.path.join(root, "target", "release", "smelt")
    if not os.path.exists(smelt):
        subprocess.run(["cargo", "build", "--release", "-p", "smelt"], check=True, cwd=root)
    binary = find_llama_perplexity()
    rows = []
    for name in a.models:
        path = model_path(smelt, name)
        for kv in a.cache_type.split(","):
            ll = (float("nan"), float("nan"), 0.0)
            if a.llama_types is None or kv in a.llama_types.split(","):
                print(f"{name} {kv}: llama-perplexity", file=sys.stderr, flush=True)
                ll = llama(binary, path, a.file, a.ctx, a.chunks, a.threads, kv)
            print(f"{name} {kv}: smelt perplexity", file=sys.stderr, flush=True)
            sm = smelt_ppl(smelt, path, a.file, a.ctx, a.chunks, a.threads, kv)
            rows.append((name, kv, ll, sm))
    print(f"\ntext: {a.file}; context {a.ctx}, {a.chunks} chunks, {a.threads} threads\n")
    print("| model | KV | llama-perplexity | vs its f16 | smelt perplexity | vs its f16 | smelt vs llama.cpp | llama.cpp s | smelt s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = {(name, prog): v for name, kv, ll, sm in rows if kv == "f16" for prog, v in (("llama", ll[0]), ("smelt", sm[0]))}
    for name, kv, (lp, le, lt), (sp, se, st) in rows:
        rel = lambda v, prog: f"{100 * (v / base[(name, prog)] - 1):+.2f}%" if (name, prog) in base and kv != "f16" and v == v else ""
        if lp == lp:
            ll, vs, lts = f"{lp:.4f} ± {le:.4f}", f"{100 * (sp / lp - 1):+.3f}%", f"{lt:.1f}"
        else:
            ll, vs, lts = "not run", "", ""
        print(f"| {name} | {kv} | {ll} | {rel(lp, 'llama')} | {sp:.4f} ± {se:.4f} | {rel(sp, 'smelt')} | {vs} | {lts} | {st:.1f} |")


if __name__ == "__main__":
    main()
