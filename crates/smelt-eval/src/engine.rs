//! A [`Sampler`] over smelt engines: each request's messages rendered with its model's chat
//! template and submitted at once, so the engine batches them.

use crate::{Sample, SampleRequest, Sampler};
use serde_json::Value;
use smelt_engine::sampling::SamplingParams;
use smelt_engine::scheduler::{EmbedRequest, Engine, Event, GenRequest, Job, Sink, SubmitError};
use smelt_engine::GenerateParams;
use smelt_model::lora::LoraSet;

/// Finds the engine (and adapters) for a model name.
pub trait Resolve {
    fn resolve(&mut self, model: &str) -> Result<(&Engine, LoraSet), String>;
}

/// One request's events, tagged with its index.
struct Tagged(usize, std::sync::mpsc::Sender<(usize, Event)>);

impl Sink for Tagged {
    fn send(&mut self, ev: Event) -> bool {
        self.1.send((self.0, ev)).is_ok()
    }
}

pub struct EngineSampler<R: Resolve>(pub R);

fn submit(engine: &Engine, lora: LoraSet, r: &SampleRequest, sink: Box<dyn Sink>) -> Result<(), String> {
    let model = &engine.model;
    let template = model.chat_template().map_err(|e| format!("{}: {e}", r.model))?;
    let text = template.render(&Value::Array(r.messages.clone()), None, true).map_err(|e| e.to_string())?;
    let prompt = model.tokenizer.encode_prompt(&text);
    let n_ctx = engine.config.n_ctx;
    if prompt.len() + 1 >= n_ctx {
        return Err(format!("the prompt ({} tokens) does not fit the context of {n_ctx}", prompt.len()));
    }
    let sampling = SamplingParams { temperature: r.temperature as f32, top_k: 0, top_p: 1.0, min_p: 0.0, seed: r.seed, ..SamplingParams::default() };
    let params = GenerateParams { max_tokens: r.max_tokens.min(n_ctx - prompt.len()), sampling, ..GenerateParams::default() };
    match engine.submit(Job::Generate(GenRequest { prompt, params, prompt_logprobs: None, lora, sink })) {
        Ok(()) => Ok(()),
        Err(SubmitError::QueueFull) => Err("the engine's queue is full".into()),
        Err(SubmitError::Stopped) => Err("the engine stopped".into()),
    }
}

impl<R: Resolve> Sampler for EngineSampler<R> {
    fn sample_all(&mut self, requests: Vec<SampleRequest>, done: &mut dyn FnMut()) -> Vec<Result<Sample, String>> {
        let n = requests.len();
        let mut out: Vec<Result<Sample, String>> = vec![Err("not run".into()); n];
        let (tx, rx) = std::sync::mpsc::channel();
        let mut texts = vec![String::new(); n];
        // At most WINDOW requests in the engine at once: the rest wait here, not in its queue
        // (a server's queue is shared with live traffic and refuses what does not fit).
        const WINDOW: usize = 32;
        let (mut next, mut pending) = (0, 0);
        while next < n || pending > 0 {
            while next < n && pending < WINDOW {
                let r = &requests[next];
                let submitted = self.0.resolve(&r.model).and_then(|(engine, lora)| submit(engine, lora, r, Box::new(Tagged(next, tx.clone()))));
                match submitted {
                    Ok(()) => pending += 1,
                    // Full: wait for one of ours to finish, then try again.
                    Err(e) if e.contains("queue is full") && pending > 0 => break,
                    Err(e) => {
                        out[next] = Err(e);
                        done();
                    }
                }
                next += 1;
            }
            if pending == 0 {
                continue;
            }
            let Ok((i, ev)) = rx.recv() else { break };
            match ev {
                Event::Token(step) => texts[i].push_str(&step.text),
                Event::Done(s) => {
                    out[i] = Ok(Sample { text: std::mem::take(&mut texts[i]), prompt_tokens: s.prompt_tokens, completion_tokens: s.completion_tokens });
                    pending -= 1;
                    done();
                }
                Event::Error(e) => {
                    out[i] = Err(e);
                    pending -= 1;
                    done();
                }
                _ => {}
            }
        }
        out
    }

    fn embed_all(&mut self, model: &str, texts: Vec<String>) -> Vec<Result<Vec<f32>, String>> {
        let n = texts.len();
        let fail = |e: String| (0..n).map(|_| Err(e.clone())).collect();
        let engine = match self.0.resolve(model) {
            Ok((engine, _)) => engine,
            Err(e) => return fail(e),
        };
        let n_ctx = engine.config.n_ctx;
        // Empty texts embed as nothing; long ones are cut to the context.
        let inputs: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| {
                let mut ids = engine.model.tokenizer.encode_prompt(if t.is_empty() { " " } else { t });
                ids.truncate(n_ctx);
                ids
            })
            .collect();
        let (tx, rx) = std::sync::mpsc::channel();
        if let Err(e) = engine.submit(Job::Embed(EmbedRequest { inputs, sink: Box::new(Tagged(0, tx)) })) {
            return fail(format!("{e:?}"));
        }
        loop {
            match rx.recv() {
                Ok((_, Event::Embeddings(v, _))) => return v.into_iter().map(Ok).collect(),
                Ok((_, Event::Error(e))) => return fail(e),
                Ok(_) => continue,
                Err(_) => return fail("the engine stopped".into()),
            }
        }
    }
}
