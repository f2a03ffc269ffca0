//! Checking a JSON value against a JSON Schema: the keywords structured output uses (type,
//! properties, required, additionalProperties, items, prefixItems, enum, const, anyOf, oneOf,
//! allOf, minimum/maximum and their exclusive forms, minLength/maxLength, minItems/maxItems,
//! local `$ref`s into `$defs`/`definitions`). Unknown keywords are ignored, as the standard
//! says. Recursion is bounded, so a hostile schema cannot overflow the stack.

use serde_json::Value;

const MAX_DEPTH: usize = 64;
/// Most schema nodes visited for one value: alternatives (`anyOf` of `$ref`s) can otherwise
/// multiply the work exponentially.
const MAX_STEPS: usize = 100_000;

/// Ok, or where and why `value` does not match `schema`.
pub fn validate(schema: &Value, value: &Value) -> Result<(), String> {
    let steps = std::cell::Cell::new(0);
    let r = check(schema, schema, value, "$", 0, &steps);
    if steps.get() > MAX_STEPS {
        return Err(format!("the schema takes more than {MAX_STEPS} steps to check"));
    }
    r
}

fn type_ok(t: &str, v: &Value) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "number" => v.is_number(),
        "integer" => v.as_i64().is_some() || v.as_u64().is_some() || v.as_f64().is_some_and(|f| f.fract() == 0.0),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        _ => false,
    }
}

fn resolve<'a>(root: &'a Value, reference: &str) -> Option<&'a Value> {
    let path = reference.strip_prefix('#')?;
    if path.is_empty() {
        return Some(root);
    }
    root.pointer(path)
}

fn check(root: &Value, schema: &Value, v: &Value, at: &str, depth: usize, steps: &std::cell::Cell<usize>) -> Result<(), String> {
    steps.set(steps.get() + 1);
    if steps.get() > MAX_STEPS {
        return Err(format!("{at}: the schema takes more than {MAX_STEPS} steps to check"));
    }
    if depth > MAX_DEPTH {
        return Err(format!("{at}: the schema nests deeper than {MAX_DEPTH} levels"));
    }
    let s = match schema {
        Value::Bool(true) => return Ok(()),
        Value::Bool(false) => return Err(format!("{at}: no value is allowed here")),
        Value::Object(s) => s,
        _ => return Ok(()),
    };
    if let Some(r) = s.get("$ref").and_then(Value::as_str) {
        let target = resolve(root, r).ok_or_else(|| format!("{at}: cannot resolve $ref {r:?}"))?;
        check(root, target, v, at, depth + 1, steps)?;
    }
    match s.get("type") {
        Some(Value::String(t)) if !type_ok(t, v) => return Err(format!("{at}: expected {t}, got {}", kind(v))),
        Some(Value::Array(ts)) if !ts.iter().filter_map(Value::as_str).any(|t| type_ok(t, v)) => return Err(format!("{at}: expected one of {}, got {}", Value::Array(ts.clone()), kind(v))),
        _ => {}
    }
    if let Some(options) = s.get("enum").and_then(Value::as_array) {
        if !options.contains(v) {
            return Err(format!("{at}: {v} is not one of {}", Value::Array(options.clone())));
        }
    }
    if let Some(c) = s.get("const") {
        if c != v {
            return Err(format!("{at}: expected {c}"));
        }
    }
    if let Some(all) = s.get("allOf").and_then(Value::as_array) {
        for sub in all {
            check(root, sub, v, at, depth + 1, steps)?;
        }
    }
    if let Some(any) = s.get("anyOf").and_then(Value::as_array) {
        if !any.iter().any(|sub| check(root, sub, v, at, depth + 1, steps).is_ok()) {
            return Err(format!("{at}: matches none of anyOf"));
        }
    }
    if let Some(one) = s.get("oneOf").and_then(Value::as_array) {
        let n = one.iter().filter(|sub| check(root, sub, v, at, depth + 1, steps).is_ok()).count();
        if n != 1 {
            return Err(format!("{at}: matches {n} of oneOf, not exactly one"));
        }
    }
    let num = |k: &str| s.get(k).and_then(Value::as_f64);
    if let Some(x) = v.as_f64() {
        if num("minimum").is_some_and(|m| x < m) || num("exclusiveMinimum").is_some_and(|m| x <= m) {
            return Err(format!("{at}: {x} is below the minimum"));
        }
        if num("maximum").is_some_and(|m| x > m) || num("exclusiveMaximum").is_some_and(|m| x >= m) {
            return Err(format!("{at}: {x} is above the maximum"));
        }
    }
    if let Some(text) = v.as_str() {
        let n = text.chars().count() as f64;
        if num("minLength").is_some_and(|m| n < m) || num("maxLength").is_some_and(|m| n > m) {
            return Err(format!("{at}: string length {n} is out of bounds"));
        }
    }
    if let Some(items) = v.as_array() {
        let n = items.len() as f64;
        if num("minItems").is_some_and(|m| n < m) || num("maxItems").is_some_and(|m| n > m) {
            return Err(format!("{at}: {n} items is out of bounds"));
        }
        let prefix = s.get("prefixItems").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]);
        for (i, item) in items.iter().enumerate() {
            let sub = prefix.get(i).or_else(|| s.get("items"));
            if let Some(sub) = sub {
                check(root, sub, item, &format!("{at}[{i}]"), depth + 1, steps)?;
            }
        }
    }
    if let Some(obj) = v.as_object() {
        let props = s.get("properties").and_then(Value::as_object);
        for r in s.get("required").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str) {
            if !obj.contains_key(r) {
                return Err(format!("{at}: missing required property {r:?}"));
            }
        }
        for (k, item) in obj {
            let path = format!("{at}.{k}");
            match props.and_then(|p| p.get(k)) {
                Some(sub) => check(root, sub, item, &path, depth + 1, steps)?,
                None => match s.get("additionalProperties") {
                    Some(Value::Bool(false)) => return Err(format!("{at}: property {k:?} is not allowed")),
                    Some(sub @ Value::Object(_)) => check(root, sub, item, &path, depth + 1, steps)?,
                    _ => {}
                },
            }
        }
    }
    Ok(())
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::validate;
    use serde_json::json;

    #[test]
    fn common_keywords() {
        let schema = json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "age": {"type": "integer", "minimum": 0},
                "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
                "pet": {"$ref": "#/$defs/pet"}
            },
            "required": ["name", "age"],
            "additionalProperties": false,
            "$defs": {"pet": {"anyOf": [{"type": "null"}, {"type": "object", "required": ["kind"]}]}}
        });
        assert!(validate(&schema, &json!({"name": "Ann", "age": 30, "tags": ["a"], "pet": null})).is_ok());
        assert!(validate(&schema, &json!({"name": "Ann", "age": 30, "pet": {"kind": "cat"}})).is_ok());
        for (bad, why) in [
            (json!({"name": "Ann"}), "missing required"),
            (json!({"name": "", "age": 1}), "length"),
            (json!({"name": "A", "age": -1}), "minimum"),
            (json!({"name": "A", "age": 1.5}), "expected integer"),
            (json!({"name": "A", "age": 1, "tags": ["c"]}), "not one of"),
            (json!({"name": "A", "age": 1, "extra": 1}), "not allowed"),
            (json!({"name": "A", "age": 1, "pet": {}}), "anyOf"),
            (json!([1]), "expected object"),
        ] {
            let e = validate(&schema, &bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        // A self-referencing schema is bounded, not a stack overflow.
        let looping = json!({"$ref": "#"});
        assert!(validate(&looping, &json!(1)).unwrap_err().contains("deeper"));
        // Alternatives that refer back to the root are bounded in steps, not only in depth.
        let branching = json!({"anyOf": [{"$ref": "#"}, {"$ref": "#"}]});
        assert!(validate(&branching, &json!(1)).unwrap_err().contains("steps"));
    }
}
