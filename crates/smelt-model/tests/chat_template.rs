//! The model's own chat template renders exactly what the reference rendered.

mod common;
use common::*;
use smelt_model::arch::Model;

#[test]
fn qwen_template_matches_reference_renderings() {
    let model = Model::load(&store_model(QWEN)).unwrap();
    let t = model.chat_template().unwrap();
    let cases = jsonl("golden/qwen2.5-coder-0.5b-instruct.chat.jsonl");
    assert!(cases.iter().any(|c| c.get("tools").is_some()));
    for c in &cases {
        let got = t.render(&c["messages"], c.get("tools"), true).unwrap();
        assert_eq!(got, c["rendered_prompt"].as_str().unwrap());
    }
}

#[test]
fn qwen_template_renders_tool_calls_and_results() {
    let model = Model::load(&store_model(QWEN)).unwrap();
    let t = model.chat_template().unwrap();
    let msgs = serde_json::json!([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"},
    ]);
    let out = t.render(&msgs, None, true).unwrap();
    assert!(out.contains("<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>\n"), "{out}");
    assert!(out.contains("<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"), "{out}");
}

#[test]
fn gemma_base_model_gets_the_gemma_turn_format() {
    let model = Model::load(&store_model(GEMMA)).unwrap();
    assert!(model.chat_template.is_none());
    let t = model.chat_template().unwrap();
    let out = t.render(&serde_json::json!([{"role": "user", "content": "Hi"}]), None, true).unwrap();
    assert_eq!(out, "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n");
}
