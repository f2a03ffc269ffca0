//! Prometheus metrics, rendered as text at GET /metrics.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram { bounds, counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(), sum_micros: AtomicU64::new(0), count: AtomicU64::new(0) }
    }

    pub fn observe(&self, seconds: f64) {
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            if seconds <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_micros.fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", c.load(Ordering::Relaxed));
        }
        let n = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {n}");
    }
}

const TTFT_BOUNDS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
const ITL_BOUNDS: &[f64] = &[0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0];

pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    pub ttft: Histogram,
    pub itl: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics { requests: Mutex::new(BTreeMap::new()), ttft: Histogram::new(TTFT_BOUNDS), itl: Histogram::new(ITL_BOUNDS) }
    }
}

/// The routes counted by name; anything else is "other" (keeps label values bounded).
pub fn route_label(path: &str) -> &'static str {
    match path {
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/completions" => "/v1/completions",
        "/v1/embeddings" => "/v1/embeddings",
        "/v1/models" => "/v1/models",
        "/tokenize" => "/tokenize",
        "/detokenize" => "/detokenize",
        "/health" => "/health",
        "/metrics" => "/metrics",
        "/v1/adapters" => "/v1/adapters",
        p if p.starts_with("/v1/models/") => "/v1/models/{id}",
        p if p.starts_with("/v1/adapters/") => "/v1/adapters/{id}",
        "/v1/files" => "/v1/files",
        p if p.starts_with("/v1/files/") => "/v1/files/{id}",
        "/v1/fine_tuning/jobs" => "/v1/fine_tuning/jobs",
        p if p.starts_with("/v1/fine_tuning/jobs/") => "/v1/fine_tuning/jobs/{id}",
        _ => "other",
    }
}

impl Metrics {
    pub fn count(&self, route: &'static str, status: u16) {
        *self.requests.lock().unwrap_or_else(|e| e.into_inner()).entry((route, status)).or_default() += 1;
    }

    pub fn render_requests(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP smelt_requests_total HTTP requests by route and status.\n# TYPE smelt_requests_total counter");
        for ((route, status), n) in self.requests.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "smelt_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}");
        }
        self.ttft.render("smelt_time_to_first_token_seconds", "Time from request to first generated token.", out);
        self.itl.render("smelt_inter_token_latency_seconds", "Time between consecutive generated tokens of a request.", out);
    }
}
