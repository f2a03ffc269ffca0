//! Listing stored completions: filters, order and cursor pagination (`after`).

use crate::{Completion, Error, Feedback, Page, Record, Result};
use rusqlite::types::Value as Sql;
use rusqlite::{params_from_iter, Connection};
use serde_json::Value;

/// Which feedback a listed completion must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rated {
    /// Some feedback with a rating above zero.
    Good,
    /// Some feedback with a rating below zero.
    Bad,
    /// Some feedback with a corrected answer.
    Corrected,
    /// Any feedback.
    Any,
    /// No feedback.
    None,
}

impl std::str::FromStr for Rated {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Rated, String> {
        Ok(match s {
            "good" => Rated::Good,
            "bad" => Rated::Bad,
            "corrected" => Rated::Corrected,
            "any" => Rated::Any,
            "none" => Rated::None,
            _ => return Err(format!("unknown rating filter {s:?} (good, bad, corrected, any, none)")),
        })
    }
}

#[derive(Debug, Clone, Default)]
pub struct Query {
    /// Only this owner's completions; None: everyone's.
    pub owner: Option<String>,
    /// Only the completion with this id.
    pub id: Option<String>,
    pub model: Option<String>,
    /// Pairs the metadata must all contain.
    pub metadata: Vec<(String, String)>,
    /// Start after this completion (in the listing's order).
    pub after: Option<String>,
    pub limit: usize,
    /// Newest first.
    pub descending: bool,
    pub rated: Option<Rated>,
}

pub(crate) fn list(conn: &Connection, q: &Query) -> Result<Page> {
    let mut sql = String::from(
        "SELECT seq, id, owner, created, model, metadata, request, response, user, prompt_tokens, completion_tokens, duration_ms FROM completions c WHERE 1",
    );
    let mut args: Vec<Sql> = Vec::new();
    // A clause with one '?' for the value `v`.
    let arg = |sql: &mut String, args: &mut Vec<Sql>, clause: &str, v: Sql| {
        args.push(v);
        sql.push_str(&clause.replace('?', &format!("?{}", args.len())));
    };
    if let Some(owner) = &q.owner {
        arg(&mut sql, &mut args, " AND owner = ?", Sql::Text(owner.clone()));
    }
    if let Some(id) = &q.id {
        arg(&mut sql, &mut args, " AND id = ?", Sql::Text(id.clone()));
    }
    if let Some(model) = &q.model {
        arg(&mut sql, &mut args, " AND model = ?", Sql::Text(model.clone()));
    }
    for (k, v) in &q.metadata {
        // Keys compared as values (json_each), so any character in them is safe.
        args.push(Sql::Text(k.clone()));
        args.push(Sql::Text(v.clone()));
        sql.push_str(&format!(" AND EXISTS (SELECT 1 FROM json_each(c.metadata) m WHERE m.key = ?{} AND m.value = ?{})", args.len() - 1, args.len()));
    }
    if let Some(after) = &q.after {
        let seq: Option<i64> = conn
            .query_row("SELECT seq FROM completions WHERE id = ?1 AND (?2 IS NULL OR owner = ?2)", rusqlite::params![after, q.owner], |r| r.get(0))
            .ok();
        let seq = seq.ok_or_else(|| Error::Invalid(format!("no stored completion {after:?} to list after")))?;
        arg(&mut sql, &mut args, if q.descending { " AND seq < ?" } else { " AND seq > ?" }, Sql::Integer(seq));
    }
    sql.push_str(match q.rated {
        None => "",
        Some(Rated::Good) => " AND EXISTS (SELECT 1 FROM feedback f WHERE f.completion_id = c.id AND f.rating > 0)",
        Some(Rated::Bad) => " AND EXISTS (SELECT 1 FROM feedback f WHERE f.completion_id = c.id AND f.rating < 0)",
        Some(Rated::Corrected) => " AND EXISTS (SELECT 1 FROM feedback f WHERE f.completion_id = c.id AND f.correction IS NOT NULL)",
        Some(Rated::Any) => " AND EXISTS (SELECT 1 FROM feedback f WHERE f.completion_id = c.id)",
        Some(Rated::None) => " AND NOT EXISTS (SELECT 1 FROM feedback f WHERE f.completion_id = c.id)",
    });
    sql.push_str(if q.descending { " ORDER BY seq DESC" } else { " ORDER BY seq ASC" });
    let limit = q.limit.max(1);
    sql.push_str(&format!(" LIMIT {}", limit + 1));
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(params_from_iter(args.iter()), |r| {
        let json = |i: usize| -> rusqlite::Result<Value> {
            let text: String = r.get(i)?;
            Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
        };
        let metadata = match json(5)? {
            Value::Object(m) => m,
            _ => Default::default(),
        };
        Ok(Completion {
            id: r.get(1)?,
            owner: r.get(2)?,
            created: r.get::<_, i64>(3)? as u64,
            model: r.get(4)?,
            metadata,
            request: json(6)?,
            response: json(7)?,
            user: r.get(8)?,
            prompt_tokens: r.get::<_, i64>(9)? as u64,
            completion_tokens: r.get::<_, i64>(10)? as u64,
            duration_ms: r.get::<_, i64>(11)? as u64,
        })
    })?;
    let mut completions = rows.collect::<rusqlite::Result<Vec<_>>>()?;
    let has_more = completions.len() > limit;
    completions.truncate(limit);
    let mut fb = conn.prepare("SELECT id, completion_id, created, rating, comment, correction FROM feedback WHERE completion_id = ?1 ORDER BY seq")?;
    let mut records = Vec::with_capacity(completions.len());
    for completion in completions {
        let feedback = fb
            .query_map([&completion.id], |r| {
                Ok(Feedback { id: r.get(0)?, completion_id: r.get(1)?, created: r.get::<_, i64>(2)? as u64, rating: r.get(3)?, comment: r.get(4)?, correction: r.get(5)? })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        records.push(Record { completion, feedback });
    }
    Ok(Page { records, has_more })
}
