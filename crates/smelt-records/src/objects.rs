//! Other API objects kept as JSON documents: evals, their runs and output items. Each has an
//! id, a kind, an optional parent (a run's eval), an owner, and its body.

use crate::{Records, Reply};
use rusqlite::{params, OptionalExtension};
use serde_json::Value;

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS objects (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    parent TEXT,
    owner TEXT NOT NULL,
    created INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS objects_by_parent ON objects (kind, parent, owner, seq);
";

/// A listing of objects of one kind (and parent): `after` an id, newest first or not.
#[derive(Clone, Debug, Default)]
pub struct ObjectQuery {
    pub kind: String,
    pub parent: Option<String>,
    pub owner: Option<String>,
    pub after: Option<String>,
    pub limit: usize,
    pub descending: bool,
}

impl Records {
    /// Store an object (replacing its body when the id exists).
    pub fn put_object(&self, kind: &str, id: &str, parent: Option<&str>, owner: &str, created: u64, body: &Value) -> Reply<()> {
        let (kind, id, parent, owner, body) = (kind.to_string(), id.to_string(), parent.map(str::to_string), owner.to_string(), body.to_string());
        self.call(move |conn| {
            conn.execute(
                "INSERT INTO objects (id, kind, parent, owner, created, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (id) DO UPDATE SET body = excluded.body",
                params![id, kind, parent, owner, created as i64, body],
            )?;
            Ok(())
        })
    }

    /// Replace an existing object's body; false (and nothing written) when it is gone.
    pub fn update_object(&self, id: &str, body: &Value) -> Reply<bool> {
        let (id, body) = (id.to_string(), body.to_string());
        self.call(move |conn| Ok(conn.execute("UPDATE objects SET body = ?2 WHERE id = ?1", params![id, body])? > 0))
    }

    /// Store a child object only while its parent exists; false when the parent is gone.
    pub fn put_child(&self, kind: &str, id: &str, parent: &str, owner: &str, created: u64, body: &Value) -> Reply<bool> {
        let (kind, id, parent, owner, body) = (kind.to_string(), id.to_string(), parent.to_string(), owner.to_string(), body.to_string());
        self.call(move |conn| {
            let n = conn.execute(
                "INSERT INTO objects (id, kind, parent, owner, created, body) SELECT ?1, ?2, ?3, ?4, ?5, ?6 WHERE EXISTS (SELECT 1 FROM objects WHERE id = ?3)
                 ON CONFLICT (id) DO UPDATE SET body = excluded.body",
                params![id, kind, parent, owner, created as i64, body],
            )?;
            Ok(n > 0)
        })
    }

    pub fn get_object(&self, kind: &str, owner: Option<&str>, id: &str) -> Reply<Option<Value>> {
        let (kind, owner, id) = (kind.to_string(), owner.map(str::to_string), id.to_string());
        self.call(move |conn| {
            let body: Option<String> = conn
                .query_row("SELECT body FROM objects WHERE id = ?1 AND kind = ?2 AND (?3 IS NULL OR owner = ?3)", params![id, kind, owner], |r| r.get(0))
                .optional()?;
            Ok(body.map(|b| serde_json::from_str(&b).unwrap_or(Value::Null)))
        })
    }

    /// One page of objects, and whether more follow.
    pub fn list_objects(&self, q: ObjectQuery) -> Reply<(Vec<Value>, bool)> {
        self.call(move |conn| {
            let after: Option<i64> = match &q.after {
                Some(a) => Some(
                    conn.query_row(
                        "SELECT seq FROM objects WHERE id = ?1 AND kind = ?2 AND (?3 IS NULL OR parent = ?3) AND (?4 IS NULL OR owner = ?4)",
                        params![a, q.kind, q.parent, q.owner],
                        |r| r.get(0),
                    )
                        .optional()?
                        .ok_or_else(|| crate::Error::Invalid(format!("no object {a:?} to list after")))?,
                ),
                None => None,
            };
            let order = if q.descending { "DESC" } else { "ASC" };
            let cmp = if q.descending { "<" } else { ">" };
            let sql = format!(
                "SELECT body FROM objects WHERE kind = ?1 AND (?2 IS NULL OR parent = ?2) AND (?3 IS NULL OR owner = ?3) AND (?4 IS NULL OR seq {cmp} ?4) ORDER BY seq {order} LIMIT ?5"
            );
            let limit = q.limit.max(1);
            let mut stmt = conn.prepare(&sql)?;
            let mut rows: Vec<Value> = stmt
                .query_map(params![q.kind, q.parent, q.owner, after, (limit + 1) as i64], |r| r.get::<_, String>(0))?
                .map(|b| b.map(|b| serde_json::from_str(&b).unwrap_or(Value::Null)))
                .collect::<rusqlite::Result<_>>()?;
            let more = rows.len() > limit;
            rows.truncate(limit);
            Ok((rows, more))
        })
    }

    /// Delete an object and everything under it (its children, theirs, ...); false when there
    /// was no such object.
    pub fn delete_object(&self, kind: &str, owner: Option<&str>, id: &str) -> Reply<bool> {
        let (kind, owner, id) = (kind.to_string(), owner.map(str::to_string), id.to_string());
        self.call(move |conn| {
            let tx = conn.transaction()?;
            let n = tx.execute("DELETE FROM objects WHERE id = ?1 AND kind = ?2 AND (?3 IS NULL OR owner = ?3)", params![id, kind, owner])?;
            if n > 0 {
                let mut parents = vec![id];
                while let Some(p) = parents.pop() {
                    let children: Vec<String> = tx.prepare("SELECT id FROM objects WHERE parent = ?1")?.query_map([&p], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
                    tx.execute("DELETE FROM objects WHERE parent = ?1", [&p])?;
                    parents.extend(children);
                }
            }
            tx.commit()?;
            Ok(n > 0)
        })
    }
}
