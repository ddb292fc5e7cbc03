//! The small commands: `check-config`, `keygen`, `healthcheck`, `topology declare|show`, `dead-letters
//! list|replay`. Each returns what to print; `main` decides exit codes.

use std::io::Write;
use std::path::Path;

use anyhow::Context;

use crate::amqp::publisher::Publisher;
use crate::amqp::{Link, LinkOptions, dead_letters, topology};
use crate::config::Config;
use crate::envelope::SigningKey;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::secret::SecretUrl;

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

/// What `keygen` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Keygen {
    /// A new pair was written; its key id.
    Created(String),
    /// `--if-missing` and a key was there already; its key id.
    Kept(String),
}

/// `keygen --out DIR`: writes `DIR/signing.key` (mode 0600) and `DIR/signing.pub`, both base64. Refuses to
/// overwrite an existing key — losing a signing key means every receiver must be reconfigured — unless
/// `if_missing`, which keeps the existing pair (and rewrites a missing `signing.pub` from it).
///
/// One format serves both sides: an issuer's pair signs `share_token` envelopes (`issuer.signing_key_file`, its
/// `signing.pub` goes to each receiver's `[[receiver.issuers]] public_key_file`); a receiver's own pair signs its
/// `reshare.request`s (`receiver.signing_key_file`, its `signing.pub` goes to each issuer's `[[issuer.partners]]
/// public_keys` or `public_key_files`). A process running both roles uses two directories.
pub fn keygen(dir: &Path, if_missing: bool) -> anyhow::Result<Keygen> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let key_path = dir.join("signing.key");
    let pub_path = dir.join("signing.pub");
    if key_path.exists() && if_missing {
        let text = std::fs::read_to_string(&key_path)
            .with_context(|| format!("cannot read {}", key_path.display()))?;
        let key = SigningKey::from_base64(&text)
            .map_err(|e| anyhow::anyhow!("{} is not a signing key: {e}", key_path.display()))?;
        if !pub_path.exists() {
            std::fs::write(&pub_path, format!("{}\n", key.verifying_key().to_base64()))
                .with_context(|| format!("cannot write {}", pub_path.display()))?;
        }
        return Ok(Keygen::Kept(key.key_id().to_string()));
    }
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
    Ok(Keygen::Created(key.key_id().to_string()))
}

/// `keygen --public-out PUB`: writes `PUB/signing.pub`, derived from `DIR/signing.key` (so it always matches the
/// private key, whichever run created it), and nothing else into `PUB`.
pub fn export_public(dir: &Path, public_out: &Path) -> anyhow::Result<()> {
    let key_path = dir.join("signing.key");
    let text = std::fs::read_to_string(&key_path)
        .with_context(|| format!("cannot read {}", key_path.display()))?;
    let key = SigningKey::from_base64(&text)
        .map_err(|e| anyhow::anyhow!("{} is not a signing key: {e}", key_path.display()))?;
    std::fs::create_dir_all(public_out)
        .with_context(|| format!("cannot create {}", public_out.display()))?;
    let pub_path = public_out.join("signing.pub");
    std::fs::write(&pub_path, format!("{}\n", key.verifying_key().to_base64()))
        .with_context(|| format!("cannot write {}", pub_path.display()))
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

/// `topology show`: what the enabled roles declare, one entity per line.
pub fn topology_show(config: &Config) -> String {
    let mut out = String::new();
    for entity in crate::app::declared_topology(config) {
        out.push_str(&entity.to_string());
        out.push('\n');
    }
    out
}

/// A link for the one-shot commands (no readiness, no metrics that anyone scrapes).
fn one_shot_link(config: &Config, url: SecretUrl) -> Link {
    Link::new(
        url,
        "cli",
        std::sync::Arc::new(Metrics::new()),
        std::sync::Arc::new(Health::new()),
        LinkOptions::from_config(&config.amqp, "partner-bridge cli"),
    )
}

async fn one_shot_channel(link: &Link) -> anyhow::Result<lapin::Channel> {
    let connection =
        tokio::time::timeout(std::time::Duration::from_secs(10), link.try_connection())
            .await
            .map_err(|_| anyhow::anyhow!("the broker did not answer within 10 s"))??;
    Ok(connection.create_channel().await?)
}

/// `topology declare`: declares everything on the main broker, and the token exchange on the token broker when
/// that is another one. Returns what was declared.
pub async fn topology_declare(config: &Config) -> anyhow::Result<String> {
    let plan = crate::app::declared_topology(config);
    let link = one_shot_link(config, config.amqp_url()?);
    let channel = one_shot_channel(&link).await?;
    topology::declare(&channel, &plan).await?;
    let mut out = topology_show(config);
    if config.issuer.enabled && config.tokens_url()?.expose() != config.amqp_url()?.expose() {
        let tokens = one_shot_link(config, config.tokens_url()?);
        let channel = one_shot_channel(&tokens).await?;
        let names = crate::amqp::Names::new(&config.amqp.prefix);
        topology::declare(&channel, &topology::issuer_tokens_plan(&names)).await?;
        out.push_str(&format!(
            "(and the tokens exchange on {})\n",
            config.tokens_url()?.redacted()
        ));
        tokens.close().await;
    }
    link.close().await;
    Ok(out)
}

/// `dead-letters list`: the messages in `<queue>.dead` with their reasons; nothing is removed.
pub async fn dead_letters_list(
    config: &Config,
    queue: &str,
    limit: usize,
) -> anyhow::Result<String> {
    let link = one_shot_link(config, config.amqp_url()?);
    let channel = one_shot_channel(&link).await?;
    let infos = dead_letters::list_dead(&channel, queue, limit).await?;
    let mut out = format!("{} message(s) shown from {}.dead\n", infos.len(), queue);
    for info in infos {
        out.push_str(&format!(
            "- reason={} type={} message_id={} bytes={} deaths={}\n",
            info.reason,
            info.kind.as_deref().unwrap_or("-"),
            info.message_id.as_deref().unwrap_or("-"),
            info.body_bytes,
            info.death_count
        ));
        if let Some(detail) = &info.detail {
            out.push_str(&format!("  detail: {detail}\n"));
        }
        out.push_str(&format!("  body: {}\n", info.body_preview));
    }
    link.close().await;
    Ok(out)
}

/// `dead-letters replay`: moves up to `limit` of the messages present in `<queue>.dead` when it starts back into
/// `queue` (never the ones that fail again while it runs), and tells how many moved.
pub async fn dead_letters_replay(
    config: &Config,
    queue: &str,
    limit: usize,
) -> anyhow::Result<dead_letters::Replayed> {
    let link = one_shot_link(config, config.amqp_url()?);
    let channel = one_shot_channel(&link).await?;
    let publisher = Publisher::new(
        link.clone(),
        std::time::Duration::from_millis(config.amqp.confirm_timeout_ms),
        std::sync::Arc::new(Metrics::new()),
    );
    let moved = dead_letters::replay_dead(&channel, &publisher, queue, limit).await?;
    link.close().await;
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::VerifyingKey;

    #[test]
    fn export_public_writes_only_the_matching_public_key() {
        let dir = tempfile::tempdir().unwrap();
        let public = tempfile::tempdir().unwrap();
        let Keygen::Created(id) = keygen(dir.path(), false).unwrap() else {
            panic!("a new key was expected")
        };
        export_public(dir.path(), &public.path().join("pub")).unwrap();
        let names: Vec<_> = std::fs::read_dir(public.path().join("pub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["signing.pub"]);
        let key = VerifyingKey::from_base64(
            &std::fs::read_to_string(public.path().join("pub/signing.pub")).unwrap(),
        )
        .unwrap();
        assert_eq!(key.key_id(), id);
    }

    #[test]
    fn keygen_writes_a_usable_pair_once() {
        let dir = tempfile::tempdir().unwrap();
        let Keygen::Created(id) = keygen(dir.path(), false).unwrap() else {
            panic!("a new key was expected")
        };
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
        assert!(
            keygen(dir.path(), false).is_err(),
            "must not overwrite a key"
        );
        assert_eq!(keygen(dir.path(), true).unwrap(), Keygen::Kept(id.clone()));
        std::fs::remove_file(dir.path().join("signing.pub")).unwrap();
        assert_eq!(keygen(dir.path(), true).unwrap(), Keygen::Kept(id));
        assert!(dir.path().join("signing.pub").exists());
    }
}
