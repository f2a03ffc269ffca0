//! API keys and their limits: who may call, how often, how much, how many at once.
//!
//! A key file has one key per line, optionally followed by `name=NAME`, `rpm=N` (requests per
//! minute), `tpm=N` (prompt + generated tokens per minute), `concurrency=N` (requests in
//! flight) and `guard=RULES` (guardrails for this key, replacing the server's `--guard`); `#`
//! starts a comment. Limits are per key, so one key cannot starve the others:
//! a key over its limit gets 429 with `Retry-After`, the others are not affected.
//!
//! Rates are token buckets refilled continuously (a full minute's allowance can be spent at
//! once, then it comes back at rate/60 per second). Tokens are charged after the fact, when a
//! request's usage is known; a key that ran into debt waits until its bucket is positive again.

use crate::error::ApiError;
use axum::http::{HeaderValue, StatusCode};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Debug, Clone, PartialEq)]
pub struct KeySpec {
    pub secret: String,
    pub name: String,
    pub rpm: Option<u32>,
    pub tpm: Option<u64>,
    pub concurrency: Option<u32>,
    /// Guardrails for this key's chat requests (instead of the server's).
    pub guard: Option<smelt_guard::Policy>,
}

impl KeySpec {
    /// A key without limits (`--api-key`).
    pub fn plain(secret: impl Into<String>) -> KeySpec {
        KeySpec { secret: secret.into(), name: "default".into(), rpm: None, tpm: None, concurrency: None, guard: None }
    }
}

/// Parse a key file (see the module comment). Errors name the line.
pub fn parse_key_file(text: &str) -> Result<Vec<KeySpec>, String> {
    let mut keys: Vec<KeySpec> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let at = |m: String| format!("line {}: {m}", i + 1);
        let mut words = line.split_whitespace();
        let secret = words.next().unwrap_or_default().to_string();
        if secret.contains('=') {
            return Err(at(format!("expected the key first, then options; found {secret:?}")));
        }
        // An unnamed key is named after its secret (not its line), so that the records it owns
        // stay its own when the file is edited.
        let mut spec = KeySpec { name: format!("key-{:08x}", fnv1a(secret.as_bytes()) >> 32), ..KeySpec::plain(secret) };
        for w in words {
            let (k, v) = w.split_once('=').ok_or_else(|| at(format!("expected name=VALUE, found {w:?}")))?;
            let number = || v.parse::<u64>().ok().filter(|&n| n > 0).ok_or_else(|| at(format!("{k} must be a positive whole number, found {v:?}")));
            match k {
                "name" if !v.is_empty() => spec.name = v.to_string(),
                "rpm" => spec.rpm = Some(number()?.min(u32::MAX as u64) as u32),
                "tpm" => spec.tpm = Some(number()?),
                "concurrency" => spec.concurrency = Some(number()?.min(u32::MAX as u64) as u32),
                "guard" => spec.guard = Some(smelt_guard::parse_policy(v).map_err(at)?),
                _ => return Err(at(format!("unknown option {k:?} (expected name, rpm, tpm, concurrency or guard)"))),
            }
        }
        if keys.iter().any(|k| k.secret == spec.secret) {
            return Err(at("this key appears twice".into()));
        }
        if keys.iter().any(|k| k.name == spec.name) {
            return Err(at(format!("the name {:?} is used twice", spec.name)));
        }
        keys.push(spec);
    }
    if keys.is_empty() {
        return Err("no keys in the file".into());
    }
    Ok(keys)
}

/// FNV-1a: a stable hash (the same in every build), for naming unnamed keys.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// A continuously refilled allowance of `per_minute`, which may go negative (debt).
#[derive(Debug)]
struct Bucket {
    per_minute: f64,
    level: f64,
    at: Instant,
}

impl Bucket {
    fn new(per_minute: f64) -> Bucket {
        Bucket { per_minute, level: per_minute, at: Instant::now() }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + dt * self.per_minute / 60.0).min(self.per_minute);
        self.at = now;
    }

    /// Seconds until the level reaches `need`.
    fn wait_for(&self, need: f64) -> f64 {
        ((need - self.level) * 60.0 / self.per_minute).max(0.0)
    }
}

#[derive(Debug)]
struct KeyState {
    spec: KeySpec,
    requests: Option<Mutex<Bucket>>,
    tokens: Option<Mutex<Bucket>>,
    in_flight: AtomicU32,
}

/// The keys a server accepts, with their live counters.
#[derive(Debug, Clone)]
pub struct Keys(Arc<Vec<KeyState>>);

/// What a request holds while it runs: its key's name, a concurrency slot (given back on
/// drop), the account its tokens are charged to, and the count of those tokens (for the
/// request log).
#[derive(Debug, Clone)]
pub struct Meter(Option<Arc<MeterInner>>, Arc<std::sync::atomic::AtomicUsize>);

#[derive(Debug)]
struct MeterInner {
    keys: Keys,
    index: usize,
}

impl Drop for MeterInner {
    fn drop(&mut self) {
        self.keys.0[self.index].in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Meter {
    /// A meter that charges nobody (no keys configured).
    pub fn none() -> Meter {
        Meter(None, Default::default())
    }

    /// The name of the key this request was admitted with.
    pub fn name(&self) -> Option<&str> {
        self.0.as_ref().map(|m| m.keys.0[m.index].spec.name.as_str())
    }

    /// Tokens charged so far (prompt and generated).
    pub fn used(&self) -> usize {
        self.1.load(Ordering::Relaxed)
    }

    /// The guardrails of the key this request was admitted with, when it has its own.
    pub fn guard(&self) -> Option<&smelt_guard::Policy> {
        self.0.as_ref().and_then(|m| m.keys.0[m.index].spec.guard.as_ref())
    }

    /// Charge tokens a request used to its key's per-minute allowance.
    pub fn charge(&self, tokens: usize) {
        self.1.fetch_add(tokens, Ordering::Relaxed);
        let Some(m) = &self.0 else { return };
        if let Some(b) = &m.keys.0[m.index].tokens {
            let mut b = b.lock().unwrap_or_else(|e| e.into_inner());
            b.refill(Instant::now());
            b.level -= tokens as f64;
        }
    }
}

/// Tokens a streamed request has used so far, charged when the stream ends (or the client
/// leaves).
pub struct Bill {
    meter: Meter,
    pub tokens: usize,
}

impl Meter {
    pub fn bill(&self, tokens: usize) -> Bill {
        Bill { meter: self.clone(), tokens }
    }
}

impl Drop for Bill {
    fn drop(&mut self) {
        self.meter.charge(self.tokens);
    }
}

fn rate_limited(message: String, retry_after: f64) -> ApiError {
    ApiError { retry_after: Some(retry_after.ceil().clamp(1.0, 3600.0) as u32), ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message) }.code("rate_limit_exceeded")
}

impl Keys {
    pub fn new(specs: Vec<KeySpec>) -> Keys {
        Keys(Arc::new(
            specs
                .into_iter()
                .map(|spec| KeyState {
                    requests: spec.rpm.map(|n| Mutex::new(Bucket::new(n as f64))),
                    tokens: spec.tpm.map(|n| Mutex::new(Bucket::new(n as f64))),
                    in_flight: AtomicU32::new(0),
                    spec,
                })
                .collect(),
        ))
    }

    /// Which key an `Authorization` header value carries, compared in constant time against
    /// every key (so timing says nothing about which keys exist).
    fn find(&self, header: Option<&HeaderValue>) -> Option<usize> {
        let given = header.map(|v| v.as_bytes()).unwrap_or_default();
        // The scheme is case-insensitive (RFC 9110); the token is taken as is.
        let token = match given.iter().position(|&b| b == b' ') {
            Some(i) if given[..i].eq_ignore_ascii_case(b"bearer") => trim(&given[i + 1..]),
            _ => &[][..],
        };
        let mut found = None;
        for (i, k) in self.0.iter().enumerate() {
            if same_secret(token, k.spec.secret.as_bytes()) && !token.is_empty() {
                found = Some(i);
            }
        }
        found
    }

    /// Admit a request carrying `header`, or say why not (401 or 429).
    pub fn admit(&self, header: Option<&HeaderValue>) -> Result<Meter, ApiError> {
        let i = self.find(header).ok_or_else(ApiError::unauthorized)?;
        let k = &self.0[i];
        let now = Instant::now();
        if let Some(b) = &k.tokens {
            let mut b = b.lock().unwrap_or_else(|e| e.into_inner());
            b.refill(now);
            if b.level <= 0.0 {
                let wait = b.wait_for(1.0);
                return Err(rate_limited(format!("Key '{}' is over its limit of {} tokens per minute; retry in {:.0} s", k.spec.name, b.per_minute, wait.ceil()), wait));
            }
        }
        let held = k.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        let meter = Meter(Some(Arc::new(MeterInner { keys: self.clone(), index: i })), Default::default());
        if let Some(limit) = k.spec.concurrency {
            if held > limit {
                return Err(rate_limited(format!("Key '{}' already has {limit} requests in flight (its concurrency limit); retry when one finishes", k.spec.name), 1.0));
            }
        }
        if let Some(b) = &k.requests {
            let mut b = b.lock().unwrap_or_else(|e| e.into_inner());
            b.refill(now);
            if b.level < 1.0 {
                let wait = b.wait_for(1.0);
                return Err(rate_limited(format!("Key '{}' is over its limit of {} requests per minute; retry in {:.0} s", k.spec.name, b.per_minute, wait.ceil()), wait));
            }
            b.level -= 1.0;
        }
        Ok(meter)
    }
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Constant-time comparison, so response timing says nothing about the key.
pub(crate) fn same_secret(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | (a.len() != b.len()) as u8;
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(secret: &str) -> HeaderValue {
        HeaderValue::from_str(&format!("Bearer {secret}")).unwrap()
    }

    #[test]
    fn secrets_compare_exactly() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
        assert!(!same_secret(b"", b"a"));
        assert!(same_secret(b"", b""));
    }

    #[test]
    fn key_files_parse_with_names_and_limits() {
        let keys = parse_key_file("# team keys\nsk-a name=alice rpm=60 tpm=1000\n\nsk-b concurrency=2 # batch jobs\nsk-c\n").unwrap();
        assert_eq!(keys.len(), 3);
        assert_eq!(keys[0], KeySpec { secret: "sk-a".into(), name: "alice".into(), rpm: Some(60), tpm: Some(1000), concurrency: None, guard: None });
        assert_eq!(keys[1].concurrency, Some(2));
        assert!(keys[1].name.starts_with("key-") && keys[1].name != keys[2].name);
        // Named after the secret: the same whatever line it is on.
        assert_eq!(parse_key_file("sk-b\n").unwrap()[0].name, keys[1].name);
        assert_eq!((keys[2].secret.as_str(), keys[2].rpm), ("sk-c", None));
        // A key's own guardrails; a bad rule names its line.
        let keys = parse_key_file("sk-a guard=input:pii=block,output:secrets=redact\n").unwrap();
        assert_eq!(keys[0].guard, Some(smelt_guard::parse_policy("input:pii=block,output:secrets=redact").unwrap()));
        assert!(parse_key_file("sk-a\nsk-b guard=input:faces=block\n").unwrap_err().starts_with("line 2: guard rule"));
        for (bad, says) in [("sk-a rpm=0", "line 1: rpm must be a positive"), ("sk-a\nsk-a", "line 2: this key appears twice"), ("sk-a foo=1", "unknown option"), ("rpm=3", "expected the key first"), ("# only\n", "no keys"), ("sk-a name=x\nsk-b name=x", "used twice"), ("sk-a rpm", "expected name=VALUE")] {
            let e = parse_key_file(bad).unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_keys_are_told_apart() {
        let keys = Keys::new(vec![KeySpec::plain("sk-1"), KeySpec { name: "b".into(), ..KeySpec::plain("sk-2") }]);
        let h = |s: &str| HeaderValue::from_str(s).unwrap();
        assert_eq!(keys.admit(Some(&h("bearer sk-2"))).unwrap().name(), Some("b"));
        assert_eq!(keys.admit(Some(&h("BEARER  sk-1 "))).unwrap().name(), Some("default"));
        for bad in ["Bearer sk-3", "Basic sk-1", "sk-1", "Bearer ", ""] {
            assert_eq!(keys.admit(Some(&h(bad))).unwrap_err().status, StatusCode::UNAUTHORIZED, "{bad:?}");
        }
        // Bytes that are not text still get a proper 401.
        let raw = HeaderValue::from_bytes(b"Bearer sk-\xff").unwrap();
        assert_eq!(keys.admit(Some(&raw)).unwrap_err().status, StatusCode::UNAUTHORIZED);
        assert_eq!(keys.admit(None).unwrap_err().status, StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn limits_apply_per_key() {
        let keys = Keys::new(vec![
            KeySpec { rpm: Some(2), ..KeySpec::plain("sk-r") },
            KeySpec { name: "c".into(), concurrency: Some(1), ..KeySpec::plain("sk-c") },
            KeySpec { name: "t".into(), tpm: Some(100), ..KeySpec::plain("sk-t") },
        ]);
        let h = |s: &str| bearer(s);
        // Requests per minute: two, then 429 with a wait of about 30 s.
        assert!(keys.admit(Some(&h("sk-r"))).is_ok());
        assert!(keys.admit(Some(&h("sk-r"))).is_ok());
        let e = keys.admit(Some(&h("sk-r"))).unwrap_err();
        assert_eq!((e.status, e.code), (StatusCode::TOO_MANY_REQUESTS, Some("rate_limit_exceeded")));
        assert!((29..=30).contains(&e.retry_after.unwrap()), "{:?}", e.retry_after);
        // Concurrency: a second request while the first is held is refused; after it ends, fine.
        let first = keys.admit(Some(&h("sk-c"))).unwrap();
        let e = keys.admit(Some(&h("sk-c"))).unwrap_err();
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(e.message.contains("'c'"), "{}", e.message);
        drop(first);
        assert!(keys.admit(Some(&h("sk-c"))).is_ok());
        // Tokens per minute: charged after use; a key in debt waits.
        let m = keys.admit(Some(&h("sk-t"))).unwrap();
        m.charge(130);
        let e = keys.admit(Some(&h("sk-t"))).unwrap_err();
        assert!((18..=19).contains(&e.retry_after.unwrap()), "{:?}", e.retry_after);
        // Other keys are untouched by one key's limits.
        assert!(keys.admit(Some(&h("sk-c"))).is_ok());
    }
}
