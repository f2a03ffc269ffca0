//! A finished run in the shape of OpenAI's Evals API: the run object's results and its output
//! items. Shared by the server's `/v1/evals` and the CLI's stored red-team runs.

use crate::{item_messages, EvalSpec, RunReport};
use serde_json::{json, Value};

/// Fill a run object (`status`, `result_counts`, `per_testing_criteria_results`,
/// `per_model_usage`) from a finished report.
pub fn complete_run(run: &mut Value, report: &RunReport) {
    let overall = report.overall();
    let (p, c) = report.tokens();
    run["status"] = json!("completed");
    run["result_counts"] = json!({"total": report.items.len(), "errored": overall.errored, "failed": overall.failed, "passed": overall.passed});
    run["per_testing_criteria_results"] = report.criteria.iter().zip(report.per_criterion()).map(|(n, k)| json!({"testing_criteria": n, "passed": k.passed, "failed": k.failed + k.errored})).collect();
    if let Some(m) = &report.model {
        run["per_model_usage"] = json!([{"model_name": m, "invocation_count": report.items.len(), "prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c, "cached_tokens": 0}]);
    }
}

/// The run's output items, with their ids (`outputitem-RUN-N`).
pub fn output_items(run_id: &str, eval_id: &str, created: u64, spec: &EvalSpec, report: &RunReport) -> Vec<(String, Value)> {
    report
        .items
        .iter()
        .enumerate()
        .map(|(n, it)| {
            let item_id = format!("outputitem-{run_id}-{n}");
            let results: Vec<Value> = report.criteria.iter().zip(&it.grades).map(|(name, g)| json!({"name": name, "passed": g.passed, "score": g.score, "error": g.error})).collect();
            let sample = json!({
                "input": item_messages(spec, &it.item).unwrap_or_default(),
                "output": it.sample.as_ref().map(|s| vec![json!({"role": "assistant", "content": s.text})]).unwrap_or_default(),
                "model": report.model,
                "usage": it.sample.as_ref().map(|s| json!({"prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens, "total_tokens": s.prompt_tokens + s.completion_tokens})),
                "error": it.sample_error.as_ref().map(|e| json!({"code": "sampling_error", "message": e})),
                "temperature": spec.temperature,
                "max_completion_tokens": spec.max_tokens,
                "seed": spec.seed,
            });
            let out = json!({
                "object": "eval.run.output_item", "id": item_id, "run_id": run_id, "eval_id": eval_id, "created_at": created,
                "status": if it.passed() { "pass" } else { "fail" }, "datasource_item_id": n, "datasource_item": it.item, "results": results, "sample": sample,
            });
            (item_id, out)
        })
        .collect()
}
