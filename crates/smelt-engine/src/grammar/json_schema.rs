//! JSON Schema to grammar, so that constrained output is always a valid instance.
//!
//! Supported: `type` (one or several), `properties` / `required` (properties come in the order
//! declared; optional ones may be left out), `additionalProperties` (a schema with no
//! `properties` makes a map; otherwise only the declared properties are produced, which is
//! always valid), `items` / `prefixItems` / `minItems` / `maxItems`, `enum`, `const`,
//! `minLength` / `maxLength` / `pattern` / `format` (date, time, date-time, uuid) on strings,
//! `minimum` / `maximum` / `exclusiveMinimum` / `exclusiveMaximum` on integers (and integer
//! bounds ≥ 0 on numbers), `anyOf` / `oneOf`, a single-schema `allOf`, `$ref` into
//! `$defs` / `definitions` (recursion included), `nullable`. Annotations (`title`,
//! `description`, `default`, `examples`, ...) are ignored. Every other keyword is rejected by
//! name: silently ignoring one would produce output the schema does not allow.
//!
//! Whitespace between tokens is one space, or a newline and up to 20 spaces or tabs of
//! indentation (as llama.cpp's converter allows), so a model cannot loop on blank space.

use super::regex;
use serde_json::{Map, Value};
use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct SchemaError {
    pub msg: String,
}

fn err<T>(path: &str, msg: impl std::fmt::Display) -> Result<T, SchemaError> {
    Err(SchemaError { msg: format!("{msg} (at {})", if path.is_empty() { "#" } else { path }) })
}

const ANNOTATIONS: &[&str] = &[
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "readOnly", "writeOnly", "deprecated",
    "discriminator", "strict", "$anchor",
];
const KNOWN: &[&str] = &[
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems", "enum", "const",
    "minLength", "maxLength", "pattern", "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "anyOf",
    "oneOf", "allOf", "$ref", "$defs", "definitions", "nullable",
];

const PRIMITIVES: &str = r#"
ws ::= (" " | "\n" [ \t]{0,20})?
json-char ::= [^"\\\x00-\x1f] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})
json-string ::= "\"" json-char* "\""
json-int ::= "-"? ("0" | [1-9] [0-9]{0,15})
json-number ::= json-int ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,3})?
json-bool ::= "true" | "false"
json-null ::= "null"
json-value ::= json-object | json-array | json-string | json-number | json-bool | json-null
json-object ::= "{" ws (json-string ws ":" ws json-value ws ("," ws json-string ws ":" ws json-value ws)*)? "}"
json-array ::= "[" ws (json-value ws ("," ws json-value ws)*)? "]"
"#;

/// A grammar (rule `root`) for any JSON object: `response_format: {"type": "json_object"}`.
pub fn any_object_gbnf() -> String {
    format!("root ::= json-object\n{PRIMITIVES}")
}

/// A grammar (rule `root`) for the instances of `schema`.
pub fn to_gbnf(schema: &Value) -> Result<String, SchemaError> {
    let (expr, rules) = schema_rules(schema, "")?;
    Ok(format!("root ::= {expr}\n{rules}{PRIMITIVES}"))
}

/// The rules for the instances of `schema`, named with `prefix` so that several schemas can
/// share one grammar: (an expression for an instance, the rule definitions). Combine with
/// [`primitives`] once.
pub fn schema_rules(schema: &Value, prefix: &str) -> Result<(String, String), SchemaError> {
    let mut b = Builder { root: schema, depth: 0, visited: 0, prefix, rules: Vec::new(), names: HashMap::new(), refs: HashMap::new() };
    let expr = b.value(schema, "#")?;
    let mut out = String::new();
    for (name, body) in &b.rules {
        out.push_str(&format!("{name} ::= {body}\n"));
    }
    Ok((expr, out))
}

/// The shared rules every schema grammar uses (`ws`, `json-string`, `json-value`, ...).
pub fn primitives() -> &'static str {
    PRIMITIVES
}

/// A GBNF literal for exact text.
pub use super::regex::gbnf_literal as literal;

/// Largest `minLength` / `maxLength` / `minItems` / `maxItems` (the grammar's repetition limit).
pub const MAX_COUNT: usize = 10_000;
/// Most nested sub-schemas (`$ref` hops included) on one path from the root: a deeper schema,
/// such as a chain of thousands of references, is refused rather than followed by recursion.
pub const MAX_DEPTH: usize = 64;
/// Most grammar rules a schema may produce.
pub const MAX_RULES: usize = 10_000;
/// Most sub-schemas (properties, items, alternatives, references) a schema may hold in all.
pub const MAX_SUBSCHEMAS: usize = 10_000;

struct Builder<'a> {
    root: &'a Value,
    /// Sub-schemas open around the current one.
    depth: usize,
    /// Sub-schemas visited so far.
    visited: usize,
    prefix: &'a str,
    rules: Vec<(String, String)>,
    /// Rule body -> name, so identical sub-schemas share a rule.
    names: HashMap<String, String>,
    /// `$ref` target -> rule name (made before the body, so recursion works).
    refs: HashMap<String, String>,
}

fn as_count(v: Option<&Value>, path: &str, key: &str) -> Result<Option<usize>, SchemaError> {
    match v {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n <= MAX_COUNT as u64 => Ok(Some(n as usize)),
            _ => err(path, format!("{key} must be a non-negative integer up to {MAX_COUNT}, got {v}")),
        },
    }
}

/// `x{min,max}` in GBNF (max None: unbounded).
fn repeat(x: &str, min: usize, max: Option<usize>) -> String {
    match (min, max) {
        (0, None) => format!("({x})*"),
        (1, None) => format!("({x})+"),
        (m, None) => format!("({x}){{{m},}}"),
        (m, Some(n)) if m == n => format!("({x}){{{m}}}"),
        (m, Some(n)) => format!("({x}){{{m},{n}}}"),
    }
}

impl<'a> Builder<'a> {
    /// A named rule with this body (shared with identical bodies).
    fn rule(&mut self, hint: &str, body: String) -> String {
        if let Some(n) = self.names.get(&body) {
            return n.clone();
        }
        let clean: String = hint.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
        let clean = clean.trim_matches('-');
        let name = format!("{}s{}-{}", self.prefix, self.rules.len(), if clean.is_empty() { "value" } else { clean });
        self.rules.push((name.clone(), body.clone()));
        self.names.insert(body, name.clone());
        name
    }

    /// A GBNF expression for the instances of `s` (at JSON pointer `path`, for messages).
    fn value(&mut self, s: &'a Value, path: &str) -> Result<String, SchemaError> {
        if self.depth >= MAX_DEPTH {
            return err(path, format!("the schema nests more than {MAX_DEPTH} sub-schemas deep (references included)"));
        }
        self.visited += 1;
        if self.visited > MAX_SUBSCHEMAS {
            return err(path, format!("the schema is too large: it holds more than {MAX_SUBSCHEMAS} sub-schemas"));
        }
        if self.rules.len() > MAX_RULES {
            return err(path, format!("the schema is too large: it needs more than {MAX_RULES} grammar rules"));
        }
        self.depth += 1;
        let r = self.value_inner(s, path);
        self.depth -= 1;
        r
    }

    fn value_inner(&mut self, s: &'a Value, path: &str) -> Result<String, SchemaError> {
        let obj = match s {
            Value::Bool(true) => return Ok("json-value".into()),
            Value::Bool(false) => return err(path, "the schema `false` allows no value"),
            Value::Object(o) => o,
            _ => return err(path, "a schema must be an object or a boolean"),
        };
        for k in obj.keys() {
            if !KNOWN.contains(&k.as_str()) && !ANNOTATIONS.contains(&k.as_str()) && !k.starts_with("x-") {
                return err(path, format!("unsupported JSON Schema keyword {k:?}"));
            }
        }
        if let Some(r) = obj.get("$ref") {
            let others: Vec<&String> = obj.keys().filter(|k| KNOWN.contains(&k.as_str()) && !matches!(k.as_str(), "$ref" | "$defs" | "definitions")).collect();
            if !others.is_empty() {
                return err(path, format!("\"$ref\" next to {:?} is not supported", others[0]));
            }
            return self.reference(r, path);
        }
        let alt = if obj.contains_key("anyOf") { Some("anyOf") } else if obj.contains_key("oneOf") { Some("oneOf") } else { None };
        if let Some(key) = alt {
            let Some(list) = obj[key].as_array().filter(|l| !l.is_empty()) else { return err(path, format!("{key} must be a non-empty array")) };
            let mut alts = Vec::new();
            for (i, sub) in list.iter().enumerate() {
                alts.push(self.value(sub, &format!("{path}/{key}/{i}"))?);
            }
            let mut body = alts.join(" | ");
            if obj.get("nullable") == Some(&Value::Bool(true)) {
                body.push_str(" | json-null");
            }
            return Ok(self.rule(key, body));
        }
        if let Some(all) = obj.get("allOf") {
            match all.as_array().map(|l| l.as_slice()) {
                Some([one]) => return self.value(one, &format!("{path}/allOf/0")),
                _ => return err(path, "\"allOf\" with more than one schema is not supported"),
            }
        }
        if let Some(c) = obj.get("const") {
            return Ok(literal(&c.to_string()));
        }
        if let Some(e) = obj.get("enum") {
            let Some(list) = e.as_array().filter(|l| !l.is_empty()) else { return err(path, "enum must be a non-empty array") };
            let body = list.iter().map(|v| literal(&v.to_string())).collect::<Vec<_>>().join(" | ");
            return Ok(self.rule("enum", body));
        }
        let mut types: Vec<&str> = match obj.get("type") {
            None => {
                if obj.contains_key("properties") || obj.contains_key("additionalProperties") {
                    vec!["object"]
                } else if obj.contains_key("items") || obj.contains_key("prefixItems") {
                    vec!["array"]
                } else {
                    vec![]
                }
            }
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) => {
                let mut v = Vec::new();
                for t in ts {
                    v.push(t.as_str().ok_or_else(|| SchemaError { msg: format!("type names must be strings (at {path})") })?);
                }
                v
            }
            Some(_) => return err(path, "\"type\" must be a string or an array of strings"),
        };
        if obj.get("nullable") == Some(&Value::Bool(true)) && !types.is_empty() && !types.contains(&"null") {
            types.push("null");
        }
        if types.is_empty() {
            return Ok("json-value".into());
        }
        let mut alts = Vec::new();
        for t in types {
            alts.push(match t {
                "object" => self.object(obj, path)?,
                "array" => self.array(obj, path)?,
                "string" => self.string(obj, path)?,
                "integer" => self.integer(obj, path)?,
                "number" => self.number(obj, path)?,
                "boolean" => "json-bool".into(),
                "null" => "json-null".into(),
                other => return err(path, format!("unknown type {other:?}")),
            });
        }
        Ok(if alts.len() == 1 { alts.pop().unwrap_or_default() } else { self.rule("types", alts.join(" | ")) })
    }

    fn reference(&mut self, r: &Value, path: &str) -> Result<String, SchemaError> {
        let Some(r) = r.as_str() else { return err(path, "\"$ref\" must be a string") };
        if let Some(name) = self.refs.get(r) {
            return Ok(name.clone());
        }
        let Some(pointer) = r.strip_prefix('#') else { return err(path, format!("only local references (\"#/...\") are supported, not {r:?}")) };
        let target = self.root.pointer(pointer).ok_or_else(|| SchemaError { msg: format!("\"$ref\" {r:?} points at nothing (at {path})") })?;
        // Name the rule first: the target may refer back to itself.
        let name = format!("{}ref{}-{}", self.prefix, self.refs.len(), pointer.rsplit('/').next().unwrap_or("").chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect::<String>());
        let name = name.trim_end_matches('-').to_string();
        self.refs.insert(r.to_string(), name.clone());
        let body = self.value(target, r)?;
        self.rules.push((name.clone(), body));
        Ok(name)
    }

    fn object(&mut self, obj: &'a Map<String, Value>, path: &str) -> Result<String, SchemaError> {
        let props = match obj.get("properties") {
            None => None,
            Some(Value::Object(p)) => Some(p),
            Some(_) => return err(path, "\"properties\" must be an object"),
        };
        let required: Vec<&str> = match obj.get("required") {
            None => vec![],
            Some(Value::Array(r)) => r.iter().filter_map(|v| v.as_str()).collect(),
            Some(_) => return err(path, "\"required\" must be an array of names"),
        };
        let additional = obj.get("additionalProperties");
        let props = match props {
            Some(p) if !p.is_empty() => p,
            _ => {
                if let Some(name) = required.first() {
                    return err(path, format!("required property {name:?} is not declared in \"properties\""));
                }
                // No declared properties: a map of the additional ones (any JSON when absent).
                let value = match additional {
                    None | Some(Value::Bool(true)) => "json-value".to_string(),
                    Some(Value::Bool(false)) => return Ok(self.rule("empty-object", "\"{\" ws \"}\"".into())),
                    Some(s) => self.value(s, &format!("{path}/additionalProperties"))?,
                };
                let member = format!("json-string ws \":\" ws {value} ws");
                return Ok(self.rule("map", format!("\"{{\" ws ({member} (\",\" ws {member})*)? \"}}\"")));
            }
        };
        for r in &required {
            if !props.contains_key(*r) {
                return err(path, format!("required property {r:?} is not declared in \"properties\""));
            }
        }
        let mut members = Vec::new();
        for (name, sub) in props {
            let v = self.value(sub, &format!("{path}/properties/{name}"))?;
            members.push((format!("{} ws \":\" ws {v} ws", literal(&Value::String(name.clone()).to_string())), required.contains(&name.as_str())));
        }
        // rest(i): members i.. after one has been written; first(i): before any has.
        let n = members.len();
        let mut rest = vec![String::new(); n + 1];
        let mut first = vec![String::new(); n + 1];
        for i in (0..n).rev() {
            let (m, req) = &members[i];
            let after_rest = if rest[i + 1].is_empty() { String::new() } else { format!(" {}", rest[i + 1]) };
            let body = if *req {
                format!("\",\" ws {m}{after_rest}")
            } else {
                let skip = if rest[i + 1].is_empty() { "\"\"".to_string() } else { rest[i + 1].clone() };
                format!("\",\" ws {m}{after_rest} | {skip}")
            };
            rest[i] = self.rule("rest", body);
            let body = if *req {
                format!("{m}{after_rest}")
            } else {
                let skip = if first[i + 1].is_empty() { "\"\"".to_string() } else { first[i + 1].clone() };
                format!("{m}{after_rest} | {skip}")
            };
            first[i] = self.rule("members", body);
        }
        Ok(self.rule("object", format!("\"{{\" ws {} \"}}\"", first[0])))
    }

    fn array(&mut self, obj: &'a Map<String, Value>, path: &str) -> Result<String, SchemaError> {
        let min = as_count(obj.get("minItems"), path, "minItems")?.unwrap_or(0);
        let max = as_count(obj.get("maxItems"), path, "maxItems")?;
        if max.is_some_and(|m| m < min) {
            return err(path, "maxItems is below minItems");
        }
        let mut fixed = Vec::new();
        if let Some(p) = obj.get("prefixItems") {
            let Some(list) = p.as_array() else { return err(path, "\"prefixItems\" must be an array") };
            for (i, sub) in list.iter().enumerate() {
                fixed.push(self.value(sub, &format!("{path}/prefixItems/{i}"))?);
            }
        }
        let item = match obj.get("items") {
            None | Some(Value::Bool(true)) => Some("json-value".to_string()),
            Some(Value::Bool(false)) => None,
            Some(s @ Value::Object(_)) => Some(self.value(s, &format!("{path}/items"))?),
            Some(_) => return err(path, "\"items\" must be a schema (tuple forms use \"prefixItems\")"),
        };
        // Sequence: the prefix items in order (as many as the counts allow), then repeated items.
        let max_total = match (&item, max) {
            (None, m) => Some(m.map_or(fixed.len(), |m| m.min(fixed.len()))),
            (Some(_), m) => m,
        };
        if max_total.is_some_and(|m| m < min) {
            return err(path, "minItems is more than the tuple allows");
        }
        // Elements as a list of (expr, mandatory) in order; build the right-nested optional chain.
        let n_fixed = fixed.len().min(max_total.unwrap_or(usize::MAX));
        let mut tail = match &item {
            Some(it) if max_total.is_none_or(|m| m > n_fixed) => {
                let min_more = min.saturating_sub(n_fixed);
                let max_more = max_total.map(|m| m - n_fixed);
                let one = format!("\",\" ws {it} ws");
                if n_fixed == 0 {
                    // The first element has no leading comma.
                    let rest = repeat(&one, min_more.saturating_sub(1), max_more.map(|m| m - 1));
                    let body = format!("{it} ws {rest}");
                    if min_more == 0 {
                        format!("({body})?")
                    } else {
                        body
                    }
                } else {
                    repeat(&one, min_more, max_more)
                }
            }
            _ => String::new(),
        };
        for i in (0..n_fixed).rev() {
            let sep = if i == 0 { "" } else { "\",\" ws " };
            let body = format!("{sep}{} ws {tail}", fixed[i]);
            tail = if i < min { body } else { format!("({body})?") };
        }
        let body = if tail.is_empty() { "\"[\" ws \"]\"".to_string() } else { format!("\"[\" ws {tail} \"]\"") };
        Ok(self.rule("array", body))
    }

    fn string(&mut self, obj: &'a Map<String, Value>, path: &str) -> Result<String, SchemaError> {
        let min = as_count(obj.get("minLength"), path, "minLength")?.unwrap_or(0);
        let max = as_count(obj.get("maxLength"), path, "maxLength")?;
        if max.is_some_and(|m| m < min) {
            return err(path, "maxLength is below minLength");
        }
        if let Some(p) = obj.get("pattern") {
            if obj.contains_key("minLength") || obj.contains_key("maxLength") || obj.contains_key("format") {
                return err(path, "\"pattern\" together with length limits or \"format\" is not supported");
            }
            let Some(p) = p.as_str() else { return err(path, "\"pattern\" must be a string") };
            let e = regex::to_json_string_expr(p).map_err(|e| SchemaError { msg: format!("pattern {p:?}: {e} (at {path})") })?;
            return Ok(self.rule("pattern", format!("\"\\\"\" {e} \"\\\"\"")));
        }
        if let Some(f) = obj.get("format") {
            if obj.contains_key("minLength") || obj.contains_key("maxLength") {
                return err(path, "\"format\" together with length limits is not supported");
            }
            let date = r#"[0-9]{4} "-" ("0" [1-9] | "1" [0-2]) "-" ("0" [1-9] | [12] [0-9] | "3" [01])"#;
            let time = r#"([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ("." [0-9]{1,6})? ("Z" | [+-] ([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9])"#;
            let body = match f.as_str() {
                Some("date") => date.to_string(),
                Some("time") => time.to_string(),
                Some("date-time") => format!("{date} \"T\" {time}"),
                Some("uuid") => r#"[0-9a-f]{8} "-" [0-9a-f]{4} "-" [0-9a-f]{4} "-" [0-9a-f]{4} "-" [0-9a-f]{12}"#.to_string(),
                _ => return err(path, format!("string format {f} is not supported (date, time, date-time and uuid are)")),
            };
            return Ok(self.rule(f.as_str().unwrap_or("format"), format!("\"\\\"\" {body} \"\\\"\"")));
        }
        if min == 0 && max.is_none() {
            return Ok("json-string".into());
        }
        Ok(self.rule("string", format!("\"\\\"\" {} \"\\\"\"", repeat("json-char", min, max))))
    }

    /// Inclusive integer bounds from minimum/maximum/exclusive*.
    fn bounds(obj: &Map<String, Value>, path: &str, integer: bool) -> Result<(Option<i64>, Option<i64>), SchemaError> {
        let num = |k: &str| -> Result<Option<f64>, SchemaError> {
            match obj.get(k) {
                None | Some(Value::Bool(_)) => Ok(None),
                Some(v) => v.as_f64().map(Some).ok_or_else(|| SchemaError { msg: format!("{k} must be a number (at {path})") }),
            }
        };
        let excl_flag = |k: &str| obj.get(k) == Some(&Value::Bool(true));
        let limit = 1e15;
        let mut lo = None;
        let mut hi = None;
        if let Some(m) = num("minimum")? {
            let exclusive = excl_flag("exclusiveMinimum");
            lo = Some(if integer { if exclusive { m.floor() + 1.0 } else { m.ceil() } } else { if exclusive { return err(path, "exclusive bounds on numbers are not supported") } m });
        }
        if let Some(m) = num("exclusiveMinimum")? {
            if !integer {
                return err(path, "exclusiveMinimum on a number is not supported (use minimum, or an integer)");
            }
            lo = Some(lo.map_or(m.floor() + 1.0, |l: f64| l.max(m.floor() + 1.0)));
        }
        if let Some(m) = num("maximum")? {
            let exclusive = excl_flag("exclusiveMaximum");
            hi = Some(if integer { if exclusive { m.ceil() - 1.0 } else { m.floor() } } else { if exclusive { return err(path, "exclusive bounds on numbers are not supported") } m });
        }
        if let Some(m) = num("exclusiveMaximum")? {
            if !integer {
                return err(path, "exclusiveMaximum on a number is not supported (use maximum, or an integer)");
            }
            hi = Some(hi.map_or(m.ceil() - 1.0, |h: f64| h.min(m.ceil() - 1.0)));
        }
        for b in [lo, hi].into_iter().flatten() {
            if b.abs() > limit || b.fract() != 0.0 {
                return err(path, if integer { "integer bounds must be within ±10^15".to_string() } else { "bounds on a number must be integers within ±10^15".to_string() });
            }
        }
        if let (Some(l), Some(h)) = (lo, hi) {
            if l > h {
                return err(path, "minimum is above maximum: no value fits");
            }
        }
        Ok((lo.map(|v| v as i64), hi.map(|v| v as i64)))
    }

    fn integer(&mut self, obj: &'a Map<String, Value>, path: &str) -> Result<String, SchemaError> {
        match Self::bounds(obj, path, true)? {
            (None, None) => Ok("json-int".into()),
            (lo, hi) => Ok(self.rule("int-range", int_range(lo, hi))),
        }
    }

    fn number(&mut self, obj: &'a Map<String, Value>, path: &str) -> Result<String, SchemaError> {
        let frac = "(\".\" [0-9]{1,16})?";
        match Self::bounds(obj, path, false)? {
            (None, None) => Ok("json-number".into()),
            (lo, hi) => {
                if lo.is_some_and(|l| l < 0) || hi.is_some_and(|h| h < 0) {
                    return err(path, "bounds on a number must be integers ≥ 0 (negative bounds are supported on integers)");
                }
                // Integer part below the maximum with any fraction, or the maximum exactly.
                let mut alts = Vec::new();
                match hi {
                    None => alts.push(format!("({}) {frac}", int_range(lo, None))),
                    Some(h) => {
                        if lo.unwrap_or(i64::MIN) < h {
                            alts.push(format!("({}) {frac}", int_range(lo, Some(h - 1))));
                        }
                        alts.push(format!("{} (\".\" \"0\"{{1,16}})?", literal(&h.to_string())));
                    }
                }
                Ok(self.rule("number-range", alts.join(" | ")))
            }
        }
    }
}

/// GBNF for decimal integers in lo..=hi (either side open), without leading zeros.
fn int_range(lo: Option<i64>, hi: Option<i64>) -> String {
    let mut alts = Vec::new();
    // Non-negative part.
    let nlo = lo.map_or(0, |l| l.max(0));
    if hi.is_none_or(|h| h >= nlo) {
        alts.push(match hi {
            Some(h) => unsigned_range(nlo as u64, h as u64),
            None => unsigned_at_least(nlo as u64),
        });
    }
    // Negative part: "-" then magnitudes from max(1, -hi) up to -lo.
    if lo.is_none_or(|l| l < 0) {
        let mlo = match hi {
            Some(h) if h < 0 => (-h) as u64,
            _ => 1,
        };
        let m = match lo {
            Some(l) => unsigned_range(mlo, (-l) as u64),
            None => unsigned_at_least(mlo),
        };
        alts.push(format!("\"-\" ({m})"));
    }
    alts.join(" | ")
}

/// Unsigned integers ≥ lo (up to 16 digits).
fn unsigned_at_least(lo: u64) -> String {
    let d = lo.to_string().len();
    let mut alts = vec![unsigned_range(lo, 10u64.pow(d as u32) - 1)];
    if d < 16 {
        alts.push(format!("[1-9] [0-9]{{{},{}}}", d, 15));
    }
    alts.join(" | ")
}

/// Unsigned integers in lo..=hi.
fn unsigned_range(lo: u64, hi: u64) -> String {
    let (ls, hs) = (lo.to_string(), hi.to_string());
    let mut alts = Vec::new();
    if ls.len() == hs.len() {
        alts.push(same_length(ls.as_bytes(), hs.as_bytes()));
    } else {
        alts.push(same_length(ls.as_bytes(), "9".repeat(ls.len()).as_bytes()));
        for k in ls.len() + 1..hs.len() {
            alts.push(format!("[1-9] [0-9]{{{}}}", k - 1));
        }
        let mut low = "1".to_string();
        low.push_str(&"0".repeat(hs.len() - 1));
        alts.push(same_length(low.as_bytes(), hs.as_bytes()));
    }
    alts.into_iter().map(|a| format!("({a})")).collect::<Vec<_>>().join(" | ")
}

/// Digit strings of one length between a and b (inclusive).
fn same_length(a: &[u8], b: &[u8]) -> String {
    if a.is_empty() {
        return "\"\"".into();
    }
    let (da, db) = (a[0] - b'0', b[0] - b'0');
    let n = a.len() - 1;
    let any = |n: usize| if n == 0 { String::new() } else { format!(" [0-9]{{{n}}}") };
    if da == db {
        return if n == 0 { format!("\"{da}\"") } else { format!("\"{da}\" ({})", same_length(&a[1..], &b[1..])) };
    }
    let a_min = a[1..].iter().all(|&c| c == b'0');
    let b_max = b[1..].iter().all(|&c| c == b'9');
    let mut alts = Vec::new();
    let mut from = da;
    if !a_min {
        alts.push(format!("\"{da}\" ({})", same_length(&a[1..], "9".repeat(n).as_bytes())));
        from = da + 1;
    }
    let to = if b_max { db } else { db - 1 };
    if from <= to {
        alts.push(format!("[{from}-{to}]{}", any(n)));
    }
    if !b_max {
        alts.push(format!("\"{db}\" ({})", same_length("0".repeat(n).as_bytes(), &b[1..])));
    }
    alts.join(" | ")
}

#[cfg(test)]
mod tests {
    use super::super::gbnf::parse;
    use super::super::matcher::Matcher;
    use super::*;
    use serde_json::json;

    fn accepts(schema: &Value, text: &str) -> bool {
        let src = to_gbnf(schema).unwrap();
        let m = Matcher::new(parse(&src, "root").unwrap_or_else(|e| panic!("{e}\n{src}")));
        m.accept_bytes(&m.start(), text.as_bytes()).is_some_and(|s| m.accepting(&s))
    }

    #[test]
    fn integer_ranges_are_exact() {
        for (lo, hi) in [(Some(0), Some(0)), (Some(-5), Some(5)), (Some(7), Some(1234)), (Some(-300), Some(-20)), (None, Some(-3)), (Some(42), None), (None, Some(17)), (Some(-17), None), (Some(100), Some(100))] {
            let mut s = json!({"type": "integer"});
            if let Some(l) = lo {
                s["minimum"] = json!(l);
            }
            if let Some(h) = hi {
                s["maximum"] = json!(h);
            }
            let src = to_gbnf(&s).unwrap();
            let m = Matcher::new(parse(&src, "root").unwrap());
            for v in -2000i64..2000 {
                let ok = m.accept_bytes(&m.start(), v.to_string().as_bytes()).is_some_and(|st| m.accepting(&st));
                let want = lo.is_none_or(|l| v >= l) && hi.is_none_or(|h| v <= h);
                assert_eq!(ok, want, "{v} in {lo:?}..={hi:?}\n{src}");
            }
            assert!(!m.accept_bytes(&m.start(), b"007").is_some_and(|st| m.accepting(&st)));
        }
    }

    #[test]
    fn objects_arrays_and_refs() {
        let s = json!({
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "string", "maxLength": 3}, "c": {"$ref": "#/$defs/node"}},
            "required": ["b"],
            "$defs": {"node": {"type": "object", "properties": {"next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}}, "required": ["next"]}}
        });
        for ok in [r#"{"b":"xy"}"#, r#"{"a": 1, "b": ""}"#, r#"{ "b":"abc" , "c":{"next":{"next":null}} }"#] {
            assert!(accepts(&s, ok), "{ok}");
        }
        for bad in [r#"{}"#, r#"{"a":1}"#, r#"{"b":"abcd"}"#, r#"{"b":"x","a":1}"#, r#"{"b":"x",}"#, r#"{"b":"x","c":{}}"#] {
            assert!(!accepts(&s, bad), "{bad}");
        }
        let arr = json!({"type": "array", "items": {"enum": ["x", 1, null]}, "minItems": 1, "maxItems": 3});
        assert!(accepts(&arr, r#"["x"]"#) && accepts(&arr, r#"[1, null,"x"]"#));
        assert!(!accepts(&arr, "[]") && !accepts(&arr, r#"["x",1,1,1]"#) && !accepts(&arr, r#"["y"]"#));
        let tuple = json!({"type": "array", "prefixItems": [{"type": "boolean"}, {"const": "k"}], "items": false, "minItems": 1});
        assert!(accepts(&tuple, "[true]") && accepts(&tuple, r#"[false, "k"]"#));
        assert!(!accepts(&tuple, "[]") && !accepts(&tuple, r#"[true,"k",1]"#));
        let pat = json!({"type": "string", "pattern": "^[A-Z]{2}-\\d+$"});
        assert!(accepts(&pat, r#""AB-12""#) && !accepts(&pat, r#""A-1""#));
        let num = json!({"type": "number", "minimum": 0, "maximum": 1});
        assert!(accepts(&num, "0.25") && accepts(&num, "1") && accepts(&num, "1.00") && !accepts(&num, "1.5") && !accepts(&num, "-0.1"));
    }

    #[test]
    fn unsupported_keywords_are_named() {
        for (s, word) in [
            (json!({"type": "array", "uniqueItems": true}), "uniqueItems"),
            (json!({"type": "object", "properties": {"x": {"type": "string", "format": "email"}}}), "email"),
            (json!({"not": {"type": "string"}}), "\"not\""),
            (json!({"allOf": [{"type": "string"}, {"minLength": 2}]}), "allOf"),
            (json!({"$ref": "https://example.com/s.json"}), "local references"),
            (json!({"type": "object", "properties": {"x": {"type": "integer", "multipleOf": 3}}}), "multipleOf"),
        ] {
            let e = to_gbnf(&s).unwrap_err();
            assert!(e.msg.contains(word), "{e}");
        }
        assert!(to_gbnf(&json!({"type": "object", "properties": {"x": {"multipleOf": 2}}})).unwrap_err().msg.contains("#/properties/x"));
    }
}
