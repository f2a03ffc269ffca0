//! Fast detectors: hand-written scanners (no backtracking, linear in the text) for personal
//! data, secrets and prompt-injection markers. Each finding is a byte range of the text.

use std::ops::Range;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    PrivateKey,
    ApiKey,
    Credential,
    Email,
    Iban,
    PaymentCard,
    NationalId,
    Phone,
    PromptInjection,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Group {
    Pii,
    Secrets,
    Injection,
}

impl Kind {
    pub const ALL: [Kind; 9] = [Kind::PrivateKey, Kind::ApiKey, Kind::Credential, Kind::Email, Kind::Iban, Kind::PaymentCard, Kind::NationalId, Kind::Phone, Kind::PromptInjection];

    pub fn name(self) -> &'static str {
        match self {
            Kind::PrivateKey => "private_key",
            Kind::ApiKey => "api_key",
            Kind::Credential => "credential",
            Kind::Email => "email",
            Kind::Iban => "iban",
            Kind::PaymentCard => "payment_card",
            Kind::NationalId => "national_id",
            Kind::Phone => "phone",
            Kind::PromptInjection => "prompt_injection",
        }
    }

    pub fn group(self) -> Group {
        match self {
            Kind::PrivateKey | Kind::ApiKey | Kind::Credential => Group::Secrets,
            Kind::Email | Kind::Iban | Kind::PaymentCard | Kind::NationalId | Kind::Phone => Group::Pii,
            Kind::PromptInjection => Group::Injection,
        }
    }

    /// The moderation category: `pii/email`, `secrets/api_key`, `prompt_injection`.
    pub fn category(self) -> String {
        match self.group() {
            Group::Injection => self.name().to_string(),
            g => format!("{}/{}", g.name(), self.name()),
        }
    }
}

impl Group {
    pub fn name(self) -> &'static str {
        match self {
            Group::Pii => "pii",
            Group::Secrets => "secrets",
            Group::Injection => "prompt_injection",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub kind: Kind,
    pub range: Range<usize>,
}

/// Everything the detectors find in `text`, in order, without overlaps (where two overlap, the
/// kind listed first in [`Kind::ALL`] wins; injection markers are kept beside the others).
pub fn scan(text: &str) -> Vec<Finding> {
    let mut found = Vec::new();
    private_keys(text, &mut found);
    api_keys(text, &mut found);
    credentials(text, &mut found);
    emails(text, &mut found);
    ibans(text, &mut found);
    digit_runs(text, &mut found);
    ninos(text, &mut found);
    crate::injection::markers(text, &mut found);
    found.sort_by_key(|f| (f.kind, f.range.start));
    let mut kept: Vec<Finding> = Vec::new();
    for f in found {
        let clash = f.kind != Kind::PromptInjection && kept.iter().any(|k| k.kind != Kind::PromptInjection && k.range.start < f.range.end && f.range.start < k.range.end);
        if !clash {
            kept.push(f);
        }
    }
    kept.sort_by_key(|f| (f.range.start, f.kind));
    kept
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// No word character right before `at`.
fn starts_word(t: &[u8], at: usize) -> bool {
    at == 0 || !is_word(t[at - 1])
}

fn private_keys(text: &str, out: &mut Vec<Finding>) {
    let mut from = 0;
    while let Some(i) = text[from..].find("-----BEGIN ") {
        let start = from + i;
        let head_end = match text[start + 11..].find("-----") {
            Some(j) if j <= 40 => start + 11 + j + 5,
            _ => {
                from = start + 11;
                continue;
            }
        };
        let label = &text[start + 11..head_end - 5];
        if !label.ends_with("PRIVATE KEY") {
            from = head_end;
            continue;
        }
        let end = match text[head_end..].find("-----END ") {
            Some(j) => {
                let e = head_end + j + 9;
                text[e..].find("-----").map(|k| e + k + 5).unwrap_or(text.len())
            }
            None => text.len(),
        };
        out.push(Finding { kind: Kind::PrivateKey, range: start..end });
        from = end;
    }
}

/// Known token formats: a prefix, then a body of at least `min` (at most `max`) characters.
struct TokenFormat {
    prefix: &'static str,
    min: usize,
    max: usize,
    /// Body characters: alphanumerics, plus these.
    extra: &'static [u8],
    /// The body needs a digit and a letter (prefixes that could start ordinary words).
    mixed: bool,
    upper_only: bool,
}

const FORMATS: &[TokenFormat] = &[
    TokenFormat { prefix: "sk-", min: 20, max: 200, extra: b"-_", mixed: true, upper_only: false }, // OpenAI, Anthropic, ...
    TokenFormat { prefix: "sk_live_", min: 16, max: 120, extra: b"", mixed: true, upper_only: false }, // Stripe
    TokenFormat { prefix: "sk_test_", min: 16, max: 120, extra: b"", mixed: true, upper_only: false },
    TokenFormat { prefix: "rk_live_", min: 16, max: 120, extra: b"", mixed: true, upper_only: false },
    TokenFormat { prefix: "AKIA", min: 16, max: 16, extra: b"", mixed: false, upper_only: true }, // AWS access key ids
    TokenFormat { prefix: "ASIA", min: 16, max: 16, extra: b"", mixed: false, upper_only: true },
    TokenFormat { prefix: "ghp_", min: 30, max: 60, extra: b"", mixed: false, upper_only: false }, // GitHub
    TokenFormat { prefix: "gho_", min: 30, max: 60, extra: b"", mixed: false, upper_only: false },
    TokenFormat { prefix: "ghs_", min: 30, max: 60, extra: b"", mixed: false, upper_only: false },
    TokenFormat { prefix: "ghu_", min: 30, max: 60, extra: b"", mixed: false, upper_only: false },
    TokenFormat { prefix: "github_pat_", min: 22, max: 120, extra: b"_", mixed: false, upper_only: false },
    TokenFormat { prefix: "glpat-", min: 20, max: 60, extra: b"-_", mixed: false, upper_only: false }, // GitLab
    TokenFormat { prefix: "xoxb-", min: 10, max: 120, extra: b"-", mixed: true, upper_only: false }, // Slack
    TokenFormat { prefix: "xoxp-", min: 10, max: 120, extra: b"-", mixed: true, upper_only: false },
    TokenFormat { prefix: "AIza", min: 35, max: 35, extra: b"-_", mixed: false, upper_only: false }, // Google
    TokenFormat { prefix: "hf_", min: 30, max: 60, extra: b"", mixed: true, upper_only: false }, // Hugging Face
];

fn api_keys(text: &str, out: &mut Vec<Finding>) {
    let t = text.as_bytes();
    for f in FORMATS {
        let mut from = 0;
        while let Some(i) = text[from..].find(f.prefix) {
            let start = from + i;
            let body_start = start + f.prefix.len();
            let mut end = body_start;
            while end < t.len() && (t[end].is_ascii_alphanumeric() || f.extra.contains(&t[end])) && (!f.upper_only || !t[end].is_ascii_lowercase()) {
                end += 1;
            }
            let body = &t[body_start..end];
            let mixed_ok = !f.mixed || (body.iter().any(u8::is_ascii_digit) && body.iter().any(u8::is_ascii_alphabetic));
            if starts_word(t, start) && (f.min..=f.max).contains(&body.len()) && mixed_ok && (end == t.len() || !t[end].is_ascii_alphanumeric()) {
                out.push(Finding { kind: Kind::ApiKey, range: start..end });
            }
            from = end.max(start + 1);
        }
    }
    jwts(text, out);
}

/// JSON Web Tokens: three base64url parts, the first two starting `eyJ` (`{"`).
fn jwts(text: &str, out: &mut Vec<Finding>) {
    let t = text.as_bytes();
    let b64 = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
    let mut from = 0;
    while let Some(i) = text[from..].find("eyJ") {
        let start = from + i;
        let mut end = start;
        let mut parts = 0;
        let mut lens = Vec::new();
        loop {
            let s = end;
            while end < t.len() && b64(t[end]) {
                end += 1;
            }
            lens.push(end - s);
            parts += 1;
            if parts == 3 || end >= t.len() || t[end] != b'.' {
                break;
            }
            end += 1;
        }
        if starts_word(t, start) && parts == 3 && lens.iter().all(|&n| n >= 8) && text[start..].split('.').nth(1).is_some_and(|p| p.starts_with("eyJ")) {
            out.push(Finding { kind: Kind::ApiKey, range: start..end });
        }
        from = end.max(start + 3);
    }
}

pub(crate) const SECRET_NAMES: &[&str] = &["password", "passwd", "pwd", "api_key", "apikey", "api-key", "secret", "secret_key", "client_secret", "access_token", "auth_token", "token", "access_key", "private_key"];

/// `password = "..."`, `api_key: ...`, `"secret": "..."`: the value of an assignment to a name
/// that holds secrets.
fn credentials(text: &str, out: &mut Vec<Finding>) {
    let t = text.as_bytes();
    let lower = text.to_ascii_lowercase();
    for name in SECRET_NAMES {
        let mut from = 0;
        while let Some(i) = lower[from..].find(name) {
            let start = from + i;
            let mut j = start + name.len();
            from = j;
            // Whole name (any prefix word like `db_` is fine: `db_password`).
            if j < t.len() && (t[j].is_ascii_alphanumeric() || t[j] == b'_') {
                continue;
            }
            while j < t.len() && (t[j] == b'"' || t[j] == b'\'') {
                j += 1;
            }
            while j < t.len() && t[j] == b' ' {
                j += 1;
            }
            if j >= t.len() || !(t[j] == b'=' || t[j] == b':') {
                continue;
            }
            j += 1;
            while j < t.len() && (t[j] == b' ' || t[j] == b'"' || t[j] == b'\'') {
                j += 1;
            }
            let v = j;
            while j < t.len() && !t[j].is_ascii_whitespace() && !matches!(t[j], b'"' | b'\'' | b',' | b';' | b'}' | b')') {
                j += 1;
            }
            // Sentence punctuation after the value is not part of it.
            while j > v && matches!(t[j - 1], b'.' | b'!' | b'?' | b':') {
                j -= 1;
            }
            let value = &text[v..j];
            // A value, not prose: long enough, and not a placeholder.
            let placeholder = value.starts_with('<') || value.starts_with('$') || value.starts_with('{') || value.chars().all(|c| c == '*' || c == 'x' || c == 'X' || c == '.');
            if value.len() >= 6 && !placeholder {
                out.push(Finding { kind: Kind::Credential, range: v..j });
            }
        }
    }
}

fn emails(text: &str, out: &mut Vec<Finding>) {
    let t = text.as_bytes();
    let local = |b: u8| b.is_ascii_alphanumeric() || b"._%+-".contains(&b);
    let domain = |b: u8| b.is_ascii_alphanumeric() || b == b'.' || b == b'-';
    let mut last_end = 0;
    for (at, _) in text.match_indices('@') {
        if at < last_end {
            continue;
        }
        let mut s = at;
        while s > 0 && local(t[s - 1]) {
            s -= 1;
        }
        while s < at && t[s] == b'.' {
            s += 1;
        }
        let mut e = at + 1;
        while e < t.len() && domain(t[e]) {
            e += 1;
        }
        while e > at + 1 && (t[e - 1] == b'.' || t[e - 1] == b'-') {
            e -= 1;
        }
        let dom = &text[at + 1..e];
        let labels: Vec<&str> = dom.split('.').collect();
        let tld = labels.last().copied().unwrap_or("");
        if s < at && labels.len() >= 2 && labels.iter().all(|l| !l.is_empty()) && tld.len() >= 2 && tld.bytes().all(|b| b.is_ascii_alphabetic()) {
            out.push(Finding { kind: Kind::Email, range: s..e });
            last_end = e;
        }
    }
}

/// IBAN lengths by country.
const IBAN_LENGTHS: &[(&str, usize)] = &[
    ("AD", 24), ("AE", 23), ("AT", 20), ("AZ", 28), ("BA", 20), ("BE", 16), ("BG", 22), ("BH", 22), ("BR", 29), ("CH", 21), ("CR", 22), ("CY", 28), ("CZ", 24),
    ("DE", 22), ("DK", 18), ("DO", 28), ("EE", 20), ("EG", 29), ("ES", 24), ("FI", 18), ("FO", 18), ("FR", 27), ("GB", 22), ("GE", 22), ("GI", 23), ("GL", 18),
    ("GR", 27), ("GT", 28), ("HR", 21), ("HU", 28), ("IE", 22), ("IL", 23), ("IS", 26), ("IT", 27), ("JO", 30), ("KW", 30), ("KZ", 20), ("LB", 28), ("LI", 21),
    ("LT", 20), ("LU", 20), ("LV", 21), ("MC", 27), ("MD", 24), ("ME", 22), ("MK", 19), ("MR", 27), ("MT", 31), ("MU", 30), ("NL", 18), ("NO", 15), ("PK", 24),
    ("PL", 28), ("PS", 29), ("PT", 25), ("QA", 29), ("RO", 24), ("RS", 22), ("SA", 24), ("SE", 24), ("SI", 19), ("SK", 24), ("SM", 27), ("TN", 24), ("TR", 26),
    ("UA", 29), ("VG", 24), ("XK", 20),
];

/// ISO 13616 check: the number with its first four characters moved to the end, letters as
/// 10..35, is 1 modulo 97.
pub fn iban_valid(chars: &[u8]) -> bool {
    if chars.len() < 15 || !chars.iter().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit()) {
        return false;
    }
    let mut r: u32 = 0;
    for &c in chars[4..].iter().chain(&chars[..4]) {
        let v = if c.is_ascii_digit() { (c - b'0') as u32 } else { (c - b'A') as u32 + 10 };
        r = if v >= 10 { (r * 100 + v) % 97 } else { (r * 10 + v) % 97 };
    }
    r == 1
}

fn ibans(text: &str, out: &mut Vec<Finding>) {
    let t = text.as_bytes();
    let mut i = 0;
    while i + 4 <= t.len() {
        let head = t[i].is_ascii_uppercase() && t[i + 1].is_ascii_uppercase() && t[i + 2].is_ascii_digit() && t[i + 3].is_ascii_digit();
        let want = IBAN_LENGTHS.iter().find(|(c, _)| c.as_bytes() == &t[i..i + 2]).map(|&(_, n)| n);
        if !(head && starts_word(t, i)) || want.is_none() {
            i += 1;
            continue;
        }
        let want = want.unwrap_or(0);
        // Collect the characters, allowing single spaces between groups (printed form).
        let (mut chars, mut j, mut end) = (Vec::new(), i, i);
        while j < t.len() && chars.len() < want {
            let c = t[j].to_ascii_uppercase();
            if c.is_ascii_alphanumeric() {
                chars.push(c);
                j += 1;
                end = j;
            } else if t[j] == b' ' && j + 1 < t.len() && t[j + 1].is_ascii_alphanumeric() {
                j += 1;
            } else {
                break;
            }
        }
        let whole = end == t.len() || !t[end].is_ascii_alphanumeric();
        if chars.len() == want && whole && iban_valid(&chars) {
            out.push(Finding { kind: Kind::Iban, range: i..end });
            i = end;
        } else {
            i += 1;
        }
    }
}

/// Luhn's check digit test (payment cards).
pub fn luhn_valid(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (k, &d) in digits.iter().rev().enumerate() {
        let mut v = (d - b'0') as u32;
        if k % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    !digits.is_empty() && sum % 10 == 0
}

/// Runs of digits with separators (space, '-', '.', parentheses) and an optional leading '+':
/// payment cards, US social security numbers and phone numbers.
fn digit_runs(text: &str, out: &mut Vec<Finding>) {
    let t = text.as_bytes();
    let sep = |b: u8| matches!(b, b' ' | b'-' | b'.' | b'(' | b')');
    let mut i = 0;
    while i < t.len() {
        let lead = (t[i] == b'+' || t[i] == b'(') && i + 1 < t.len() && t[i + 1].is_ascii_digit();
        if !(t[i].is_ascii_digit() || lead) || (i > 0 && (t[i - 1].is_ascii_alphanumeric() || t[i - 1] == b'+' || t[i - 1] == b'_')) {
            i += 1;
            continue;
        }
        let start = i;
        let mut j = i + 1;
        let mut end = if lead { i } else { i + 1 };
        loop {
            let mut k = j;
            let mut seps = 0;
            while k < t.len() && sep(t[k]) && seps < 2 {
                k += 1;
                seps += 1;
            }
            if k < t.len() && t[k].is_ascii_digit() {
                while k < t.len() && t[k].is_ascii_digit() {
                    k += 1;
                }
                end = k;
                j = k;
            } else {
                break;
            }
        }
        // A closing parenthesis right after the digits belongs to the run only inside it.
        if end < t.len() && t[end].is_ascii_alphabetic() {
            i = end;
            continue;
        }
        let run = &text[start..end];
        if let Some(kind) = classify_run(run) {
            out.push(Finding { kind, range: start..end });
        }
        i = end.max(start + 1);
    }
}

fn classify_run(run: &str) -> Option<Kind> {
    let digits: Vec<u8> = run.bytes().filter(u8::is_ascii_digit).collect();
    let groups: Vec<usize> = run.split(|c: char| !c.is_ascii_digit()).filter(|g| !g.is_empty()).map(str::len).collect();
    let only = |allowed: &[u8]| run.bytes().all(|b| b.is_ascii_digit() || allowed.contains(&b));
    let n = digits.len();
    if (13..=19).contains(&n) && only(b" -") && (b'2'..=b'6').contains(&digits[0]) && luhn_valid(&digits) && (groups.len() == 1 || groups.iter().all(|&g| (3..=6).contains(&g))) {
        return Some(Kind::PaymentCard);
    }
    if n == 9 && groups == [3, 2, 4] && only(b"- ") {
        let (area, group, serial) = (&digits[..3], &digits[3..5], &digits[5..]);
        if area != b"000" && area != b"666" && area[0] != b'9' && group != b"00" && serial != b"0000" {
            return Some(Kind::NationalId);
        }
    }
    let plus = run.starts_with('+');
    if plus && (8..=15).contains(&n) && groups.len() >= 2 && groups[0] <= 3 {
        return Some(Kind::Phone);
    }
    if !plus {
        // North American: 3-3-4 (area code maybe in parentheses), with an optional leading 1.
        // (Ten digits in one run are more often ids and timestamps than phone numbers.)
        let nanp = groups == [3, 3, 4] || groups == [1, 3, 3, 4] && digits[0] == b'1';
        // National formats with a trunk 0 (020 7946 0958), or 00 + country code.
        let trunk = digits[0] == b'0' && (10..=13).contains(&n) && groups.len() >= 2 && groups.iter().all(|&g| (2..=5).contains(&g));
        if nanp && digits[0] != b'0' || trunk {
            return Some(Kind::Phone);
        }
    }
    None
}

/// UK National Insurance numbers: two letters, six digits (maybe in pairs), A–D.
fn ninos(text: &str, out: &mut Vec<Finding>) {
    let t = text.as_bytes();
    let first_ok = |c: u8| c.is_ascii_uppercase() && !b"DFIQUV".contains(&c);
    let second_ok = |c: u8| c.is_ascii_uppercase() && !b"DFIOQUV".contains(&c);
    let mut i = 0;
    while i + 9 <= t.len() {
        if !(first_ok(t[i]) && second_ok(t[i + 1]) && starts_word(t, i)) {
            i += 1;
            continue;
        }
        let mut j = i + 2;
        let mut digits = 0;
        while j < t.len() && digits < 6 {
            if t[j].is_ascii_digit() {
                digits += 1;
                j += 1;
            } else if t[j] == b' ' && digits % 2 == 0 && j + 1 < t.len() && t[j + 1].is_ascii_digit() {
                j += 1;
            } else {
                break;
            }
        }
        if digits == 6 && j < t.len() && t[j] == b' ' && j + 1 < t.len() && (b'A'..=b'D').contains(&t[j + 1]) {
            j += 1;
        }
        let ok = digits == 6 && j < t.len() && (b'A'..=b'D').contains(&t[j]) && (j + 1 == t.len() || !t[j + 1].is_ascii_alphanumeric());
        if ok {
            out.push(Finding { kind: Kind::NationalId, range: i..j + 1 });
            i = j + 1;
        } else {
            i += 1;
        }
    }
}
