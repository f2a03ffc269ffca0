#!/usr/bin/env python3
"""Training speed and peak memory, side by side in one run: `smelt tune` (LoRA on the quantized
model) against llama.cpp's `llama-finetune` (full fine-tuning; it needs an F32 copy of the model,
made here with `llama-quantize --allow-requantize ... F32`), on the same text, the same context
and thread count; smelt with its activations kept and recomputed (`--recompute`). Prints training
tokens/s, peak resident memory and the ratio, with the CPU.

    python3 scripts/tune-vs-llama.py --smelt target/release/smelt [--llama-bin DIR] [--threads 2]

DIR holds llama-finetune and llama-quantize (scripts/build-llama-cpp.sh builds them; default
~/.cache/smelt-ref/llama.cpp/bin).
"""
import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]


def timed(cmd, log, must=True):
    """Run `cmd` under /usr/bin/time; (stderr text, peak RSS in MiB), or None when it fails and
    `must` is false."""
    with open(log, "w") as f:
        p = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB %M", *cmd], stdout=subprocess.DEVNULL, stderr=f)
    text = open(log, errors="replace").read()
    if p.returncode != 0:
        if not must:
            return None
        sys.exit(f"{cmd[0]} failed (log in {log}):\n{text[-2000:]}")
    rss = int(re.findall(r"MAXRSS_KB (\d+)", text)[-1]) / 1024
    return text, rss


def store_path(name):
    home = pathlib.Path(os.environ.get("SMELT_HOME", pathlib.Path.home() / ".cache/smelt"))
    return home / "models" / f"{name}.gguf"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smelt", default="target/release/smelt")
    ap.add_argument("--llama-bin", default=str(pathlib.Path.home() / ".cache/smelt-ref/llama.cpp/bin"))
    ap.add_argument("--models", default="qwen2.5-coder-0.5b-instruct,gemma-3-270m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--chars", type=int, default=7000, help="training text: this many characters of the README")
    ap.add_argument("--dir", help="work directory (the F32 copies are kept there; default: a temporary one)")
    a = ap.parse_args()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown CPU")
    work = pathlib.Path(a.dir or tempfile.mkdtemp(prefix="smelt-tune-vs-llama-"))
    work.mkdir(parents=True, exist_ok=True)
    text = (REPO / "README.md").read_text()[: a.chars]
    (work / "train.txt").write_text(text)
    # The same text for smelt: pieces of about a context each, trained on whole (no prompt).
    pieces, cur = [], ""
    for para in text.split("\n\n"):
        if len(cur) + len(para) > a.ctx * 3 and cur:
            pieces.append(cur)
            cur = ""
        cur += para + "\n\n"
    pieces.append(cur)
    with open(work / "train.jsonl", "w") as f:
        for p in pieces:
            f.write(json.dumps({"prompt": "", "completion": p}) + "\n")
    bin_ = pathlib.Path(a.llama_bin)
    print(f"{cpu}, {a.threads} threads, context {a.ctx}, {len(text)} characters of text, one epoch each")
    results = []
    for name in a.models.split(","):
        model = store_path(name)
        f32 = work / f"{name}-f32.gguf"
        if not f32.exists():
            subprocess.run([str(bin_ / "llama-quantize"), "--allow-requantize", str(model), str(f32), "F32"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        run = timed([str(bin_ / "llama-finetune"), "-m", str(f32), "-f", str(work / "train.txt"), "-c", str(a.ctx), "-b", str(a.ctx), "-ub", str(a.ctx),
                     "-t", str(a.threads), "-ngl", "0", "--epochs", "1", "-o", str(work / "llama-finetuned.gguf")], work / f"llama-{name}.log", must=False)
        llama_rate, rss, why = None, None, None
        if run is None:
            # llama-finetune cannot train every architecture (Gemma 3: no backward pass for GEGLU).
            lines = [l for l in open(work / f"llama-{name}.log", errors="replace").read().splitlines() if "unsupported" in l or "error" in l.lower()]
            why = (lines[-1] if lines else "it failed").split(": ", 1)[-1]
        else:
            log, rss = run
            train = [seg for seg in re.split(r"[\r\n]", log) if seg.startswith("train:") and "data=" in seg][-1]
            done, _total = map(int, re.search(r"data=(\d+)/(\d+)", train).groups())
            h, m, s = map(int, re.search(r"t=(\d+):(\d+):(\d+)", train).groups())
            llama_rate = done * a.ctx / max(1, h * 3600 + m * 60 + s)
        try:
            os.remove(work / "llama-finetuned.gguf")
        except OSError:
            pass
        for recompute in (False, True):
            log, srss = timed([a.smelt, "tune", "-m", str(model), "--data", str(work / "train.jsonl"), "--out", str(work / f"{name}-lora.gguf"), "--epochs", "1",
                               "--rank", "16", "--ctx", str(4 * a.ctx), "-t", str(a.threads), "--json", *(["--recompute"] if recompute else [])], work / f"smelt-{name}.log")
            smelt_rate = float(re.search(r"\(([\d.]+) tokens/s", log).group(1))
            llama = f"llama-finetune {llama_rate:.1f} tokens/s, peak {rss:.0f} MiB" if llama_rate else f"llama-finetune cannot train it ({why})"
            ratio = f"{smelt_rate / llama_rate:.1f}x" if llama_rate else "-"
            what = "smelt tune --recompute" if recompute else "smelt tune"
            print(f"{name}: {llama}  |  {what} (LoRA r16) {smelt_rate:.1f} tokens/s, peak {srss:.0f} MiB  |  {ratio}")
            results.append({"model": name, "recompute": recompute, "llama_tokens_per_s": llama_rate and round(llama_rate, 2), "llama_peak_mb": rss and round(rss), "llama_error": why,
                            "smelt_tokens_per_s": smelt_rate, "smelt_peak_mb": round(srss), "ratio": llama_rate and round(smelt_rate / llama_rate, 2)})
    print(json.dumps({"cpu": cpu, "threads": a.threads, "ctx": a.ctx, "results": results}))


if __name__ == "__main__":
    main()
