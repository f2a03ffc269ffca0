//! The records database: storing, listing with filters and cursors, updating, deleting,
//! feedback, owners kept apart, retention, and concurrent writers.

use serde_json::{json, Map, Value};
use smelt_records::{check_metadata, Completion, Feedback, Query, Rated, Records};
use std::path::PathBuf;

fn temp_db(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("smelt-records-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("smelt.db")
}

fn completion(id: &str, owner: &str, model: &str, meta: &[(&str, &str)], created: u64) -> Completion {
    let metadata: Map<String, Value> = meta.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
    Completion {
        id: id.into(),
        owner: owner.into(),
        created,
        model: model.into(),
        metadata,
        request: json!({"model": model, "messages": [{"role": "user", "content": format!("question {id}")}]}),
        response: json!({"id": id, "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("answer {id}")}}]}),
        user: None,
        prompt_tokens: 7,
        completion_tokens: 3,
        duration_ms: 12,
    }
}

fn ids(page: &smelt_records::Page) -> Vec<String> {
    page.records.iter().map(|r| r.completion.id.clone()).collect()
}

#[test]
fn stores_lists_updates_and_deletes() {
    let path = temp_db("crud");
    let db = Records::open(&path, None).unwrap();
    for i in 0..7 {
        let model = if i % 2 == 0 { "a" } else { "b" };
        let topic = if i < 4 { "math" } else { "code" };
        db.insert(completion(&format!("c{i}"), "", model, &[("topic", topic)], 100 + i)).wait().unwrap();
    }
    let all = db.list(Query { limit: 100, ..Query::default() }).wait().unwrap();
    assert_eq!(ids(&all), ["c0", "c1", "c2", "c3", "c4", "c5", "c6"]);
    assert!(!all.has_more);
    let got = db.get(None, "c3").wait().unwrap().unwrap();
    assert_eq!(got.completion, completion("c3", "", "b", &[("topic", "math")], 103));

    // Filters combine; pages follow `after` in either order.
    let q = |model: Option<&str>, meta: &[(&str, &str)]| Query { model: model.map(Into::into), metadata: meta.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(), limit: 100, ..Query::default() };
    assert_eq!(ids(&db.list(q(Some("a"), &[])).wait().unwrap()), ["c0", "c2", "c4", "c6"]);
    assert_eq!(ids(&db.list(q(Some("a"), &[("topic", "math")])).wait().unwrap()), ["c0", "c2"]);
    assert_eq!(ids(&db.list(q(None, &[("topic", "code")])).wait().unwrap()), ["c4", "c5", "c6"]);
    assert_eq!(ids(&db.list(q(None, &[("topic", "art")])).wait().unwrap()), Vec::<String>::new());
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = db.list(Query { limit: 3, descending: true, after: after.clone(), ..Query::default() }).wait().unwrap();
        seen.extend(ids(&page));
        if !page.has_more {
            break;
        }
        after = seen.last().cloned();
    }
    assert_eq!(seen, ["c6", "c5", "c4", "c3", "c2", "c1", "c0"]);
    assert!(db.list(Query { after: Some("nope".into()), limit: 3, ..Query::default() }).wait().is_err());

    let meta = check_metadata(&json!({"topic": "algebra", "reviewed": "yes"})).unwrap();
    let updated = db.set_metadata(None, "c1", meta.clone()).wait().unwrap().unwrap();
    assert_eq!(updated.completion.metadata, meta);
    assert!(db.set_metadata(None, "missing", meta).wait().unwrap().is_none());
    assert_eq!(ids(&db.list(q(None, &[("reviewed", "yes")])).wait().unwrap()), ["c1"]);

    assert!(db.delete(None, "c1").wait().unwrap());
    assert!(!db.delete(None, "c1").wait().unwrap());
    assert!(db.get(None, "c1").wait().unwrap().is_none());

    // A second insert of the same id fails alone; the rest of its group is stored.
    let dup = db.insert(completion("c0", "", "a", &[], 200));
    let fresh = db.insert(completion("c9", "", "a", &[], 200));
    assert!(dup.wait().is_err());
    fresh.wait().unwrap();

    // Everything is still there after reopening.
    drop(db);
    let db = Records::open(&path, None).unwrap();
    assert_eq!(ids(&db.list(Query { limit: 100, ..Query::default() }).wait().unwrap()), ["c0", "c2", "c3", "c4", "c5", "c6", "c9"]);
}

#[test]
fn owners_see_only_their_own() {
    let db = Records::open(&temp_db("owners"), None).unwrap();
    db.insert(completion("alice-1", "alice", "m", &[], 1)).wait().unwrap();
    db.insert(completion("bob-1", "bob", "m", &[], 2)).wait().unwrap();
    let alice = |q: Query| Query { owner: Some("alice".into()), limit: 10, ..q };
    assert_eq!(ids(&db.list(alice(Query::default())).wait().unwrap()), ["alice-1"]);
    assert!(db.get(Some("alice"), "bob-1").wait().unwrap().is_none());
    assert!(db.set_metadata(Some("alice"), "bob-1", Map::new()).wait().unwrap().is_none());
    assert!(!db.delete(Some("alice"), "bob-1").wait().unwrap());
    let fb = Feedback { id: "fb-1".into(), completion_id: "bob-1".into(), created: 3, rating: Some(1.0), comment: None, correction: None };
    assert!(db.add_feedback(Some("alice"), fb).wait().unwrap().is_none());
    assert!(db.list(alice(Query { after: Some("bob-1".into()), ..Query::default() })).wait().is_err());
    assert!(db.get(Some("bob"), "bob-1").wait().unwrap().is_some());
    assert_eq!(db.list(Query { limit: 10, ..Query::default() }).wait().unwrap().records.len(), 2);
}

#[test]
fn feedback_is_kept_with_its_completion_and_filters() {
    let db = Records::open(&temp_db("feedback"), None).unwrap();
    for i in 0..5 {
        db.insert(completion(&format!("c{i}"), "", "m", &[], i)).wait().unwrap();
    }
    let fb = |n: u32, c: &str, rating: Option<f64>, correction: Option<&str>| Feedback {
        id: format!("fb{n}"),
        completion_id: c.into(),
        created: 10 + n as u64,
        rating,
        comment: Some(format!("note {n}")),
        correction: correction.map(Into::into),
    };
    db.add_feedback(None, fb(1, "c0", Some(1.0), None)).wait().unwrap().unwrap();
    db.add_feedback(None, fb(2, "c1", Some(-1.0), Some("the right answer"))).wait().unwrap().unwrap();
    db.add_feedback(None, fb(3, "c2", Some(-0.5), None)).wait().unwrap().unwrap();
    db.add_feedback(None, fb(4, "c2", Some(0.5), None)).wait().unwrap().unwrap();
    assert!(db.add_feedback(None, fb(5, "nope", Some(1.0), None)).wait().unwrap().is_none());
    let rated = |r: Rated| ids(&db.list(Query { rated: Some(r), limit: 10, ..Query::default() }).wait().unwrap());
    assert_eq!(rated(Rated::Good), ["c0", "c2"]);
    assert_eq!(rated(Rated::Bad), ["c1", "c2"]);
    assert_eq!(rated(Rated::Corrected), ["c1"]);
    assert_eq!(rated(Rated::Any), ["c0", "c1", "c2"]);
    assert_eq!(rated(Rated::None), ["c3", "c4"]);
    let c2 = db.get(None, "c2").wait().unwrap().unwrap();
    assert_eq!(c2.feedback, vec![fb(3, "c2", Some(-0.5), None), fb(4, "c2", Some(0.5), None)]);
    // Export: a correction replaces the answer; an answer rated bad without one is not trained on.
    use smelt_records::training_line;
    let line = |id: &str| training_line(&db.get(None, id).wait().unwrap().unwrap());
    assert_eq!(line("c1").unwrap()["messages"][1]["content"], "the right answer");
    assert_eq!(line("c0").unwrap()["messages"][1]["content"], "answer c0");
    assert!(line("c2").is_some(), "its latest rating is good");
    db.add_feedback(None, fb(6, "c3", Some(-1.0), None)).wait().unwrap().unwrap();
    assert!(line("c3").is_none());
        // Deleting the completion deletes its feedback.
    assert!(db.delete(None, "c1").wait().unwrap());
    assert_eq!(rated(Rated::Corrected), Vec::<String>::new());
}

#[test]
fn retention_deletes_old_completions() {
    let path = temp_db("retention");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    {
        let db = Records::open(&path, None).unwrap();
        db.insert(completion("old", "", "m", &[], now - 40 * 86400)).wait().unwrap();
        db.insert(completion("new", "", "m", &[], now - 86400)).wait().unwrap();
    }
    let db = Records::open(&path, Some(std::time::Duration::from_secs(30 * 86400))).unwrap();
    assert_eq!(ids(&db.list(Query { limit: 10, ..Query::default() }).wait().unwrap()), ["new"]);
    assert_eq!(db.purge_before(now).wait().unwrap(), 1);
}

#[test]
fn concurrent_writers_lose_nothing() {
    let db = Records::open(&temp_db("concurrent"), None).unwrap();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let db = db.clone();
            std::thread::spawn(move || {
                let replies: Vec<_> = (0..200).map(|i| db.insert(completion(&format!("t{t}-{i}"), "", "m", &[], i))).collect();
                replies.into_iter().for_each(|r| r.wait().unwrap());
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    assert_eq!(db.list(Query { limit: 10_000, ..Query::default() }).wait().unwrap().records.len(), 1600);
}

#[test]
fn metadata_is_checked_like_openai() {
    assert!(check_metadata(&Value::Null).unwrap().is_empty());
    assert!(check_metadata(&json!({"a": "b"})).is_ok());
    let many: Map<String, Value> = (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
    assert!(check_metadata(&Value::Object(many)).unwrap_err().contains("16"));
    assert!(check_metadata(&json!({"k": 1})).unwrap_err().contains("string"));
    assert!(check_metadata(&json!({"k".repeat(65): "v"})).unwrap_err().contains("64"));
    assert!(check_metadata(&json!({"k": "v".repeat(513)})).unwrap_err().contains("512"));
    assert!(check_metadata(&json!(["a"])).is_err());
}

#[test]
fn objects_nest_list_and_delete_with_their_children() {
    use smelt_records::ObjectQuery;
    let db = Records::open(&temp_db("objects"), None).unwrap();
    db.put_object("eval", "e1", None, "alice", 1, &json!({"id": "e1", "name": "first"})).wait().unwrap();
    db.put_object("eval", "e2", None, "bob", 2, &json!({"id": "e2"})).wait().unwrap();
    for r in 0..3 {
        db.put_object("run", &format!("r{r}"), Some("e1"), "alice", 3, &json!({"id": format!("r{r}")})).wait().unwrap();
        db.put_object("item", &format!("i{r}"), Some(&format!("r{r}")), "alice", 3, &json!({"id": format!("i{r}")})).wait().unwrap();
    }
    // Replacing keeps the position; owners are kept apart.
    db.put_object("eval", "e1", None, "alice", 1, &json!({"id": "e1", "name": "renamed"})).wait().unwrap();
    assert_eq!(db.get_object("eval", Some("alice"), "e1").wait().unwrap().unwrap()["name"], "renamed");
    assert!(db.get_object("eval", Some("alice"), "e2").wait().unwrap().is_none());
    let q = |kind: &str, parent: Option<&str>, after: Option<&str>, limit, descending| ObjectQuery { kind: kind.into(), parent: parent.map(Into::into), owner: None, after: after.map(Into::into), limit, descending };
    let (page, more) = db.list_objects(q("run", Some("e1"), None, 2, false)).wait().unwrap();
    assert_eq!((page.iter().map(|v| v["id"].as_str().unwrap()).collect::<Vec<_>>(), more), (vec!["r0", "r1"], true));
    let (page, more) = db.list_objects(q("run", Some("e1"), Some("r1"), 2, false)).wait().unwrap();
    assert_eq!((page.len(), more), (1, false));
    let (page, _) = db.list_objects(q("run", Some("e1"), None, 10, true)).wait().unwrap();
    assert_eq!(page[0]["id"], "r2");
    assert!(db.list_objects(q("run", None, Some("nope"), 2, false)).wait().is_err());
    // Deleting the eval deletes its runs and their items.
    assert!(!db.delete_object("eval", Some("bob"), "e1").wait().unwrap());
    assert!(db.delete_object("eval", Some("alice"), "e1").wait().unwrap());
    assert!(db.get_object("run", None, "r1").wait().unwrap().is_none());
    assert!(db.get_object("item", None, "i2").wait().unwrap().is_none());
    assert!(db.get_object("eval", None, "e2").wait().unwrap().is_some());
}

#[test]
fn metadata_keys_are_plain_strings() {
    let db = Records::open(&temp_db("odd-keys"), None).unwrap();
    for key in ["a\"b", "x.y", "z[0]", "$", "a'b"] {
        db.insert(completion(&format!("odd-{key}"), "", "m", &[(key, "v")], 50)).wait().unwrap();
    }
    for key in ["a\"b", "x.y", "z[0]", "$", "a'b"] {
        let q = Query { metadata: vec![(key.to_string(), "v".to_string())], limit: 10, ..Query::default() };
        assert_eq!(ids(&db.list(q).wait().unwrap()), [format!("odd-{key}")]);
    }
}
