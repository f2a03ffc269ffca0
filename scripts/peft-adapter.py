#!/usr/bin/env python3
"""An adapter made with the Hugging Face tooling, for the reverse interop check: the `peft`
package builds a LoRA adapter with random weights for Qwen2.5-Coder 0.5B Instruct's
architecture (rank 8 on every projection; the base weights are never needed, only the model's
config), llama.cpp's `convert_lora_to_gguf.py` converts it to GGUF, and
`scripts/lora-vs-llama.py --adapter` then compares smelt and llama-server under it.

    python3 -m pip install torch transformers peft safetensors
    python3 scripts/peft-adapter.py --out /tmp/peft.gguf [--llama-src DIR]
    python3 scripts/lora-vs-llama.py --adapter /tmp/peft.gguf qwen2.5-coder-0.5b-instruct

DIR is llama.cpp's unpacked source (default: the one scripts/build-llama-cpp.sh unpacks).
"""
import argparse
import glob
import json
import os
import pathlib
import subprocess
import sys
import tempfile

# Qwen2.5-Coder-0.5B-Instruct's config.json (the published model's values).
QWEN_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "tie_word_embeddings": True, "vocab_size": 151936, "hidden_act": "silu",
    "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": 24, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16",
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--b-std", type=float, default=0.02, help="spread of the B factor (PEFT starts it at 0; random here so the adapter changes outputs)")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--llama-src", default=None)
    a = ap.parse_args()
    src = a.llama_src or next(iter(glob.glob(str(pathlib.Path.home() / ".cache/smelt-ref/llama.cpp/src/*/llama.cpp"))), None)
    if not src or not os.path.exists(os.path.join(src, "convert_lora_to_gguf.py")):
        sys.exit("llama.cpp's source not found: run scripts/build-llama-cpp.sh or pass --llama-src")

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(a.seed)
    work = pathlib.Path(tempfile.mkdtemp(prefix="smelt-peft-"))
    base = work / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(QWEN_CONFIG))
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))  # random base weights: only shapes matter
    cfg = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], lora_dropout=0.0)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, a.b_std)
    adapter = work / "adapter"
    peft_model.save_pretrained(adapter)
    print(f"PEFT adapter in {adapter}: {sorted(os.listdir(adapter))}")
    subprocess.run([sys.executable, os.path.join(src, "convert_lora_to_gguf.py"), "--base", str(base), "--outtype", "f16", "--outfile", a.out, str(adapter)], check=True,
                   env={**os.environ, "PYTHONPATH": os.path.join(src, "gguf-py") + os.pathsep + os.environ.get("PYTHONPATH", "")})
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
