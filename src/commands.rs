//! The small commands: `check-config`, `keygen`, `healthcheck` (and, once the AMQP layer exists, `topology` and
//! `dead-letters`). Each returns what to print; `main` decides exit codes.

use std::io::Write;
use std::path::Path;

use anyhow::Context;

use crate::config::Config;
use crate::envelope::SigningKey;

/// `check-config`: the effective configuration, secrets redacted, plus a one-line summary of the roles.
pub fn check_config(config: &Config) -> String {
    let mut out = String::new();
    out.push_str("# configuration is valid\n");
    if config.issuer.enabled {
        out.push_str(&format!(
            "# issuer: {} partner(s): {}\n",
            config.issuer.partners.len(),
            config
                .issuer
                .partners
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if config.receiver.enabled {
        out.push_str(&format!(
            "# receiver: {} issuer(s): {}\n",
            config.receiver.issuers.len(),
            config
                .receiver
                .issuers
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    out.push_str(&config.redacted_toml());
    out
}

/// `keygen --out DIR`: writes `DIR/signing.key` (mode 0600) and `DIR/signing.pub`, both base64, and returns the key
/// id. Refuses to overwrite an existing key: losing a signing key means every receiver must be reconfigured.
pub fn keygen(dir: &Path) -> anyhow::Result<String> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let key_path = dir.join("signing.key");
    let pub_path = dir.join("signing.pub");
    if key_path.exists() {
        anyhow::bail!(
            "{} already exists; move it away first if you really mean to replace the key",
            key_path.display()
        );
    }
    let key = SigningKey::generate();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(&key_path)
        .with_context(|| format!("cannot create {}", key_path.display()))?;
    writeln!(file, "{}", key.to_base64())
        .with_context(|| format!("cannot write {}", key_path.display()))?;
    file.sync_all()?;
    std::fs::write(&pub_path, format!("{}\n", key.verifying_key().to_base64()))
        .with_context(|| format!("cannot write {}", pub_path.display()))?;
    Ok(key.key_id().to_string())
}

/// `healthcheck --url URL`: Ok when the URL answers 200 within 3 seconds.
pub async fn healthcheck(url: &str) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(3))
        .build()?;
    let response = client
        .get(url)
        .send()
        .await
        .with_context(|| format!("{url} did not answer"))?;
    if response.status().is_success() {
        Ok(())
    } else {
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        anyhow::bail!("{url} answered {status}: {}", body.trim())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::VerifyingKey;

    #[test]
    fn keygen_writes_a_usable_pair_once() {
        let dir = tempfile::tempdir().unwrap();
        let id = keygen(dir.path()).unwrap();
        let key = SigningKey::from_base64(
            &std::fs::read_to_string(dir.path().join("signing.key")).unwrap(),
        )
        .unwrap();
        let public = VerifyingKey::from_base64(
            &std::fs::read_to_string(dir.path().join("signing.pub")).unwrap(),
        )
        .unwrap();
        assert_eq!(key.key_id(), id);
        assert_eq!(public.key_id(), id);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("signing.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(keygen(dir.path()).is_err(), "must not overwrite a key");
    }
}
