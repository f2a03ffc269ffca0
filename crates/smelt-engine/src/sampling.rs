//! Token sampling: logit bias, repetition/presence/frequency penalties, top-k, top-p, min-p,
//! temperature — applied in that order, as llama.cpp's default chain does — then a draw from a
//! seeded generator. Temperature 0 is greedy.

use crate::rng::Rng;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy (argmax after bias and penalties).
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 = off.
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p; 1 = off.
    pub top_p: f32,
    /// Drop tokens less likely than min_p × the most likely one; 0 = off.
    pub min_p: f32,
    /// Divide positive (multiply negative) logits of recent tokens; 1 = off.
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token seen recently.
    pub presence_penalty: f32,
    /// Subtracted per occurrence of a token seen recently.
    pub frequency_penalty: f32,
    /// How many recent tokens the penalties look at (prompt included); 0 = all.
    pub penalty_last_n: usize,
    /// Added to the logits of the given tokens (-inf bans a token).
    pub logit_bias: Vec<(u32, f32)>,
    /// None = a random seed.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    /// llama.cpp's defaults.
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            penalty_last_n: 64,
            logit_bias: Vec::new(),
            seed: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams { temperature: 0.0, ..Default::default() }
    }

    /// Reject values that make no sense, naming the parameter.
    pub fn validate(&self, n_vocab: usize) -> Result<(), String> {
        let finite = |name: &str, v: f32| if v.is_finite() { Ok(()) } else { Err(format!("{name} must be a finite number")) };
        finite("temperature", self.temperature)?;
        if self.temperature < 0.0 {
            return Err(format!("temperature must be >= 0, got {}", self.temperature));
        }
        finite("top_p", self.top_p)?;
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        finite("min_p", self.min_p)?;
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        finite("repetition_penalty", self.repetition_penalty)?;
        if self.repetition_penalty <= 0.0 {
            return Err(format!("repetition_penalty must be > 0, got {}", self.repetition_penalty));
        }
        finite("presence_penalty", self.presence_penalty)?;
        finite("frequency_penalty", self.frequency_penalty)?;
        for &(id, b) in &self.logit_bias {
            if id as usize >= n_vocab {
                return Err(format!("logit_bias names token {id}, outside the vocabulary of {n_vocab}"));
            }
            if b.is_nan() || b == f32::INFINITY {
                return Err(format!("logit_bias for token {id} must be a number or -inf"));
            }
        }
        Ok(())
    }
}

pub struct Sampler {
    pub params: SamplingParams,
    rng: Rng,
    candidates: Vec<(u32, f32)>,
    counts: std::collections::HashMap<u32, u32>,
    /// Per-token weights of the unsorted draw (reused between tokens).
    weights: Vec<f32>,
    /// The logits with bias and penalties applied, when a request has any (reused).
    adjusted: Vec<f32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        let seed = params.seed.unwrap_or_else(|| {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
            t ^ (std::process::id() as u64) << 32
        });
        Sampler { params, rng: Rng::new(seed), candidates: Vec::new(), counts: Default::default(), weights: Vec::new(), adjusted: Vec::new() }
    }

    /// Pick the next token from `logits` (after bias and penalties, applied to a copy), given
    /// the sequence so far (`history`: prompt and generated tokens).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let mut adjusted = std::mem::take(&mut self.adjusted);
        let id = if self.adjust(logits, history, &mut adjusted) { self.pick(&adjusted) } else { self.pick(logits) };
        self.adjusted = adjusted;
        id
    }

    /// Write `logits` with the logit bias and the repetition penalties applied to `out`; false
    /// (nothing written) when the request has neither, so the common case copies nothing.
    fn adjust(&mut self, logits: &[f32], history: &[u32], out: &mut Vec<f32>) -> bool {
        let p = &self.params;
        let penalize = p.repetition_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0;
        if p.logit_bias.is_empty() && !penalize {
            return false;
        }
        out.clear();
        out.extend_from_slice(logits);
        for &(id, b) in &p.logit_bias {
            if let Some(l) = out.get_mut(id as usize) {
                *l += b;
            }
        }
        if penalize {
            let recent = if p.penalty_last_n == 0 { history } else { &history[history.len().saturating_sub(p.penalty_last_n)..] };
            self.counts.clear();
            for &t in recent {
                *self.counts.entry(t).or_default() += 1;
            }
            for (&t, &c) in &self.counts {
                if let Some(l) = out.get_mut(t as usize) {
                    if *l > 0.0 {
                        *l /= p.repetition_penalty;
                    } else {
                        *l *= p.repetition_penalty;
                    }
                    *l -= c as f32 * p.frequency_penalty + p.presence_penalty;
                }
            }
        }
        true
    }

    /// Pick from logits that already carry bias and penalties.
    fn pick(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature <= 0.0 {
            return argmax(logits);
        }
        if p.top_p >= 1.0 && (p.top_k == 0 || p.top_k >= logits.len()) {
            return self.draw_whole(logits);
        }

        let cands = &mut self.candidates;
        let by_logit_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        // top-k, then sort what is left (for top-p we need the whole distribution in order, but
        // only as far as the cut: sort a generous head first and widen if it is not enough).
        top_k_candidates(logits, p.top_k, cands);
        if cands.is_empty() {
            return argmax(logits);
        }
        sort_head(cands, p.top_p, by_logit_desc);

        let max = cands[0].1;
        let mut probs: Vec<f64> = cands.iter().map(|c| ((c.1 - max) as f64).exp()).collect();
        let total: f64 = probs.iter().sum();
        // top-p over the sorted candidates.
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = cands.len();
            for (i, pr) in probs.iter().enumerate() {
                cum += pr / total;
                if cum >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            cands.truncate(keep);
            probs.truncate(keep);
        }
        // min-p relative to the most likely token.
        if p.min_p > 0.0 {
            let keep = probs.iter().take_while(|&&pr| pr >= p.min_p as f64 * probs[0]).count().max(1);
            cands.truncate(keep);
        }
        // Temperature, then draw.
        let inv_t = 1.0 / p.temperature as f64;
        let weights: Vec<f64> = cands.iter().map(|c| (((c.1 - max) as f64) * inv_t).exp()).collect();
        let sum: f64 = weights.iter().sum();
        let mut r = self.rng.uniform() * sum;
        for (c, w) in cands.iter().zip(&weights) {
            if r < *w {
                return c.0;
            }
            r -= w;
        }
        cands[cands.len() - 1].0
    }
}

impl Sampler {
    /// Without top-k or top-p nothing needs sorting: weigh every token (min-p and temperature
    /// applied) in one vectorized pass and draw. This is the OpenAI API's default sampling.
    fn draw_whole(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let max = max_value(logits);
        if !max.is_finite() {
            // Every logit -inf or NaN, or some +inf (which takes all the probability).
            return argmax(logits);
        }
        // min-p: keep tokens at least min_p times as likely as the best (before temperature).
        let floor = if p.min_p > 0.0 { max + p.min_p.ln() } else { f32::NEG_INFINITY };
        self.weights.resize(logits.len(), 0.0);
        let total = smelt_kernels::ops::exp_weights(logits, max, 1.0 / p.temperature, floor, &mut self.weights);
        let r = self.rng.uniform() * total;
        draw(&self.weights, r).map_or_else(|| argmax(logits), |i| i as u32)
    }
}

/// Tokens per block of the draw's first pass.
const DRAW_BLOCK: usize = 1024;

/// The token where the running sum of `weights` first exceeds `r` (the last token with weight,
/// if rounding leaves `r` past the end); None when no token has weight.
///
/// Walking a 262,144-token vocabulary one subtraction at a time is a chain of dependent
/// floating-point operations (~0.3 ms); this skips whole blocks by their sums (added in four
/// independent lanes) and walks only inside the block where the draw lands.
fn draw(weights: &[f32], mut r: f64) -> Option<usize> {
    for (b, block) in weights.chunks(DRAW_BLOCK).enumerate() {
        let mut lanes = [0f64; 4];
        let mut quads = block.chunks_exact(4);
        for q in &mut quads {
            for (l, &w) in lanes.iter_mut().zip(q) {
                *l += w as f64;
            }
        }
        let sum = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]) + quads.remainder().iter().map(|&w| w as f64).sum::<f64>();
        if sum <= 0.0 {
            continue;
        }
        if r >= sum {
            r -= sum;
            continue;
        }
        // Inside this block (or, if rounding says otherwise, carry the rest to the next).
        for (i, &w) in block.iter().enumerate() {
            if w > 0.0 {
                if r < w as f64 {
                    return Some(b * DRAW_BLOCK + i);
                }
                r -= w as f64;
            }
        }
    }
    weights.iter().rposition(|&w| w > 0.0)
}

/// Sort candidates by descending logit, far enough that a top-p cut lies inside the sorted part.
fn sort_head(cands: &mut [(u32, f32)], top_p: f32, cmp: impl Fn(&(u32, f32), &(u32, f32)) -> std::cmp::Ordering + Copy) {
    const HEAD: usize = 1024;
    if cands.len() > HEAD && top_p < 1.0 {
        cands.select_nth_unstable_by(HEAD - 1, cmp);
        cands[..HEAD].sort_unstable_by(cmp);
        let max = cands[0].1;
        let head: f64 = cands[..HEAD].iter().map(|c| ((c.1 - max) as f64).exp()).sum();
        let tail: f64 = cands[HEAD..].iter().map(|c| ((c.1 - max) as f64).exp()).sum();
        if head / (head + tail) >= top_p as f64 {
            return;
        }
    }
    cands.sort_unstable_by(cmp);
}

/// The finite logits (no NaN) among the `k` largest, ties to the lower index — exactly the first
/// `k` under (logit descending, index ascending); every finite logit when `k` is 0 or larger
/// than their count. One pass that keeps only values above the current k-th best, so a large
/// vocabulary costs a scan, not a selection over all of it.
fn top_k_candidates(logits: &[f32], k: usize, out: &mut Vec<(u32, f32)>) {
    let by_logit_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    out.clear();
    if k == 0 || k >= logits.len() {
        out.extend(logits.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, &l)| (i as u32, l)));
        return;
    }
    // A later index with the k-th best value ranks below it, so only strictly larger values
    // can still enter once k are held.
    let mut floor = f32::NEG_INFINITY;
    for (i, &l) in logits.iter().enumerate() {
        if l.is_finite() && l.total_cmp(&floor).is_gt() {
            out.push((i as u32, l));
            if out.len() >= 2 * k + 256 {
                out.select_nth_unstable_by(k - 1, by_logit_desc);
                out.truncate(k);
                floor = out[k - 1].1;
            }
        }
    }
    if out.len() > k {
        out.select_nth_unstable_by(k - 1, by_logit_desc);
        out.truncate(k);
    }
}

/// The largest value, NaN ignored (-inf when there is none). Sixteen independent lanes so the
/// compiler vectorizes the scan.
pub fn max_value(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let mut best = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    for c in chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    for m in lanes {
        if m > best {
            best = m;
        }
    }
    best
}

/// Index of the largest logit (the first, on ties; NaN ignored; 0 when there is none): block
/// maxima by a vectorized scan, then a search of the first block that holds the maximum.
pub fn argmax(logits: &[f32]) -> u32 {
    const BLOCK: usize = 512;
    let (mut best, mut block) = (f32::NEG_INFINITY, 0);
    for (b, chunk) in logits.chunks(BLOCK).enumerate() {
        let m = max_value(chunk);
        if m > best {
            (best, block) = (m, b);
        }
    }
    let start = block * BLOCK;
    logits[start.min(logits.len())..].iter().position(|&l| l == best).map_or(0, |i| (start + i) as u32)
}

/// Log-softmax normalizer (log-sum-exp) of a logits row.
pub fn log_sum_exp(logits: &[f32]) -> f32 {
    smelt_kernels::ops::log_sum_exp(logits)
}

/// The `k` most likely tokens with their log-probabilities, most likely first.
pub fn top_logprobs(logits: &[f32], lse: f32, k: usize) -> Vec<(u32, f32)> {
    let k = k.min(logits.len());
    if k == 0 {
        return Vec::new();
    }
    let mut idx: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
    let cmp = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    idx.select_nth_unstable_by(k - 1, cmp);
    idx.truncate(k);
    idx.sort_unstable_by(cmp);
    idx.into_iter().map(|(i, l)| (i, l - lse)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, -1.0, 2.5]
    }

    #[test]
    fn greedy_takes_the_argmax_after_bias() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&logits(), &[]), 1);
        let mut s = Sampler::new(SamplingParams { logit_bias: vec![(1, f32::NEG_INFINITY)], ..SamplingParams::greedy() });
        assert_eq!(s.sample(&logits(), &[]), 4);
    }

    #[test]
    fn penalties_follow_llama_cpp() {
        let mut l = Vec::new();
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 2.0, presence_penalty: 0.5, frequency_penalty: 0.25, ..SamplingParams::greedy() });
        assert!(s.adjust(&logits(), &[1, 1, 3], &mut l));
        assert!(!Sampler::new(SamplingParams::greedy()).adjust(&logits(), &[1, 1, 3], &mut l));
        assert_eq!(l[1], 3.0 / 2.0 - 2.0 * 0.25 - 0.5);
        assert_eq!(l[3], -1.0 * 2.0 - 0.25 - 0.5);
        assert_eq!(l[0], 1.0);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_respects_filters() {
        let draw = |seed, top_k, top_p, min_p| {
            let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_k, top_p, min_p, seed: Some(seed), ..Default::default() });
            (0..2000).map(|_| s.sample(&logits(), &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(7, 0, 1.0, 0.0), draw(7, 0, 1.0, 0.0));
        assert_ne!(draw(7, 0, 1.0, 0.0), draw(8, 0, 1.0, 0.0));
        assert!(draw(1, 2, 1.0, 0.0).iter().all(|&t| t == 1 || t == 4));
        assert!(draw(1, 0, 1.0, 0.0).contains(&3));
        // p(1)=.48 p(4)=.29: top_p .5 keeps both; min_p .7 keeps only tokens >= .7 * p(1).
        assert!(draw(2, 0, 0.5, 0.0).iter().all(|&t| t == 1 || t == 4));
        assert!(draw(2, 0, 1.0, 0.7).iter().all(|&t| t == 1));
    }

    #[test]
    fn sampling_frequencies_follow_the_distribution() {
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, seed: Some(3), ..Default::default() });
        let n = 20000;
        let mut hits = [0usize; 5];
        for _ in 0..n {
            hits[s.sample(&logits(), &[]) as usize] += 1;
        }
        let l = logits();
        let lse = log_sum_exp(&l);
        for i in 0..5 {
            let p = ((l[i] - lse) as f64).exp();
            assert!((hits[i] as f64 / n as f64 - p).abs() < 0.015, "token {i}");
        }
    }

    #[test]
    fn unsorted_draw_follows_temperature_and_min_p() {
        // The default OpenAI sampling (no top-k/top-p) takes the unsorted path; check its
        // frequencies against the analytic distribution, and against the sorted path's.
        let l = logits();
        let (t, min_p) = (0.6f32, 0.2f32);
        let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let w: Vec<f64> = l.iter().map(|&x| if x - max >= min_p.ln() { (((x - max) / t) as f64).exp() } else { 0.0 }).collect();
        let total: f64 = w.iter().sum();
        let freq = |top_p: f32| {
            let mut s = Sampler::new(SamplingParams { temperature: t, top_k: 0, top_p, min_p, seed: Some(9), ..Default::default() });
            let mut hits = [0usize; 5];
            for _ in 0..20000 {
                hits[s.sample(&logits(), &[]) as usize] += 1;
            }
            hits.map(|h| h as f64 / 20000.0)
        };
        // top_p 0.9999 forces the sorted path without cutting anything here.
        for f in [freq(1.0), freq(0.9999)] {
            for i in 0..5 {
                assert!((f[i] - w[i] / total).abs() < 0.015, "token {i}: {} vs {}", f[i], w[i] / total);
            }
        }
    }

    #[test]
    fn the_blocked_draw_picks_where_the_running_sum_crosses() {
        // Against the plain definition on a Gemma-sized vocabulary: zero weights (min-p), odd
        // lengths, draws at the very start, inside and at the very end.
        let mut rng = Rng::new(5);
        for n in [1usize, 3, 1023, 1024, 1025, 5000, 262_144] {
            let w: Vec<f32> = (0..n).map(|_| if rng.uniform() < 0.3 { 0.0 } else { (rng.uniform() * 3.0) as f32 }).collect();
            let total: f64 = w.iter().map(|&x| x as f64).sum();
            let plain = |mut r: f64| {
                let mut last = None;
                for (i, &x) in w.iter().enumerate() {
                    if x > 0.0 {
                        if r < x as f64 {
                            return Some(i);
                        }
                        r -= x as f64;
                        last = Some(i);
                    }
                }
                last
            };
            let mut rs: Vec<f64> = (0..200).map(|_| rng.uniform() * total).collect();
            rs.extend([0.0, total, total * 2.0]);
            for r in rs {
                let (got, want) = (draw(&w, r), plain(r));
                // The two sum in different orders; they may differ only where the draw is
                // within rounding of a boundary between two tokens.
                if got != want {
                    let before: f64 = w[..got.unwrap().min(want.unwrap())].iter().map(|&x| x as f64).sum();
                    let boundary = before + w[got.unwrap().min(want.unwrap())] as f64;
                    assert!((r - boundary).abs() < 1e-9 * total.max(1.0), "n {n}: r {r}: {got:?} vs {want:?}");
                }
            }
        }
        assert_eq!(draw(&[0.0, 0.0], 0.5), None);
    }

    #[test]
    fn top_logprobs_are_sorted_and_normalized() {
        let l = logits();
        let top = top_logprobs(&l, log_sum_exp(&l), 3);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 4, 2]);
        let total: f64 = l.iter().map(|&x| ((x - log_sum_exp(&l)) as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }

    /// Random logits with many ties, signed zeros, NaN and infinities.
    fn awkward(n: usize, seed: u64) -> Vec<f32> {
        let mut r = Rng::new(seed);
        (0..n)
            .map(|_| match (r.uniform() * 40.0) as u32 {
                0 => f32::NAN,
                1 => f32::NEG_INFINITY,
                2 => -0.0,
                3 => 0.0,
                _ => ((r.uniform() * 16.0) as i32 - 8) as f32 * 0.5,
            })
            .collect()
    }

    #[test]
    fn argmax_and_top_k_equal_plain_definitions() {
        let by_logit_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        for (seed, n) in [(1, 1), (2, 7), (3, 513), (4, 1000), (5, 4099), (6, 262_145)] {
            let l = awkward(n, seed);
            // The first index of the largest non-NaN value.
            let mut want = None;
            for (i, &v) in l.iter().enumerate() {
                if !v.is_nan() && want.is_none_or(|w: usize| v > l[w]) {
                    want = Some(i);
                }
            }
            assert_eq!(argmax(&l), want.unwrap_or(0) as u32, "n = {n}");
            for k in [1, 2, 40, 300, n.saturating_sub(1), n, n + 5, 0] {
                let mut all: Vec<(u32, f32)> = l.iter().enumerate().filter(|(_, v)| v.is_finite()).map(|(i, &v)| (i as u32, v)).collect();
                all.sort_by(by_logit_desc);
                if k > 0 && k < n {
                    all.truncate(k);
                }
                let mut got = Vec::new();
                top_k_candidates(&l, k, &mut got);
                got.sort_by(by_logit_desc);
                assert_eq!(got.iter().map(|c| (c.0, c.1.to_bits())).collect::<Vec<_>>(), all.iter().map(|c| (c.0, c.1.to_bits())).collect::<Vec<_>>(), "n = {n}, k = {k}");
            }
        }
        assert_eq!(argmax(&[]), 0);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
        assert_eq!(argmax(&[f32::NAN, 1.0, f32::INFINITY, f32::INFINITY]), 2);
    }

    #[test]
    fn invalid_parameters_are_named() {
        let bad = SamplingParams { top_p: 1.5, ..Default::default() };
        assert!(bad.validate(10).unwrap_err().contains("top_p"));
        let bad = SamplingParams { temperature: f32::NAN, ..Default::default() };
        assert!(bad.validate(10).unwrap_err().contains("temperature"));
        let bad = SamplingParams { logit_bias: vec![(99, 1.0)], ..Default::default() };
        assert!(bad.validate(10).unwrap_err().contains("99"));
    }
}
