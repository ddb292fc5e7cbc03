//! The small commands: `check-config`, `keygen`, `healthcheck`, `topology declare|show`, `dead-letters
//! list|replay`, `audit list|export|verify|recipients`, `notify`. Each returns what to print; `main` decides exit codes.

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
    /// `--if-missing` and a key was there already; the key id of the one that signs.
    Kept(String),
    /// `--rotate`: a new key was added to the set; its key id and how many keys the set holds now.
    Rotated(String, usize),
}

/// Reads `DIR/signing.key` as a key set (the last key signs).
fn read_key_set(key_path: &Path) -> anyhow::Result<Vec<SigningKey>> {
    let text = std::fs::read_to_string(key_path)
        .with_context(|| format!("cannot read {}", key_path.display()))?;
    crate::keys::parse_signing_set(&text, key_path, &[])
        .map_err(|e| anyhow::anyhow!("{} is not a signing key set: {e}", key_path.display()))
}

fn public_lines(keys: &[SigningKey]) -> String {
    keys.iter()
        .map(|k| format!("{}\n", k.verifying_key().to_base64()))
        .collect()
}

/// Writes `text` to `path` through a temporary file in the same directory and a rename, so that a bridge
/// re-reading the file never sees half of it. `private` files get mode 0600.
fn write_atomically(path: &Path, text: &str, private: bool) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))
}

/// `keygen --out DIR`: writes `DIR/signing.key` (mode 0600) and `DIR/signing.pub`, both base64. Refuses to
/// overwrite an existing key — losing a signing key means every receiver must be reconfigured — unless
/// `if_missing`, which keeps the existing set (and rewrites a missing `signing.pub` from it).
///
/// One format serves both sides: an issuer's pair signs `share_token` envelopes (`issuer.signing_key_file`, its
/// `signing.pub` goes to each receiver's `[[receiver.issuers]] public_key_file`); a receiver's own pair signs its
/// `reshare.request`s (`receiver.signing_key_file`, its `signing.pub` goes to each issuer's `[[issuer.partners]]
/// public_keys` or `public_key_files`). A process running both roles uses two directories. Both files are key
/// sets (see [`crate::keys`]); [`keygen_rotate`] adds keys to them.
pub fn keygen(dir: &Path, if_missing: bool) -> anyhow::Result<Keygen> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let key_path = dir.join("signing.key");
    let pub_path = dir.join("signing.pub");
    if key_path.exists() && if_missing {
        let keys = read_key_set(&key_path)?;
        if !pub_path.exists() {
            std::fs::write(&pub_path, public_lines(&keys))
                .with_context(|| format!("cannot write {}", pub_path.display()))?;
        }
        let signer = keys.last().expect("a parsed set is never empty");
        return Ok(Keygen::Kept(signer.key_id().to_string()));
    }
    if key_path.exists() {
        anyhow::bail!(
            "{} already exists; move it away first if you really mean to replace the key (or add a key with --rotate)",
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

/// `keygen --rotate DIR`: adds a new key at the end of `DIR/signing.key` (so it is the one that signs) and its
/// public key at the end of `DIR/signing.pub`, keeping every key already there; both files are replaced
/// atomically. A verifier that lists the new `signing.pub` accepts envelopes signed with the old key and the new one.
pub fn keygen_rotate(dir: &Path) -> anyhow::Result<Keygen> {
    let key_path = dir.join("signing.key");
    let pub_path = dir.join("signing.pub");
    if !key_path.exists() {
        anyhow::bail!(
            "{} does not exist: there is no key to rotate (create the first with `keygen --out {}`)",
            key_path.display(),
            dir.display()
        );
    }
    let mut keys = read_key_set(&key_path)?;
    let key = SigningKey::generate();
    let mut private = std::fs::read_to_string(&key_path)
        .with_context(|| format!("cannot read {}", key_path.display()))?;
    if !private.is_empty() && !private.ends_with('\n') {
        private.push('\n');
    }
    let stamp = crate::envelope::rfc3339(chrono::Utc::now());
    private.push_str(&format!(
        "# key id {} added {stamp} (the last key signs)\n{}\n",
        key.key_id(),
        key.to_base64()
    ));
    let public = match std::fs::read_to_string(&pub_path) {
        Ok(mut text) => {
            crate::keys::parse_public_set(&text, &pub_path).map_err(|e| {
                anyhow::anyhow!("{} is not a public key set: {e}", pub_path.display())
            })?;
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => public_lines(&keys),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", pub_path.display())),
    };
    let public = format!(
        "{public}# key id {} added {stamp}\n{}\n",
        key.key_id(),
        key.verifying_key().to_base64()
    );
    // The public set first: whoever copies both files mid-way gets a public set that already knows the new key.
    write_atomically(&pub_path, &public, false)?;
    write_atomically(&key_path, &private, true)?;
    keys.push(key);
    let id = keys.last().expect("just pushed").key_id().to_string();
    Ok(Keygen::Rotated(id, keys.len()))
}

/// `keygen --public-out PUB`: writes `PUB/signing.pub` with the public key of every key in `DIR/signing.key`
/// (derived from the private set, so it always matches it), and nothing else into `PUB`.
pub fn export_public(dir: &Path, public_out: &Path) -> anyhow::Result<()> {
    let keys = read_key_set(&dir.join("signing.key"))?;
    std::fs::create_dir_all(public_out)
        .with_context(|| format!("cannot create {}", public_out.display()))?;
    let pub_path = public_out.join("signing.pub");
    write_atomically(&pub_path, &public_lines(&keys), false)
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

/// `topology declare`: declares everything on the main broker, and on every other token broker (`issuer.tokens_url`,
/// `issuer.partners[].tokens_url`) the token exchange and the issuer's reshare queue. Returns what was declared.
pub async fn topology_declare(config: &Config) -> anyhow::Result<String> {
    let plan = crate::app::declared_topology(config);
    let amqp_url = config.amqp_url()?;
    let link = one_shot_link(config, amqp_url.clone());
    let channel = one_shot_channel(&link).await?;
    topology::declare(&channel, &plan).await?;
    let mut out = topology_show(config);
    if config.issuer.enabled {
        let names = crate::amqp::Names::new(&config.amqp.prefix);
        let settings = topology::QueueSettings::from_config(&config.amqp);
        let own = config.issuer_didit()?.application_id;
        for (url, _) in config.token_brokers()? {
            if url.expose() == amqp_url.expose() {
                continue;
            }
            let tokens = one_shot_link(config, url.clone());
            let channel = one_shot_channel(&tokens).await?;
            let remote = topology::combine([
                topology::issuer_tokens_plan(&names),
                topology::issuer_remote_reshare_plan(&names, &settings, &own),
            ]);
            topology::declare(&channel, &remote).await?;
            out.push_str(&format!(
                "(and the tokens exchange and the reshare queue on {})\n",
                url.redacted()
            ));
            tokens.close().await;
        }
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

/// The audit log in the configured ledger, and the public keys its checkpoints must verify with (every key of the
/// issuer's signing set and of the receiver's, as configured).
pub async fn open_audit(
    config: &Config,
) -> anyhow::Result<(crate::audit::AuditLog, Vec<crate::envelope::VerifyingKey>)> {
    use crate::keys::SigningKeys;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut sets = Vec::new();
    if config.issuer.enabled {
        sets.push(
            SigningKeys::load(
                &config.signing_key_source()?,
                "issuer.signing_key",
                config.known_public_keys(),
                None,
            )
            .map_err(|e| anyhow::anyhow!("invalid signing key: {e}"))?,
        );
    }
    if config.receiver.enabled
        && let Some((source, name)) = config.receiver_signing_key_source()
    {
        sets.push(
            SigningKeys::load(&source, name, config.known_public_keys(), None)
                .map_err(|e| anyhow::anyhow!("invalid receiver signing key: {e}"))?,
        );
    }
    let keys = sets.iter().flat_map(SigningKeys::public_keys).collect();
    let first = sets.first().map(SigningKeys::first);
    let url = config.ledger_url();
    let ledger = crate::ledger::Ledger::open_with_tls(
        &url,
        config.ledger.timeout(),
        &config.ledger.tls_settings(),
    )
    .await
    .with_context(|| format!("cannot open the ledger at {}", url.redacted()))?;
    let audit =
        crate::audit::AuditLog::open(&ledger, None, first.as_ref(), config.ledger.timeout())
            .await
            .with_context(|| format!("cannot open the audit log at {}", url.redacted()))?;
    Ok((audit, keys))
}

fn cell(value: &Option<String>) -> &str {
    value.as_deref().unwrap_or("-")
}

/// The columns `audit list` shows.
pub const LIST_COLUMNS: [&str; 11] = [
    "seq",
    "at",
    "side",
    "act",
    "partner",
    "partner_application_id",
    "agreement_id",
    "session_id",
    "imported_session_id",
    "status",
    "reason",
];

/// `audit list`: a header line, then one tab-separated line per row (`-` for nothing).
pub fn audit_list(rows: &[crate::audit::AuditRow]) -> String {
    let mut out = LIST_COLUMNS.join("\t");
    out.push('\n');
    for r in rows {
        let at = crate::envelope::rfc3339(r.at());
        let line = [
            r.seq.to_string().as_str(),
            at.as_str(),
            r.side.as_str(),
            r.act.as_str(),
            cell(&r.partner),
            cell(&r.partner_application_id),
            cell(&r.agreement_id),
            cell(&r.session_id),
            cell(&r.imported_session_id),
            cell(&r.status),
            cell(&r.reason),
        ]
        .map(|v| v.replace(['\t', '\n', '\r'], " "))
        .join("\t");
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// One CSV field (RFC 4180): quoted when it holds a comma, a quote or a line break, quotes doubled.
fn csv_field(value: &str) -> String {
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_string()
    }
}

/// `audit export`: every stored column of each row, in stored order (the same for every row): JSON lines, or CSV
/// with a header line (an empty field for NULL).
pub fn audit_export(rows: &[crate::audit::AuditRow], format: crate::cli::ExportFormat) -> String {
    let mut out = String::new();
    match format {
        crate::cli::ExportFormat::Jsonl => {
            for r in rows {
                out.push_str(&serde_json::to_string(r).expect("rows serialise"));
                out.push('\n');
            }
        }
        crate::cli::ExportFormat::Csv => {
            let names: Vec<&str> = crate::audit::AuditRow::column_names().to_vec();
            out.push_str(&names.join(","));
            out.push_str("\r\n");
            for r in rows {
                let fields: Vec<String> = r
                    .columns()
                    .iter()
                    .map(|(_, v)| csv_field(v.as_deref().unwrap_or("")))
                    .collect();
                out.push_str(&fields.join(","));
                out.push_str("\r\n");
            }
        }
    }
    out
}

/// `audit verify`: the summary when the chain and every checkpoint hold, else an error naming the first row that
/// does not match.
pub async fn audit_verify(config: &Config) -> anyhow::Result<String> {
    let (audit, keys) = open_audit(config).await?;
    let verified = audit.verify(&keys).await?;
    if let Some(problem) = verified.problem {
        anyhow::bail!(
            "{problem} ({} row(s) and {} checkpoint(s) read)",
            verified.rows,
            verified.checkpoints
        );
    }
    let rows = audit.rows(&crate::audit::Filter::default()).await?;
    let span = match (rows.first(), rows.last()) {
        (Some(a), Some(b)) => format!(", seq {} to {}", a.seq, b.seq),
        _ => String::new(),
    };
    let mut out = format!(
        "audit log verified: {} row(s){span}, {} signed checkpoint(s)",
        verified.rows,
        verified.checkpoints - verified.unsigned
    );
    if verified.unsigned > 0 {
        out.push_str(&format!(
            ", {} unsigned (this side has no signing key)",
            verified.unsigned
        ));
    }
    out.push('\n');
    Ok(out)
}

/// `audit recipients`: a header line, then one tab-separated line per partner that was sent the session.
pub async fn audit_recipients(
    config: &Config,
    session: &str,
    json: bool,
) -> anyhow::Result<String> {
    let (audit, _) = open_audit(config).await?;
    let recipients = audit.recipients(session).await?;
    if json {
        return Ok(format!("{}\n", serde_json::to_string(&recipients)?));
    }
    let mut out = String::from(
        "partner\tpartner_application_id\tagreement_id\tfirst_sent\tlast_sent\ttokens\n",
    );
    let time = |ms: i64| {
        crate::envelope::rfc3339(chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default())
    };
    for r in recipients {
        out.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\t{}\n",
            cell(&r.partner),
            r.partner_application_id,
            cell(&r.agreement_id),
            time(r.first_ms),
            time(r.last_ms),
            r.tokens
        ));
    }
    Ok(out)
}

/// `notify`: tells every recipient of `session_id` about an erasure or rectification (see
/// [`crate::issuer::notices`]). Sends the notices once and returns what happened; the running issuer collects the
/// acknowledgements and sends again whatever is not acknowledged. `request_id` makes a repeated command send
/// nothing new (default: a fresh one).
pub async fn notify(
    config: &Config,
    session_id: &str,
    kind: crate::envelope::NoticeKind,
    reason: Option<String>,
    request_id: Option<String>,
) -> anyhow::Result<String> {
    if !config.issuer.enabled {
        anyhow::bail!(
            "notify needs the issuer role ([issuer] enabled = true): notices go to the issuer's partners"
        );
    }
    let metrics = std::sync::Arc::new(Metrics::new());
    let ledger_url = config.ledger_url();
    let ledger = crate::ledger::Ledger::open_with_tls(
        &ledger_url,
        config.ledger.timeout(),
        &config.ledger.tls_settings(),
    )
    .await
    .with_context(|| format!("cannot open the ledger at {}", ledger_url.redacted()))?;
    let audit = crate::audit::AuditLog::open(&ledger, None, None, config.ledger.timeout())
        .await
        .context("cannot open the audit log")?;
    let signing_key = crate::keys::SigningKeys::load(
        &config.signing_key_source()?,
        if config.issuer.signing_key.is_some() {
            "issuer.signing_key"
        } else {
            "issuer.signing_key_file"
        },
        config.known_public_keys(),
        None,
    )
    .map_err(|e| anyhow::anyhow!("invalid signing key: {e}"))?;
    let confirm_timeout = std::time::Duration::from_millis(config.amqp.confirm_timeout_ms);
    // One link per token broker (the first is `issuer.tokens_url`, else `amqp.url`): a partner with a broker of its
    // own gets its notice there, beside its tokens. Connected first, so that a publish below does not fail on a link
    // that never tried.
    let mut links = Vec::new();
    let mut partner_tokens = std::collections::HashMap::new();
    for (i, (url, served)) in config.token_brokers()?.into_iter().enumerate() {
        let link = one_shot_link(config, url);
        drop(one_shot_channel(&link).await?);
        if i > 0 {
            let publisher = Publisher::new(link.clone(), confirm_timeout, metrics.clone());
            for p in served {
                partner_tokens.insert(
                    config.issuer.partners[p].application_id.clone(),
                    publisher.clone(),
                );
            }
        }
        links.push(link);
    }
    let notifier = crate::issuer::notices::Notifier {
        ledger,
        audit,
        tokens: Publisher::new(links[0].clone(), confirm_timeout, metrics.clone()),
        partner_tokens,
        names: crate::amqp::Names::new(&config.amqp.prefix),
        signing_key,
        application_id: config.issuer_didit()?.application_id,
        partners: config.issuer.partners.clone(),
        metrics,
    };
    let request = crate::envelope::NoticeRequested {
        kind: crate::envelope::types::NOTICE_REQUESTED.to_string(),
        request_id: request_id.unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
        session_id: session_id.to_string(),
        notice_kind: kind,
        reason,
    };
    let issued = notifier.issue(&request, chrono::Utc::now()).await?;
    for link in links {
        link.close().await;
    }
    let mut out = String::new();
    if issued.notices.is_empty() {
        out.push_str(&format!(
            "session {session_id} was never shared (no recipient in the audit log or the ledger): the {} notice reaches nobody
",
            kind.as_str()
        ));
        return Ok(out);
    }
    out.push_str(&format!(
        "{} notice for session {session_id} (request {}) to {} recipient(s):
",
        kind.as_str(),
        request.request_id,
        issued.notices.len()
    ));
    for n in &issued.notices {
        let state = if n.acked_at.is_some() {
            "acknowledged"
        } else if issued.not_sent.iter().any(|(id, _)| id == &n.notice_id) {
            "not confirmed by the broker yet: the running issuer sends it again"
        } else {
            "sent, waiting for the acknowledgement"
        };
        out.push_str(&format!(
            "- {} ({}) notice_id={} agreement={}: {state}
",
            n.partner,
            n.partner_application_id,
            n.notice_id,
            n.agreement_id.as_deref().unwrap_or("-")
        ));
    }
    for (id, detail) in &issued.not_sent {
        out.push_str(&format!("  {id}: {detail}\n"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::VerifyingKey;

    #[test]
    fn csv_fields_are_quoted_only_when_they_must_be() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("two\nlines"), "\"two\nlines\"");
    }

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
    fn rotate_adds_a_signing_key_and_keeps_the_old_public_key() {
        let dir = tempfile::tempdir().unwrap();
        assert!(keygen_rotate(dir.path()).is_err(), "nothing to rotate yet");
        let Keygen::Created(first) = keygen(dir.path(), false).unwrap() else {
            panic!("a new key was expected")
        };
        let Keygen::Rotated(second, 2) = keygen_rotate(dir.path()).unwrap() else {
            panic!("a second key was expected")
        };
        assert_ne!(first, second);
        let key_path = dir.path().join("signing.key");
        let keys = read_key_set(&key_path).unwrap();
        assert_eq!(keys[0].key_id(), first);
        assert_eq!(keys[1].key_id(), second, "the newest key signs");
        let pub_path = dir.path().join("signing.pub");
        let public =
            crate::keys::parse_public_set(&std::fs::read_to_string(&pub_path).unwrap(), &pub_path)
                .unwrap();
        let ids: Vec<_> = public.iter().map(|k| k.key_id().to_string()).collect();
        assert_eq!(ids, [first.clone(), second.clone()]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(
            keygen(dir.path(), true).unwrap(),
            Keygen::Kept(second.clone())
        );
        let out = tempfile::tempdir().unwrap();
        export_public(dir.path(), out.path()).unwrap();
        let exported = std::fs::read_to_string(out.path().join("signing.pub")).unwrap();
        assert_eq!(exported.lines().count(), 2);
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
