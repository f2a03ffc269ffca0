//! Tool calling: the tools a request offers, how the model is told about them, grammars that
//! force a valid call, and reading calls back out of generated text (streamed or not — both go
//! through the same parser, so they agree).
//!
//! Calls are recognised in the forms models are trained to write:
//! - `<tool_call>{"name": …, "arguments": {…}}</tool_call>` blocks (Qwen 2.5, Hermes, and the
//!   form smelt teaches models whose template knows no tools);
//! - `[TOOL_CALLS] [{"name": …, "arguments": {…}}, …]` (Mistral);
//! - `<|python_tag|>` or a whole reply that is a JSON call object or list of them, with
//!   `arguments` or `parameters` (Llama 3.x).

use crate::error::ApiError;
use serde_json::{json, Value};
use smelt_engine::grammar::json_schema;

pub struct Tool {
    pub name: String,
    pub parameters: Value,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Named(String),
}

/// How the model writes calls (decides the prompt and the forcing grammar).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Syntax {
    Tagged,
    Llama3,
    Mistral,
}

pub struct ToolSetup {
    pub tools: Vec<Tool>,
    pub choice: ToolChoice,
    pub parallel: bool,
    pub syntax: Syntax,
}

/// A parsed call.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    pub name: String,
    /// The arguments as a JSON text (OpenAI's shape).
    pub arguments: String,
}

fn bad(param: &str, msg: impl Into<String>) -> ApiError {
    ApiError::invalid(param, msg)
}

/// What the template can do: render tool definitions, and assistant calls / tool results.
pub fn template_knows_tools(source: &str) -> bool {
    source.contains("tools")
}

pub fn template_knows_tool_messages(source: &str) -> bool {
    source.contains("tool_calls") || source.contains("tool_call")
}

fn syntax_of(template: &str) -> Syntax {
    if template.contains("[TOOL_CALLS]") {
        Syntax::Mistral
    } else if template.contains("<|python_tag|>") || (template.contains("<|start_header_id|>") && template.contains("tools")) {
        Syntax::Llama3
    } else {
        Syntax::Tagged
    }
}

/// Check `tools`, `tool_choice` and `parallel_tool_calls`. None when the request has no tools
/// (or `tool_choice` is "none": the model then answers in text and nothing is parsed).
pub fn setup(tools: Option<&Value>, choice: Option<&Value>, parallel: Option<bool>, template: &str) -> Result<Option<ToolSetup>, ApiError> {
    let choice = match choice {
        None => None,
        Some(Value::String(s)) => Some(match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => return Err(bad("tool_choice", format!("tool_choice must be \"none\", \"auto\", \"required\" or {{\"type\": \"function\", \"function\": {{\"name\": …}}}}, got {other:?}"))),
        }),
        Some(v @ Value::Object(_)) => match v.pointer("/function/name").and_then(|n| n.as_str()) {
            Some(n) if v.get("type").and_then(|t| t.as_str()).unwrap_or("function") == "function" => Some(ToolChoice::Named(n.to_string())),
            _ => return Err(bad("tool_choice", "a named tool_choice must look like {\"type\": \"function\", \"function\": {\"name\": \"…\"}}")),
        },
        Some(_) => return Err(bad("tool_choice", "tool_choice must be a string or an object")),
    };
    let list = match tools {
        None | Some(Value::Null) => {
            return match choice {
                None | Some(ToolChoice::None) | Some(ToolChoice::Auto) => Ok(None),
                Some(_) => Err(bad("tool_choice", "tool_choice needs tools")),
            }
        }
        Some(Value::Array(l)) => l,
        Some(_) => return Err(bad("tools", "tools must be an array of {\"type\": \"function\", \"function\": {…}}")),
    };
    if list.is_empty() {
        return Err(bad("tools", "tools must not be empty (leave it out instead)"));
    }
    if list.len() > 128 {
        return Err(bad("tools", "at most 128 tools"));
    }
    let mut out = Vec::new();
    for (i, t) in list.iter().enumerate() {
        let param = format!("tools[{i}]");
        if t.get("type").and_then(|v| v.as_str()) != Some("function") {
            return Err(bad(&param, "only tools of type \"function\" are supported"));
        }
        let f = t.get("function").and_then(|f| f.as_object()).ok_or_else(|| bad(&param, "a tool needs a \"function\" object"))?;
        let name = f.get("name").and_then(|n| n.as_str()).ok_or_else(|| bad(&format!("{param}.function.name"), "a function needs a name"))?;
        if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return Err(bad(&format!("{param}.function.name"), format!("function names are 1-64 letters, digits, '_' or '-', got {name:?}")));
        }
        if out.iter().any(|o: &Tool| o.name == name) {
            return Err(bad(&format!("{param}.function.name"), format!("two tools are named {name:?}")));
        }
        let parameters = match f.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(p @ Value::Object(_)) => p.clone(),
            Some(_) => return Err(bad(&format!("{param}.function.parameters"), "parameters must be a JSON Schema object")),
        };
        out.push(Tool { name: name.to_string(), parameters });
    }
    let choice = choice.unwrap_or(ToolChoice::Auto);
    if let ToolChoice::Named(n) = &choice {
        if !out.iter().any(|t| &t.name == n) {
            return Err(bad("tool_choice", format!("tool_choice names {n:?}, which is not among the tools")));
        }
    }
    if choice == ToolChoice::None {
        return Ok(None);
    }
    Ok(Some(ToolSetup { tools: out, choice, parallel: parallel.unwrap_or(true), syntax: syntax_of(template) }))
}

/// For templates that know nothing of tools: how to call them, as a system prompt.
pub fn instructions(tools: &Value) -> String {
    let mut s = String::from(
        "You can call the functions below. To call one, reply with only a block of this form (one block per call):\n<tool_call>\n{\"name\": \"<function name>\", \"arguments\": {<arguments as JSON>}}\n</tool_call>\nResults come back in <tool_response> blocks. If no function is needed, answer normally.\n\nFunctions:\n",
    );
    if let Some(list) = tools.as_array() {
        for t in list {
            if let Some(f) = t.get("function") {
                s.push_str(&f.to_string());
                s.push('\n');
            }
        }
    }
    s
}

/// Rewrite tool traffic for templates without tool support: assistant calls become
/// `<tool_call>` text, tool results become user turns in `<tool_response>` blocks.
pub fn plain_messages(messages: &mut Value) {
    let Some(list) = messages.as_array_mut() else { return };
    for m in list.iter_mut() {
        let role = m["role"].as_str().unwrap_or("").to_string();
        if role == "assistant" {
            if let Some(calls) = m.get("tool_calls").and_then(|c| c.as_array()).cloned() {
                let mut text = m["content"].as_str().unwrap_or("").to_string();
                for c in calls {
                    let f = &c["function"];
                    let args = match &f["arguments"] {
                        Value::String(s) => serde_json::from_str(s).unwrap_or(Value::String(s.clone())),
                        v => v.clone(),
                    };
                    if !text.is_empty() {
                        text.push('\n');
                    }
                    text.push_str(&format!("<tool_call>\n{}\n</tool_call>", json!({"name": f["name"], "arguments": args})));
                }
                m["content"] = Value::String(text);
                if let Some(o) = m.as_object_mut() {
                    o.remove("tool_calls");
                }
            }
        } else if role == "tool" {
            let content = m["content"].as_str().unwrap_or("").to_string();
            *m = json!({"role": "user", "content": format!("<tool_response>\n{content}\n</tool_response>")});
        }
    }
}

impl ToolSetup {
    /// A grammar that admits only calls (of the named function, or of any when "required"),
    /// with arguments valid for the function's schema. None when the model may also answer
    /// in text ("auto").
    pub fn forcing_grammar(&self) -> Result<Option<crate::structured::Source>, ApiError> {
        let allowed: Vec<(usize, &Tool)> = match &self.choice {
            ToolChoice::Required => self.tools.iter().enumerate().collect(),
            ToolChoice::Named(n) => self.tools.iter().enumerate().filter(|(_, t)| &t.name == n).collect(),
            _ => return Ok(None),
        };
        let args_key = if self.syntax == Syntax::Llama3 { "parameters" } else { "arguments" };
        let mut rules = String::new();
        let mut calls = Vec::new();
        for (i, t) in allowed {
            let (expr, r) = json_schema::schema_rules(&t.parameters, &format!("t{i}-"))
                .map_err(|e| bad(&format!("tools[{i}].function.parameters"), format!("cannot force a call of {:?}: {}", t.name, e.msg)))?;
            rules.push_str(&r);
            let name = json_schema::literal(&Value::String(t.name.clone()).to_string());
            let object = format!("\"{{\" ws \"\\\"name\\\"\" ws \":\" ws {name} ws \",\" ws \"\\\"{args_key}\\\"\" ws \":\" ws {expr} ws \"}}\"");
            calls.push(match self.syntax {
                Syntax::Tagged => format!("\"<tool_call>\" ws {object} ws \"</tool_call>\""),
                _ => object,
            });
        }
        rules.push_str(&format!("call ::= {}\n", calls.join(" | ")));
        let root = match (self.syntax, self.parallel) {
            // Parallel calls are capped: a small model forced to call may otherwise never stop.
            (Syntax::Tagged, true) => "call (ws call){0,3}",
            (Syntax::Tagged, false) | (Syntax::Llama3, _) => "call",
            (Syntax::Mistral, true) => "\"[TOOL_CALLS]\" ws \"[\" ws call (ws \",\" ws call){0,3} ws \"]\"",
            (Syntax::Mistral, false) => "\"[TOOL_CALLS]\" ws \"[\" ws call ws \"]\"",
        };
        let src = format!("root ::= {root}\n{rules}{}", json_schema::primitives());
        Ok(Some(crate::structured::Source { param: "tools", kind: crate::structured::Kind::Generated(src) }))
    }

    fn call_from(&self, v: &Value) -> Option<Call> {
        let name = v.get("name")?.as_str()?;
        if !self.tools.iter().any(|t| t.name == name) {
            return None;
        }
        let args = v.get("arguments").or_else(|| v.get("parameters")).cloned().unwrap_or(json!({}));
        let args = match args {
            Value::String(s) => serde_json::from_str::<Value>(&s).ok()?,
            v => v,
        };
        args.is_object().then(|| Call { name: name.to_string(), arguments: args.to_string() })
    }

    /// Calls in a JSON text: call objects (one, or several separated by whitespace, ',' or
    /// ';') or a list of them. Everything must be a call.
    fn calls_in(&self, text: &str) -> Option<Vec<Call>> {
        let mut text = text.trim();
        if let Some(inner) = text.strip_prefix(FENCE).and_then(|t| t.trim_end().strip_suffix("```")) {
            text = inner;
        }
        let values = json_values(text)?;
        let list: Vec<&Value> = match values.as_slice() {
            [Value::Array(items)] if !items.is_empty() => items.iter().collect(),
            vs => vs.iter().collect(),
        };
        list.into_iter().map(|c| self.call_from(c)).collect()
    }
}

/// The JSON values in `text`, one after another (small models often drop a closing brace or
/// two of the last one: those are added).
fn json_values(text: &str) -> Option<Vec<Value>> {
    let mut out = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let mut it = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
        match it.next() {
            Some(Ok(v)) => {
                out.push(v);
                rest = rest[it.byte_offset()..].trim_start().trim_start_matches([';', ',']).trim_start();
            }
            _ => {
                out.push(serde_json::from_str(&close_brackets(rest)?).ok()?);
                break;
            }
        }
    }
    (!out.is_empty()).then_some(out)
}

/// What the parser releases: text for `content`, or a complete call.
#[derive(Debug, PartialEq)]
pub enum Piece {
    Text(String),
    Call(Call),
}

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";
/// A reply that is one fenced JSON block may be a call too (small models like to fence).
const FENCE: &str = "```json";
/// Markers after which the rest of the reply is calls.
const REST_MARKERS: [&str; 2] = ["[TOOL_CALLS]", "<|python_tag|>"];

#[derive(PartialEq)]
enum Mode {
    /// Nothing but whitespace seen yet.
    Start,
    Text,
    /// Inside a `<tool_call>` block.
    Block,
    /// The rest of the reply is calls (after a marker, or a reply starting with JSON).
    Rest,
}

/// Splits streamed text into content and calls. Text that might be the start of a call is held
/// back until it is clear.
pub struct CallParser<'a> {
    setup: &'a ToolSetup,
    buf: String,
    mode: Mode,
    /// Text in `Rest` mode started with a marker (kept to give back if it is not a call).
    marker: String,
    pub calls: usize,
}

impl<'a> CallParser<'a> {
    pub fn new(setup: &'a ToolSetup) -> CallParser<'a> {
        CallParser { setup, buf: String::new(), mode: Mode::Start, marker: String::new(), calls: 0 }
    }

    fn call(&mut self, c: Call, out: &mut Vec<Piece>) {
        if self.calls == 0 || self.setup.parallel {
            self.calls += 1;
            out.push(Piece::Call(c));
        }
    }

    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        loop {
            match self.mode {
                Mode::Start => {
                    let t = self.buf.trim_start();
                    if t.is_empty() {
                        return out;
                    }
                    if REST_MARKERS.iter().chain([&FENCE]).any(|m| t.len() < m.len() && m.starts_with(t)) {
                        return out; // could still become a marker
                    }
                    if t.starts_with('{') || t.starts_with(FENCE) || (t.starts_with('[') && !REST_MARKERS.iter().any(|m| t.starts_with(m))) {
                        self.mode = Mode::Rest;
                        continue;
                    }
                    self.mode = Mode::Text;
                }
                Mode::Text => {
                    let mut hit: Option<(usize, &str)> = None;
                    for m in std::iter::once(OPEN).chain(REST_MARKERS) {
                        if let Some(i) = self.buf.find(m) {
                            if hit.is_none_or(|(j, _)| i < j) {
                                hit = Some((i, m));
                            }
                        }
                    }
                    if let Some((i, m)) = hit {
                        if i > 0 {
                            out.push(Piece::Text(self.buf[..i].to_string()));
                        }
                        self.buf.drain(..i + m.len());
                        if m == OPEN {
                            self.mode = Mode::Block;
                        } else {
                            self.marker = m.to_string();
                            self.mode = Mode::Rest;
                        }
                        continue;
                    }
                    // Release all but a tail that could begin a marker.
                    let keep = std::iter::once(OPEN).chain(REST_MARKERS).map(|m| partial_suffix(&self.buf, m)).max().unwrap_or(0);
                    let cut = self.buf.len() - keep;
                    if cut > 0 {
                        out.push(Piece::Text(self.buf[..cut].to_string()));
                        self.buf.drain(..cut);
                    }
                    return out;
                }
                Mode::Block => {
                    let Some(j) = self.buf.find(CLOSE) else { return out };
                    let inner = self.buf[..j].to_string();
                    self.buf.drain(..j + CLOSE.len());
                    match self.setup.calls_in(&inner) {
                        Some(calls) => {
                            for c in calls {
                                self.call(c, &mut out);
                            }
                        }
                        None => out.push(Piece::Text(format!("{OPEN}{inner}{CLOSE}"))),
                    }
                    // Whitespace between blocks is not content.
                    if self.buf.trim().is_empty() {
                        self.buf.clear();
                    }
                    self.mode = Mode::Text;
                }
                Mode::Rest => return out,
            }
        }
    }

    /// The reply is complete: release what was held.
    pub fn finish(&mut self) -> Vec<Piece> {
        let mut out = Vec::new();
        let rest = std::mem::take(&mut self.buf);
        match self.mode {
            Mode::Start | Mode::Text => {
                if !rest.is_empty() && (self.calls == 0 || !rest.trim().is_empty()) {
                    out.push(Piece::Text(rest));
                }
            }
            Mode::Block => match self.setup.calls_in(&rest) {
                // An unterminated last block (the reply ended first) still counts when complete.
                Some(calls) => calls.into_iter().for_each(|c| self.call(c, &mut out)),
                None => out.push(Piece::Text(format!("{OPEN}{rest}"))),
            },
            Mode::Rest => match self.setup.calls_in(&rest) {
                Some(calls) => calls.into_iter().for_each(|c| self.call(c, &mut out)),
                None => out.push(Piece::Text(format!("{}{rest}", self.marker))),
            },
        }
        out
    }
}

/// `text` with its unclosed objects and arrays closed (None when a string is left open or the
/// brackets do not nest).
fn close_brackets(text: &str) -> Option<String> {
    let mut open = Vec::new();
    let (mut in_string, mut escaped) = (false, false);
    for c in text.chars() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '{' => open.push('}'),
            '[' => open.push(']'),
            '}' | ']' if open.pop() != Some(c) => return None,
            _ => {}
        }
    }
    if in_string || open.is_empty() || open.len() > 3 {
        return None;
    }
    Some(text.to_string() + &open.iter().rev().collect::<String>())
}

/// Length of the longest suffix of `s` that is a proper prefix of `marker`.
fn partial_suffix(s: &str, marker: &str) -> usize {
    (1..marker.len().min(s.len() + 1)).rev().find(|&k| s.is_char_boundary(s.len() - k) && marker.starts_with(&s[s.len() - k..])).unwrap_or(0)
}

/// Parse a whole reply: (content, calls).
pub fn parse(setup: &ToolSetup, text: &str) -> (Option<String>, Vec<Call>) {
    let mut p = CallParser::new(setup);
    let mut pieces = p.push(text);
    pieces.extend(p.finish());
    let mut content = String::new();
    let mut calls = Vec::new();
    for piece in pieces {
        match piece {
            Piece::Text(t) => content.push_str(&t),
            Piece::Call(c) => calls.push(c),
        }
    }
    let content = if calls.is_empty() { Some(content) } else { Some(content.trim().to_string()).filter(|c| !c.is_empty()) };
    (content, calls)
}

/// A call id in OpenAI's style.
pub fn call_id() -> String {
    crate::generation::new_id("call").replacen('-', "_", 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools(template: &str) -> ToolSetup {
        let t = json!([
            {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
        ]);
        setup(Some(&t), None, None, template).unwrap().unwrap()
    }

    #[test]
    fn every_native_syntax_parses() {
        let s = tools("{% if tools %}<tool_call>{% endif %}");
        let weather = Call { name: "get_weather".into(), arguments: r#"{"city":"Paris"}"#.into() };
        let add = Call { name: "add".into(), arguments: r#"{"a":1,"b":2}"#.into() };
        for (text, content, calls) in [
            ("Hello!", Some("Hello!"), vec![]),
            ("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>", None, vec![weather.clone()]),
            ("Let me check.\n<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}</tool_call>\n<tool_call>{\"name\": \"add\", \"arguments\": \"{\\\"a\\\": 1, \\\"b\\\": 2}\"}</tool_call>", Some("Let me check."), vec![weather.clone(), add.clone()]),
            ("[TOOL_CALLS] [{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}]", None, vec![add.clone()]),
            ("<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}", None, vec![weather.clone()]),
            ("{\"name\": \"add\", \"parameters\": {\"a\": 1, \"b\": 2}}", None, vec![add.clone()]),
            ("<tool_call>{\"name\": \"nope\", \"arguments\": {}}</tool_call>", Some("<tool_call>{\"name\": \"nope\", \"arguments\": {}}</tool_call>"), vec![]),
            ("{\"not\": \"a call\"}", Some("{\"not\": \"a call\"}"), vec![]),
            ("{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}", None, vec![weather.clone()]),
            ("{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}", None, vec![add.clone(), weather.clone()]),
            ("{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}\n{\"response\": 3}", Some("{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}\n{\"response\": 3}"), vec![]),
            ("a < b <tool", Some("a < b <tool"), vec![]),
            ("```json\n{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}\n```", None, vec![add.clone()]),
            ("```json\n[1, 2]\n```", Some("```json\n[1, 2]\n```"), vec![]),
        ] {
            let (c, k) = parse(&s, text);
            assert_eq!(c.as_deref(), content, "{text}");
            assert_eq!(k, calls, "{text}");
            // Streaming in small pieces gives the same result.
            let mut p = CallParser::new(&s);
            let mut pieces = Vec::new();
            let chars: Vec<char> = text.chars().collect();
            for chunk in chars.chunks(3) {
                pieces.extend(p.push(&chunk.iter().collect::<String>()));
            }
            pieces.extend(p.finish());
            let streamed: Vec<Call> = pieces.iter().filter_map(|x| if let Piece::Call(c) = x { Some(c.clone()) } else { None }).collect();
            let text_out: String = pieces.iter().filter_map(|x| if let Piece::Text(t) = x { Some(t.as_str()) } else { None }).collect();
            assert_eq!(streamed, calls, "streamed {text}");
            assert_eq!(Some(text_out.trim()).filter(|t| !t.is_empty()), content.map(|c| c.trim()), "streamed text {text}");
        }
    }

    #[test]
    fn forcing_grammars_admit_exactly_valid_calls_in_each_syntax() {
        use smelt_engine::grammar::matcher::Matcher;
        use smelt_engine::grammar::Compiled;
        let accepts = |g: &Compiled, text: &str| {
            let m: &Matcher = &g.0;
            m.accept_bytes(&m.start(), text.as_bytes()).is_some_and(|s| m.accepting(&s))
        };
        let t = json!([
            {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
        ]);
        for (template, good, bad) in [
            (
                "{% if tools %}<tool_call>{% endif %}",
                "<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}\n</tool_call>",
                "<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": \"1\", \"b\": 2}}\n</tool_call>",
            ),
            ("[TOOL_CALLS]", "[TOOL_CALLS] [{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}]", "[TOOL_CALLS] [{\"name\": \"add\", \"arguments\": {\"a\": 1}}]"),
            ("<|python_tag|>", "{\"name\": \"add\", \"parameters\": {\"a\": -4, \"b\": 2}}", "{\"name\": \"add\", \"arguments\": {\"a\": -4, \"b\": 2}}"),
        ] {
            let s = setup(Some(&t), Some(&json!({"type": "function", "function": {"name": "add"}})), Some(false), template).unwrap().unwrap();
            let g = s.forcing_grammar().unwrap().unwrap().build().unwrap();
            assert!(accepts(&g, good), "{template}: {good}");
            assert!(!accepts(&g, bad), "{template}: {bad}");
            // The named function only.
            assert!(!accepts(&g, &good.replace("add", "get_weather")), "{template}");
            // What the grammar admits, the parser reads back as the call.
            let (_, calls) = parse(&s, good);
            assert_eq!(calls, vec![Call { name: "add".into(), arguments: serde_json::from_str::<Value>(&good[good.find("{\"a\"").unwrap()..good.rfind('}').unwrap()]).unwrap().to_string() }], "{template}");
        }
        // "required" with parallel calls: several calls, of any tool.
        let s = setup(Some(&t), Some(&json!("required")), None, "{% if tools %}<tool_call>{% endif %}").unwrap().unwrap();
        let g = s.forcing_grammar().unwrap().unwrap().build().unwrap();
        let two = "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}</tool_call>\n<tool_call>{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}</tool_call>";
        assert!(accepts(&g, two));
        assert!(!accepts(&g, "Sure! <tool_call>{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}</tool_call>"));
        assert_eq!(parse(&s, two).1.len(), 2);
    }

    #[test]
    fn bad_tool_requests_are_named() {
        let e = |tools: Value, choice: Value| setup(Some(&tools), Some(&choice), None, "").err().unwrap().body().to_string();
        let ok = json!([{"type": "function", "function": {"name": "f"}}]);
        assert!(e(json!([{"type": "function", "function": {"name": "bad name"}}]), json!("auto")).contains("function names"));
        assert!(e(ok.clone(), json!({"type": "function", "function": {"name": "g"}})).contains("not among the tools"));
        assert!(e(ok.clone(), json!("sometimes")).contains("tool_choice must be"));
        assert!(e(json!({"f": 1}), json!("auto")).contains("tools must be an array"));
        assert!(setup(None, Some(&json!("required")), None, "").is_err());
    }
}
