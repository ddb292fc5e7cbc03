//! Organisations that share no broker (issue #11 item 5): the recipe of deploy/shovel/ (docs/deployment.md
//! "Organisations that share no broker"), run as written between two separate brokers. The issuer publishes to its
//! own broker, the partner's shovel pulls the tokens into the partner's broker, and the issuer's shovel pulls the
//! partner's reshare requests back. A shovel restarted mid-stream redelivers what it had in flight; the ledgers
//! absorb that, so every session is still imported once.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use partner_bridge::amqp::Names;

use crate::brokers::{
    assert_once_into, cleanup_broker, imports_into, on_broker, separate, wait_imported,
};
use crate::support::bridge::{Amqp, World, metric};
use crate::support::faults::{create_sessions, non_empty, publish_events, test_logs};
use crate::support::rabbit_nodes::Node;
use crate::support::wait_for;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn script() -> PathBuf {
    repo().join("deploy/shovel/shovel.sh")
}

/// A template of deploy/shovel/.
fn template(name: &str) -> String {
    std::fs::read_to_string(repo().join("deploy/shovel").join(name)).unwrap()
}

/// The `@NAME@` placeholders in `text`.
fn placeholders(text: &str) -> BTreeSet<String> {
    text.split('@')
        .skip(1)
        .step_by(2)
        .filter(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .map(str::to_string)
        .collect()
}

#[test]
fn the_recipe_files_are_valid_json_the_script_fills_completely() {
    let script_text = std::fs::read_to_string(script()).unwrap();
    let syntax = Command::new("sh").arg("-n").arg(script()).output().unwrap();
    assert!(syntax.status.success(), "sh -n shovel.sh: {syntax:?}");
    for name in ["outbound.json", "inbound-shovel.json"] {
        let text = template(name);
        let value: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        let used = placeholders(&text);
        assert!(!used.is_empty(), "{name}");
        for p in &used {
            assert!(
                script_text.contains(&format!("s|@{p}@|")),
                "{name}: shovel.sh does not fill @{p}@"
            );
        }
        if name == "inbound-shovel.json" {
            assert_eq!(value["ack-mode"], "on-confirm");
            assert!(
                value.get("dest-exchange-key").is_none(),
                "keeps the routing key"
            );
        }
    }
}

/// One side of the recipe: the read-only user it creates for the other side, and the names the script gives.
struct Side {
    node: &'static Node,
    role: &'static str,
    user: String,
    password: String,
}

impl Side {
    fn new(node: &'static Node, role: &'static str, world: &World) -> Side {
        Side {
            node,
            role,
            user: format!("{}-{role}-shovel", world.prefix),
            password: format!("pw-{}", uuid::Uuid::new_v4().simple()),
        }
    }

    /// The side's broker as the other side's shovel reaches it, logging in as the user this side created.
    fn uri_for_the_other_side(&self) -> String {
        format!(
            "amqp://{}:{}@127.0.0.1:{}/%2f",
            self.user, self.password, self.node.port
        )
    }

    /// `P.shovel.<issuer_word or partner_word>.<application id>`, as the script names things on this side's broker:
    /// the issuer's names carry the partner's application id, the partner's the issuer's.
    fn name(&self, world: &World, issuer_word: &str, partner_word: &str) -> String {
        let (word, app) = match self.role {
            "issuer" => (issuer_word, &world.partner_app.application_id),
            _ => (partner_word, &world.issuer_app.application_id),
        };
        format!("{}.shovel.{word}.{app}", world.prefix)
    }

    /// The shovel the script defines on this side's broker.
    fn shovel(&self, world: &World) -> String {
        self.name(world, "reshare-from", "tokens-from")
    }

    /// The outbound queue the script declares on this side's broker.
    fn outbound_queue(&self, world: &World) -> String {
        self.name(world, "tokens", "reshare")
    }

    /// Runs `deploy/shovel/shovel.sh <role>` against this side's broker, as its operator would.
    async fn run_recipe(&self, world: &World, other: &Side) {
        let mut cmd = Command::new("sh");
        cmd.arg(script())
            .arg(self.role)
            .env("PREFIX", &world.prefix)
            .env("ISSUER_APP_ID", &world.issuer_app.application_id)
            .env("PARTNER_APP_ID", &world.partner_app.application_id)
            .env("SHOVEL_USER", &self.user)
            .env("SHOVEL_PASSWORD", &self.password)
            .env("REMOTE_URI", other.uri_for_the_other_side())
            .env(
                "RABBITMQCTL",
                format!("rabbitmqctl -q -n {}", self.node.name),
            )
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.node.dir.join("enabled_plugins"),
            );
        let role = self.role;
        let out = tokio::task::spawn_blocking(move || cmd.output().expect("sh"))
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "shovel.sh {role}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The state of this side's shovel (`running`, `starting`, …), from `rabbitmqctl shovel_status`.
    async fn shovel_state(&'static self, world: &World) -> Option<String> {
        let name = self.shovel(world);
        let out = self
            .node
            .cli_async(
                "rabbitmqctl",
                vec!["shovel_status".into(), "--formatter".into(), "json".into()],
            )
            .await;
        let rows: serde_json::Value = serde_json::from_str(&out).ok()?;
        rows.as_array()?
            .iter()
            .find(|r| r["name"].as_str() == Some(&name))
            .and_then(|r| r["state"].as_str().map(str::to_string))
    }

    async fn wait_running(&'static self, world: &World) {
        wait_for(
            &format!("the {} side's shovel running", self.role),
            Duration::from_secs(60),
            || async {
                (self.shovel_state(world).await.as_deref() == Some("running")).then_some(())
            },
        )
        .await;
    }

    async fn ctl(&'static self, args: &[&str]) -> String {
        let args = args.iter().map(|a| a.to_string()).collect();
        self.node.cli_async("rabbitmqctl", args).await
    }

    /// A shovel definition (name, value) from the recipe's template with the amqps:// URI of docs/deployment.md.
    fn tls_example_shovel(&self, world: &World) -> (String, String) {
        let docs = std::fs::read_to_string(repo().join("docs/deployment.md")).unwrap();
        let start = docs
            .find("`amqps://partner-shovel:")
            .expect("an amqps:// example in docs/deployment.md")
            + 1;
        let uri = &docs[start..start + docs[start..].find('`').unwrap()];
        assert!(
            [
                "cacertfile=",
                "certfile=",
                "keyfile=",
                "verify=verify_peer",
                "server_name_indication="
            ]
            .iter()
            .all(|k| uri.contains(k)),
            "{uri}"
        );
        let value = template("inbound-shovel.json")
            .replace("@REMOTE_URI@", uri)
            .replace("@REMOTE_QUEUE@", &self.outbound_queue(world))
            .replace("@LOCAL_URI@", "amqp://")
            .replace("@EXCHANGE@", &world.names.tokens_exchange());
        (format!("{}.tls-example", world.prefix), value)
    }

    /// Removes the shovel, the user and the outbound queue.
    async fn cleanup(&'static self, world: &World) {
        self.ctl(&["clear_parameter", "shovel", &self.shovel(world)])
            .await;
        self.ctl(&["delete_user", &self.user]).await;
        let amqp = Amqp::connect_to(&self.node.amqp_url()).await;
        let _ = amqp
            .channel
            .queue_delete(
                self.outbound_queue(world).as_str().into(),
                Default::default(),
            )
            .await;
        amqp.close().await;
    }
}

/// Nothing left in `queues` on `url`.
async fn assert_empty_on(url: &str, queues: &[String]) {
    let amqp = Amqp::connect_to(url).await;
    let left = non_empty(&amqp, queues).await;
    assert!(left.is_empty(), "messages left on {url}: {left:?}");
    amqp.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shovel_recipe_moves_tokens_and_reshares_between_brokers_and_a_restart_imports_each_once()
 {
    test_logs();
    const STREAM: usize = 12;
    const EXPIRING: usize = 4;
    let (a_node, b_node) = (separate(0).await, separate(1).await);
    // No other test stops these brokers while the shovels run between them.
    let _guards = (a_node.exclusive().await, b_node.exclusive().await);
    let (a_url, b_url) = (a_node.amqp_url(), b_node.amqp_url());
    let world = World::new("shovel").await;
    let partner_app = world.partner_app.application_id.clone();

    // Two organisations, each bridge on its own broker only: nothing in either configuration names the other.
    let issuer = world
        .start(world.config(&on_broker(&world.issuer_toml(), &a_url)))
        .await;
    let receiver_config = world.config(&on_broker(&world.receiver_toml(false), &b_url));
    let receiver = world.start(receiver_config.clone()).await;

    // The recipe, as the two operators run it, each on its own broker.
    let issuer_side: &'static Side = Box::leak(Box::new(Side::new(a_node, "issuer", &world)));
    let partner_side: &'static Side = Box::leak(Box::new(Side::new(b_node, "partner", &world)));
    issuer_side.run_recipe(&world, partner_side).await;
    partner_side.run_recipe(&world, issuer_side).await;
    issuer_side.wait_running(&world).await;
    partner_side.wait_running(&world).await;

    // The TLS source URI docs/deployment.md shows is one RabbitMQ's shovel accepts.
    let tls = issuer_side.tls_example_shovel(&world);
    issuer_side
        .ctl(&["set_parameter", "shovel", &tls.0, &tls.1])
        .await;
    issuer_side
        .ctl(&["clear_parameter", "shovel", &tls.0])
        .await;

    // The read-only user can read its queue and nothing else, and cannot publish.
    let perms = issuer_side
        .ctl(&["list_user_permissions", &issuer_side.user])
        .await;
    assert!(
        perms.contains(&format!(
            "^{}$",
            issuer_side.outbound_queue(&world).replace('.', "\\.")
        )) && perms.matches("^$").count() == 2,
        "{perms}"
    );

    let amqp = Amqp::connect_to(&a_url).await;
    let created = create_sessions(&world, STREAM + EXPIRING, "shovel").await;
    let third = STREAM / 3;
    let mut stream = publish_events(&world, &amqp, &created[..third]).await;

    // Mid-stream, the partner restarts its shovel while tokens keep coming (they wait in the issuer's outbound
    // queue meanwhile, and whatever the shovel had in flight unconfirmed comes again); then it runs its recipe
    // again, which redefines the shovel: a second restart.
    wait_for(
        "the first imports through the shovel",
        Duration::from_secs(60),
        || async { (!imports_into(&world, &partner_app).await.is_empty()).then_some(()) },
    )
    .await;
    partner_side
        .ctl(&["restart_shovel", &partner_side.shovel(&world)])
        .await;
    stream.extend(publish_events(&world, &amqp, &created[third..2 * third]).await);
    partner_side.run_recipe(&world, issuer_side).await;
    stream.extend(publish_events(&world, &amqp, &created[2 * third..STREAM]).await);
    wait_imported(&world, &partner_app, &stream, Duration::from_secs(90)).await;
    partner_side.wait_running(&world).await;

    // The receiver is down past its tokens' TTL: the tokens wait on the partner's broker, expire, and the reshare
    // requests travel back through the issuer's shovel; the fresh tokens come through the partner's.
    receiver.stop().await.unwrap();
    let expiring = publish_events(&world, &amqp, &created[STREAM..]).await;
    let receiver_queue = world.names.receiver_tokens_queue();
    let b = Amqp::connect_to(&b_url).await;
    wait_for(
        "the expiring tokens waiting on the partner's broker",
        Duration::from_secs(60),
        || async { (b.depth(&receiver_queue).await as usize == EXPIRING).then_some(()) },
    )
    .await;
    b.close().await;
    world.control.advance_clock(3700).await.unwrap();
    let receiver = world.start(receiver_config).await;
    let all: Vec<String> = stream.iter().chain(&expiring).cloned().collect();
    wait_imported(&world, &partner_app, &all, Duration::from_secs(90)).await;
    let stats = world.control.stats().await.unwrap();
    assert_eq!(stats.rejected("share_token_expired"), EXPIRING as u64);
    assert_eq!(
        metric(
            &issuer.metrics().encode(),
            "partner_bridge_reshare_requests_total{direction=\"received\"}"
        ),
        EXPIRING as f64
    );

    receiver.stop().await.unwrap();
    issuer.stop().await.unwrap();
    assert_once_into(&world, &partner_app, &all).await;
    // Nothing waiting or dead-lettered on either broker, and the shovels' queues drained.
    let names = &world.names;
    let mut on_a = vec![issuer_side.outbound_queue(&world)];
    for queue in [
        names.issuer_onboarding_queue(),
        names.issuer_reshare_queue(),
    ] {
        on_a.push(Names::retry_queue(&queue));
        on_a.push(Names::dead_queue(&queue));
        on_a.push(queue);
    }
    let mut on_b = vec![partner_side.outbound_queue(&world)];
    let queue = names.receiver_tokens_queue();
    on_b.push(Names::retry_queue(&queue));
    on_b.push(Names::dead_queue(&queue));
    on_b.push(queue);
    on_b.push(Names::dead_queue(&world.results_queue()));
    assert_empty_on(&a_url, &on_a).await;
    assert_empty_on(&b_url, &on_b).await;

    amqp.close().await;
    for side in [issuer_side, partner_side] {
        side.cleanup(&world).await;
    }
    for url in [&a_url, &b_url] {
        cleanup_broker(&world, url).await;
    }
    world.cleanup().await;
}
