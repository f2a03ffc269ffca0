//! Suites, criteria and runs against a sampler that answers from a table (the grading logic is
//! what is under test here; real models run it in the CLI and server tests).

use serde_json::{json, Value};
use smelt_eval::{parse_criterion, parse_suite, run, wilson, Sample, SampleRequest, Sampler};
use std::collections::HashMap;

/// Answers each request by its first user message, per model; records the calls.
struct Table {
    answers: HashMap<(String, String), String>,
    calls: Vec<SampleRequest>,
}

impl Sampler for Table {
    fn sample_all(&mut self, requests: Vec<SampleRequest>, done: &mut dyn FnMut()) -> Vec<Result<Sample, String>> {
        requests
            .into_iter()
            .map(|r| {
                let last = r.messages.iter().find(|m| m["role"] == "user").and_then(|m| m["content"].as_str()).unwrap_or("").to_string();
                self.calls.push(r.clone());
                done();
                let key = (r.model.clone(), last.clone());
                match self.answers.get(&key) {
                    Some(a) => Ok(Sample { text: a.clone(), prompt_tokens: last.len(), completion_tokens: a.len() }),
                    None if r.model == "judge" => Ok(Sample { text: if last.contains("Paris") { "correct".into() } else { "incorrect".into() }, prompt_tokens: 1, completion_tokens: 1 }),
                    None => Err(format!("no answer for {key:?}")),
                }
            })
            .collect()
    }

    /// Letter counts: texts with the same letters point the same way.
    fn embed_all(&mut self, model: &str, texts: Vec<String>) -> Vec<Result<Vec<f32>, String>> {
        texts
            .iter()
            .map(|t| {
                if model != "embedder" {
                    return Err(format!("{model} cannot embed"));
                }
                let mut v = vec![0.0f32; 26];
                for c in t.to_lowercase().bytes().filter(u8::is_ascii_lowercase) {
                    v[(c - b'a') as usize] += 1.0;
                }
                Ok(v)
            })
            .collect()
    }
}

fn table(rows: &[(&str, &str, &str)]) -> Table {
    Table { answers: rows.iter().map(|(m, q, a)| ((m.to_string(), q.to_string()), a.to_string())).collect(), calls: Vec::new() }
}

#[test]
fn suite_with_criteria_runs_and_counts() {
    let header = json!({"eval": {
        "name": "capitals",
        "input": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Capital of {{item.country}}?"}],
        "testing_criteria": [
            {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}", "reference": "{{item.ideal}}", "operation": "eq"},
            {"type": "string_check", "name": "mentions", "input": "{{sample.output_text}}", "reference": "{{item.ideal}}", "operation": "ilike"},
            {"type": "text_similarity", "name": "fuzzy", "input": "{{sample.output_text}}", "reference": "{{item.ideal}}", "evaluation_metric": "fuzzy_match", "pass_threshold": 0.8},
            {"type": "label_model", "name": "judge", "model": "judge", "input": [{"role": "user", "content": "Question: {{item.country}}. Answer: {{sample.output_text}}. Is it right?"}], "labels": ["correct", "incorrect"], "passing_labels": ["correct"]}
        ],
        "max_tokens": 8
    }});
    let items = [json!({"country": "France", "ideal": "Paris"}), json!({"country": "Spain", "ideal": "Madrid"}), json!({"country": "Peru", "ideal": "Lima"})];
    let text = std::iter::once(header.to_string()).chain(items.iter().map(|i| json!({"item": i}).to_string())).collect::<Vec<_>>().join("\n");
    let (spec, parsed) = parse_suite(&text, "x").unwrap();
    assert_eq!((spec.name.as_str(), parsed.len(), spec.max_tokens), ("capitals", 3, 8));
    let mut t = table(&[("m", "Capital of France?", "Paris"), ("m", "Capital of Spain?", "It is madrid."), ("m", "Capital of Peru?", "Lma")]);
    let mut seen = 0;
    let r = run(&spec, &parsed, Some("m"), &mut t, &mut |done, total| {
        assert!(done <= total);
        seen = done;
    });
    assert_eq!(seen, 6, "3 samples and 3 grader calls");
    let per: Vec<(usize, usize, usize)> = r.per_criterion().iter().map(|c| (c.passed, c.failed, c.errored)).collect();
    assert_eq!(per, [(1, 2, 0), (2, 1, 0), (1, 2, 0), (1, 2, 0)]);
    assert_eq!(r.overall().passed, 1);
    // The template reached the model; the grader saw the sample.
    assert_eq!(t.calls[0].messages, vec![json!({"role": "system", "content": "Answer briefly."}), json!({"role": "user", "content": "Capital of France?"})]);
    assert!(t.calls[3].messages[0]["content"].as_str().unwrap().contains("Answer: Paris."));
    assert!(t.calls[3].messages.last().unwrap()["content"].as_str().unwrap().contains("correct, incorrect"));
    assert_eq!(r.tokens(), (18 + 17 + 16, 5 + 13 + 3));

    // A failing sample is an error for every criterion, not a crash.
    let mut t = table(&[("m", "Capital of France?", "Paris")]);
    let r = run(&spec, &parsed, Some("m"), &mut t, &mut |_, _| {});
    assert_eq!(r.overall().errored, 2);
    assert!(r.items[1].sample_error.as_deref().unwrap().contains("no answer"));
}

#[test]
fn suites_without_a_header_check_the_ideal_answer() {
    let text = "{\"input\": \"2+2?\", \"ideal\": \"4\"}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"3+3?\"}], \"ideal\": \"6\"}\n";
    let (spec, items) = parse_suite(text, "math").unwrap();
    let mut t = table(&[("m", "2+2?", "The answer is 4."), ("m", "3+3?", "7")]);
    let r = run(&spec, &items, Some("m"), &mut t, &mut |_, _| {});
    assert_eq!((r.overall().passed, r.overall().failed), (1, 1));
    for (bad, why) in [("", "no items"), ("{\"input\": \"x\"}", "ideal"), ("nope", "line 1: not JSON"), ("{\"input\": \"x\", \"ideal\": \"y\"}\n{\"eval\": {}}", "first line"), ("[1]", "object")] {
        let e = parse_suite(bad, "s").unwrap_err();
        assert!(e.contains(why), "{bad:?}: {e}");
    }
}

#[test]
fn criteria_are_checked_with_the_field_at_fault() {
    let cases = [
        (json!({"type": "string_check", "input": "{{sample.output_text}}", "reference": "x", "operation": "contains"}), "c.operation"),
        (json!({"type": "string_check", "input": "{{ sample.foo }}", "reference": "x", "operation": "eq"}), "c.input"),
        (json!({"type": "string_check", "input": "{{item.x", "reference": "x", "operation": "eq"}), "c.input"),
        (json!({"type": "text_similarity", "input": "a", "reference": "b", "evaluation_metric": "meteor", "pass_threshold": 0.5}), "c.evaluation_metric"),
        (json!({"type": "text_similarity", "input": "a", "reference": "b", "evaluation_metric": "bleu", "pass_threshold": 2}), "c.pass_threshold"),
        (json!({"type": "label_model", "model": "m", "input": [{"role": "user", "content": "x"}], "labels": ["a"], "passing_labels": ["b"]}), "c.passing_labels"),
        (json!({"type": "label_model", "input": [{"role": "user", "content": "x"}], "labels": ["a"], "passing_labels": ["a"]}), "c.model"),
        (json!({"type": "score_model", "model": "m", "input": [], "range": [0, 10]}), "c.input"),
        (json!({"type": "score_model", "model": "m", "input": [{"role": "user", "content": "x"}], "range": [5, 1]}), "c.range"),
        (json!({"type": "json_schema", "schema": 3}), "c.schema"),
        (json!({"type": "python", "source": "x"}), "c.type"),
        (json!({"name": "x"}), "c.type"),
    ];
    for (c, param) in cases {
        let e = parse_criterion(&c, "c").unwrap_err();
        assert_eq!(e.param, param, "{c}: {e}");
    }
    // Round trip through the API shape.
    let c = json!({"type": "text_similarity", "name": "r", "input": "{{sample.output_text}}", "reference": "{{item.ideal}}", "evaluation_metric": "rouge_l", "pass_threshold": 0.5});
    assert_eq!(parse_criterion(&c, "c").unwrap().to_json(), c);
}

#[test]
fn json_schema_and_score_model_graders() {
    let header = json!({"eval": {"testing_criteria": [
        {"type": "json_schema", "name": "shape", "schema": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}},
        {"type": "score_model", "name": "score", "model": "scorer", "input": [{"role": "user", "content": "Rate {{sample.output_text}}"}], "range": [1, 5], "pass_threshold": 4}
    ]}});
    let items: Vec<Value> = ["a", "b", "c"].iter().map(|q| json!({"input": q})).collect();
    let text = std::iter::once(header.to_string()).chain(items.iter().map(Value::to_string)).collect::<Vec<_>>().join("\n");
    let (spec, items) = parse_suite(&text, "s").unwrap();
    let mut t = table(&[
        ("m", "a", "{\"n\": 3}"),
        ("m", "b", "```json\n{\"n\": \"three\"}\n```"),
        ("m", "c", "no json here"),
        ("scorer", "Rate {\"n\": 3}", "Score: 5"),
        ("scorer", "Rate ```json\n{\"n\": \"three\"}\n```", "2"),
        ("scorer", "Rate no json here", "about eleven"),
    ]);
    let r = run(&spec, &items, Some("m"), &mut t, &mut |_, _| {});
    let grades: Vec<Vec<(bool, f64, bool)>> = r.items.iter().map(|i| i.grades.iter().map(|g| (g.passed, g.score, g.error.is_some())).collect()).collect();
    assert_eq!(grades, vec![vec![(true, 1.0, false), (true, 5.0, false)], vec![(false, 0.0, false), (false, 2.0, false)], vec![(false, 0.0, false), (false, 0.0, true)]]);
}

#[test]
fn wilson_intervals() {
    let (p, lo, hi) = wilson(8, 10);
    assert!((p - 0.8).abs() < 1e-12 && (lo - 0.4902).abs() < 1e-3 && (hi - 0.9433).abs() < 1e-3, "{lo} {hi}");
    assert_eq!(wilson(0, 0), (0.0, 0.0, 1.0));
    let (_, lo, hi) = wilson(0, 20);
    assert!(lo == 0.0 && hi > 0.1 && hi < 0.2);
}

#[test]
fn cosine_similarity_uses_the_samplers_embeddings() {
    let header = json!({"eval": {"testing_criteria": [
        {"type": "text_similarity", "name": "cos", "input": "{{sample.output_text}}", "reference": "{{item.ideal}}", "evaluation_metric": "cosine", "pass_threshold": 0.99, "embedding_model": "embedder"},
        {"type": "text_similarity", "name": "cos-bad-model", "input": "{{sample.output_text}}", "reference": "{{item.ideal}}", "evaluation_metric": "cosine", "pass_threshold": 0.5, "embedding_model": "nobody"}
    ]}});
    let text = format!("{header}\n{}\n{}", json!({"input": "a", "ideal": "listen"}), json!({"input": "b", "ideal": "listen"}));
    let (spec, items) = parse_suite(&text, "s").unwrap();
    let mut t = table(&[("m", "a", "silent"), ("m", "b", "loud")]);
    let r = run(&spec, &items, Some("m"), &mut t, &mut |_, _| {});
    let g: Vec<(bool, bool)> = r.items.iter().map(|i| (i.grades[0].passed, i.grades[1].error.is_some())).collect();
    assert_eq!(g, [(true, true), (false, true)], "anagrams have the same letters; the second criterion's model cannot embed");
    assert!((r.items[0].grades[0].score - 1.0).abs() < 1e-9);
    let missing = json!({"type": "text_similarity", "input": "a", "reference": "b", "evaluation_metric": "cosine", "pass_threshold": 0.5});
    assert_eq!(parse_criterion(&missing, "c").unwrap_err().param, "c.embedding_model");
}
