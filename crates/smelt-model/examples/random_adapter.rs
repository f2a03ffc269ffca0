//! Write a random LoRA adapter for a model, in llama.cpp's GGUF adapter format (f16), for
//! interoperability checks and benchmarks:
//!   cargo run --release -p smelt-model --example random_adapter -- MODEL.gguf OUT.gguf [RANK] [SEED] [B_STD]

use smelt_kernels::formats::DType;
use smelt_model::arch::Model;
use smelt_model::lora::{Adapter, Target};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!("usage: random_adapter MODEL.gguf OUT.gguf [RANK] [SEED] [B_STD]");
        std::process::exit(2);
    }
    let rank: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(8);
    let seed: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1);
    let model = Model::load(std::path::Path::new(&args[0])).unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(1)
    });
    // B's spread: large enough that the adapter visibly changes greedy outputs.
    let b_std: f32 = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(0.05);
    let adapter = Adapter::random(&model, "random", rank, rank as f32, &Target::ALL, DType::F16, b_std, seed);
    std::fs::write(&args[1], adapter.to_gguf().to_bytes()).unwrap_or_else(|e| {
        eprintln!("error: {}: {e}", args[1]);
        std::process::exit(1)
    });
    eprintln!("{}: rank {rank}, {} MB", args[1], adapter.bytes >> 20);
}
