//! What chat and text completions share: validating sampling parameters, submitting one engine
//! job per choice, and collecting (or streaming) their events with latency metrics.

use crate::error::ApiError;
use crate::state::{AppState, ModelEntry};
use crate::types::SamplingFields;
use smelt_engine::scheduler::{Event, GenRequest, Job, PromptLogprob, Sink, SubmitError, Summary};
use smelt_engine::{FinishReason, GenerateParams, SamplingParams, Step};
use std::time::Instant;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// Events of several choices through one channel, tagged with the choice index.
struct TaggedSink {
    index: usize,
    tx: UnboundedSender<(usize, Event)>,
}

impl Sink for TaggedSink {
    fn send(&mut self, ev: Event) -> bool {
        self.tx.send((self.index, ev)).is_ok()
    }
    fn closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// Parameters common to every choice of a request.
pub struct Plan {
    pub params: GenerateParams,
    /// The grammar extension to compile (see [`crate::structured::compile`]).
    pub grammar: Option<crate::structured::Source>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    /// The adapters the request's model id names (empty: the base model).
    pub lora: smelt_model::lora::LoraSet,
}

fn range(name: &str, v: f64, lo: f64, hi: f64) -> Result<f32, ApiError> {
    if !v.is_finite() || v < lo || v > hi {
        return Err(ApiError::invalid(name, format!("{name} must be between {lo} and {hi}, got {v}")));
    }
    Ok(v as f32)
}

/// Check and convert the sampling fields (OpenAI's defaults: temperature 1, top_p 1, no
/// penalties), for a model with `n_vocab` tokens and a context of `n_ctx`; `logprobs`: whether
/// token log-probabilities are wanted, and with how many alternatives.
pub fn plan(f: &SamplingFields, n_vocab: usize, n_ctx: usize, logprobs: Option<usize>) -> Result<Plan, ApiError> {
    let top_logprobs = logprobs.unwrap_or(0);
    let mut s = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, repetition_penalty: 1.0, penalty_last_n: 64, ..Default::default() };
    if let Some(t) = f.temperature {
        s.temperature = range("temperature", t, 0.0, 2.0)?;
    }
    if let Some(p) = f.top_p {
        s.top_p = range("top_p", p, 0.0, 1.0)?;
        if s.top_p == 0.0 {
            return Err(ApiError::invalid("top_p", "top_p must be greater than 0"));
        }
    }
    if let Some(k) = f.top_k {
        if !(0..=1_000_000).contains(&k) {
            return Err(ApiError::invalid("top_k", format!("top_k must be between 0 and 1000000, got {k}")));
        }
        s.top_k = k as usize;
    }
    if let Some(m) = f.min_p {
        s.min_p = range("min_p", m, 0.0, 1.0)?;
    }
    if let Some(r) = f.repetition_penalty {
        s.repetition_penalty = range("repetition_penalty", r, 0.01, 10.0)?;
    }
    if let Some(p) = f.presence_penalty {
        s.presence_penalty = range("presence_penalty", p, -2.0, 2.0)?;
    }
    if let Some(p) = f.frequency_penalty {
        s.frequency_penalty = range("frequency_penalty", p, -2.0, 2.0)?;
    }
    if let Some(seed) = f.seed {
        s.seed = Some(seed as u64);
    }
    if let Some(bias) = &f.logit_bias {
        if bias.len() > 1024 {
            return Err(ApiError::invalid("logit_bias", "logit_bias may name at most 1024 tokens"));
        }
        for (k, &v) in bias {
            let id: u32 = k.trim().parse().map_err(|_| ApiError::invalid("logit_bias", format!("logit_bias key {k:?} is not a token id")))?;
            if id as usize >= n_vocab {
                return Err(ApiError::invalid("logit_bias", format!("logit_bias names token {id}, but the vocabulary has {n_vocab} tokens")));
            }
            s.logit_bias.push((id, range("logit_bias", v, -100.0, 100.0)?));
        }
    }
    let n = f.n.unwrap_or(1);
    if !(1..=16).contains(&n) {
        return Err(ApiError::invalid("n", format!("n must be between 1 and 16, got {n}")));
    }
    let max = match (f.max_completion_tokens, f.max_tokens) {
        (Some(m), _) => Some(("max_completion_tokens", m)),
        (None, Some(m)) => Some(("max_tokens", m)),
        _ => None,
    };
    let max_tokens = match max {
        Some((name, m)) if m < 1 => return Err(ApiError::invalid(name, format!("{name} must be at least 1, got {m}"))),
        Some((name, m)) if m as u64 > n_ctx as u64 => {
            return Err(ApiError::invalid(name, format!("{name} is too large: {m}. This model's context holds at most {n_ctx} tokens, prompt included")))
        }
        Some((_, m)) => m as usize,
        None => usize::MAX,
    };
    let stop = f.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    if stop.len() > 4 {
        return Err(ApiError::invalid("stop", "stop may hold at most 4 sequences"));
    }
    if stop.iter().any(|s| s.is_empty()) {
        return Err(ApiError::invalid("stop", "stop sequences must not be empty"));
    }
    if top_logprobs > 20 {
        return Err(ApiError::invalid("top_logprobs", format!("top_logprobs must be between 0 and 20, got {top_logprobs}")));
    }
    let grammar = crate::structured::extension(f)?;
    Ok(Plan {
        params: GenerateParams { max_tokens, sampling: s, stop, ignore_eos: f.ignore_eos, logprobs: logprobs.is_some(), top_logprobs, grammar: None },
        grammar,
        n: n as usize,
        stream: f.stream,
        include_usage: f.stream_options.as_ref().is_some_and(|o| o.include_usage),
        lora: Default::default(),
    })
}

impl Plan {
    /// Compile the request's grammar, if any, into its generation parameters (off the HTTP
    /// workers, within budgets; see [`crate::structured::compile`]).
    pub async fn compile_grammar(&mut self, entry: &ModelEntry) -> Result<(), ApiError> {
        if let Some(src) = self.grammar.take() {
            self.params.grammar = Some(crate::structured::compile(entry, src).await?);
        }
        Ok(())
    }
}

/// The prompt must leave room for at least one generated token.
pub fn check_context(entry: &ModelEntry, prompt_tokens: usize) -> Result<(), ApiError> {
    let n_ctx = entry.engine.config.n_ctx;
    if prompt_tokens == 0 {
        return Err(ApiError::invalid("prompt", "the prompt is empty"));
    }
    if prompt_tokens >= n_ctx {
        return Err(ApiError::bad_request(format!(
            "This model's maximum context length is {n_ctx} tokens. However, your prompt has {prompt_tokens} tokens, which leaves no room for a completion. Shorten the prompt (or start the server with a larger --ctx)."
        ))
        .code("context_length_exceeded"));
    }
    Ok(())
}

/// Submit one job per (prompt, choice); events arrive tagged with the choice index
/// `prompt_index * n + j`.
pub fn submit(entry: &ModelEntry, prompts: &[Vec<u32>], plan: &Plan, prompt_logprobs: Option<usize>) -> Result<UnboundedReceiver<(usize, Event)>, ApiError> {
    let (tx, rx) = unbounded_channel();
    for (pi, prompt) in prompts.iter().enumerate() {
        for j in 0..plan.n {
            let mut params = plan.params.clone();
            // Distinct but reproducible seeds for the choices of one seeded request.
            if let Some(seed) = params.sampling.seed {
                params.sampling.seed = Some(seed.wrapping_add(j as u64));
            }
            let sink = Box::new(TaggedSink { index: pi * plan.n + j, tx: tx.clone() });
            let job = Job::Generate(GenRequest { prompt: prompt.clone(), params, prompt_logprobs, lora: plan.lora.clone(), sink });
            match entry.engine.submit(job) {
                Ok(()) => {}
                Err(SubmitError::QueueFull) => return Err(ApiError::busy()),
                Err(SubmitError::Stopped) => return Err(ApiError::unavailable("the engine has stopped")),
            }
        }
    }
    Ok(rx)
}

/// Latency bookkeeping for one request.
pub struct Timing {
    start: Instant,
    last: Vec<Option<Instant>>,
}

impl Timing {
    pub fn new(start: Instant, choices: usize) -> Timing {
        Timing { start, last: vec![None; choices] }
    }

    pub fn token(&mut self, state: &AppState, index: usize) {
        let now = Instant::now();
        match self.last[index] {
            None => state.metrics().ttft.observe((now - self.start).as_secs_f64()),
            Some(prev) => state.metrics().itl.observe((now - prev).as_secs_f64()),
        }
        self.last[index] = Some(now);
    }
}

/// Everything one choice produced.
#[derive(Default)]
pub struct Choice {
    pub steps: Vec<Step>,
    pub text: String,
    pub prompt_logprobs: Option<Vec<PromptLogprob>>,
    pub summary: Option<Summary>,
}

/// Wait for every choice to finish.
pub async fn collect(state: &AppState, mut rx: UnboundedReceiver<(usize, Event)>, choices: usize, start: Instant) -> Result<Vec<Choice>, ApiError> {
    let mut out: Vec<Choice> = (0..choices).map(|_| Choice::default()).collect();
    let mut timing = Timing::new(start, choices);
    let mut done = 0;
    while done < choices {
        let Some((i, ev)) = rx.recv().await else {
            return Err(ApiError::internal("the engine stopped before finishing the request"));
        };
        match ev {
            Event::Token(step) => {
                timing.token(state, i);
                out[i].text.push_str(&step.text);
                out[i].steps.push(step);
            }
            Event::PromptLogprobs(lp) => out[i].prompt_logprobs = Some(lp),
            Event::Done(s) => {
                out[i].summary = Some(s);
                done += 1;
            }
            Event::Error(e) => return Err(ApiError::bad_request(e)),
            Event::Embeddings(..) => {}
        }
    }
    Ok(out)
}

pub fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length | FinishReason::Cancelled => "length",
    }
}

/// A token's text for logprobs: its bytes as (lossy) UTF-8, and the bytes themselves.
pub fn token_text(entry: &ModelEntry, id: u32) -> (String, Vec<u8>) {
    let bytes = entry.engine.model.tokenizer.piece(id, true).to_vec();
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A short random id for completion objects.
pub fn new_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    format!("{prefix}-{:016x}{n:04x}", t ^ (std::process::id() as u64).rotate_left(32))
}
