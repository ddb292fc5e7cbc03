//! `partner-bridge demo`: the whole product on one machine, needing only a local RabbitMQ.
//!
//! It starts the sandbox (Didit's API, emulated) in-process with two applications — `fintech-a`, the issuer, and
//! `sponsor-bank`, its partner — then one issuer bridge and one receiver bridge, each exactly as `run` would start
//! them from a configuration file. It creates a mix of finished KYC and KYB verifications at the issuer, publishes
//! one `onboarding.finished` event per verification the way the issuer's backend would, follows the `import.result`
//! messages the receiver publishes, and prints what was imported where. Every name it uses on the broker carries a
//! fresh prefix, and it deletes them when it ends.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;

use crate::amqp::publisher::{Outgoing, Publisher};
use crate::amqp::{Link, LinkOptions, Names, topology};
use crate::app::{self, Running};
use crate::config::Config;
use crate::didit::wire::SessionKind;
use crate::envelope::{self, ImportResult, OnboardingFinished, SigningKey};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::sandbox::{Sandbox, SandboxOptions};
use crate::secret::SecretUrl;

/// What `demo` was asked to do.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The broker.
    pub amqp_url: String,
    /// How many verifications to share.
    pub sessions: usize,
    /// Keep running after the summary until Ctrl-C.
    pub keep_running: bool,
    /// The issuer's admin address; the receiver's is the next port.
    pub admin_listen: SocketAddr,
    /// Whether the receiver trusts the issuer's decisions.
    pub trust_review: bool,
}

const STATUSES: [&str; 4] = ["Approved", "In Review", "Approved", "Declined"];

/// What the demo partner accepts and why, printed before anything is shared: the demo's partner is configured
/// wider than a partner that sets nothing, and without this a first run reads as "every status is shared".
pub const POLICY_EXPLANATION: &str = "  policy    sponsor-bank accepts statuses Approved, In Review and Declined of user (KYC) and business (KYB)
            sessions, so the demo can show every outcome. A partner configured without `statuses` receives
            Approved only (the default, statuses = [\"Approved\"]); session_kinds defaults to both kinds.
            Widen it per partner in [[issuer.partners]] only when the partner's contract covers it.";

struct Row {
    source_session_id: String,
    kind: SessionKind,
    vendor_data: String,
    source_status: String,
    result: Option<ImportResult>,
}

/// Runs the demo; an error means it could not show what it should (the broker is missing, a port is taken, or an
/// import did not arrive).
pub async fn run(options: DemoOptions) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let prefix = format!("pb-demo-{run_id}");
    let state_dir = std::env::temp_dir().join(format!("partner-bridge-demo-{run_id}"));
    println!(
        "partner-bridge demo: Didit sandbox + issuer bridge + receiver bridge on {}",
        SecretUrl::new(&options.amqp_url)
    );
    check_broker(&options.amqp_url).await?;

    let sandbox = Sandbox::start(
        "127.0.0.1:0".parse().expect("static address"),
        SandboxOptions {
            default_applications: false,
            ..SandboxOptions::default()
        },
    )
    .await
    .context("cannot start the sandbox")?;
    let control = sandbox.control();
    let issuer_app = control.create_application("fintech-a").await?;
    let partner_app = control.create_application("sponsor-bank").await?;
    println!(
        "  sandbox   {}  (fintech-a issues, sponsor-bank imports)",
        sandbox.base_url()
    );
    println!("{POLICY_EXPLANATION}");

    let key = SigningKey::generate();
    // The receiver signs its reshare requests with its own key; the issuer lists the public half for the partner.
    let receiver_key = SigningKey::generate();
    let issuer_config = Config::from_toml(&format!(
        r#"
state_dir = "{state}/issuer"
[didit]
base_url = "{base}"
application_id = "{issuer_id}"
api_key = "{issuer_key}"
[amqp]
url = "{amqp}"
prefix = "{prefix}"
[admin]
listen = "{issuer_admin}"
[retry]
initial_ms = 100
max_ms = 2000
[log]
level = "warn"
[issuer]
enabled = true
signing_key = "{signing_key}"
[[issuer.partners]]
name = "sponsor-bank"
application_id = "{partner_id}"
ttl_seconds = 3600
statuses = ["Approved", "In Review", "Declined"]
session_kinds = ["user", "business"]
share_vendor_data = true
public_keys = ["{receiver_public}"]
"#,
        state = state_dir.display(),
        base = sandbox.base_url(),
        issuer_id = issuer_app.application_id,
        issuer_key = issuer_app.api_key.expose(),
        amqp = options.amqp_url,
        issuer_admin = options.admin_listen,
        signing_key = key.to_base64(),
        partner_id = partner_app.application_id,
        receiver_public = receiver_key.verifying_key().to_base64(),
    ))?;
    let receiver_admin = SocketAddr::new(
        options.admin_listen.ip(),
        options.admin_listen.port().saturating_add(1),
    );
    let receiver_config = Config::from_toml(&format!(
        r#"
state_dir = "{state}/receiver"
[didit]
base_url = "{base}"
application_id = "{partner_id}"
api_key = "{partner_key}"
[amqp]
url = "{amqp}"
prefix = "{prefix}"
[admin]
listen = "{receiver_admin}"
[retry]
initial_ms = 100
max_ms = 2000
[log]
level = "warn"
[receiver]
enabled = true
workflow_user = "{wf_user}"
workflow_business = "{wf_business}"
vendor_data = "{{issuer}}:{{source_vendor_data}}"
signing_key = "{receiver_key}"
[[receiver.issuers]]
name = "fintech-a"
application_id = "{issuer_id}"
public_key = "{public_key}"
trust_review = {trust}
"#,
        state = state_dir.display(),
        base = sandbox.base_url(),
        partner_id = partner_app.application_id,
        partner_key = partner_app.api_key.expose(),
        amqp = options.amqp_url,
        wf_user = partner_app.workflows.user,
        wf_business = partner_app.workflows.business,
        issuer_id = issuer_app.application_id,
        public_key = key.verifying_key().to_base64(),
        trust = options.trust_review,
        receiver_key = receiver_key.to_base64(),
    ))?;
    issuer_config.validate()?;
    receiver_config.validate()?;

    let shutdown = CancellationToken::new();
    let receiver = app::start(receiver_config.clone(), shutdown.child_token())
        .await
        .context("cannot start the receiver bridge")?;
    let issuer = app::start(issuer_config.clone(), shutdown.child_token())
        .await
        .context("cannot start the issuer bridge")?;
    wait_ready(&[("issuer", &issuer), ("receiver", &receiver)]).await?;
    println!(
        "  issuer    admin http://{}/metrics   receiver  admin http://{}/metrics",
        issuer.admin_addr(),
        receiver.admin_addr()
    );
    println!(
        "  trust_review = {} (the receiver {} the issuer's decisions)",
        options.trust_review,
        if options.trust_review {
            "keeps"
        } else {
            "re-reviews"
        }
    );
    println!();

    let outcome = share_and_follow(&options, &control, &issuer_app.application_id, &prefix).await;

    if options.keep_running && outcome.is_ok() {
        println!("\nkeeping the bridges up; press Ctrl-C to stop");
        let stop = crate::shutdown::on_signal();
        stop.cancelled().await;
    }
    shutdown.cancel();
    let _ = issuer.wait().await;
    let _ = receiver.wait().await;
    cleanup(&options.amqp_url, &issuer_config, &receiver_config).await;
    sandbox.shutdown().await;
    let _ = std::fs::remove_dir_all(&state_dir);
    outcome
}

async fn check_broker(url: &str) -> anyhow::Result<()> {
    let connect = lapin::Connection::connect(url, lapin::ConnectionProperties::default());
    match tokio::time::timeout(Duration::from_secs(5), connect).await {
        Ok(Ok(connection)) => {
            let _ = connection.close(200, "demo check".into()).await;
            Ok(())
        }
        Ok(Err(e)) => anyhow::bail!(
            "cannot reach RabbitMQ at {}: {e}\n  start one (e.g. `rabbitmq-server -detached`) or pass --amqp-url",
            SecretUrl::new(url)
        ),
        Err(_) => anyhow::bail!(
            "RabbitMQ at {} did not answer within 5 s",
            SecretUrl::new(url)
        ),
    }
}

async fn wait_ready(apps: &[(&str, &Running)]) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut waiting = Vec::new();
        for (name, running) in apps {
            if let Err(reasons) = running.health().check() {
                waiting.push(format!("{name}: {}", reasons.join("; ")));
            }
        }
        if waiting.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "the bridges did not become ready:\n  {}",
                waiting.join("\n  ")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn share_and_follow(
    options: &DemoOptions,
    control: &crate::sandbox::Control,
    issuer_application_id: &str,
    prefix: &str,
) -> anyhow::Result<()> {
    let names = Names::new(prefix);
    let metrics = std::sync::Arc::new(Metrics::new());
    let health = std::sync::Arc::new(Health::new());
    let link = Link::new(
        SecretUrl::new(&options.amqp_url),
        "demo",
        metrics.clone(),
        health,
        LinkOptions::default(),
    );
    let never = CancellationToken::new();
    let connection = link.connection(&never).await?;
    let channel = connection.create_channel().await?;
    let results_queue = format!("{prefix}.receiver.results");
    let mut results = channel
        .basic_consume(
            results_queue.as_str().into(),
            "partner-bridge-demo".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .context("cannot follow the receiver's results queue")?;

    let mut rows = Vec::new();
    for i in 0..options.sessions {
        let kind = if i % 3 == 2 {
            SessionKind::Business
        } else {
            SessionKind::User
        };
        let status = STATUSES[i % STATUSES.len()];
        let vendor = match kind {
            SessionKind::User => format!("customer-{}", i + 1),
            SessionKind::Business => format!("company-{}", i + 1),
        };
        let session = control
            .create_session(issuer_application_id, kind, status, Some(&vendor))
            .await?;
        rows.push(Row {
            source_session_id: session.session_id,
            kind,
            vendor_data: vendor,
            source_status: session.status,
            result: None,
        });
    }
    println!(
        "created {} verifications at fintech-a; publishing onboarding.finished for each",
        rows.len()
    );

    let publisher = Publisher::new(link.clone(), Duration::from_secs(10), metrics);
    let exchange = names.onboarding_exchange();
    for row in &rows {
        let event = OnboardingFinished {
            kind: envelope::types::ONBOARDING_FINISHED.into(),
            event_id: uuid::Uuid::new_v4().to_string(),
            session_id: row.source_session_id.clone(),
            status: row.source_status.clone(),
            session_kind: Some(row.kind),
            vendor_data: Some(row.vendor_data.clone()),
            occurred_at: Some(Utc::now()),
            partners: None,
        };
        let body = serde_json::to_vec(&event)?;
        publisher
            .publish(Outgoing {
                exchange: &exchange,
                routing_key: envelope::types::ONBOARDING_FINISHED,
                body: &body,
                message_id: &event.event_id,
                kind: envelope::types::ONBOARDING_FINISHED,
                headers: Vec::new(),
            })
            .await
            .context("the broker did not confirm an onboarding event")?;
    }

    let total = rows.len();
    let mut done = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60 + total as u64 / 10);
    while done < total {
        let next = tokio::time::timeout_at(deadline, results.next()).await;
        let delivery = match next {
            Ok(Some(Ok(delivery))) => delivery,
            Ok(Some(Err(e))) => anyhow::bail!("lost the results queue: {e}"),
            Ok(None) => anyhow::bail!("the results queue was cancelled"),
            Err(_) => anyhow::bail!(
                "only {done} of {total} verifications were imported within the time limit"
            ),
        };
        let _ = delivery.ack(BasicAckOptions::default()).await;
        let Ok(result) = serde_json::from_slice::<ImportResult>(&delivery.data) else {
            continue;
        };
        let Some(row) = rows
            .iter_mut()
            .find(|r| r.source_session_id == result.source_session_id)
        else {
            continue;
        };
        if row.result.is_none() {
            done += 1;
        }
        println!(
            "[{done:>3}/{total}] {:<9} {}  {:<9} {} -> {}  {}",
            result.outcome.as_str(),
            kind_label(row.kind),
            row.source_status,
            short(&row.source_session_id),
            result
                .imported_session_id
                .as_deref()
                .map(short)
                .unwrap_or("-"),
            result.status.as_deref().unwrap_or("")
        );
        row.result = Some(result);
    }
    let _ = channel
        .basic_cancel(
            "partner-bridge-demo".into(),
            lapin::options::BasicCancelOptions::default(),
        )
        .await;
    let _ = channel.close(200, "demo done".into()).await;

    println!();
    println!(
        "{:<38} {:<4} {:<10} {:<38} {:<10} {:<6} vendor_data",
        "source session (fintech-a)",
        "kind",
        "status",
        "imported session (sponsor-bank)",
        "status",
        "trust"
    );
    for row in &rows {
        let result = row.result.as_ref().expect("every row has a result");
        println!(
            "{:<38} {:<4} {:<10} {:<38} {:<10} {:<6} {}",
            row.source_session_id,
            kind_label(row.kind),
            row.source_status,
            result.imported_session_id.as_deref().unwrap_or("-"),
            result.status.as_deref().unwrap_or("-"),
            result.trust_review,
            result.vendor_data.as_deref().unwrap_or("-")
        );
    }
    let stats = control.stats().await?;
    let twice: Vec<_> = stats.imports.iter().filter(|i| i.count != 1).collect();
    println!();
    println!(
        "Didit sandbox: {} share tokens minted, {} sessions imported, {} imported more than once",
        stats.shares,
        stats.imports.len(),
        twice.len()
    );
    if !twice.is_empty() {
        anyhow::bail!("a session was imported more than once: {twice:?}");
    }
    let failed = rows
        .iter()
        .filter(|r| {
            r.result
                .as_ref()
                .is_some_and(|res| res.outcome != envelope::ImportOutcome::Imported)
        })
        .count();
    if failed > 0 {
        anyhow::bail!("{failed} verification(s) were not imported");
    }
    println!("every verification was imported exactly once");
    link.close().await;
    Ok(())
}

fn kind_label(kind: SessionKind) -> &'static str {
    match kind {
        SessionKind::User => "KYC",
        SessionKind::Business => "KYB",
    }
}

fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// Deletes every queue and exchange the demo declared.
async fn cleanup(amqp_url: &str, issuer: &Config, receiver: &Config) {
    let Ok(connection) =
        lapin::Connection::connect(amqp_url, lapin::ConnectionProperties::default()).await
    else {
        return;
    };
    let mut plans = Vec::new();
    for config in [issuer, receiver] {
        plans.push(app::declared_topology(config));
    }
    if let Ok(channel) = connection.create_channel().await {
        let _ = topology::delete(&channel, &topology::combine(plans)).await;
        let _ = channel.close(200, "demo cleanup".into()).await;
    }
    let _ = connection.close(200, "demo cleanup".into()).await;
}
