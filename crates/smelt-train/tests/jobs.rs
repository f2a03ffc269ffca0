//! The fine-tuning job store on a small random-weight model: uploads are checked line by line,
//! a job runs to an adapter through its statuses with events and epoch checkpoints, what it
//! publishes is served, and a reopened store holds everything it held.

use smelt_model::arch::Model;
use smelt_model::lora::Adapter;
use smelt_model::synthetic::{tiny_model, TinySpec};
use smelt_train::jobs::{self, ErrorKind, JobHost, JobStore, NewJob};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Host {
    model: Arc<Model>,
    published: Mutex<Vec<(String, String)>>,
}

impl JobHost for Host {
    fn model(&self, id: &str) -> Option<(Arc<Model>, usize)> {
        (id == "tiny").then(|| (self.model.clone(), 256))
    }
    fn publish(&self, base: &str, name: &str, adapter: Adapter, path: &Path) {
        assert!(path.is_file() && adapter.rank() == 16);
        self.published.lock().unwrap().push((base.to_string(), name.to_string()));
    }
}

fn line(q: &str, a: &str) -> String {
    format!(r#"{{"messages": [{{"role": "user", "content": "{q}"}}, {{"role": "assistant", "content": "{a}"}}]}}"#)
}

fn wait(store: &JobStore, id: &str) -> jobs::Job {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let j = store.job(id).unwrap();
        if j.finished() {
            return j;
        }
        assert!(Instant::now() < deadline, "job {id} stuck in {}", j.status);
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_job_runs_to_a_served_adapter_and_the_store_survives_a_reopen() {
    let dir = std::env::temp_dir().join(format!("smelt-jobs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.with_extension("gguf");
    std::fs::write(&path, tiny_model(&TinySpec::new("llama")).to_bytes()).unwrap();
    let host = Arc::new(Host { model: Arc::new(Model::load(&path).unwrap()), published: Mutex::new(Vec::new()) });
    let lock = jobs::lock_dir(&dir).unwrap();
    let e = jobs::lock_dir(&dir).unwrap_err().to_string();
    assert!(e.contains("in use by another smelt process"), "{e}");
    drop(lock);
    let _lock = jobs::lock_dir(&dir).unwrap();
    let store = JobStore::open(&dir).unwrap();

    // A bad upload is refused with every bad line named; nothing is stored.
    let bad = format!("{}\nnot json\n{{\"messages\": []}}\n", line("the model", "a token"));
    let e = store.add_file("bad.jsonl", "fine-tune", bad.as_bytes()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Invalid);
    assert!(e.message.contains("2 bad line(s)") && e.message.contains("line 2") && e.message.contains("line 3"), "{}", e.message);
    assert!(store.files().is_empty());

    let text: String = [("the model", "a token"), ("is", "of the"), ("a", "the end"), ("of", "is a")].iter().map(|(q, a)| line(q, a) + "\n").collect();
    let file = store.add_file("data.jsonl", "fine-tune", text.as_bytes()).unwrap();
    let missing = store.create_job(NewJob { model: "tiny".into(), training_file: "file-nope".into(), ..Default::default() }).unwrap_err();
    assert_eq!((missing.kind, missing.param), (ErrorKind::NotFound, Some("training_file")));

    let job = store.create_job(NewJob { model: "tiny".into(), training_file: file.id.clone(), suffix: Some("t".into()), seed: Some(5), n_epochs: Some(2), batch_size: Some(2), ..Default::default() }).unwrap();
    assert_eq!(job.status, "validating_files");
    let other = store.create_job(NewJob { model: "tiny".into(), training_file: file.id.clone(), ..Default::default() }).unwrap();
    assert_eq!(store.delete_file(&file.id).unwrap_err().kind, ErrorKind::Conflict, "a file unfinished jobs need stays");
    assert_eq!(store.cancel(&other.id).unwrap().status, "cancelled");

    let runner = (store.clone(), host.clone());
    std::thread::spawn(move || jobs::run_jobs(runner.0, runner.1, 2));
    let done = wait(&store, &job.id);
    assert_eq!(done.status, "succeeded", "{:?}", done.error);
    let ft = format!("ft:tiny:t:{}", job.id);
    assert_eq!(done.fine_tuned_model.as_deref(), Some(ft.as_str()));
    assert_eq!(done.hyperparameters["n_epochs"], 2);
    assert_eq!(done.hyperparameters["batch_size"], 2);
    // Two steps per epoch: the first epoch's end is a checkpoint served as a model of its own.
    let ckpt = format!("{ft}:ckpt-step-2");
    assert_eq!(*host.published.lock().unwrap(), [("tiny".to_string(), ckpt.clone()), ("tiny".to_string(), ft.clone())]);
    let events = store.events(&job.id).unwrap();
    let steps: Vec<u64> = events.iter().rev().filter(|e| e.kind == "metrics").map(|e| e.data["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [1, 2, 3, 4]);
    assert!(events[0].message.contains("successfully completed"), "{}", events[0].message);
    assert_eq!(store.checkpoints(&job.id).unwrap()[0].fine_tuned_model_checkpoint, ckpt);
    let results = store.file_content(&done.result_files[0]).unwrap();
    assert_eq!(String::from_utf8(results).unwrap().lines().count(), 5);

    // Everything is on disk: a reopened store has the same jobs, events and adapters.
    let again = JobStore::open(&dir).unwrap();
    assert_eq!(again.job(&job.id).unwrap().status, "succeeded");
    assert_eq!(again.job(&other.id).unwrap().status, "cancelled");
    assert_eq!(again.events(&job.id).unwrap().len(), events.len());
    let published: Vec<String> = again.published().into_iter().map(|(_, name, p)| {
        Adapter::load(&p, &host.model, &name).unwrap();
        name
    }).collect();
    assert_eq!(published, [ckpt, ft]);
    again.delete_file(&file.id).unwrap();
    assert_eq!(again.file(&file.id).unwrap_err().kind, ErrorKind::NotFound);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&path);
}
