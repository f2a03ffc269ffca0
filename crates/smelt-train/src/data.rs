//! Training data: JSONL files in OpenAI's chat fine-tuning format (`{"messages": [...]}` per
//! line, optional `"weight": 0|1` on assistant messages, optional `"tools"`), rendered with the
//! model's own chat template, with the loss on assistant tokens only; or `{"prompt",
//! "completion"}` lines for base models (the loss on the completion and the end-of-sequence
//! token). Every line is checked before training starts, and every bad line is reported with its
//! number.

use crate::model::Example;
use serde_json::{json, Value};
use smelt_model::arch::Model;

/// A line that cannot be trained on: its number (from 1) and why.
#[derive(Debug, Clone, PartialEq)]
pub struct LineError {
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

/// Normalize one message for the template; Err says what is wrong with it.
fn template_message(i: usize, m: &Value) -> Result<(Value, bool), String> {
    let obj = m.as_object().ok_or_else(|| format!("messages[{i}] is not an object"))?;
    let role = match obj.get("role").and_then(Value::as_str) {
        Some("system" | "developer") => "system",
        Some(r @ ("user" | "assistant" | "tool")) => r,
        Some(r) => return Err(format!("messages[{i}].role {r:?} is not one of system, developer, user, assistant, tool")),
        None => return Err(format!("messages[{i}] has no role")),
    };
    let content = match obj.get("content") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    _ => return Err(format!("messages[{i}].content: only text parts are supported")),
                }
            }
            text
        }
        Some(_) => return Err(format!("messages[{i}].content must be a string or text parts")),
    };
    let mut out = json!({"role": role, "content": content});
    if let Some(calls) = obj.get("tool_calls") {
        let mut calls = calls.clone();
        let list = calls.as_array_mut().ok_or_else(|| format!("messages[{i}].tool_calls must be an array"))?;
        for c in list.iter_mut() {
            // Templates read the arguments as an object; the API sends them as a JSON string.
            if let Some(args) = c.pointer_mut("/function/arguments") {
                if let Some(parsed) = args.as_str().and_then(|s| serde_json::from_str::<Value>(s).ok()) {
                    *args = parsed;
                }
            }
        }
        out["tool_calls"] = calls;
    } else if obj.get("content").is_none_or(Value::is_null) {
        return Err(format!("messages[{i}] needs content"));
    }
    if let Some(id) = obj.get("tool_call_id") {
        out["tool_call_id"] = id.clone();
    }
    let weight = match obj.get("weight") {
        None => true,
        Some(w) if role == "assistant" && (w == 0 || w == 1) => w == 1,
        Some(w) => return Err(format!("messages[{i}].weight must be 0 or 1 on an assistant message, got {w}")),
    };
    Ok((out, role == "assistant" && weight))
}

/// A line of a dataset, checked for shape: a chat with its messages normalized for the template
/// (and whether each is trained on), or a prompt and completion.
enum Line {
    Chat { msgs: Vec<Value>, trained: Vec<bool>, tools: Option<Value> },
    Completion { prompt: String, completion: String },
}

fn parse_line(line: &str) -> Result<Line, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    if let Some(messages) = v.get("messages") {
        let messages = messages.as_array().filter(|m| !m.is_empty()).ok_or("\"messages\" must be a non-empty array")?;
        let tools = v.get("tools").cloned();
        if tools.as_ref().is_some_and(|t| !t.is_array()) {
            return Err("\"tools\" must be an array".into());
        }
        let (mut msgs, mut trained) = (Vec::new(), Vec::new());
        for (i, m) in messages.iter().enumerate() {
            let (m, t) = template_message(i, m)?;
            msgs.push(m);
            trained.push(t);
        }
        if !trained.iter().any(|&t| t) {
            return Err("no assistant message to train on (all missing or weight 0)".into());
        }
        Ok(Line::Chat { msgs, trained, tools })
    } else if let (Some(p), Some(c)) = (v.get("prompt"), v.get("completion")) {
        match (p.as_str(), c.as_str()) {
            (Some(_), Some("")) => Err("the completion is empty".into()),
            (Some(p), Some(c)) => Ok(Line::Completion { prompt: p.to_string(), completion: c.to_string() }),
            _ => Err("\"prompt\" and \"completion\" must be strings".into()),
        }
    } else {
        Err("expected {\"messages\": [...]} or {\"prompt\", \"completion\"}".into())
    }
}

/// Check one line's shape without a model: a JSON object with a well-formed non-empty
/// `messages` array that has an assistant message to train on, or `prompt` and `completion`
/// strings.
pub fn check_line(line: &str) -> Result<(), String> {
    parse_line(line).map(|_| ())
}

/// One line of a dataset as a training example for `model`, no longer than `max_tokens`.
pub fn example(model: &Model, line: &str, max_tokens: usize) -> Result<Example, String> {
    let tok = &model.tokenizer;
    let (tokens, targets) = match parse_line(line)? {
        Line::Chat { msgs, trained, tools } => {
            let template = model.chat_template().map_err(|e| e.to_string())?;
            // The conversation in pieces: the text before each assistant message (the template's
            // prompt for it), and the message as the template renders it, end of turn included.
            let render = |upto: usize, gen: bool| template.render(&Value::Array(msgs[..upto].to_vec()), tools.as_ref(), gen).map_err(|e| e.to_string());
            let (mut tokens, mut targets_of) = (Vec::new(), Vec::new());
            let mut done = String::new();
            for (i, m) in msgs.iter().enumerate() {
                if m["role"] != "assistant" {
                    continue;
                }
                let before = render(i, true)?;
                let after = render(i + 1, false)?;
                let (Some(prompt_part), true) = (before.strip_prefix(done.as_str()), after.starts_with(&before)) else {
                    return Err("the chat template does not render this conversation turn by turn; cannot tell the assistant's tokens apart".into());
                };
                let reply = &after[before.len()..];
                for (text, train) in [(prompt_part, false), (reply, trained[i])] {
                    let ids = if tokens.is_empty() { tok.encode_prompt(text) } else { tok.encode(text, false, true) };
                    targets_of.extend(std::iter::repeat_n(train, ids.len()));
                    tokens.extend(ids);
                }
                done = after;
            }
            (tokens, targets_of)
        }
        Line::Completion { prompt, completion } => {
            let mut tokens = tok.encode_prompt(&prompt);
            let n_prompt = tokens.len();
            tokens.extend(tok.encode(&completion, false, true));
            tokens.extend(tok.eos);
            let n = tokens.len();
            if n == n_prompt {
                return Err("the completion is empty".into());
            }
            (tokens, (0..n).map(|i| i >= n_prompt).collect())
        }
    };
    if tokens.len() > max_tokens {
        return Err(format!("{} tokens, more than the context of {max_tokens} (raise --ctx or shorten it)", tokens.len()));
    }
    // Position p predicts token p + 1: it is trained where that token is.
    let targets = (0..tokens.len()).map(|p| (p + 1 < tokens.len() && targets[p + 1]).then(|| tokens[p + 1])).collect();
    Ok(Example { tokens, targets })
}

/// Every line of a JSONL dataset as examples, or every bad line's error (blank lines are
/// skipped; nothing else is).
pub fn dataset(model: &Model, text: &str, max_tokens: usize) -> Result<Vec<Example>, Vec<LineError>> {
    each_line(text, |line| example(model, line, max_tokens))
}

/// `f` of every non-blank line, or every line's error; a file without lines is an error too.
pub fn each_line<T>(text: &str, f: impl Fn(&str) -> Result<T, String>) -> Result<Vec<T>, Vec<LineError>> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match f(line) {
            Ok(v) => out.push(v),
            Err(message) => errors.push(LineError { line: i + 1, message }),
        }
    }
    if out.is_empty() && errors.is_empty() {
        errors.push(LineError { line: 0, message: "the file holds no examples".into() });
    }
    if errors.is_empty() { Ok(out) } else { Err(errors) }
}
