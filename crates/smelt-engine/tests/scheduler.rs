//! The serving engine on small synthetic models: batched, prefix-cached, preempted and cancelled
//! requests must produce exactly what each request produces alone.

use smelt_engine::scheduler::{EmbedRequest, Engine, EngineConfig, Event, GenRequest, Job, Sink, Summary};
use smelt_engine::{FinishReason, GenerateParams, SamplingParams, Session};
use smelt_kernels::pool::ThreadPool;
use smelt_model::kv::{KvType, KvTypes};
use smelt_model::arch::Model;
use smelt_model::synthetic::{tiny_model, TinySpec};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

fn model(arch: &'static str) -> Arc<Model> {
    model_of(&TinySpec::new(arch))
}

fn model_of(spec: &TinySpec) -> Arc<Model> {
    let arch = spec.arch;
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let k = COUNTER.fetch_add(1, Ordering::SeqCst);
    let path = std::env::temp_dir().join(format!("smelt-sched-{arch}-{}-{k}.gguf", std::process::id()));
    std::fs::write(&path, tiny_model(spec).to_bytes()).unwrap();
    let m = Model::load(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    Arc::new(m)
}

struct ChanSink {
    tx: Sender<Event>,
    closed: Arc<AtomicBool>,
}

impl Sink for ChanSink {
    fn send(&mut self, ev: Event) -> bool {
        !self.closed.load(Ordering::SeqCst) && self.tx.send(ev).is_ok()
    }
    fn closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

fn sink() -> (Box<dyn Sink>, Receiver<Event>, Arc<AtomicBool>) {
    let (tx, rx) = channel();
    let closed = Arc::new(AtomicBool::new(false));
    (Box::new(ChanSink { tx, closed: closed.clone() }), rx, closed)
}

fn config(kv_blocks: usize) -> EngineConfig {
    EngineConfig { n_ctx: 256, max_seqs: 16, kv_blocks, step_tokens: 48, queue: 64, kv_types: Default::default(), kv_disk: None }
}

fn params(max_tokens: usize, seed: Option<u64>) -> GenerateParams {
    let sampling = match seed {
        None => SamplingParams::greedy(),
        Some(s) => SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, seed: Some(s), ..Default::default() },
    };
    GenerateParams { max_tokens, sampling, ignore_eos: true, ..Default::default() }
}

fn prompt(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32).map(|i| 4 + (i * 31 + salt * 17) % 290).collect()
}

/// Collect a request's tokens and its summary.
fn collect(rx: &Receiver<Event>) -> (Vec<u32>, Summary) {
    let mut ids = Vec::new();
    loop {
        match rx.recv().expect("engine stopped") {
            Event::Token(s) => ids.push(s.id),
            Event::Done(s) => return (ids, s),
            Event::Error(e) => panic!("{e}"),
            _ => {}
        }
    }
}

fn alone(m: &Arc<Model>, p: &[u32], gp: &GenerateParams) -> Vec<u32> {
    alone_typed(m, p, gp, KvTypes::default())
}

fn alone_typed(m: &Arc<Model>, p: &[u32], gp: &GenerateParams, types: KvTypes) -> Vec<u32> {
    let mut s = Session::new(m.clone(), Arc::new(ThreadPool::new(1)), 256);
    s.set_kv_types(types).unwrap();
    s.generate(p, gp, |_| true).unwrap().steps.iter().map(|s| s.id).collect()
}

#[test]
fn sixteen_concurrent_requests_match_their_solo_runs() {
    for arch in ["llama", "gemma3"] {
        let m = model(arch);
        let engine = Engine::start(m.clone(), Arc::new(ThreadPool::new(2)), config(512));
        let mut pending = Vec::new();
        for r in 0..16u32 {
            let p = prompt(5 + (r as usize * 7) % 40, r);
            let gp = params(12, if r % 2 == 0 { None } else { Some(r as u64) });
            let (sk, rx, _) = sink();
            engine.submit(Job::Generate(GenRequest { prompt: p.clone(), params: gp.clone(), prompt_logprobs: None, lora: Default::default(), sink: sk })).unwrap();
            pending.push((p, gp, rx));
        }
        for (p, gp, rx) in pending {
            let (ids, summary) = collect(&rx);
            assert_eq!(ids, alone(&m, &p, &gp), "{arch}: batched output differs from solo");
            assert_eq!(summary.completion_tokens, 12);
            assert_eq!(summary.prompt_tokens, p.len());
            assert_eq!(summary.finish, FinishReason::Length);
        }
    }
}

#[test]
fn shared_prefixes_come_from_the_cache_and_change_nothing() {
    let m = model("gemma3");
    let engine = Engine::start(m.clone(), Arc::new(ThreadPool::new(2)), config(512));
    let doc = prompt(100, 1);
    let mut q1 = doc.clone();
    q1.extend(prompt(7, 2));
    let mut q2 = doc.clone();
    q2.extend(prompt(9, 3));
    let gp = params(8, None);
    let (sk, rx, _) = sink();
    engine.submit(Job::Generate(GenRequest { prompt: q1.clone(), params: gp.clone(), prompt_logprobs: None, lora: Default::default(), sink: sk })).unwrap();
    let (first, s1) = collect(&rx);
    assert_eq!(s1.cached_tokens, 0);
    let (sk, rx, _) = sink();
    engine.submit(Job::Generate(GenRequest { prompt: q2.clone(), params: gp.clone(), prompt_logprobs: None, lora: Default::default(), sink: sk })).unwrap();
    let (second, s2) = collect(&rx);
    // The document's six full blocks are shared, and its last four tokens are copied from the
    // first request's seventh block, where the two prompts diverge.
    assert_eq!(s2.cached_tokens, 100, "the whole document is reused");
    assert_eq!(first, alone(&m, &q1, &gp));
    assert_eq!(second, alone(&m, &q2, &gp));
    // The same prompt again: everything but its last token comes from the cache.
    let (sk, rx, _) = sink();
    engine.submit(Job::Generate(GenRequest { prompt: q1.clone(), params: gp.clone(), prompt_logprobs: None, lora: Default::default(), sink: sk })).unwrap();
    let (third, s3) = collect(&rx);
    assert_eq!(s3.cached_tokens, q1.len() - 1);
    assert_eq!(third, first);
    // A prompt that diverges in the middle of a block the second request filled.
    let mut q4 = q2[..q2.len() - 2].to_vec();
    q4.extend(prompt(5, 4));
    let (sk, rx, _) = sink();
    engine.submit(Job::Generate(GenRequest { prompt: q4.clone(), params: gp.clone(), prompt_logprobs: None, lora: Default::default(), sink: sk })).unwrap();
    let (fourth, s4) = collect(&rx);
    assert_eq!(s4.cached_tokens, q2.len() - 2);
    assert_eq!(fourth, alone(&m, &q4, &gp));
    // The second request's answer, continued differently: its last block was only partly
    // filled when it finished (positions 112..116), and was kept for this.
    let mut q5 = q2.clone();
    q5.extend(&second[..6]);
    q5.extend(prompt(3, 5));
    let (sk, rx, _) = sink();
    engine.submit(Job::Generate(GenRequest { prompt: q5.clone(), params: gp.clone(), prompt_logprobs: None, lora: Default::default(), sink: sk })).unwrap();
    let (fifth, s5) = collect(&rx);
    assert_eq!(s5.cached_tokens, q2.len() + 6);
    assert_eq!(fifth, alone(&m, &q5, &gp));
    assert!(engine.stats.prefix_hit_tokens.load(Ordering::Relaxed) >= 100 + 106 + 107 + 115);
}

#[test]
fn preempted_sequences_resume_with_identical_output() {
    let m = model("llama");
    // 12 blocks of 16 positions for 6 sequences of up to 60 positions: they cannot all fit.
    let engine = Engine::start(m.clone(), Arc::new(ThreadPool::new(2)), EngineConfig { kv_blocks: 12, ..config(12) });
    let mut pending = Vec::new();
    for r in 0..6u32 {
        let p = prompt(20 + r as usize, r);
        let gp = params(40, Some(100 + r as u64));
        let (sk, rx, _) = sink();
        engine.submit(Job::Generate(GenRequest { prompt: p.clone(), params: gp.clone(), prompt_logprobs: None, lora: Default::default(), sink: sk })).unwrap();
        pending.push((p, gp, rx));
    }
    for (p, gp, rx) in pending {
        let (ids, _) = collect(&rx);
        assert_eq!(ids, alone(&m, &p, &gp));
    }
    assert!(engine.stats.preemptions.load(Ordering::Relaxed) > 0, "the pool was too small: something was preempted");
}

#[test]
fn a_request_too_big_for_the_pool_fails_clearly() {
    let m = model("llama");
    let engine = Engine::start(m.clone(), Arc::new(ThreadPool::new(1)), EngineConfig { kv_blocks: 2, ..config(2) });
    let (sk, rx, _) = sink();
    engine.submit(Job::Generate(GenRequest { prompt: prompt(60, 1), params: params(4, None), prompt_logprobs: None, lora: Default::default(), sink: sk })).unwrap();
    match rx.recv().unwrap() {
        Event::Error(e) => assert!(e.contains("--kv-memory"), "{e}"),
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn a_cancelled_request_frees_its_memory_at_once() {
    let m = model("llama");
    let engine = Engine::start(m.clone(), Arc::new(ThreadPool::new(1)), config(64));
    let (sk, rx, closed) = sink();
    let p = prompt(20, 1);
    engine.submit(Job::Generate(GenRequest { prompt: p.clone(), params: params(200, None), prompt_logprobs: None, lora: Default::default(), sink: sk })).unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        match rx.recv().unwrap() {
            Event::Token(t) => got.push(t.id),
            other => panic!("expected a token, got {other:?}"),
        }
    }
    closed.store(true, Ordering::SeqCst);
    drop(rx);
    let t = std::time::Instant::now();
    while engine.stats.running.load(Ordering::Relaxed) > 0 || engine.stats.kv_blocks_used.load(Ordering::Relaxed) > 0 {
        assert!(t.elapsed().as_secs() < 10, "sequence not released");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // What it computed stays in the prefix cache, its partly filled last block included: the
    // prompt and the first two generated tokens (positions 0..22; the third token was sampled
    // but may not have been computed before the cancel was noticed).
    let mut q = p.clone();
    q.extend(&got);
    q.extend(prompt(3, 7));
    let gp = params(4, None);
    let (sk, rx, _) = sink();
    engine.submit(Job::Generate(GenRequest { prompt: q.clone(), params: gp.clone(), prompt_logprobs: None, lora: Default::default(), sink: sk })).unwrap();
    let (ids, s) = collect(&rx);
    assert!(s.cached_tokens >= 22, "cached {} of the cancelled request's 22 computed positions", s.cached_tokens);
    assert_eq!(ids, alone(&m, &q, &gp));
}

#[test]
fn prompt_logprobs_and_embeddings() {
    let m = model("qwen3");
    let engine = Engine::start(m.clone(), Arc::new(ThreadPool::new(2)), config(128));
    let p = prompt(70, 5);
    // Twice: the second time the prompt is in the prefix cache, and every row is still there.
    let mut first = None;
    for _ in 0..2 {
        let (sk, rx, _) = sink();
        engine.submit(Job::Generate(GenRequest { prompt: p.clone(), params: params(2, None), prompt_logprobs: Some(3), lora: Default::default(), sink: sk })).unwrap();
        match rx.recv().unwrap() {
            Event::PromptLogprobs(lp) => {
                assert_eq!(lp.len(), p.len());
                assert!(lp[0].logprob.is_none());
                assert!(lp[1..].iter().all(|x| x.logprob.unwrap() <= 0.0 && x.top.len() == 3));
                assert_eq!(lp.iter().map(|x| x.token).collect::<Vec<_>>(), p);
                let values: Vec<Option<f32>> = lp.iter().map(|x| x.logprob).collect();
                assert_eq!(*first.get_or_insert(values.clone()), values);
            }
            other => panic!("expected prompt logprobs, got {other:?}"),
        }
        collect(&rx);
    }
    let (sk, rx, _) = sink();
    engine.submit(Job::Embed(EmbedRequest { inputs: vec![prompt(10, 1), prompt(40, 2), prompt(10, 1)], sink: sk })).unwrap();
    match rx.recv().unwrap() {
        Event::Embeddings(v, tokens) => {
            assert_eq!((v.len(), tokens), (3, 60));
            for e in &v {
                assert_eq!(e.len(), m.hp.n_embd);
                let norm: f32 = e.iter().map(|x| x * x).sum::<f32>().sqrt();
                assert!((norm - 1.0).abs() < 1e-4);
            }
            assert_eq!(v[0], v[2]);
            assert_ne!(v[0], v[1]);
        }
        other => panic!("expected embeddings, got {other:?}"),
    }
}

#[test]
fn constrained_requests_batched_match_their_solo_runs_and_the_grammar() {
    use smelt_engine::grammar::Compiled;
    let m = model("llama");
    let engine = Engine::start(m.clone(), Arc::new(ThreadPool::new(2)), config(512));
    let schema = serde_json::json!({"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 99}, "w": {"type": "string", "maxLength": 6}}, "required": ["n", "w"]});
    let grammars = [Compiled::regex("[a-z]{3,8}( [a-z]{3,8}){2,5}\\.").unwrap(), Compiled::json_schema(&schema).unwrap()];
    let mut pending = Vec::new();
    for r in 0..16u32 {
        let p = prompt(5 + (r as usize * 7) % 40, r);
        let mut gp = params(120, Some(r as u64 + 1));
        gp.grammar = Some(grammars[r as usize % 2].clone());
        let (sk, rx, _) = sink();
        engine.submit(Job::Generate(GenRequest { prompt: p.clone(), params: gp.clone(), prompt_logprobs: None, lora: Default::default(), sink: sk })).unwrap();
        pending.push((p, gp, rx, r));
    }
    for (p, gp, rx, r) in pending {
        let (ids, summary) = collect(&rx);
        assert_eq!(ids, alone(&m, &p, &gp), "constrained output batched differs from solo");
        assert_eq!(summary.finish, FinishReason::Stop, "the grammar completes");
        let text = m.tokenizer.decode(&ids, false);
        if r % 2 == 0 {
            let words: Vec<&str> = text.trim_end_matches('.').split(' ').collect();
            assert!(text.ends_with('.') && (3..=6).contains(&words.len()), "{text:?}");
            assert!(words.iter().all(|w| (3..=8).contains(&w.len()) && w.bytes().all(|b| b.is_ascii_lowercase())), "{text:?}");
        } else {
            let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
            assert!((1..=99).contains(&v["n"].as_i64().unwrap()) && v["w"].as_str().unwrap().chars().count() <= 6, "{text}");
        }
    }
}

fn adapter(m: &Model, arch: &'static str, seed: u64, name: &str) -> Arc<smelt_model::lora::Adapter> {
    use smelt_model::lora::Target;
    let path = std::env::temp_dir().join(format!("smelt-sched-lora-{name}-{}-{seed}.gguf", std::process::id()));
    let w = smelt_model::synthetic::tiny_adapter(&TinySpec::new(arch), 4, 8.0, smelt_kernels::formats::DType::F16, &Target::ALL, true, seed);
    std::fs::write(&path, w.to_bytes()).unwrap();
    let a = smelt_model::lora::Adapter::load(&path, m, name).unwrap();
    let _ = std::fs::remove_file(&path);
    Arc::new(a)
}

#[test]
fn requests_on_different_adapters_share_steps_and_never_share_kv() {
    use smelt_model::lora::LoraSet;
    let m = model("qwen2");
    let (a, b) = (adapter(&m, "qwen2", 1, "a"), adapter(&m, "qwen2", 2, "b"));
    let sets = [LoraSet::default(), LoraSet::one(a.clone(), 1.0), LoraSet::one(b.clone(), 1.0), LoraSet { adapters: vec![(a.clone(), 0.5), (b.clone(), 0.5)] }];
    let gp = params(12, None);
    // The same prompt under every set: were KV shared across sets, the outputs would follow.
    let p = prompt(70, 3);
    let solo: Vec<Vec<u32>> = sets
        .iter()
        .map(|set| {
            let mut s = Session::new(m.clone(), Arc::new(ThreadPool::new(1)), 256);
            s.set_lora(set.clone());
            s.generate(&p, &gp, |_| true).unwrap().steps.iter().map(|s| s.id).collect()
        })
        .collect();
    assert!(solo[0] != solo[1] && solo[1] != solo[2], "the adapters should change the greedy output");
    let engine = Engine::start(m.clone(), Arc::new(ThreadPool::new(2)), config(64));
    // All at once, twice over: one batch mixes every set.
    let mut rxs = Vec::new();
    for round in 0..2 {
        for (i, set) in sets.iter().enumerate() {
            let (sk, rx, _) = sink();
            engine.submit(Job::Generate(GenRequest { prompt: p.clone(), params: gp.clone(), prompt_logprobs: None, lora: set.clone(), sink: sk })).unwrap();
            rxs.push((round, i, rx));
        }
    }
    for (round, i, rx) in rxs {
        let (ids, _) = collect(&rx);
        assert_eq!(ids, solo[i], "round {round}, set {i}: the batched output differs from the solo run");
    }
    // One after another: a prompt cached under one set is a hit only under the same set.
    let q = prompt(70, 9);
    let run = |set: &LoraSet| {
        let (sk, rx, _) = sink();
        engine.submit(Job::Generate(GenRequest { prompt: q.clone(), params: gp.clone(), prompt_logprobs: None, lora: set.clone(), sink: sk })).unwrap();
        collect(&rx).1.cached_tokens
    };
    assert_eq!(run(&sets[0]), 0);
    assert_eq!(run(&sets[1]), 0, "the base model's KV was reused under an adapter");
    assert_eq!(run(&sets[3]), 0, "an adapter's KV was reused under another set");
    assert!(run(&sets[1]) >= 64, "the adapter's own cached prompt was not reused");
    assert!(run(&sets[0]) >= 64);
}

#[test]
fn quantized_kv_in_the_engine_matches_solo_runs_and_reuses_prefixes() {
    // Heads of 64 values, so keys and values are also stored rotated.
    let m = model_of(&TinySpec { head_dim: 64, ..TinySpec::new("qwen2") });
    let types = KvTypes { k: KvType::Q8_0, v: KvType::Q4_0 };
    let engine = Engine::start(m.clone(), Arc::new(ThreadPool::new(2)), EngineConfig { kv_types: types, ..config(512) });
    let doc = prompt(60, 1);
    let mut pending = Vec::new();
    for r in 0..6u32 {
        let mut p = doc.clone();
        p.extend(prompt(3 + r as usize, r + 2));
        let gp = params(10, if r % 2 == 0 { None } else { Some(r as u64) });
        let (sk, rx, _) = sink();
        engine.submit(Job::Generate(GenRequest { prompt: p.clone(), params: gp.clone(), prompt_logprobs: None, lora: Default::default(), sink: sk })).unwrap();
        pending.push((p, gp, rx));
    }
    for (p, gp, rx) in &pending {
        let (ids, _) = collect(rx);
        assert_eq!(ids, alone_typed(&m, p, gp, types), "batched output under quantized KV differs from solo");
    }
    // The same prompt again comes from the (quantized) prefix cache, with the same answer.
    let (p, gp, _) = &pending[0];
    let (sk, rx, _) = sink();
    engine.submit(Job::Generate(GenRequest { prompt: p.clone(), params: gp.clone(), prompt_logprobs: None, lora: Default::default(), sink: sk })).unwrap();
    let (again, summary) = collect(&rx);
    assert_eq!(summary.cached_tokens, p.len() - 1);
    assert_eq!(again, alone_typed(&m, p, gp, types));
}

/// Send one request and wait for its tokens and summary.
fn ask(engine: &Engine, p: &[u32], gp: &GenerateParams) -> (Vec<u32>, Summary) {
    let (sk, rx, _) = sink();
    engine.submit(Job::Generate(GenRequest { prompt: p.to_vec(), params: gp.clone(), prompt_logprobs: None, lora: Default::default(), sink: sk })).unwrap();
    collect(&rx)
}

/// A model loaded from a file that stays (in a fresh directory, returned): the disk cache names
/// blocks by the file's digest.
fn model_in_dir(spec: &TinySpec, name: &str) -> (Arc<Model>, std::path::PathBuf) {
    let base = std::env::temp_dir().join(format!("smelt-{name}-{}-{}", spec.arch, std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let path = base.join("model.gguf");
    std::fs::write(&path, tiny_model(spec).to_bytes()).unwrap();
    (Arc::new(Model::load(&path).unwrap()), base)
}

#[test]
fn the_disk_cache_serves_prefixes_after_a_restart_and_ignores_damaged_blocks() {
    use smelt_engine::disk_cache::DiskCache;
    let specs = [(TinySpec::new("gemma3"), KvTypes::default()), (TinySpec { head_dim: 64, ..TinySpec::new("qwen2") }, KvTypes { k: KvType::Q8_0, v: KvType::Q4_0 })];
    for (spec, types) in specs {
        let (m, base) = model_in_dir(&spec, "disk");
        let start = |dir: &str, blocks: usize| {
            let disk = Arc::new(DiskCache::open(&base.join(dir), 1 << 30).unwrap());
            let engine = Engine::start(m.clone(), Arc::new(ThreadPool::new(2)), EngineConfig { kv_types: types, kv_disk: Some(disk.clone()), ..config(blocks) });
            (engine, disk)
        };
        let gp = params(8, None);
        let mut q = prompt(100, 1);
        q.extend(prompt(5, 2));
        let want = alone_typed(&m, &q, &gp, types);

        // Written when the engine is told to persist (a server stopping), read after a restart.
        let (engine, disk) = start("a", 512);
        let (ids, summary) = ask(&engine, &q, &gp);
        assert_eq!((ids, summary.cached_tokens), (want.clone(), 0));
        let written = engine.persist(std::time::Duration::from_secs(30)).unwrap();
        assert_eq!(written, (q.len() + 7) / 16, "{}: every full block is written", spec.arch);
        assert_eq!(engine.persist(std::time::Duration::from_secs(30)), Some(0), "blocks already on disk are not written again");
        assert_eq!(disk.usage().1, written);
        drop(engine);
        let (engine, _) = start("a", 512);
        let (ids, summary) = ask(&engine, &q, &gp);
        assert_eq!(ids, want, "{}: the answer changed with KV read from disk", spec.arch);
        assert_eq!(summary.cached_tokens, (q.len() - 1) / 16 * 16);
        assert_eq!(engine.stats.disk_hit_tokens.load(Ordering::Relaxed) as usize, summary.cached_tokens);
        drop(engine);

        // Damaged files (a flipped byte, a truncated file) are ignored: the answer is the same,
        // computed from where the first damaged block starts.
        let ns_dir = std::fs::read_dir(base.join("a")).unwrap().next().unwrap().unwrap().path();
        let mut files: Vec<_> = std::fs::read_dir(&ns_dir).unwrap().map(|f| f.unwrap().path()).collect();
        files.sort();
        let mut b = std::fs::read(&files[1]).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 1;
        std::fs::write(&files[1], &b).unwrap();
        let b = std::fs::read(&files[3]).unwrap();
        std::fs::write(&files[3], &b[..b.len() - 9]).unwrap();
        let (engine, disk) = start("a", 512);
        let (ids, summary) = ask(&engine, &q, &gp);
        assert_eq!(ids, want, "{}: damaged disk blocks changed the answer", spec.arch);
        assert!(summary.cached_tokens < (q.len() - 1) / 16 * 16, "a damaged block was used");
        assert!(disk.stats.rejected_blocks.load(Ordering::Relaxed) >= 1);
        assert!(!files[1].exists() || !files[3].exists(), "the damaged file read was not deleted");
        drop(engine);

        // Blocks evicted from a small pool go to disk and come back from there.
        let (engine, disk) = start("b", 10);
        assert_eq!(ask(&engine, &q, &gp).0, want);
        assert_eq!(disk.usage().1, 0, "nothing is written before memory runs short");
        let other = prompt(120, 7);
        let other_want = alone_typed(&m, &other, &gp, types);
        assert_eq!(ask(&engine, &other, &gp).0, other_want);
        assert!(disk.usage().1 > 0, "evicted blocks were not written");
        let (ids, summary) = ask(&engine, &q, &gp);
        assert_eq!(ids, want);
        assert!(summary.cached_tokens > 0 && engine.stats.disk_hit_tokens.load(Ordering::Relaxed) > 0, "the evicted prefix was not read back");
        drop(engine);
        let _ = std::fs::remove_dir_all(&base);
    }
}

#[test]
fn sessions_and_the_engine_share_the_disk_cache() {
    use smelt_engine::disk_cache::DiskCache;
    for spec in [TinySpec::new("gemma3"), TinySpec::new("llama")] {
        let (m, base) = model_in_dir(&spec, "disk-session");
        let disk = Arc::new(DiskCache::open(&base.join("kv"), 1 << 30).unwrap());
        let gp = params(6, None);
        let q = prompt(150, 3);
        let want = alone(&m, &q, &gp);
        let session = |q: &[u32]| {
            let mut s = Session::new(m.clone(), Arc::new(ThreadPool::new(1)), 256);
            s.set_disk_cache(disk.clone()).unwrap();
            let ids: Vec<u32> = s.generate(q, &gp, |_| true).unwrap().steps.iter().map(|s| s.id).collect();
            (ids, s.disk_read_tokens)
        };
        assert_eq!(session(&q), (want.clone(), 0));
        assert_eq!(session(&q), (want.clone(), (q.len() - 1) / 16 * 16), "{}: a new session reads the blocks back", spec.arch);
        // The engine reads what sessions wrote (and the other way round).
        let engine = Engine::start(m.clone(), Arc::new(ThreadPool::new(2)), EngineConfig { kv_disk: Some(disk.clone()), ..config(512) });
        let (ids, summary) = ask(&engine, &q, &gp);
        assert_eq!((ids, summary.cached_tokens), (want, (q.len() - 1) / 16 * 16));
        let other = prompt(90, 5);
        let other_want = alone(&m, &other, &gp);
        assert_eq!(ask(&engine, &other, &gp).0, other_want);
        engine.persist(std::time::Duration::from_secs(30)).unwrap();
        assert_eq!(session(&other), (other_want, (other.len() - 1) / 16 * 16));
        let _ = std::fs::remove_dir_all(&base);
    }
}
