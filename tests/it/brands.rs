//! Several receivers on one broker (issue #11 item 3): two receiving applications (two brands) share the broker and
//! the prefix; the second names its own token queue (`receiver.queue_name`), so each imports only its own tokens.

use std::collections::BTreeMap;
use std::time::Duration;

use partner_bridge::amqp::{Names, QueueSettings, topology};

use crate::support::bridge::{Amqp, World};
use crate::support::faults::*;
use crate::support::wait_for;

/// Imports the sandbox counted, per (source session, importing application).
async fn imports_per_application(world: &World) -> BTreeMap<(String, String), u64> {
    let stats = world.control.stats().await.expect("sandbox stats");
    stats
        .imports
        .into_iter()
        .map(|i| ((i.source_session_id, i.application_id), i.count))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_receivers_on_one_broker_each_import_only_their_own_tokens() {
    test_logs();
    let world = World::new("brands").await;
    let brand_b = world.control.create_application("brand-b").await.unwrap();
    let queue_b = format!(
        "{}.receiver.{}.tokens",
        world.prefix, brand_b.application_id
    );
    // Its notice queue sits beside its token queue.
    let notices_b = format!(
        "{}.receiver.{}.notices",
        world.prefix, brand_b.application_id
    );

    // Receiver B: the partner's configuration with brand B's application, state and queue.
    let receiver_a_toml = world.receiver_toml(false);
    let receiver_b_toml = receiver_a_toml
        .replace(&world.partner_app.application_id, &brand_b.application_id)
        .replace(world.partner_app.api_key.expose(), brand_b.api_key.expose())
        .replace(&world.partner_app.workflows.user, &brand_b.workflows.user)
        .replace(
            &world.partner_app.workflows.business,
            &brand_b.workflows.business,
        )
        .replace("/receiver\"", "/receiver-b\"")
        .replacen(
            "[receiver]\nenabled = true",
            &format!("[receiver]\nenabled = true\nqueue_name = \"{queue_b}\""),
            1,
        );
    assert!(receiver_b_toml.contains("queue_name"));
    // The issuer shares every session with both brands.
    let issuer_toml = world.issuer_toml();
    let partner = &issuer_toml[issuer_toml.find("[[issuer.partners]]").unwrap()..];
    let issuer_toml = format!(
        "{issuer_toml}\n{}",
        partner
            .replace("\"sponsor-bank\"", "\"brand-b\"")
            .replace(&world.partner_app.application_id, &brand_b.application_id)
    );

    let receiver_a = world.start(world.config(&receiver_a_toml)).await;
    let receiver_b = world.start(world.config(&receiver_b_toml)).await;
    let issuer = world.start(world.config(&issuer_toml)).await;
    let amqp = Amqp::connect().await;
    let n = 8;
    let sessions = publish_sessions(&world, &amqp, n, "brands").await;

    let apps = [
        world.partner_app.application_id.clone(),
        brand_b.application_id.clone(),
    ];
    let imports = wait_for(
        "every session imported by both brands",
        Duration::from_secs(60),
        || async {
            let per = imports_per_application(&world).await;
            (per.len() >= 2 * n).then_some(per)
        },
    )
    .await;

    // A notice for brand B (unsigned, so refused) is handled by receiver B alone, from its own notice queue: with
    // one shared queue either receiver could take it.
    amqp.publish(
        &world.names.tokens_exchange(),
        &Names::notice_key(&brand_b.application_id),
        br#"{"type":"subject.notice"}"#,
        &[],
    )
    .await;
    wait_for(
        "the forged notice dead-lettered from brand B's notice queue",
        Duration::from_secs(20),
        || async { (amqp.depth(&Names::dead_queue(&notices_b)).await == 1).then_some(()) },
    )
    .await;
    assert_eq!(
        amqp.depth(&Names::dead_queue(&world.names.receiver_notices_queue()))
            .await,
        0,
        "brand A's notice queue got brand B's notice"
    );
    issuer.stop().await.unwrap();
    receiver_a.stop().await.unwrap();
    receiver_b.stop().await.unwrap();

    let mut expected = BTreeMap::new();
    for session in &sessions {
        for app in &apps {
            expected.insert((session.clone(), app.clone()), 1);
        }
    }
    let now = imports_per_application(&world).await;
    assert_eq!(imports, expected, "imports per (session, application)");
    assert_eq!(now, expected, "imports after the stop");
    let queues = [
        world.names.receiver_tokens_queue(),
        Names::dead_queue(&world.names.receiver_tokens_queue()),
        queue_b.clone(),
        Names::dead_queue(&queue_b),
    ];
    let left = non_empty(&amqp, &queues).await;
    assert!(left.is_empty(), "tokens left or dead-lettered: {left:?}");

    let plan_b = topology::receiver_plan_on(
        &world.names,
        &QueueSettings {
            delivery_limit: 20,
            retry_delay_ms: world.retry_delay_ms,
            quorum_retry: false,
        },
        &brand_b.application_id,
        &queue_b,
        &notices_b,
    );
    let _ = topology::delete(&amqp.channel, &plan_b).await;
    amqp.close().await;
    world.cleanup().await;
}
