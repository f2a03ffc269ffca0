//! Chat templates: the model's own Jinja template from `tokenizer.chat_template`, rendered the
//! way Hugging Face's `apply_chat_template` does (trim_blocks, lstrip_blocks, Python-style
//! `tojson`, Python string methods), so prompts match what the model was trained on.

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("chat template does not compile: {0}")]
    Compile(String),
    #[error("chat template failed: {0}")]
    Render(String),
}

/// ChatML, used when a model ships without a template (as llama.cpp does).
pub const CHATML: &str = "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

/// Gemma's turn format, for Gemma models without a template (the base models).
pub const GEMMA: &str = "{{- bos_token }}{%- for message in messages %}{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}{%- if role == 'system' %}{{- '<start_of_turn>user\\n' + message['content'] + '\\n\\n' }}{%- else %}{%- if not (loop.index0 > 0 and messages[loop.index0 - 1]['role'] == 'system') %}{{- '<start_of_turn>' + role + '\\n' }}{%- endif %}{{- message['content'] + '<end_of_turn>\\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}";

pub struct ChatTemplate {
    env: Environment<'static>,
    pub source: String,
    pub bos_token: String,
    pub eos_token: String,
}

/// JSON as Python's `json.dumps(ensure_ascii=False)` writes it: ", " and ": " separators, keys
/// in insertion order (what HF templates produce for tool definitions and arguments).
pub fn python_json(v: &serde_json::Value, indent: Option<usize>, out: &mut String, depth: usize) {
    use serde_json::Value as J;
    let nl = |out: &mut String, d: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * d));
        }
    };
    match v {
        J::Null => out.push_str("null"),
        J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        J::Number(n) => out.push_str(&n.to_string()),
        J::String(s) => out.push_str(&serde_json::to_string(s).unwrap_or_default()),
        J::Array(a) => {
            if a.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                    if indent.is_none() {
                        out.push(' ');
                    }
                }
                nl(out, depth + 1);
                python_json(x, indent, out, depth + 1);
            }
            nl(out, depth);
            out.push(']');
        }
        J::Object(o) => {
            if o.is_empty() {
                out.push_str("{}");
                return;
            }
            out.push('{');
            for (i, (k, x)) in o.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                    if indent.is_none() {
                        out.push(' ');
                    }
                }
                nl(out, depth + 1);
                out.push_str(&serde_json::to_string(k).unwrap_or_default());
                out.push_str(": ");
                python_json(x, indent, out, depth + 1);
            }
            nl(out, depth);
            out.push('}');
        }
    }
}

fn tojson(v: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&v).map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    python_json(&json, indent, &mut out, 0);
    Ok(Value::from_safe_string(out))
}

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

fn strftime_now(fmt: String) -> String {
    // Templates use this for "today's date" lines; render the current UTC date.
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let days = (secs / 86_400) as i64;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    const MONTHS: [&str; 12] = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
    fmt.replace("%Y", &y.to_string())
        .replace("%m", &format!("{m:02}"))
        .replace("%d", &format!("{d:02}"))
        .replace("%B", MONTHS[(m - 1) as usize])
        .replace("%b", &MONTHS[(m - 1) as usize][..3])
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate, ChatError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned("chat", source.to_string()).map_err(|e| ChatError::Compile(e.to_string()))?;
        Ok(ChatTemplate { env, source: source.to_string(), bos_token: bos_token.to_string(), eos_token: eos_token.to_string() })
    }

    /// Render `messages` (OpenAI-style objects: role, content, tool_calls, tool_call_id, …),
    /// optionally with tool definitions, ending with the assistant turn's opening when
    /// `add_generation_prompt` is set.
    pub fn render(&self, messages: &serde_json::Value, tools: Option<&serde_json::Value>, add_generation_prompt: bool) -> Result<String, ChatError> {
        let tmpl = self.env.get_template("chat").map_err(|e| ChatError::Render(e.to_string()))?;
        let ctx = minijinja::context! {
            messages => Value::from_serialize(messages),
            tools => tools.map(Value::from_serialize),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone(),
            eos_token => self.eos_token.clone(),
        };
        tmpl.render(ctx).map_err(|e| {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            ChatError::Render(msg)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_style_json() {
        let v = serde_json::json!({"b": [1, 2.5, "é\"x"], "a": {"n": null, "t": true}, "e": []});
        let mut s = String::new();
        python_json(&v, None, &mut s, 0);
        assert_eq!(s, r#"{"b": [1, 2.5, "é\"x"], "a": {"n": null, "t": true}, "e": []}"#);
    }

    #[test]
    fn fallback_templates_render() {
        let msgs = serde_json::json!([{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]);
        let t = ChatTemplate::new(CHATML, "", "").unwrap();
        assert_eq!(t.render(&msgs, None, true).unwrap(), "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
        let g = ChatTemplate::new(GEMMA, "<bos>", "").unwrap();
        assert_eq!(g.render(&msgs, None, true).unwrap(), "<bos><start_of_turn>user\nS\n\nHi<end_of_turn>\n<start_of_turn>model\n");
    }

    #[test]
    fn template_errors_are_reported() {
        assert!(ChatTemplate::new("{% if %}", "", "").is_err());
        let t = ChatTemplate::new("{{ raise_exception('no system role') }}", "", "").unwrap();
        let e = t.render(&serde_json::json!([]), None, false).unwrap_err().to_string();
        assert!(e.contains("no system role"), "{e}");
        assert!(strftime_now("%d %B %Y".into()).len() >= 10);
    }
}
