//! POST /v1/completions

use crate::error::ApiError;
use crate::generation::{check_context, collect, finish_reason, new_id, now_secs, plan, submit, token_text, Timing};
use crate::state::{AppState, ModelEntry, Resolved};
use crate::types::{CompletionRequest, Input, Usage};
use crate::{parse_json, sse_response};
use axum::body::Bytes;
use axum::extract::State;
use axum::Extension;
use crate::keys::{Bill, Meter};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};
use smelt_engine::scheduler::{Event, PromptLogprob};
use smelt_engine::Step;
use std::time::Instant;

/// Token ids of a prompt given as ids, checked against the vocabulary.
fn ids(field: &str, v: &[i64], n_vocab: usize) -> Result<Vec<u32>, ApiError> {
    v.iter()
        .map(|&t| if t >= 0 && (t as usize) < n_vocab { Ok(t as u32) } else { Err(ApiError::invalid(field, format!("token id {t} is outside the vocabulary of {n_vocab} tokens"))) })
        .collect()
}

/// The prompts of a request (text prompts tokenized with BOS and special tokens as the model asks).
pub fn prompts(entry: &ModelEntry, input: &Input, field: &str) -> Result<Vec<Vec<u32>>, ApiError> {
    let model = &entry.engine.model;
    let n_vocab = model.hp.n_vocab;
    let out = match input {
        Input::Text(t) => vec![model.tokenizer.encode_prompt(t)],
        Input::Texts(ts) => ts.iter().map(|t| model.tokenizer.encode_prompt(t)).collect(),
        Input::Tokens(v) => vec![ids(field, v, n_vocab)?],
        Input::TokenLists(vs) => vs.iter().map(|v| ids(field, v, n_vocab)).collect::<Result<_, _>>()?,
    };
    if out.is_empty() {
        return Err(ApiError::invalid(field, format!("{field} must not be empty")));
    }
    if out.len() > 64 {
        return Err(ApiError::invalid(field, format!("at most 64 inputs per request, got {}", out.len())));
    }
    Ok(out)
}

/// Fill-in-the-middle: the prompt and suffix wrapped in the model's FIM tokens, where it has them.
fn with_suffix(entry: &ModelEntry, prompt: &str, suffix: &str) -> Result<Vec<u32>, ApiError> {
    let tok = &entry.engine.model.tokenizer;
    let fim = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"].map(|t| tok.token_id(t));
    let [Some(pre), Some(suf), Some(mid)] = fim else {
        return Err(ApiError::invalid("suffix", "this model has no fill-in-the-middle tokens, so it cannot complete with a suffix"));
    };
    let mut out = Vec::new();
    if tok.add_bos {
        out.extend(tok.bos);
    }
    out.push(pre);
    out.extend(tok.encode(prompt, false, false));
    out.push(suf);
    out.extend(tok.encode(suffix, false, false));
    out.push(mid);
    Ok(out)
}

/// OpenAI's legacy logprobs object for a run of tokens.
struct LegacyLogprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<Value>,
    top: Vec<Value>,
    offsets: Vec<usize>,
    offset: usize,
}

impl LegacyLogprobs {
    fn new() -> Self {
        LegacyLogprobs { tokens: Vec::new(), token_logprobs: Vec::new(), top: Vec::new(), offsets: Vec::new(), offset: 0 }
    }

    fn push(&mut self, entry: &ModelEntry, id: u32, lp: Option<f32>, top: &[(u32, f32)]) {
        let (text, _) = token_text(entry, id);
        // Offsets count characters, as the clients index the returned text.
        self.offsets.push(self.offset);
        self.offset += text.chars().count();
        self.tokens.push(text);
        self.token_logprobs.push(lp.map(|v| json!(v)).unwrap_or(Value::Null));
        if lp.is_none() {
            self.top.push(Value::Null);
        } else {
            let mut m = Map::new();
            for &(t, l) in top {
                m.insert(token_text(entry, t).0, json!(l));
            }
            self.top.push(Value::Object(m));
        }
    }

    fn prompt(&mut self, entry: &ModelEntry, lp: &[PromptLogprob]) {
        for p in lp {
            self.push(entry, p.token, p.logprob, &p.top);
        }
    }

    fn step(&mut self, entry: &ModelEntry, s: &Step) {
        self.push(entry, s.id, s.logprob, &s.top);
    }

    fn json(&self) -> Value {
        json!({"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top, "text_offset": self.offsets})
    }
}

pub async fn handler(State(state): State<AppState>, Extension(meter): Extension<Meter>, body: Bytes) -> Result<Response, ApiError> {
    let start = Instant::now();
    let req: CompletionRequest = parse_json(&body)?;
    let Resolved { entry, lora, id: model_id, .. } = state.resolve(req.model.as_deref())?;
    let model = &entry.engine.model;
    let k = match req.logprobs {
        Some(k) if !(0..=20).contains(&k) => return Err(ApiError::invalid("logprobs", format!("logprobs must be between 0 and 20, got {k}"))),
        Some(k) => Some(k as usize),
        None => None,
    };
    if let Some(b) = req.best_of {
        if b != req.sampling.n.unwrap_or(1) {
            return Err(ApiError::invalid("best_of", "best_of is not supported (use n)"));
        }
    }
    let mut plan = plan(&req.sampling, model.hp.n_vocab, entry.engine.config.n_ctx, k)?;
    plan.lora = lora;
    if req.echo && req.suffix.is_some() {
        // The model sees the prompt and suffix wrapped in fill-in-the-middle tokens: there is no
        // prompt text to echo that its tokens would spell.
        return Err(ApiError::invalid("echo", "echo cannot be combined with suffix"));
    }
    let prompts = match (&req.suffix, &req.prompt) {
        (Some(suffix), Input::Text(p)) => vec![with_suffix(&entry, p, suffix)?],
        (Some(_), _) => return Err(ApiError::invalid("suffix", "suffix needs a single text prompt")),
        (None, input) => prompts(&entry, input, "prompt")?,
    };
    for p in &prompts {
        check_context(&entry, p.len())?;
    }
    if req.echo && plan.stream && k.is_some() {
        return Err(ApiError::invalid("echo", "echo with logprobs is not supported when streaming"));
    }
    let prompt_lp = if req.echo && k.is_some() { k } else { None };
    // Echoed prompts leave out a BOS the tokenizer added to a text prompt (it is not in the
    // request's text), so that the echoed text and its tokens' offsets line up.
    let tok = &model.tokenizer;
    let texts: Vec<&str> = match &req.prompt {
        Input::Text(t) => vec![t.as_str()],
        Input::Texts(ts) => ts.iter().map(String::as_str).collect(),
        _ => Vec::new(),
    };
    let bos_text = tok.bos.map(|b| token_text(&entry, b).0).unwrap_or_default();
    let added_bos = |i: usize, p: &[u32]| match (texts.get(i), tok.bos) {
        // A BOS the request wrote itself stays.
        (Some(t), Some(bos)) if tok.add_bos && p.first() == Some(&bos) && !t.starts_with(bos_text.as_str()) => 1,
        _ => 0,
    };
    let echoed: Vec<&[u32]> = prompts.iter().enumerate().map(|(i, p)| &p[added_bos(i, p)..]).collect();
    let choices_n = prompts.len() * plan.n;
    plan.compile_grammar(&entry).await?;
    let rx = submit(&entry, &prompts, &plan, prompt_lp)?;
    let id = new_id("cmpl");
    let created = now_secs();
    let prompt_total: usize = prompts.iter().map(|p| p.len()).sum();
    let mut bill = meter.bill(prompt_total);
    if plan.stream {
        let echo_text: Vec<String> = echoed.iter().map(|p| if req.echo { tok.decode(p, true) } else { String::new() }).collect();
        return Ok(stream(state, entry, model_id, rx, plan.n, choices_n, prompt_total, k.is_some(), plan.include_usage, echo_text, id, created, start, bill));
    }
    let choices = collect(&state, rx, choices_n, start).await?;
    let mut completion = 0;
    let out: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let summary = c.summary.as_ref();
            completion += summary.map(|s| s.completion_tokens).unwrap_or(0);
            let echo = echoed[i / plan.n];
            let mut text = String::new();
            if req.echo {
                text.push_str(&tok.decode(echo, true));
            }
            text.push_str(&c.text);
            let logprobs = match k {
                None => Value::Null,
                Some(_) => {
                    let mut l = LegacyLogprobs::new();
                    if let Some(lp) = &c.prompt_logprobs {
                        l.prompt(&entry, &lp[lp.len().saturating_sub(echo.len())..]);
                    }
                    for s in &c.steps {
                        l.step(&entry, s);
                    }
                    l.json()
                }
            };
            let fr = finish_reason(summary.map(|s| s.finish).unwrap_or(smelt_engine::FinishReason::Length));
            json!({"index": i, "text": text, "logprobs": logprobs, "finish_reason": fr})
        })
        .collect();
    bill.tokens += completion;
    Ok(axum::Json(json!({
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model_id,
        "system_fingerprint": concat!("smelt-", env!("CARGO_PKG_VERSION")),
        "choices": out,
        "usage": Usage::new(prompt_total, completion),
    }))
    .into_response())
}

#[allow(clippy::too_many_arguments)]
fn stream(
    state: AppState,
    entry: std::sync::Arc<ModelEntry>,
    model_id: String,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<(usize, Event)>,
    n: usize,
    choices: usize,
    prompt_tokens: usize,
    want_logprobs: bool,
    include_usage: bool,
    echo: Vec<String>,
    id: String,
    created: u64,
    start: Instant,
    bill: Bill,
) -> Response {
    let (tx, out) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        // Moved in whole (not just the counter) so that dropping it charges the tokens.
        let mut bill = bill;
        let chunk = |choice: Value| {
            let mut c = json!({"id": id, "object": "text_completion", "created": created, "model": model_id, "choices": [choice]});
            if include_usage {
                c["usage"] = Value::Null;
            }
            c.to_string()
        };
        for i in 0..choices {
            if !echo[i / n].is_empty() && tx.send(chunk(json!({"index": i, "text": echo[i / n], "logprobs": null, "finish_reason": null}))).is_err() {
                return;
            }
        }
        let mut timing = Timing::new(start, choices);
        let (mut done, mut completion) = (0, 0);
        while done < choices {
            let Some((i, ev)) = rx.recv().await else { return };
            let msg = match ev {
                Event::Token(step) => {
                    timing.token(&state, i);
                    bill.tokens += 1;
                    if step.text.is_empty() && !want_logprobs {
                        continue;
                    }
                    let lp = if want_logprobs {
                        let mut l = LegacyLogprobs::new();
                        l.step(&entry, &step);
                        l.json()
                    } else {
                        Value::Null
                    };
                    chunk(json!({"index": i, "text": step.text, "logprobs": lp, "finish_reason": null}))
                }
                Event::Done(s) => {
                    done += 1;
                    completion += s.completion_tokens;
                    chunk(json!({"index": i, "text": "", "logprobs": null, "finish_reason": finish_reason(s.finish)}))
                }
                Event::Error(e) => {
                    let _ = tx.send(ApiError::bad_request(e).body().to_string());
                    return;
                }
                _ => continue,
            };
            if tx.send(msg).is_err() {
                return;
            }
        }
        if include_usage {
            let c = json!({"id": id, "object": "text_completion", "created": created, "model": model_id, "choices": [], "usage": Usage::new(prompt_tokens, completion)});
            let _ = tx.send(c.to_string());
        }
        let _ = tx.send("[DONE]".into());
    });
    sse_response(out)
}
