//! Teacher-forced comparison with the two references recorded for each public model: llama.cpp
//! (`*.greedy.jsonl`) and the model's original code in fp32 (`*.greedy-hf.jsonl`). smelt must be
//! no farther from at least one of them than they are from each other (25% slack on the
//! logprob figures, one point on argmax agreement). The long prompts cross Gemma 3's window.

mod common;
use common::*;
use smelt_model::arch::Model;

fn compare(name: &str, key: &str) {
    let model = Model::load(&store_model(name)).unwrap();
    let mut ws = workspace();
    let llama = jsonl(&format!("golden/{key}.greedy.jsonl"));
    let hf = jsonl(&format!("golden/{key}.greedy-hf.jsonl"));
    assert_eq!(llama.len(), hf.len());
    let (mut vs_llama, mut vs_hf, mut refs) = (Vec::new(), Vec::new(), Vec::new());
    for (l, h) in llama.iter().zip(&hf) {
        let prompt = ids(&l["prompt_ids"]);
        let outputs = ids(&l["output_ids"]);
        assert_eq!(ids(&h["prompt_ids"]), prompt);
        let ours = teacher_forced(&model, &mut ws, &prompt, &outputs, 256);
        let (ls, hs) = (l["steps"].as_array().unwrap(), h["steps"].as_array().unwrap());
        for (i, lp) in ours.iter().enumerate() {
            let (lstep, hstep) = (&ls[i], &hs[i]);
            let id = lstep["id"].as_u64().unwrap() as usize;
            let top = |s: &serde_json::Value| s["top"][0][0].as_u64().unwrap() as u32;
            let mine = argmax(lp);
            let (llp, hlp) = (lstep["logprob"].as_f64().unwrap(), hstep["logprob"].as_f64().unwrap());
            vs_llama.push((mine == top(lstep), (lp[id] as f64 - llp).abs()));
            vs_hf.push((mine == top(hstep), (lp[id] as f64 - hlp).abs()));
            refs.push((top(lstep) == top(hstep), (llp - hlp).abs()));
        }
    }
    let (a, b, r) = (Spread::from_pairs(&vs_llama), Spread::from_pairs(&vs_hf), Spread::from_pairs(&refs));
    println!("{name}\n  llama.cpp vs fp32: {r}\n  smelt vs llama.cpp: {a}\n  smelt vs fp32:      {b}");
    let within = |s: &Spread| {
        s.agreement >= r.agreement - 0.01 && s.median <= 1.25 * r.median && s.p95 <= 1.25 * r.p95 && s.max <= 1.25 * r.max
    };
    assert!(within(&a) || within(&b), "{name}: outside the reference spread\n  refs {r}\n  vs llama.cpp {a}\n  vs fp32 {b}");
}

#[test]
fn gemma3_270m_agrees_with_references() {
    compare(GEMMA, "gemma-3-270m");
}

#[test]
fn qwen2_5_coder_0_5b_agrees_with_references() {
    compare(QWEN, "qwen2.5-coder-0.5b-instruct");
}
