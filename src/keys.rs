//! Key sets and files re-read on change: what makes every key rotatable without a restart (DESIGN.md §6).
//!
//! A key-set file holds one base64 key per line; blank lines and everything after a `#` are ignored. In a set of
//! private signing keys (`signing.key`) the **last** key signs and the others are kept for the record; in a set of
//! public keys (`signing.pub`, or a copy a verifier mounts) every key is accepted. `partner-bridge keygen --rotate
//! DIR` appends a new key to both files of DIR. A file written by a plain `keygen` (one line) is a set of one.
//!
//! [`Watched`] holds the value parsed from a file and checks the file's metadata on every use (one `stat`); when
//! the file changed it is read and parsed again. A file that becomes unreadable or invalid keeps the last good
//! value in use, logs an error naming the config key and the path (never the content) and counts
//! `partner_bridge_key_reload_errors_total{key}`; nothing stops.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use crate::envelope::{BadMessage, SigningKey, VerifyingKey};
use crate::metrics::Metrics;
use crate::secret::SecretSource;

/// A file whose modification time is this close to (or after) the moment it was last read may have been written
/// again within the file system's timestamp granularity, with the same length: read it again to be sure.
const RACY: Duration = Duration::from_secs(2);

/// A problem in a key-set file, naming the file and the line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path} line {line}: {problem}")]
pub struct KeySetError {
    /// The file.
    pub path: String,
    /// 1-based line number (0: the file as a whole).
    pub line: usize,
    /// What is wrong, without the key material.
    pub problem: String,
}

/// The keys of a key-set text, with their line numbers.
fn lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines().enumerate().filter_map(|(i, line)| {
        let key = line.split('#').next().unwrap_or("").trim();
        (!key.is_empty()).then_some((i + 1, key))
    })
}

fn empty(path: &Path) -> KeySetError {
    KeySetError {
        path: path.display().to_string(),
        line: 0,
        problem: "holds no key (one base64 key per line; `#` starts a comment)".into(),
    }
}

/// Parses a set of private signing keys (the last one signs). `public` are public keys known to this
/// configuration: a line holding one of them is a public key given where a private one belongs, and is refused.
pub fn parse_signing_set(
    text: &str,
    path: &Path,
    public: &[VerifyingKey],
) -> Result<Vec<SigningKey>, KeySetError> {
    let mut keys = Vec::new();
    for (line, text) in lines(text) {
        let key = SigningKey::from_base64(text).map_err(|e| KeySetError {
            path: path.display().to_string(),
            line,
            problem: format!("not a signing key: {e}"),
        })?;
        if let Some(p) = public.iter().find(|p| key.is_public_key(p)) {
            return Err(KeySetError {
                path: path.display().to_string(),
                line,
                problem: format!(
                    "holds a public key (key id {}), not a private signing key: give the signing.key file `keygen` wrote, not signing.pub",
                    p.key_id()
                ),
            });
        }
        keys.push(key);
    }
    if keys.is_empty() {
        return Err(empty(path));
    }
    Ok(keys)
}

/// Parses a set of public keys (any of them is accepted).
pub fn parse_public_set(text: &str, path: &Path) -> Result<Vec<VerifyingKey>, KeySetError> {
    let mut keys = Vec::new();
    for (line, text) in lines(text) {
        let key = VerifyingKey::from_base64(text).map_err(|e| KeySetError {
            path: path.display().to_string(),
            line,
            problem: format!("not a public key: {e}"),
        })?;
        keys.push(key);
    }
    if keys.is_empty() {
        return Err(empty(path));
    }
    Ok(keys)
}

/// The public keys listed in `DIR/signing.pub` next to a signing key file, when there is one and it parses: what
/// `keygen` wrote with the key, so a signing key file that holds one of them is a public key in the wrong place.
pub fn sibling_public_keys(signing_key_file: &Path) -> Vec<VerifyingKey> {
    let sibling = signing_key_file.with_file_name("signing.pub");
    std::fs::read_to_string(&sibling)
        .ok()
        .and_then(|text| parse_public_set(&text, &sibling).ok())
        .unwrap_or_default()
}

/// What identifies a version of a file without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    len: u64,
    modified: Option<SystemTime>,
    #[cfg(unix)]
    inode: (u64, u64, i64, i64),
}

impl Fingerprint {
    fn of(meta: &std::fs::Metadata) -> Fingerprint {
        #[cfg(unix)]
        use std::os::unix::fs::MetadataExt;
        Fingerprint {
            len: meta.len(),
            modified: meta.modified().ok(),
            #[cfg(unix)]
            inode: (meta.dev(), meta.ino(), meta.ctime(), meta.ctime_nsec()),
        }
    }
}

type Parser<T> = Box<dyn Fn(&str) -> Result<T, String> + Send + Sync>;

struct WatchState<T> {
    value: Arc<T>,
    seen: Option<Fingerprint>,
    read_at: SystemTime,
    digest: [u8; 32],
    /// The problem last reported, so that one bad file is logged and counted once, not on every use.
    problem: Option<String>,
}

/// A value parsed from a file, re-read when the file changes (see the module docs).
pub struct Watched<T> {
    key: String,
    path: PathBuf,
    parse: Parser<T>,
    metrics: Option<Arc<Metrics>>,
    state: Mutex<WatchState<T>>,
}

impl<T> std::fmt::Debug for Watched<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched")
            .field("key", &self.key)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl<T> Watched<T> {
    /// Reads and parses `path` now; the first read must succeed. `key` is the config key, for logs and metrics.
    pub fn new(
        key: impl Into<String>,
        path: impl Into<PathBuf>,
        parse: impl Fn(&str) -> Result<T, String> + Send + Sync + 'static,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<Watched<T>, String> {
        let path = path.into();
        let read_at = SystemTime::now();
        let seen = std::fs::metadata(&path).ok().map(|m| Fingerprint::of(&m));
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let value = parse(&text)?;
        let key = key.into();
        if let Some(metrics) = &metrics {
            metrics.key_watched(&key);
        }
        Ok(Watched {
            key,
            path,
            parse: Box::new(parse),
            metrics,
            state: Mutex::new(WatchState {
                value: Arc::new(value),
                seen,
                read_at,
                digest: Sha256::digest(text.as_bytes()).into(),
                problem: None,
            }),
        })
    }

    /// The config key this file was given under.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The current value: the file's, re-read when it changed; the last good one while the file is unusable.
    pub fn current(&self) -> Arc<T> {
        self.refresh(false).0
    }

    /// Reads the file again whatever its metadata says. `Ok(true)` when the value changed; an unusable file is an
    /// error and the last good value stays in use.
    pub fn reload(&self) -> Result<bool, String> {
        let (_, changed, problem) = self.refresh(true);
        match problem {
            Some(p) => Err(p),
            None => Ok(changed),
        }
    }

    fn refresh(&self, force: bool) -> (Arc<T>, bool, Option<String>) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let meta = match std::fs::metadata(&self.path) {
            Ok(meta) => meta,
            Err(e) => {
                let problem = format!("cannot read {}: {e}", self.path.display());
                self.report(&mut state, &problem);
                state.seen = None;
                return (state.value.clone(), false, Some(problem));
            }
        };
        let fingerprint = Fingerprint::of(&meta);
        let racy = fingerprint
            .modified
            .is_none_or(|m| m + RACY >= state.read_at);
        if !force && !racy && state.seen.as_ref() == Some(&fingerprint) {
            return (state.value.clone(), false, None);
        }
        let read_at = SystemTime::now();
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) => {
                let problem = format!("cannot read {}: {e}", self.path.display());
                self.report(&mut state, &problem);
                return (state.value.clone(), false, Some(problem));
            }
        };
        let digest: [u8; 32] = Sha256::digest(text.as_bytes()).into();
        state.seen = Some(fingerprint);
        state.read_at = read_at;
        if digest == state.digest {
            // Unchanged content; a problem reported earlier (a file briefly gone) is over.
            if state.problem.take().is_some() {
                tracing::info!(key = %self.key, path = %self.path.display(), "key file is readable again; nothing changed");
            }
            return (state.value.clone(), false, None);
        }
        match (self.parse)(&text) {
            Ok(value) => {
                state.value = Arc::new(value);
                state.digest = digest;
                state.problem = None;
                tracing::info!(key = %self.key, path = %self.path.display(), "key file changed; reloaded");
                (state.value.clone(), true, None)
            }
            Err(problem) => {
                // Remember this content as seen, so that it is reported once; a new write is read again.
                state.digest = digest;
                self.report(&mut state, &problem);
                (state.value.clone(), false, Some(problem))
            }
        }
    }

    fn report(&self, state: &mut WatchState<T>, problem: &str) {
        if state.problem.as_deref() == Some(problem) {
            return;
        }
        tracing::error!(key = %self.key, path = %self.path.display(), error = %problem, "key file unusable; keeping the keys last read from it");
        if let Some(metrics) = &self.metrics {
            metrics.key_reload_error(&self.key);
        }
        state.problem = Some(problem.to_string());
    }
}

/// Where a role's signing keys come from: inline (a set of one) or a key-set file re-read on change.
#[derive(Debug, Clone)]
pub enum SigningKeys {
    /// `signing_key` (env or config).
    Fixed(Box<SigningKey>),
    /// `signing_key_file`.
    File(Arc<Watched<Vec<SigningKey>>>),
}

impl SigningKeys {
    /// From where the config says (`config_key` names it in logs and metrics). A file is re-read on change; `known`
    /// public keys (and the `signing.pub` next to the file) are refused in it, at start and on every reload.
    pub fn load(
        source: &SecretSource,
        config_key: &str,
        known: Vec<VerifyingKey>,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<SigningKeys, String> {
        match source {
            SecretSource::Inline(secret) => SigningKey::from_base64(secret.expose())
                .map(|k| SigningKeys::Fixed(Box::new(k)))
                .map_err(|e| format!("{config_key}: {e}")),
            SecretSource::File(path) => {
                let p = path.clone();
                Watched::new(
                    config_key,
                    path,
                    move |text| {
                        let mut known = known.clone();
                        known.extend(sibling_public_keys(&p));
                        parse_signing_set(text, &p, &known).map_err(|e| e.to_string())
                    },
                    metrics,
                )
                .map(|w| SigningKeys::File(Arc::new(w)))
            }
        }
    }

    /// `x-pb-signature` and `x-pb-key-id` for `body`, signed by the current key (what every signed message carries).
    pub fn signature_headers(&self, body: &[u8]) -> Vec<(String, crate::amqp::HeaderValue)> {
        let key = self.signer();
        vec![
            (
                crate::envelope::HEADER_SIGNATURE.to_string(),
                crate::amqp::HeaderValue::Str(key.sign(body)),
            ),
            (
                crate::envelope::HEADER_KEY_ID.to_string(),
                crate::amqp::HeaderValue::Str(key.key_id().to_string()),
            ),
        ]
    }

    /// The oldest (first) key of the set: rotation appends, so it stays the same (the audit log keys its
    /// `vendor_data` hash with it).
    pub fn first(&self) -> SigningKey {
        match self {
            SigningKeys::Fixed(key) => (**key).clone(),
            SigningKeys::File(file) => file
                .current()
                .first()
                .cloned()
                .expect("a parsed signing key set is never empty"),
        }
    }

    /// Every public key of the set (to verify what any of its keys signed).
    pub fn public_keys(&self) -> Vec<crate::envelope::VerifyingKey> {
        match self {
            SigningKeys::Fixed(key) => vec![key.verifying_key()],
            SigningKeys::File(file) => file.current().iter().map(|k| k.verifying_key()).collect(),
        }
    }

    /// The key that signs now: the newest (last) of the set.
    pub fn signer(&self) -> SigningKey {
        match self {
            SigningKeys::Fixed(key) => (**key).clone(),
            SigningKeys::File(file) => file
                .current()
                .last()
                .cloned()
                .expect("a parsed signing key set is never empty"),
        }
    }
}

/// A peer's public keys: listed in the config (fixed) and in key-set files (re-read on change). Any of them is
/// accepted.
#[derive(Debug, Clone, Default)]
pub struct PublicKeys {
    fixed: Vec<VerifyingKey>,
    files: Vec<Arc<Watched<Vec<VerifyingKey>>>>,
}

/// Why a signature is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// `x-pb-key-id` names no configured key.
    UnknownKey(String),
    /// No candidate key verifies the signature.
    Bad(BadMessage),
}

impl PublicKeys {
    /// Keys from the config and from files.
    pub fn new(fixed: Vec<VerifyingKey>, files: Vec<Arc<Watched<Vec<VerifyingKey>>>>) -> Self {
        PublicKeys { fixed, files }
    }

    /// Keys given in the config, and key-set files (config key, path) to watch.
    pub fn load(
        fixed: Vec<VerifyingKey>,
        files: Vec<(String, PathBuf)>,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<PublicKeys, String> {
        let mut watched = Vec::new();
        for (key, path) in files {
            let p = path.clone();
            watched.push(Arc::new(Watched::new(
                key,
                path,
                move |text| parse_public_set(text, &p).map_err(|e| e.to_string()),
                metrics.clone(),
            )?));
        }
        Ok(PublicKeys::new(fixed, watched))
    }

    /// No key configured at all.
    pub fn is_empty(&self) -> bool {
        self.fixed.is_empty() && self.files.is_empty()
    }

    /// Every key accepted now.
    pub fn all(&self) -> Vec<VerifyingKey> {
        let mut keys = self.fixed.clone();
        for file in &self.files {
            keys.extend(file.current().iter().cloned());
        }
        keys
    }

    /// Checks an `x-pb-signature` over `body`. With a key id (thumbprint, or the hex id of earlier versions) only
    /// the key of that id is tried; without one, any key that verifies is accepted. Returns the verifying key.
    pub fn verify(
        &self,
        body: &[u8],
        signature: &str,
        key_id: Option<&str>,
    ) -> Result<VerifyingKey, Refused> {
        let all = self.all();
        let candidates: Vec<&VerifyingKey> = match key_id {
            Some(id) => all.iter().filter(|k| k.has_id(id)).collect(),
            None => all.iter().collect(),
        };
        if candidates.is_empty() {
            return Err(Refused::UnknownKey(key_id.unwrap_or_default().to_string()));
        }
        let mut last = None;
        for key in candidates {
            match key.verify(body, signature) {
                Ok(()) => return Ok(key.clone()),
                Err(bad) => last = Some(bad),
            }
        }
        Err(Refused::Bad(last.expect("at least one candidate")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_skip_comments_and_name_file_and_line() {
        let a = SigningKey::generate();
        let b = SigningKey::generate();
        let text = format!(
            "# made by keygen\n\n{}  # first\n{}\n",
            a.to_base64(),
            b.to_base64()
        );
        let path = Path::new("/keys/signing.key");
        let set = parse_signing_set(&text, path, &[]).unwrap();
        assert_eq!(set.len(), 2);
        assert_eq!(set[1].key_id(), b.key_id());

        let bad = format!("{}\n# comment\nnot-base64!\n", a.to_base64());
        let e = parse_signing_set(&bad, path, &[]).unwrap_err();
        assert_eq!(e.line, 3);
        assert_eq!(
            e.to_string(),
            "/keys/signing.key line 3: not a signing key: not valid base64"
        );
        let e = parse_public_set("# nothing\n\n", Path::new("/keys/signing.pub")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/keys/signing.pub line 0: holds no key")
        );
        let short = format!("{}\nAAAA\n", a.verifying_key().to_base64());
        let e = parse_public_set(&short, Path::new("p.pub")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "p.pub line 2: not a public key: must decode to 32 bytes (got 3)"
        );
    }

    #[test]
    fn a_public_key_is_refused_as_a_signing_key() {
        let a = SigningKey::generate();
        let public = a.verifying_key();
        let text = format!("{}\n", public.to_base64());
        let e =
            parse_signing_set(&text, Path::new("k"), std::slice::from_ref(&public)).unwrap_err();
        assert_eq!(e.line, 1);
        assert!(e.problem.contains("holds a public key"), "{e}");
        assert!(!e.to_string().contains(&public.to_base64()));
    }

    #[test]
    fn any_key_of_the_set_verifies_by_new_or_legacy_id() {
        let old = SigningKey::generate();
        let new = SigningKey::generate();
        let stranger = SigningKey::generate();
        let keys = PublicKeys::new(vec![old.verifying_key(), new.verifying_key()], vec![]);
        let body = b"{}";
        assert!(
            keys.verify(body, &new.sign(body), Some(new.key_id()))
                .is_ok()
        );
        assert!(
            keys.verify(body, &old.sign(body), Some(old.key_id()))
                .is_ok()
        );
        assert!(keys.verify(body, &old.sign(body), None).is_ok());
        let legacy = hex::encode(
            &Sha256::digest(
                base64::Engine::decode(
                    &base64::engine::general_purpose::STANDARD,
                    old.verifying_key().to_base64(),
                )
                .unwrap(),
            )[..8],
        );
        assert!(keys.verify(body, &old.sign(body), Some(&legacy)).is_ok());
        assert_eq!(
            keys.verify(body, &stranger.sign(body), Some(stranger.key_id())),
            Err(Refused::UnknownKey(stranger.key_id().to_string()))
        );
        assert!(matches!(
            keys.verify(body, &stranger.sign(body), Some(new.key_id())),
            Err(Refused::Bad(_))
        ));
    }

    #[test]
    fn a_watched_file_follows_changes_and_keeps_the_last_good_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pub");
        let a = SigningKey::generate().verifying_key();
        let b = SigningKey::generate().verifying_key();
        std::fs::write(&path, format!("{}\n", a.to_base64())).unwrap();
        let metrics = Arc::new(Metrics::new());
        let p = path.clone();
        let watched = Watched::new(
            "receiver.issuers[0].public_key_file",
            &path,
            move |t| parse_public_set(t, &p).map_err(|e| e.to_string()),
            Some(metrics.clone()),
        )
        .unwrap();
        assert_eq!(watched.current().len(), 1);
        std::fs::write(&path, format!("{}\n{}\n", a.to_base64(), b.to_base64())).unwrap();
        assert_eq!(watched.current().len(), 2);
        std::fs::write(&path, "garbage\n").unwrap();
        assert_eq!(watched.current().len(), 2, "the last good set stays");
        assert_eq!(watched.current().len(), 2);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(watched.current().len(), 2);
        let text = metrics.encode();
        assert!(
            text.contains(
                r#"partner_bridge_key_reload_errors_total{key="receiver.issuers[0].public_key_file"} 2"#
            ),
            "{text}"
        );
        std::fs::write(&path, format!("{}\n", b.to_base64())).unwrap();
        let now = watched.current();
        assert_eq!(now.len(), 1);
        assert_eq!(now[0].key_id(), b.key_id());
    }
}
