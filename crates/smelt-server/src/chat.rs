//! POST /v1/chat/completions

use crate::error::ApiError;
use crate::generation::{check_context, collect, finish_reason, new_id, now_secs, plan, submit, token_text, Choice, Timing};
use crate::state::{AppState, ModelEntry, Resolved};
use crate::types::{ChatMessage, ChatRequest, Content, Usage};
use crate::{guard, parse_json, sse_response, stored, structured, tools};
use smelt_guard::StreamGuard;
use axum::body::Bytes;
use axum::extract::State;
use axum::Extension;
use crate::keys::{Bill, Meter};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use smelt_engine::scheduler::Event;
use smelt_engine::Step;
use std::time::Instant;

/// Messages as the chat template expects them: string content, tool-call arguments as objects.
fn template_messages(messages: &[ChatMessage]) -> Result<Value, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" | "assistant" | "tool" => m.role.as_str(),
            other => return Err(ApiError::invalid(&format!("messages[{i}].role"), format!("unknown role {other:?} (system, developer, user, assistant, tool)"))),
        };
        let content = match &m.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => text.push_str(t),
                        ("text", None) => return Err(ApiError::invalid(&format!("messages[{i}].content"), "a content part of type \"text\" needs a \"text\" string")),
                        (kind, _) => return Err(ApiError::invalid(&format!("messages[{i}].content"), format!("content parts of type {kind:?} are not supported; this server takes text"))),
                    }
                }
                text
            }
        };
        if role == "tool" && m.tool_call_id.as_deref().is_none_or(str::is_empty) {
            return Err(ApiError::invalid(&format!("messages[{i}].tool_call_id"), "Missing required parameter: a message with role \"tool\" needs the tool_call_id of the call it answers"));
        }
        if m.content.is_none() && m.tool_calls.is_none() {
            return Err(ApiError::invalid(&format!("messages[{i}].content"), "a message needs content"));
        }
        let mut msg = json!({"role": role, "content": content});
        if let Some(calls) = &m.tool_calls {
            let mut calls = calls.clone();
            // OpenAI sends arguments as a JSON string; templates render them as objects.
            if let Some(list) = calls.as_array_mut() {
                for c in list {
                    if let Some(args) = c.pointer_mut("/function/arguments") {
                        if let Some(parsed) = args.as_str().and_then(|s| serde_json::from_str::<Value>(s).ok()) {
                            *args = parsed;
                        }
                    }
                }
            }
            msg["tool_calls"] = calls;
        }
        if let Some(id) = &m.tool_call_id {
            msg["tool_call_id"] = json!(id);
        }
        if let Some(name) = &m.name {
            msg["name"] = json!(name);
        }
        out.push(msg);
    }
    Ok(Value::Array(out))
}

fn logprob_entry(entry: &ModelEntry, step: &Step) -> Value {
    let (token, bytes) = token_text(entry, step.id);
    let top: Vec<Value> = step
        .top
        .iter()
        .map(|&(id, lp)| {
            let (t, b) = token_text(entry, id);
            json!({"token": t, "logprob": lp, "bytes": b})
        })
        .collect();
    json!({"token": token, "logprob": step.logprob, "bytes": bytes, "top_logprobs": top})
}

pub async fn handler(State(state): State<AppState>, Extension(meter): Extension<Meter>, body: Bytes) -> Result<Response, ApiError> {
    let start = Instant::now();
    let policy = meter.guard().cloned().unwrap_or_else(|| state.guard());
    // Guardrails see the request first: a blocked one goes no further, a redacted one is what
    // the model (and the store) gets.
    let body = guard::guard_request(&policy.input, &body)?.unwrap_or(body);
    let req: ChatRequest = parse_json(&body)?;
    let Resolved { entry, lora, id: model_id, .. } = state.resolve(req.model.as_deref())?;
    let to_store = stored::plan(&state, &meter, &body, &req, start)?;
    let model = &entry.engine.model;
    let want_logprobs = req.logprobs.unwrap_or(false);
    let top = match (want_logprobs, req.top_logprobs) {
        (false, Some(k)) if k > 0 => return Err(ApiError::invalid("top_logprobs", "top_logprobs requires logprobs: true")),
        (_, Some(k)) if k < 0 => return Err(ApiError::invalid("top_logprobs", format!("top_logprobs must be between 0 and 20, got {k}"))),
        (_, k) => k.unwrap_or(0) as usize,
    };
    if want_logprobs && !policy.output.is_empty() {
        // Token log-probabilities would show the text the guardrails redact or block.
        return Err(ApiError::invalid("logprobs", "logprobs are not available on this server's guarded answers (it redacts or blocks output)"));
    }
    let mut plan = plan(&req.sampling, model.hp.n_vocab, entry.engine.config.n_ctx, want_logprobs.then_some(top))?;
    plan.lora = lora;
    let template = model.chat_template().map_err(|e| ApiError::internal(e.to_string()))?;
    if let Some(format) = model.fallback_chat_format() {
        if !entry.warned_no_template.swap(true, std::sync::atomic::Ordering::Relaxed) {
            eprintln!("warning: {model_id} has no chat template (a base model?); chat requests to it use {format} and may get rambling answers (said once)");
        }
    }
    let tools = tools::setup(req.tools.as_ref(), req.tool_choice.as_ref(), req.parallel_tool_calls, &template.source)?;
    let mut messages = template_messages(&req.messages)?;
    if !tools::template_knows_tool_messages(&template.source) {
        tools::plain_messages(&mut messages);
    }
    let native = tools::template_knows_tools(&template.source);
    if let (Some(_), false, Some(defs)) = (&tools, native, req.tools.as_ref()) {
        add_system_text(&mut messages, &tools::instructions(defs));
    }
    if let Some(rf) = &req.response_format {
        if let Some(g) = structured::response_format(rf)? {
            if plan.grammar.is_some() {
                return Err(ApiError::invalid("response_format", "give either response_format or a grammar extension, not both"));
            }
            plan.grammar = Some(g);
        }
    }
    if let Some(g) = tools.as_ref().map(|t| t.forcing_grammar()).transpose()?.flatten() {
        if plan.grammar.is_some() {
            return Err(ApiError::invalid("tool_choice", "a tool_choice that forces a call cannot be combined with response_format or a grammar"));
        }
        plan.grammar = Some(g);
    }
    let render_tools = if tools.is_some() && native { req.tools.as_ref() } else { None };
    let rendered = template.render(&messages, render_tools, true).map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let prompt = model.tokenizer.encode_prompt(&rendered);
    check_context(&entry, prompt.len())?;
    plan.compile_grammar(&entry).await?;
    let rx = submit(&entry, std::slice::from_ref(&prompt), &plan, None)?;
    let mut bill = meter.bill(prompt.len());
    let id = new_id("chatcmpl");
    let created = now_secs();
    if plan.stream {
        let opts = StreamOpts { n: plan.n, prompt_tokens: prompt.len(), want_logprobs, include_usage: plan.include_usage, id, created, start, model: model_id };
        return Ok(stream(state, entry, rx, opts, tools, bill, to_store, policy.output));
    }
    let choices = collect(&state, rx, plan.n, start).await?;
    let completion: usize = choices.iter().filter_map(|c| c.summary.as_ref()).map(|s| s.completion_tokens).sum();
    bill.tokens += completion;
    let out: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, c): (usize, &Choice)| {
            let s = c.summary.as_ref().map(|s| s.finish).unwrap_or(smelt_engine::FinishReason::Length);
            let logprobs = if want_logprobs { json!({"content": c.steps.iter().map(|st| logprob_entry(&entry, st)).collect::<Vec<_>>()}) } else { Value::Null };
            let (mut content, calls) = match &tools {
                Some(t) => tools::parse(t, &c.text),
                None => (Some(c.text.clone()), Vec::new()),
            };
            let mut finish = finish_reason(s);
            if let (Some(text), false) = (content.as_mut(), policy.output.is_empty()) {
                let mut g = StreamGuard::new(policy.output.clone());
                let (a, b) = (g.push(text), g.finish());
                *text = a.text + &b.text;
                if a.blocked.or(b.blocked).is_some() {
                    finish = "content_filter";
                }
            }
            let mut message = json!({"role": "assistant", "content": content});
            let mut calls = calls;
            if !policy.output.is_empty() {
                // Arguments are screened like text; a blocked call ends the answer there.
                let mut kept = Vec::new();
                for mut c in calls {
                    match smelt_guard::check(&policy.output, &c.arguments) {
                        smelt_guard::Checked::Passed(a) if finish != "content_filter" => {
                            c.arguments = a;
                            kept.push(c);
                        }
                        _ => finish = "content_filter",
                    }
                }
                calls = kept;
            }
            if !calls.is_empty() {
                message["tool_calls"] = calls.iter().map(|c| json!({"id": tools::call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}})).collect();
                if finish != "content_filter" {
                    finish = "tool_calls";
                }
            }
            json!({"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish})
        })
        .collect();
    let cached: usize = choices.first().and_then(|c| c.summary.as_ref()).map(|s| s.cached_tokens).unwrap_or(0);
    let mut usage = json!(Usage::new(prompt.len(), completion));
    usage["prompt_tokens_details"] = json!({"cached_tokens": cached});
    let response = json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model_id,
        "system_fingerprint": concat!("smelt-", env!("CARGO_PKG_VERSION")),
        "choices": out,
        "usage": usage,
    });
    if let Some(s) = to_store {
        s.save(&response).await;
    }
    Ok(axum::Json(response).into_response())
}

/// Where a streamed reply goes and what it reports.
struct StreamOpts {
    n: usize,
    prompt_tokens: usize,
    want_logprobs: bool,
    include_usage: bool,
    id: String,
    created: u64,
    start: Instant,
    /// The model id to answer with (the request's, adapter included).
    model: String,
}

/// Pass a choice's pieces through its output guard: text is redacted (held back while a match
/// may be in progress); after a block nothing more goes out. `last`: the choice is done.
fn screen(guard: &mut Option<StreamGuard>, cut: &mut bool, pieces: Vec<tools::Piece>, last: bool) -> Vec<tools::Piece> {
    if *cut {
        return Vec::new();
    }
    let Some(g) = guard.as_mut() else { return pieces };
    let mut out = Vec::new();
    let release = |r: smelt_guard::Released, out: &mut Vec<tools::Piece>| {
        out.push(tools::Piece::Text(r.text));
        r.blocked.is_some()
    };
    for p in pieces {
        match p {
            tools::Piece::Text(t) => {
                if release(g.push(&t), &mut out) {
                    *cut = true;
                    return out;
                }
            }
            tools::Piece::Call(mut call) => {
                // Text before a call is complete: release it first.
                if release(g.finish(), &mut out) {
                    *cut = true;
                    return out;
                }
                *g = StreamGuard::new(g.rules().clone());
                match smelt_guard::check(g.rules(), &call.arguments) {
                    smelt_guard::Checked::Passed(a) => call.arguments = a,
                    smelt_guard::Checked::Blocked(_) => {
                        *cut = true;
                        return out;
                    }
                }
                out.push(tools::Piece::Call(call));
            }
        }
    }
    if last && release(g.finish(), &mut out) {
        *cut = true;
    }
    out
}

/// Put `text` into the system message (made first when there is none).
fn add_system_text(messages: &mut Value, text: &str) {
    let Some(list) = messages.as_array_mut() else { return };
    match list.first_mut() {
        Some(m) if m["role"] == "system" => {
            let old = m["content"].as_str().unwrap_or("").to_string();
            m["content"] = Value::String(if old.is_empty() { text.to_string() } else { format!("{old}\n\n{text}") });
        }
        _ => list.insert(0, json!({"role": "system", "content": text})),
    }
}

fn stream(state: AppState, entry: std::sync::Arc<ModelEntry>, mut rx: tokio::sync::mpsc::UnboundedReceiver<(usize, Event)>, o: StreamOpts, tools: Option<tools::ToolSetup>, bill: Bill, to_store: Option<stored::ToStore>, output: smelt_guard::Rules) -> Response {
    let StreamOpts { n, prompt_tokens, want_logprobs, include_usage, id, created, start, model: model_id } = o;
    let (tx, out) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        // Moved in whole (not just the counter) so that dropping it charges the tokens.
        let mut bill = bill;
        let chunk = |choices: Value| {
            let mut c = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model_id, "system_fingerprint": concat!("smelt-", env!("CARGO_PKG_VERSION")), "choices": choices});
            if include_usage {
                c["usage"] = Value::Null;
            }
            c.to_string()
        };
        for i in 0..n {
            let first = json!([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]);
            if tx.send(chunk(first)).is_err() {
                return;
            }
        }
        let mut timing = Timing::new(start, n);
        let mut assembly = to_store.as_ref().map(|_| stored::Assembly::new(n));
        let (mut done, mut completion, mut cached) = (0, 0, 0);
        let mut parsers: Vec<Option<tools::CallParser>> = (0..n).map(|_| tools.as_ref().map(tools::CallParser::new)).collect();
        // Output guardrails per choice; `cut` once a choice was blocked (nothing more is sent).
        let mut guards: Vec<Option<StreamGuard>> = (0..n).map(|_| (!output.is_empty()).then(|| StreamGuard::new(output.clone()))).collect();
        let mut cut = vec![false; n];
        // Pieces of one choice as delta chunks: content, or a call (its header, then arguments).
        let deltas = |pieces: Vec<tools::Piece>, calls_before: usize| -> Vec<Value> {
            let mut k = calls_before;
            let mut out = Vec::new();
            for p in pieces {
                match p {
                    tools::Piece::Text(t) if t.is_empty() => {}
                    tools::Piece::Text(t) => out.push(json!({"content": t})),
                    tools::Piece::Call(c) => {
                        out.push(json!({"tool_calls": [{"index": k, "id": tools::call_id(), "type": "function", "function": {"name": c.name, "arguments": ""}}]}));
                        out.push(json!({"tool_calls": [{"index": k, "function": {"arguments": c.arguments}}]}));
                        k += 1;
                    }
                }
            }
            out
        };
        while done < n {
            let Some((i, ev)) = rx.recv().await else { return };
            let msgs: Vec<String> = match ev {
                Event::Token(step) => {
                    timing.token(&state, i);
                    bill.tokens += 1;
                    let lp = if want_logprobs { json!({"content": [logprob_entry(&entry, &step)]}) } else { Value::Null };
                    let before = parsers[i].as_ref().map_or(0, |p| p.calls);
                    let pieces = match parsers[i].as_mut() {
                        Some(p) => p.push(&step.text),
                        None => vec![tools::Piece::Text(step.text.clone())],
                    };
                    let ds = deltas(screen(&mut guards[i], &mut cut[i], pieces, false), before);
                    if let Some(a) = assembly.as_mut() {
                        ds.iter().for_each(|d| a.delta(i, d));
                    }
                    if ds.is_empty() && want_logprobs && !cut[i] {
                        vec![chunk(json!([{"index": i, "delta": {}, "logprobs": lp, "finish_reason": null}]))]
                    } else {
                        ds.into_iter().enumerate().map(|(k, d)| chunk(json!([{"index": i, "delta": d, "logprobs": if k == 0 { lp.clone() } else { Value::Null }, "finish_reason": null}]))).collect()
                    }
                }
                Event::Done(s) => {
                    done += 1;
                    completion += s.completion_tokens;
                    if i == 0 {
                        cached = s.cached_tokens;
                    }
                    let mut msgs = Vec::new();
                    let mut finish = finish_reason(s.finish);
                    let before = parsers[i].as_ref().map_or(0, |p| p.calls);
                    let pieces = parsers[i].as_mut().map(|p| p.finish()).unwrap_or_default();
                    let pieces = screen(&mut guards[i], &mut cut[i], pieces, true);
                    for d in deltas(pieces, before) {
                        if let Some(a) = assembly.as_mut() {
                            a.delta(i, &d);
                        }
                        msgs.push(chunk(json!([{"index": i, "delta": d, "logprobs": null, "finish_reason": null}])));
                    }
                    if parsers[i].as_ref().is_some_and(|p| p.calls > 0) {
                        finish = "tool_calls";
                    }
                    if cut[i] {
                        finish = "content_filter";
                    }
                    if let Some(a) = assembly.as_mut() {
                        a.finish(i, finish);
                    }
                    msgs.push(chunk(json!([{"index": i, "delta": {}, "logprobs": null, "finish_reason": finish}])));
                    msgs
                }
                Event::Error(e) => {
                    let _ = tx.send(ApiError::bad_request(e).body().to_string());
                    return;
                }
                _ => continue,
            };
            for m in msgs {
                if tx.send(m).is_err() {
                    return;
                }
            }
        }
        // Stored before the stream ends: a client that saw [DONE] finds its completion stored.
        if let (Some(s), Some(a)) = (to_store, assembly) {
            s.save(&a.response(&id, created, &model_id, json!(Usage::new(prompt_tokens, completion)))).await;
        }
        if include_usage {
            let mut c = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model_id, "choices": [], "usage": Usage::new(prompt_tokens, completion)});
            // As in the non-streamed response: how much of the prompt came from the prefix cache.
            c["usage"]["prompt_tokens_details"] = json!({"cached_tokens": cached});
            c["system_fingerprint"] = json!(concat!("smelt-", env!("CARGO_PKG_VERSION")));
            let _ = tx.send(c.to_string());
        }
        let _ = tx.send("[DONE]".into());
    });
    sse_response(out)
}
