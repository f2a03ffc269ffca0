//! OpenAI's Evals API: `/v1/evals` (create, list, retrieve, update, delete), runs
//! (`/v1/evals/{id}/runs`: sample a served model — adapters included — over items given inline,
//! in an uploaded JSONL file, or taken from stored completions; or grade pre-generated
//! outputs), and each run's output items. Runs execute in the background, one model call batch
//! at a time through the served engines; their results are kept in the database.

use crate::error::ApiError;
use crate::generation::{new_id, now_secs};
use crate::keys::Meter;
use crate::parse_json;
use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::Extension;
use serde_json::{json, Map, Value};
use smelt_engine::scheduler::Engine;
use smelt_eval::engine::{EngineSampler, Resolve};
use smelt_eval::{EvalSpec, Sample};
use smelt_model::lora::LoraSet;
use crate::stored::{db_error, owner, page_json, paging as stored_paging, query_pairs};
use smelt_records::{ObjectQuery, Query, Records};
use std::sync::Arc;

fn records(state: &AppState) -> Result<Records, ApiError> {
    state.storage().map(|s| s.records.clone()).ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", "Evals need the database; this server was started with --store off").code("storage_off"))
}

fn not_found(what: &str, id: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("No {what} found with id '{id}'")).code("not_found")
}

fn spec_error(e: smelt_eval::SpecError) -> ApiError {
    ApiError::invalid(&e.param, e.message)
}

/// `limit`, `order`, `after` and a `status` filter (runs, output items).
struct Paging {
    limit: usize,
    descending: bool,
    after: Option<String>,
    status: Option<String>,
}

fn paging(raw: Option<String>) -> Result<Paging, ApiError> {
    let (mut limit, mut desc, mut after, mut status) = (20, false, None, None);
    for (k, v) in query_pairs(raw)? {
        if stored_paging(&k, &v, &mut limit, &mut desc, &mut after)? {
            continue;
        }
        match k.as_str() {
            "status" => status = Some(v),
            // Evals are listed by creation time (updates do not move them).
            "order_by" => {}
            _ => return Err(ApiError::invalid(&k, format!("unknown query parameter {k:?}"))),
        }
    }
    Ok(Paging { limit, descending: desc, after, status })
}

/// A page of objects of one kind under `parent`, filtered by `status` when asked.
async fn listing(state: &AppState, meter: &Meter, kind: &str, parent: Option<String>, p: Paging) -> Result<Value, ApiError> {
    let records = records(state)?;
    let owner = owner(state, meter);
    let Some(status) = p.status else {
        let q = ObjectQuery { kind: kind.into(), parent, owner, after: p.after, limit: p.limit, descending: p.descending };
        let (data, more) = records.list_objects(q).get().await.map_err(db_error)?;
        return Ok(page_json(data, more));
    };
    // Filtered: read them all (runs and items of one eval are few), then page.
    let q = ObjectQuery { kind: kind.into(), parent, owner, after: None, limit: 100_000, descending: p.descending };
    let (all, _) = records.list_objects(q).get().await.map_err(db_error)?;
    let all: Vec<Value> = all.into_iter().filter(|o| o["status"] == status.as_str()).collect();
    let start = match &p.after {
        Some(a) => all.iter().position(|o| o["id"] == a.as_str()).map(|i| i + 1).ok_or_else(|| ApiError::invalid("after", format!("no {kind} '{a}' in this listing")))?,
        None => 0,
    };
    let more = all.len() > start + p.limit;
    Ok(page_json(all.into_iter().skip(start).take(p.limit).collect(), more))
}

fn metadata(v: Option<&Value>) -> Result<Map<String, Value>, ApiError> {
    smelt_records::check_metadata(v.unwrap_or(&Value::Null)).map_err(|e| ApiError::invalid("metadata", e))
}

/// The testing criteria of an eval object, parsed.
fn criteria_of(eval: &Value) -> Result<Vec<smelt_eval::Criterion>, ApiError> {
    let list = eval["testing_criteria"].as_array().cloned().unwrap_or_default();
    list.iter().enumerate().map(|(i, c)| smelt_eval::parse_criterion(c, &format!("testing_criteria[{i}]")).map_err(spec_error)).collect()
}

/// POST /v1/evals
pub async fn create(State(state): State<AppState>, Extension(meter): Extension<Meter>, body: Bytes) -> Result<axum::Json<Value>, ApiError> {
    let req: Value = parse_json(&body)?;
    let records = records(&state)?;
    let config = req.get("data_source_config").ok_or_else(|| ApiError::invalid("data_source_config", "Missing required parameter: 'data_source_config'"))?;
    let config = match config.get("type").and_then(Value::as_str) {
        Some("custom") => {
            let schema = config.get("item_schema").filter(|s| s.is_object()).ok_or_else(|| ApiError::invalid("data_source_config.item_schema", "a custom data source needs an item_schema (a JSON Schema object)"))?;
            let mut properties = json!({"item": schema});
            if config.get("include_sample_schema").and_then(Value::as_bool).unwrap_or(false) {
                properties["sample"] = json!({"type": "object", "properties": {"output_text": {"type": "string"}}});
            }
            json!({"type": "custom", "schema": {"type": "object", "properties": properties, "required": ["item"]}})
        }
        Some("stored_completions") | Some("logs") => {
            let m = metadata(config.get("metadata"))?;
            json!({"type": "stored_completions", "metadata": m, "schema": {"type": "object", "properties": {"item": {"type": "object"}, "sample": {"type": "object"}}, "required": ["item", "sample"]}})
        }
        other => return Err(ApiError::invalid("data_source_config.type", format!("must be custom or stored_completions, got {other:?}"))),
    };
    let criteria = req.get("testing_criteria").and_then(Value::as_array).filter(|c| !c.is_empty()).ok_or_else(|| ApiError::invalid("testing_criteria", "must be a non-empty array"))?;
    let mut parsed = Vec::new();
    for (i, c) in criteria.iter().enumerate() {
        let crit = smelt_eval::parse_criterion(c, &format!("testing_criteria[{i}]")).map_err(spec_error)?;
        if let Some(m) = crit.grader_model().or(crit.embedding_model()) {
            state.resolve(Some(m)).map_err(|e| ApiError { param: Some(format!("testing_criteria[{i}].model")), ..e })?;
        }
        let mut shown = crit.to_json();
        shown["id"] = json!(format!("{}-{i}", crit.name()));
        parsed.push(shown);
    }
    let id = new_id("eval");
    let created = now_secs();
    let eval = json!({
        "object": "eval",
        "id": id,
        "name": req.get("name").and_then(Value::as_str).unwrap_or("eval"),
        "data_source_config": config,
        "testing_criteria": parsed,
        "created_at": created,
        "metadata": metadata(req.get("metadata"))?,
    });
    records.put_object("eval", &id, None, meter.name().unwrap_or(""), created, &eval).get().await.map_err(db_error)?;
    Ok(axum::Json(eval))
}

async fn find_eval(state: &AppState, meter: &Meter, id: &str) -> Result<Value, ApiError> {
    records(state)?.get_object("eval", owner(state, meter).as_deref(), id).get().await.map_err(db_error)?.ok_or_else(|| not_found("eval", id))
}

/// GET /v1/evals
pub async fn list(State(state): State<AppState>, Extension(meter): Extension<Meter>, RawQuery(raw): RawQuery) -> Result<axum::Json<Value>, ApiError> {
    Ok(axum::Json(listing(&state, &meter, "eval", None, paging(raw)?).await?))
}

/// GET /v1/evals/{id}
pub async fn retrieve(State(state): State<AppState>, Extension(meter): Extension<Meter>, Path(id): Path<String>) -> Result<axum::Json<Value>, ApiError> {
    Ok(axum::Json(find_eval(&state, &meter, &id).await?))
}

/// POST /v1/evals/{id}: rename, or replace the metadata.
pub async fn update(State(state): State<AppState>, Extension(meter): Extension<Meter>, Path(id): Path<String>, body: Bytes) -> Result<axum::Json<Value>, ApiError> {
    let req: Value = parse_json(&body)?;
    let mut eval = find_eval(&state, &meter, &id).await?;
    if let Some(n) = req.get("name") {
        eval["name"] = json!(n.as_str().ok_or_else(|| ApiError::invalid("name", "name must be a string"))?);
    }
    if req.get("metadata").is_some() {
        eval["metadata"] = Value::Object(metadata(req.get("metadata"))?);
    }
    records(&state)?.put_object("eval", &id, None, meter.name().unwrap_or(""), eval["created_at"].as_u64().unwrap_or(0), &eval).get().await.map_err(db_error)?;
    Ok(axum::Json(eval))
}

/// DELETE /v1/evals/{id}: the eval with its runs and their output items.
pub async fn delete(State(state): State<AppState>, Extension(meter): Extension<Meter>, Path(id): Path<String>) -> Result<axum::Json<Value>, ApiError> {
    if !records(&state)?.delete_object("eval", owner(&state, &meter).as_deref(), &id).get().await.map_err(db_error)? {
        return Err(not_found("eval", &id));
    }
    Ok(axum::Json(json!({"object": "eval.deleted", "deleted": true, "eval_id": id})))
}

/// Items (with pre-generated samples, when given) of a run's data source.
async fn load_items(state: &AppState, meter: &Meter, source: &Value, at: &str) -> Result<Vec<(Value, Option<String>)>, ApiError> {
    let entries = |list: &[Value], at: &str| -> Result<Vec<(Value, Option<String>)>, ApiError> {
        list.iter()
            .enumerate()
            .map(|(i, e)| {
                let item = e.get("item").cloned().unwrap_or_else(|| e.clone());
                if !item.is_object() {
                    return Err(ApiError::invalid(&format!("{at}[{i}]"), "an item must be a JSON object"));
                }
                let sample = e.pointer("/sample/output_text").and_then(Value::as_str).map(str::to_string);
                Ok((item, sample))
            })
            .collect()
    };
    match source.get("type").and_then(Value::as_str) {
        Some("file_content") => {
            let content = source.get("content").and_then(Value::as_array).ok_or_else(|| ApiError::invalid(&format!("{at}.content"), "must be an array of {\"item\": {...}}"))?;
            entries(content, &format!("{at}.content"))
        }
        Some("file_id") => {
            let id = source.get("id").and_then(Value::as_str).ok_or_else(|| ApiError::invalid(&format!("{at}.id"), "must be a file id"))?;
            let jobs = state.jobs().ok_or_else(|| ApiError::invalid(&format!("{at}.id"), "this server keeps no files"))?;
            let bytes = jobs.file_content(id).map_err(|e| ApiError { param: Some(format!("{at}.id")), ..ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", e.message) })?;
            let text = String::from_utf8(bytes).map_err(|_| ApiError::invalid(&format!("{at}.id"), "the file is not UTF-8 text"))?;
            let mut list = Vec::new();
            for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                list.push(serde_json::from_str::<Value>(line).map_err(|e| ApiError::invalid(&format!("{at}.id"), format!("line {}: not JSON: {e}", i + 1)))?);
            }
            entries(&list, &format!("{at}.id"))
        }
        Some("stored_completions") => {
            let storage = state.storage().ok_or_else(|| ApiError::invalid(at, "this server stores no completions"))?;
            let md = metadata(source.get("metadata"))?;
            let limit = source.get("limit").and_then(Value::as_u64).unwrap_or(1000).clamp(1, 10_000) as usize;
            let q = Query {
                owner: owner(state, meter),
                model: source.get("model").and_then(Value::as_str).map(str::to_string),
                metadata: md.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string())).collect(),
                limit,
                descending: true,
                ..Query::default()
            };
            let page = storage.records.list(q).get().await.map_err(db_error)?;
            Ok(page
                .records
                .into_iter()
                .rev()
                .map(|r| {
                    let c = r.completion;
                    let output = c.response.pointer("/choices/0/message/content").and_then(Value::as_str).map(str::to_string);
                    let item = json!({"input": c.request["messages"], "output": output, "model": c.model, "metadata": c.metadata, "completion_id": c.id});
                    (item, output)
                })
                .collect())
        }
        other => Err(ApiError::invalid(&format!("{at}.type"), format!("must be file_content, file_id or stored_completions, got {other:?}"))),
    }
}

/// The served models, resolved for the eval runner's engine sampler.
struct Served(AppState, Vec<(String, Arc<crate::state::ModelEntry>, LoraSet)>);

impl Resolve for Served {
    fn resolve(&mut self, model: &str) -> Result<(&Engine, LoraSet), String> {
        if !self.1.iter().any(|(m, _, _)| m == model) {
            let r = self.0.resolve(Some(model)).map_err(|e| e.message)?;
            self.1.push((model.to_string(), r.entry, r.lora));
        }
        let (_, entry, lora) = self.1.iter().find(|(m, _, _)| m == model).ok_or("unresolved")?;
        Ok((&entry.engine, lora.clone()))
    }
}

/// POST /v1/evals/{id}/runs
pub async fn create_run(State(state): State<AppState>, Extension(meter): Extension<Meter>, Path(eval_id): Path<String>, body: Bytes) -> Result<axum::Json<Value>, ApiError> {
    let req: Value = parse_json(&body)?;
    let eval = find_eval(&state, &meter, &eval_id).await?;
    let records = records(&state)?;
    let ds = req.get("data_source").ok_or_else(|| ApiError::invalid("data_source", "Missing required parameter: 'data_source'"))?;
    let kind = ds.get("type").and_then(Value::as_str).unwrap_or("");
    let source = ds.get("source").ok_or_else(|| ApiError::invalid("data_source.source", "Missing required parameter"))?;
    let mut spec = EvalSpec::new(eval["name"].as_str().unwrap_or("eval"), criteria_of(&eval)?);
    let model = match kind {
        "jsonl" => None,
        "completions" => {
            let m = ds.get("model").and_then(Value::as_str).ok_or_else(|| ApiError::invalid("data_source.model", "a completions run needs the model to sample"))?;
            state.resolve(Some(m)).map_err(|e| ApiError { param: Some("data_source.model".into()), ..e })?;
            match ds.get("input_messages") {
                Some(im) if im.get("type").and_then(Value::as_str) == Some("template") => {
                    spec.input = Some(smelt_eval::parse_messages(im.get("template").unwrap_or(&Value::Null), "data_source.input_messages.template").map_err(spec_error)?);
                }
                Some(im) if im.get("type").and_then(Value::as_str) == Some("item_reference") => {
                    let r = im.get("item_reference").and_then(Value::as_str).unwrap_or("");
                    if r != "item.input" && r != "item.messages" {
                        return Err(ApiError::invalid("data_source.input_messages.item_reference", "must be item.input or item.messages"));
                    }
                }
                None => {}
                Some(_) => return Err(ApiError::invalid("data_source.input_messages.type", "must be template or item_reference")),
            }
            let sp = ds.get("sampling_params").cloned().unwrap_or(json!({}));
            if let Some(t) = sp.get("temperature") {
                spec.temperature = t.as_f64().filter(|t| (0.0..=2.0).contains(t)).ok_or_else(|| ApiError::invalid("data_source.sampling_params.temperature", "must be from 0 to 2"))?;
            }
            if let Some(n) = sp.get("max_completion_tokens").or_else(|| sp.get("max_tokens")) {
                spec.max_tokens = n.as_u64().filter(|&n| (1..=32768).contains(&n)).ok_or_else(|| ApiError::invalid("data_source.sampling_params.max_completion_tokens", "must be from 1 to 32768"))? as usize;
            }
            spec.seed = sp.get("seed").and_then(Value::as_u64);
            Some(m.to_string())
        }
        other => return Err(ApiError::invalid("data_source.type", format!("must be completions or jsonl, got {other:?}"))),
    };
    let entries = load_items(&state, &meter, source, "data_source.source").await?;
    if entries.is_empty() {
        return Err(ApiError::invalid("data_source.source", "the data source has no items"));
    }
    if model.is_none() && spec.criteria.iter().any(|c| c.to_json().to_string().contains("sample.output_text")) && entries.iter().any(|(_, s)| s.is_none()) {
        return Err(ApiError::invalid("data_source", "the criteria grade {{sample.output_text}}, but this jsonl data has no samples: give each entry a \"sample\": {\"output_text\": ...} or run a model (type \"completions\")"));
    }
    let id = new_id("evalrun");
    let created = now_secs();
    let run = json!({
        "object": "eval.run",
        "id": id,
        "eval_id": eval_id,
        "name": req.get("name").and_then(Value::as_str).unwrap_or(&id),
        "status": "queued",
        "model": model,
        "data_source": ds,
        "created_at": created,
        "metadata": metadata(req.get("metadata"))?,
        "result_counts": {"total": entries.len(), "errored": 0, "failed": 0, "passed": 0},
        "per_model_usage": [],
        "per_testing_criteria_results": [],
        "report_url": null,
        "error": null,
    });
    let key = meter.name().unwrap_or("").to_string();
    records.put_object("eval.run", &id, Some(&eval_id), &key, created, &run).get().await.map_err(db_error)?;
    let (st, run_in) = (state.clone(), run.clone());
    tokio::spawn(async move { execute(st, records, run_in, spec, entries, model, key).await });
    Ok(axum::Json(run))
}

/// Run the eval in the background and record its results.
async fn execute(state: AppState, records: Records, mut run: Value, spec: EvalSpec, entries: Vec<(Value, Option<String>)>, model: Option<String>, owner: String) {
    let (id, eval_id) = (run["id"].as_str().unwrap_or_default().to_string(), run["eval_id"].as_str().unwrap_or_default().to_string());
    run["status"] = json!("in_progress");
    // Every write below only updates: a run deleted meanwhile stays deleted.
    if !records.update_object(&id, &run).get().await.unwrap_or(false) {
        return;
    }
    let items: Vec<Value> = entries.iter().map(|(i, _)| i.clone()).collect();
    let samples: Vec<Option<Sample>> = entries.iter().map(|(_, s)| s.as_ref().map(|t| Sample { text: t.clone(), ..Sample::default() })).collect();
    let st = state.clone();
    let (spec2, model2) = (spec.clone(), model.clone());
    let report = tokio::task::spawn_blocking(move || {
        let mut sampler = EngineSampler(Served(st, Vec::new()));
        match &model2 {
            Some(m) => smelt_eval::run(&spec2, &items, Some(m), &mut sampler, &mut |_, _| {}),
            None => smelt_eval::grade(&spec2, &items, samples, &mut sampler, &mut |_, _| {}),
        }
    })
    .await;
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            run["status"] = json!("failed");
            run["error"] = json!({"code": "internal_error", "message": e.to_string()});
            let _ = records.update_object(&id, &run).get().await;
            return;
        }
    };
    let created = now_secs();
    for (item_id, out) in smelt_eval::api::output_items(&id, &eval_id, created, &spec, &report) {
        if !records.put_child("eval.run.output_item", &item_id, &id, &owner, created, &out).get().await.unwrap_or(false) {
            return;
        }
    }
    smelt_eval::api::complete_run(&mut run, &report);
    let _ = records.update_object(&id, &run).get().await;
}

async fn find_run(state: &AppState, meter: &Meter, eval_id: &str, run_id: &str) -> Result<Value, ApiError> {
    let run = records(state)?.get_object("eval.run", owner(state, meter).as_deref(), run_id).get().await.map_err(db_error)?;
    run.filter(|r| r["eval_id"] == eval_id).ok_or_else(|| not_found("eval run", run_id))
}

/// GET /v1/evals/{id}/runs
pub async fn list_runs(State(state): State<AppState>, Extension(meter): Extension<Meter>, Path(eval_id): Path<String>, RawQuery(raw): RawQuery) -> Result<axum::Json<Value>, ApiError> {
    find_eval(&state, &meter, &eval_id).await?;
    Ok(axum::Json(listing(&state, &meter, "eval.run", Some(eval_id), paging(raw)?).await?))
}

/// GET /v1/evals/{id}/runs/{run_id}
pub async fn get_run(State(state): State<AppState>, Extension(meter): Extension<Meter>, Path((eval_id, run_id)): Path<(String, String)>) -> Result<axum::Json<Value>, ApiError> {
    Ok(axum::Json(find_run(&state, &meter, &eval_id, &run_id).await?))
}

/// DELETE /v1/evals/{id}/runs/{run_id}
pub async fn delete_run(State(state): State<AppState>, Extension(meter): Extension<Meter>, Path((eval_id, run_id)): Path<(String, String)>) -> Result<axum::Json<Value>, ApiError> {
    find_run(&state, &meter, &eval_id, &run_id).await?;
    records(&state)?.delete_object("eval.run", owner(&state, &meter).as_deref(), &run_id).get().await.map_err(db_error)?;
    Ok(axum::Json(json!({"object": "eval.run.deleted", "deleted": true, "run_id": run_id})))
}

/// GET /v1/evals/{id}/runs/{run_id}/output_items
pub async fn list_output_items(State(state): State<AppState>, Extension(meter): Extension<Meter>, Path((eval_id, run_id)): Path<(String, String)>, RawQuery(raw): RawQuery) -> Result<axum::Json<Value>, ApiError> {
    find_run(&state, &meter, &eval_id, &run_id).await?;
    Ok(axum::Json(listing(&state, &meter, "eval.run.output_item", Some(run_id), paging(raw)?).await?))
}

/// GET /v1/evals/{id}/runs/{run_id}/output_items/{item_id}
pub async fn get_output_item(State(state): State<AppState>, Extension(meter): Extension<Meter>, Path((eval_id, run_id, item_id)): Path<(String, String, String)>) -> Result<axum::Json<Value>, ApiError> {
    find_run(&state, &meter, &eval_id, &run_id).await?;
    let item = records(&state)?.get_object("eval.run.output_item", owner(&state, &meter).as_deref(), &item_id).get().await.map_err(db_error)?;
    Ok(axum::Json(item.filter(|i| i["run_id"] == run_id.as_str()).ok_or_else(|| not_found("output item", &item_id))?))
}

/// Runs left `queued` or `in_progress` by a server that stopped: marked failed, so that clients
/// polling them get an answer. Blocking; called before serving. How many there were.
pub fn fail_unfinished_runs(records: &Records) -> usize {
    let q = ObjectQuery { kind: "eval.run".into(), parent: None, owner: None, after: None, limit: 1_000_000, descending: false };
    let Ok((runs, _)) = records.list_objects(q).wait() else { return 0 };
    let mut n = 0;
    for mut run in runs.into_iter().filter(|r| r["status"] == "queued" || r["status"] == "in_progress") {
        run["status"] = json!("failed");
        run["error"] = json!({"code": "server_stopped", "message": "the server stopped before the run finished; start it again"});
        if let Some(id) = run["id"].as_str().map(str::to_string) {
            n += usize::from(records.update_object(&id, &run).wait().unwrap_or(false));
        }
    }
    n
}
