//! Redacted secret types: API keys, share tokens, webhook secrets, signing keys and URLs with passwords.
//!
//! A secret can be read by code that needs it (`expose()`), but `Debug`, `Display` and `Serialize` never show it,
//! so a secret that ends up in a log line, an error or `check-config` output prints as `<redacted>`.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A string that must never be printed.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself, for the one place that must send it somewhere.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when the secret holds no characters.
    pub fn is_empty(&self) -> bool {
        self.0.trim().is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("<redacted>")
    }
}

impl<'de> Deserialize<'de> for Secret {
    /// Accepts any scalar: an environment override such as `PARTNER_BRIDGE__DIDIT__API_KEY=12345` arrives as a
    /// number once the config layer has guessed its type, and must still be a key.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        match value {
            serde_json::Value::String(s) => Ok(Secret(s)),
            serde_json::Value::Number(n) => Ok(Secret(n.to_string())),
            serde_json::Value::Bool(b) => Ok(Secret(b.to_string())),
            _ => Err(serde::de::Error::custom("expected a string")),
        }
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret::new(value)
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret::new(value)
    }
}

/// A URL that may carry a password (`amqp://user:pass@host/vhost`, `postgres://…`). Displays with the password
/// replaced by `***`, so the host and vhost stay visible to an operator.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretUrl(Secret);

impl SecretUrl {
    /// Wraps a URL.
    pub fn new(url: impl Into<String>) -> Self {
        Self(Secret::new(url))
    }

    /// The full URL, password included.
    pub fn expose(&self) -> &str {
        self.0.expose()
    }

    /// The URL with its password (and any query string) masked; each address of a list masked on its own.
    pub fn redacted(&self) -> String {
        split_url_list(self.expose())
            .into_iter()
            .map(redact_url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The addresses of a cluster list (`amqp://a,amqp://b`, see [`split_url_list`]), each its own `SecretUrl`;
    /// a plain URL gives itself.
    pub fn addresses(&self) -> Vec<SecretUrl> {
        split_url_list(self.expose())
            .into_iter()
            .map(SecretUrl::new)
            .collect()
    }

    /// Several addresses as one list value (joined with `,`), the form [`SecretUrl::addresses`] splits again.
    pub fn list(urls: &[SecretUrl]) -> SecretUrl {
        SecretUrl::new(
            urls.iter()
                .map(SecretUrl::expose)
                .collect::<Vec<_>>()
                .join(","),
        )
    }
}

/// Splits a list of broker addresses, `amqp://u:p@node-1/vh,amqp://u:p@node-2/vh`: a comma starts a new address
/// only where the text after it (spaces trimmed) begins with a scheme (`word://`), so a comma inside a password or
/// a query string stays part of its URL. A text without such a comma is one address.
pub fn split_url_list(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    for (at, _) in text.match_indices(',') {
        let next = text[at + 1..].trim_start();
        let starts_url = next.split_once("://").is_some_and(|(scheme, _)| {
            !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '+')
        });
        if starts_url {
            parts.push(text[start..at].trim());
            start = at + 1;
        }
    }
    parts.push(text[start..].trim());
    parts
}

/// Masks the password part of `scheme://user:password@host...` and drops a query string (which may hold tokens).
pub fn redact_url(url: &str) -> String {
    let without_query = url.split('?').next().unwrap_or(url);
    let Some((scheme, rest)) = without_query.split_once("://") else {
        return "<redacted>".to_string();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        None => format!("{scheme}://{rest}"),
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretUrl({})", self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for SecretUrl {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.redacted())
    }
}

impl<'de> Deserialize<'de> for SecretUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(SecretUrl(Secret::deserialize(deserializer)?))
    }
}

/// A Didit share token (a JWT). Serialises as itself, because it must travel in envelopes and requests, but
/// `Debug` and `Display` never show it, so it cannot end up in a log line.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ShareToken(String);

impl ShareToken {
    /// Wraps a token.
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// The token itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ShareToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ShareToken(<redacted>)")
    }
}

impl fmt::Display for ShareToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Reads a secret from a file, trimming the trailing newline that editors and `kubectl create secret` leave.
pub fn read_secret_file(path: &Path) -> std::io::Result<Secret> {
    let text = std::fs::read_to_string(path)?;
    Ok(Secret::new(text.trim().to_string()))
}

/// Where a secret comes from: inline (env or config) or a file re-read on demand, so that a rotated Kubernetes
/// secret or a replaced file is picked up without a restart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretSource {
    /// Given directly (environment variable or, outside production, the config file).
    Inline(Secret),
    /// Read from this path each time [`SecretSource::load`] is called.
    File(PathBuf),
}

impl SecretSource {
    /// The current value of the secret.
    pub fn load(&self) -> std::io::Result<Secret> {
        match self {
            SecretSource::Inline(secret) => Ok(secret.clone()),
            SecretSource::File(path) => read_secret_file(path),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_list_splits_only_before_a_scheme_and_redacts_each_address() {
        let list = SecretUrl::new("amqp://u:p,w@n1:5672/%2f, amqps://u:q@n2/%2f?x=a,b");
        let parts: Vec<String> = list
            .addresses()
            .iter()
            .map(|u| u.expose().to_string())
            .collect();
        assert_eq!(
            parts,
            ["amqp://u:p,w@n1:5672/%2f", "amqps://u:q@n2/%2f?x=a,b"]
        );
        assert_eq!(
            list.redacted(),
            "amqp://u:***@n1:5672/%2f,amqps://u:***@n2/%2f"
        );
        assert_eq!(SecretUrl::list(&list.addresses()).addresses().len(), 2);
        assert_eq!(SecretUrl::new("amqp://h").addresses().len(), 1);
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("sk_live_abc");
        assert_eq!(format!("{s}"), "<redacted>");
        assert!(!format!("{s:?}").contains("sk_live"));
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"<redacted>\"");
    }

    #[test]
    fn urls_keep_host_but_not_password() {
        let u = SecretUrl::new("amqp://guest:hunter2@rabbit:5672/%2f?auth=x");
        assert_eq!(u.to_string(), "amqp://guest:***@rabbit:5672/%2f");
        assert!(!format!("{u:?}").contains("hunter2"));
        assert_eq!(redact_url("amqp://rabbit/%2f"), "amqp://rabbit/%2f");
    }
}
