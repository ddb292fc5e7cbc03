//! The whole bridge end to end: issuer and receiver bridges (as two in-process apps, the way two sidecars run),
//! the sandbox as Didit, the real broker between them.

use std::time::Duration;

use partner_bridge::didit::wire::SessionKind;
use partner_bridge::envelope::ImportOutcome;

use crate::support::bridge::{Amqp, Collector, World};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mix_of_kyc_and_kyb_sessions_is_imported_once_each() {
    let world = World::new("e2e-mix").await;
    let receiver = world.start_receiver(false).await;
    let issuer = world.start_issuer().await;
    let results = Collector::start(&world.results_queue()).await;
    let amqp = Amqp::connect().await;
    let mut sessions = Vec::new();
    for i in 0..10 {
        let (kind, status) = if i % 2 == 0 {
            (SessionKind::User, "Approved")
        } else {
            (SessionKind::Business, "IN_REVIEW")
        };
        let id = world.session(kind, status, &format!("v{i}")).await;
        world
            .publish_event(&amqp, &world.event(&id, kind, status))
            .await;
        sessions.push(id);
    }
    let counts = world
        .wait_imports(sessions.len(), Duration::from_secs(30))
        .await;
    for id in &sessions {
        assert_eq!(counts.get(id), Some(&1), "session {id}");
    }
    results
        .wait_count(sessions.len(), Duration::from_secs(10))
        .await;
    let results = results.results();
    assert!(results.iter().all(|r| r.outcome == ImportOutcome::Imported));
    amqp.close().await;
    issuer.stop().await.unwrap();
    receiver.stop().await.unwrap();
    world.cleanup().await;
}
