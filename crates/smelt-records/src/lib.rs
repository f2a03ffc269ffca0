//! smelt-records: what a server keeps about its traffic — stored chat completions and the
//! feedback users give on them — in one SQLite database (WAL).
//!
//! One thread owns the connection and runs every command in the order it was sent, so a read
//! sent after a write sees it. Writes that queue up while a transaction commits are committed
//! together (group commit): a busy server pays one commit per batch, not per request. Callers
//! get a [`Reply`] to await (servers) or wait on (the CLI); a completion counts as stored once
//! its reply says so — the server answers the client only after that, so a request that got a
//! complete response survives a crash of the process.

mod export;
mod objects;
mod query;

pub use export::training_line;
pub use objects::ObjectQuery;
pub use query::{Query, Rated};

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;
use tokio::sync::oneshot;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database error: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("the database thread has stopped")]
    Closed,
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// One stored chat completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The response's id (`chatcmpl-…`).
    pub id: String,
    /// The API key's name the request came with ("" on a server without keys).
    pub owner: String,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// The model id the request named (adapter included).
    pub model: String,
    pub metadata: Map<String, Value>,
    /// The request body as sent.
    pub request: Value,
    /// The response as returned (a stream assembled into one `chat.completion`).
    pub response: Value,
    pub user: Option<String>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// From the request's arrival to the last token.
    pub duration_ms: u64,
}

/// A user's judgement of one completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Feedback {
    pub id: String,
    pub completion_id: String,
    pub created: u64,
    /// From -1 (bad) to 1 (good).
    pub rating: Option<f64>,
    pub comment: Option<String>,
    /// The answer the model should have given.
    pub correction: Option<String>,
}

/// A stored completion with the feedback given on it, oldest first.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub completion: Completion,
    pub feedback: Vec<Feedback>,
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    pub records: Vec<Record>,
    pub has_more: bool,
}

/// What a command will answer, once the database thread has run it.
pub struct Reply<T>(oneshot::Receiver<Result<T>>);

impl<T> Reply<T> {
    pub async fn get(self) -> Result<T> {
        self.0.await.unwrap_or(Err(Error::Closed))
    }

    /// Block until the answer is there (not from inside an async task).
    pub fn wait(self) -> Result<T> {
        self.0.blocking_recv().unwrap_or(Err(Error::Closed))
    }
}

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

enum Command {
    Insert(Box<Completion>, oneshot::Sender<Result<()>>),
    Run(Job),
}

/// The database: a handle to its thread. Cloning shares the thread; it stops when the last
/// handle is dropped, after running what was sent.
#[derive(Clone)]
pub struct Records {
    tx: mpsc::Sender<Command>,
    path: PathBuf,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS completions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    created INTEGER NOT NULL,
    model TEXT NOT NULL,
    metadata TEXT NOT NULL,
    request TEXT NOT NULL,
    response TEXT NOT NULL,
    user TEXT,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS completions_by_owner ON completions (owner, seq);
CREATE INDEX IF NOT EXISTS completions_by_created ON completions (created);
CREATE TABLE IF NOT EXISTS feedback (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    completion_id TEXT NOT NULL REFERENCES completions (id) ON DELETE CASCADE,
    created INTEGER NOT NULL,
    rating REAL,
    comment TEXT,
    correction TEXT
);
CREATE INDEX IF NOT EXISTS feedback_by_completion ON feedback (completion_id);
";

/// Most inserts committed in one transaction.
const GROUP: usize = 256;

impl Records {
    /// Open (creating when needed) the database at `path`. With `retention`, completions older
    /// than that are deleted now and every hour after.
    pub fn open(path: &Path, retention: Option<Duration>) -> Result<Records> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::Invalid(format!("cannot create {}: {e}", dir.display())))?;
        }
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        // WAL: readers (`smelt data export`) never block the server; NORMAL: a commit is in the
        // log file before it returns, which a killed process cannot take back.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > 2 {
            return Err(Error::Invalid(format!("{} was written by a newer smelt (schema {version}); upgrade smelt", path.display())));
        }
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(objects::SCHEMA)?;
        conn.pragma_update(None, "user_version", 2)?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("smelt-records".into())
            .spawn(move || run(conn, rx, retention))
            .map_err(|e| Error::Invalid(format!("cannot start the database thread: {e}")))?;
        Ok(Records { tx, path: path.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Run `f` on the database thread.
    pub(crate) fn call<T: Send + 'static>(&self, f: impl FnOnce(&mut Connection) -> Result<T> + Send + 'static) -> Reply<T> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let _ = tx.send(f(conn));
        });
        let _ = self.tx.send(Command::Run(job));
        Reply(rx)
    }

    /// Store a completion; the reply says when it is committed.
    pub fn insert(&self, c: Completion) -> Reply<()> {
        let (tx, rx) = oneshot::channel();
        let _ = self.tx.send(Command::Insert(Box::new(c), tx));
        Reply(rx)
    }

    /// One completion with its feedback; `owner` None sees every owner's.
    pub fn get(&self, owner: Option<&str>, id: &str) -> Reply<Option<Record>> {
        let (owner, id) = (owner.map(str::to_string), id.to_string());
        self.call(move |conn| get(conn, owner.as_deref(), &id))
    }

    pub fn list(&self, q: Query) -> Reply<Page> {
        self.call(move |conn| query::list(conn, &q))
    }

    /// Replace a completion's metadata; None when there is no such completion.
    pub fn set_metadata(&self, owner: Option<&str>, id: &str, metadata: Map<String, Value>) -> Reply<Option<Record>> {
        let (owner, id) = (owner.map(str::to_string), id.to_string());
        self.call(move |conn| {
            let Some(seq) = seq_of(conn, owner.as_deref(), &id)? else { return Ok(None) };
            conn.execute("UPDATE completions SET metadata = ?1 WHERE seq = ?2", params![Value::Object(metadata).to_string(), seq])?;
            get(conn, owner.as_deref(), &id)
        })
    }

    /// Delete a completion and its feedback; false when there was none.
    pub fn delete(&self, owner: Option<&str>, id: &str) -> Reply<bool> {
        let (owner, id) = (owner.map(str::to_string), id.to_string());
        self.call(move |conn| {
            let Some(seq) = seq_of(conn, owner.as_deref(), &id)? else { return Ok(false) };
            Ok(conn.execute("DELETE FROM completions WHERE seq = ?1", [seq])? > 0)
        })
    }

    /// Add feedback to a completion; None when there is no such completion.
    pub fn add_feedback(&self, owner: Option<&str>, f: Feedback) -> Reply<Option<Feedback>> {
        let owner = owner.map(str::to_string);
        self.call(move |conn| {
            if seq_of(conn, owner.as_deref(), &f.completion_id)?.is_none() {
                return Ok(None);
            }
            conn.execute(
                "INSERT INTO feedback (id, completion_id, created, rating, comment, correction) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![f.id, f.completion_id, f.created as i64, f.rating, f.comment, f.correction],
            )?;
            Ok(Some(f))
        })
    }

    /// Delete completions created before `cutoff` (seconds since the epoch); how many.
    pub fn purge_before(&self, cutoff: u64) -> Reply<usize> {
        self.call(move |conn| purge(conn, cutoff))
    }
}

fn seq_of(conn: &Connection, owner: Option<&str>, id: &str) -> Result<Option<i64>> {
    Ok(conn.query_row("SELECT seq FROM completions WHERE id = ?1 AND (?2 IS NULL OR owner = ?2)", params![id, owner], |r| r.get(0)).optional()?)
}

fn get(conn: &Connection, owner: Option<&str>, id: &str) -> Result<Option<Record>> {
    let mut q = Query { owner: owner.map(str::to_string), limit: 1, ..Query::default() };
    q.id = Some(id.to_string());
    Ok(query::list(conn, &q)?.records.pop())
}

fn purge(conn: &Connection, cutoff: u64) -> Result<usize> {
    Ok(conn.execute("DELETE FROM completions WHERE created < ?1", [cutoff as i64])?)
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn insert(tx: &rusqlite::Transaction, c: &Completion) -> Result<()> {
    tx.execute(
        "INSERT INTO completions (id, owner, created, model, metadata, request, response, user, prompt_tokens, completion_tokens, duration_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        params![
            c.id,
            c.owner,
            c.created as i64,
            c.model,
            Value::Object(c.metadata.clone()).to_string(),
            c.request.to_string(),
            c.response.to_string(),
            c.user,
            c.prompt_tokens as i64,
            c.completion_tokens as i64,
            c.duration_ms as i64
        ],
    )?;
    Ok(())
}

/// Commit a group of inserts in one transaction, and tell each sender.
fn commit_group(conn: &mut Connection, group: Vec<(Box<Completion>, oneshot::Sender<Result<()>>)>) {
    let outcome = (|| -> Result<Vec<Result<()>>> {
        let tx = conn.transaction()?;
        // Each insert on its own savepoint: one bad row (a duplicate id) fails alone.
        let mut results = Vec::with_capacity(group.len());
        for (c, _) in &group {
            tx.execute_batch("SAVEPOINT one")?;
            let r = insert(&tx, c);
            tx.execute_batch(if r.is_ok() { "RELEASE one" } else { "ROLLBACK TO one; RELEASE one" })?;
            results.push(r);
        }
        tx.commit()?;
        Ok(results)
    })();
    match outcome {
        Ok(results) => {
            for ((_, reply), r) in group.into_iter().zip(results) {
                let _ = reply.send(r);
            }
        }
        Err(e) => {
            let msg = e.to_string();
            for (_, reply) in group {
                let _ = reply.send(Err(Error::Invalid(format!("could not store the completion: {msg}"))));
            }
        }
    }
}

fn run(mut conn: Connection, rx: mpsc::Receiver<Command>, retention: Option<Duration>) {
    const HOUR: Duration = Duration::from_secs(3600);
    let retain = |conn: &Connection| {
        if let Some(keep) = retention {
            let _ = purge(conn, now().saturating_sub(keep.as_secs()));
        }
    };
    retain(&conn);
    let mut next_purge = std::time::Instant::now() + HOUR;
    let mut pending: Option<Command> = None;
    loop {
        let cmd = match pending.take() {
            Some(c) => c,
            None => match rx.recv_timeout(HOUR) {
                Ok(c) => c,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    retain(&conn);
                    next_purge = std::time::Instant::now() + HOUR;
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            },
        };
        match cmd {
            Command::Insert(c, reply) => {
                let mut group = vec![(c, reply)];
                while group.len() < GROUP {
                    match rx.try_recv() {
                        Ok(Command::Insert(c, reply)) => group.push((c, reply)),
                        Ok(other) => {
                            pending = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                commit_group(&mut conn, group);
            }
            Command::Run(job) => job(&mut conn),
        }
        if std::time::Instant::now() >= next_purge {
            retain(&conn);
            next_purge = std::time::Instant::now() + HOUR;
        }
    }
    // Fold the log back into the database file on a clean stop.
    let _ = conn.pragma_update(None, "wal_checkpoint", "TRUNCATE");
}

/// Check `metadata` as OpenAI does: at most 16 pairs, keys up to 64 characters, string values
/// up to 512. Err says what is wrong.
pub fn check_metadata(metadata: &Value) -> std::result::Result<Map<String, Value>, String> {
    let map = match metadata {
        Value::Null => return Ok(Map::new()),
        Value::Object(m) => m,
        _ => return Err("metadata must be an object of string keys and string values".into()),
    };
    if map.len() > 16 {
        return Err(format!("metadata may have at most 16 keys, got {}", map.len()));
    }
    for (k, v) in map {
        if k.is_empty() || k.chars().count() > 64 {
            return Err(format!("metadata keys must be 1 to 64 characters long, got {:?}", truncate(k, 80)));
        }
        match v {
            Value::String(s) if s.chars().count() <= 512 => {}
            Value::String(_) => return Err(format!("metadata[{k:?}] is longer than 512 characters")),
            _ => return Err(format!("metadata[{k:?}] must be a string")),
        }
    }
    Ok(map.clone())
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}
