//! Text similarity metrics, each from 0 (nothing shared) to 1 (the same): fuzzy match
//! (normalized edit distance), BLEU, ROUGE-N and ROUGE-L. Words are lower-cased runs of letters
//! and digits.

use std::collections::HashMap;

fn words(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_lowercase).collect()
}

/// 1 - edit distance / longer length, over characters.
pub fn fuzzy_match(a: &str, b: &str) -> f64 {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let longest = a.len().max(b.len());
    if longest == 0 {
        return 1.0;
    }
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        cur[0] = i;
        for j in 1..=b.len() {
            let sub = prev[j - 1] + usize::from(a[i - 1] != b[j - 1]);
            cur[j] = sub.min(prev[j] + 1).min(cur[j - 1] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    1.0 - prev[b.len()] as f64 / longest as f64
}

fn ngrams(w: &[String], n: usize) -> HashMap<&[String], usize> {
    let mut m = HashMap::new();
    if w.len() >= n {
        for g in w.windows(n) {
            *m.entry(g).or_insert(0) += 1;
        }
    }
    m
}

/// Clipped n-gram matches of `cand` against `reference`, and the candidate's n-gram count.
fn overlap(cand: &[String], reference: &[String], n: usize) -> (usize, usize, usize) {
    let (c, r) = (ngrams(cand, n), ngrams(reference, n));
    let matched = c.iter().map(|(g, &k)| k.min(*r.get(g).unwrap_or(&0))).sum();
    (matched, cand.len().saturating_sub(n - 1), reference.len().saturating_sub(n - 1))
}

/// Sentence BLEU up to 4-grams with add-one smoothing of the higher orders (Lin & Och), and
/// the brevity penalty.
pub fn bleu(candidate: &str, reference: &str) -> f64 {
    let (c, r) = (words(candidate), words(reference));
    if c.is_empty() || r.is_empty() {
        return if c.is_empty() && r.is_empty() { 1.0 } else { 0.0 };
    }
    let max_n = 4.min(c.len()).min(r.len()).max(1);
    let mut log_sum = 0.0;
    for n in 1..=max_n {
        let (m, total, _) = overlap(&c, &r, n);
        let p = if n == 1 { m as f64 / total as f64 } else { (m as f64 + 1.0) / (total as f64 + 1.0) };
        if p == 0.0 {
            return 0.0;
        }
        log_sum += p.ln();
    }
    let bp = if c.len() >= r.len() { 1.0 } else { (1.0 - r.len() as f64 / c.len() as f64).exp() };
    bp * (log_sum / max_n as f64).exp()
}

fn f1(p: f64, r: f64) -> f64 {
    if p + r == 0.0 { 0.0 } else { 2.0 * p * r / (p + r) }
}

/// ROUGE-N: F1 of shared n-grams.
pub fn rouge_n(candidate: &str, reference: &str, n: usize) -> f64 {
    let (c, r) = (words(candidate), words(reference));
    let (m, total_c, total_r) = overlap(&c, &r, n);
    if total_c == 0 || total_r == 0 {
        return 0.0;
    }
    f1(m as f64 / total_c as f64, m as f64 / total_r as f64)
}

/// ROUGE-L: F1 of the longest common subsequence of words.
pub fn rouge_l(candidate: &str, reference: &str) -> f64 {
    let (c, r) = (words(candidate), words(reference));
    if c.is_empty() || r.is_empty() {
        return 0.0;
    }
    let mut prev = vec![0usize; r.len() + 1];
    for cw in &c {
        let mut cur = vec![0usize; r.len() + 1];
        for (j, rw) in r.iter().enumerate() {
            cur[j + 1] = if cw == rw { prev[j] + 1 } else { cur[j].max(prev[j + 1]) };
        }
        prev = cur;
    }
    let lcs = prev[r.len()] as f64;
    f1(lcs / c.len() as f64, lcs / r.len() as f64)
}

/// Cosine of the angle between two vectors (0 when either is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        ab += x as f64 * y as f64;
        aa += x as f64 * x as f64;
        bb += y as f64 * y as f64;
    }
    if aa == 0.0 || bb == 0.0 { 0.0 } else { ab / (aa.sqrt() * bb.sqrt()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_on_known_cases() {
        assert_eq!(fuzzy_match("kitten", "sitting"), 1.0 - 3.0 / 7.0);
        assert_eq!(fuzzy_match("", ""), 1.0);
        assert_eq!(fuzzy_match("abc", "abc"), 1.0);
        assert!((bleu("the cat sat on the mat", "the cat sat on the mat") - 1.0).abs() < 1e-12);
        assert_eq!(bleu("dog", "the cat sat"), 0.0);
        let partial = bleu("the cat sat on a mat", "the cat sat on the mat");
        assert!(partial > 0.4 && partial < 1.0, "{partial}");
        // ROUGE-1: 5 of 6 words shared both ways.
        assert!((rouge_n("the cat sat on a mat", "the cat sat on the mat", 1) - 5.0 / 6.0).abs() < 1e-12);
        assert!((rouge_n("a b c d", "a b x d", 2) - 1.0 / 3.0).abs() < 1e-12);
        // LCS of "a b c d e" and "a c e" is 3: P 3/5, R 1.
        assert!((rouge_l("a b c d e", "a c e") - 0.75).abs() < 1e-12);
        assert_eq!(rouge_l("", "a"), 0.0);
        assert!((cosine(&[1.0, 0.0], &[1.0, 1.0]) - 0.5f64.sqrt()).abs() < 1e-9);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 1.0]), 0.0);
    }
}
