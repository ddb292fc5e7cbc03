//! Cluster failover (issue #11 item 4): issuer and receiver on the tests' three-node RabbitMQ cluster
//! (tests/it/support/rabbit_nodes.rs) through `amqp.urls`; the node every link is connected to stops mid-stream.
//! Each link moves to another node, nothing is lost, each session is imported once, and the quorum queues the
//! bridge declared have a member on every node.

use std::time::Duration;

use crate::support::bridge::{Amqp, Collector, World, metric};
use crate::support::faults::*;
use crate::support::rabbit_nodes::{self, Cluster, Node};
use crate::support::{amqp_url, wait_for};

/// `toml` (already [`tuned`] to the machine broker) with `amqp.url` replaced by `amqp.urls = urls`, and quorum
/// `.retry` queues: a classic one lives on one node and is gone while that node is down (`NOT_FOUND - home node …
/// is down`), which is what this test saw before `amqp.retry_queue_type` existed.
fn on_cluster(toml: &str, urls: &[String]) -> String {
    let line = format!("url = \"{}\"", amqp_url());
    assert!(toml.contains(&line), "the configuration has no {line}");
    let list: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
    toml.replace(
        &line,
        &format!(
            "urls = [{}]\nretry_queue_type = \"quorum\"",
            list.join(", ")
        ),
    )
}

/// The cluster nodes (names) the bridge's connections are on, one entry per connection, from the broker's own
/// connection list (asked of `via`, a node that stays up; the list is cluster-wide).
async fn bridge_connections(cluster: &'static Cluster, via: &'static Node) -> Vec<String> {
    let out = via
        .cli_async(
            "rabbitmqctl",
            vec![
                "list_connections".into(),
                "client_properties".into(),
                "port".into(),
            ],
        )
        .await;
    // The last column is the server port: each node listens on its own.
    out.lines()
        .filter(|line| line.contains("partner-bridge "))
        .filter_map(|line| {
            let port: u16 = line.rsplit('\t').next()?.trim().parse().ok()?;
            cluster
                .nodes
                .iter()
                .find(|n| n.port == port)
                .map(|n| n.name.clone())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_the_bridge_is_on_stops_mid_stream_and_it_moves_to_another_node() {
    test_logs();
    let cluster = tokio::task::spawn_blocking(rabbit_nodes::cluster)
        .await
        .unwrap();
    // The node to stop goes first in the list, so every link starts on it; the tests' own connections use nodes[0].
    let (stopped, stays) = (cluster.nodes[1], cluster.nodes[0]);
    let _exclusive = stopped.exclusive().await;
    let urls = vec![
        stopped.amqp_url(),
        cluster.nodes[2].amqp_url(),
        stays.amqp_url(),
    ];

    let world = World::new("cluster").await;
    let receiver_toml = tuned(&world.receiver_toml(false), &amqp_url(), 4);
    let issuer_toml = tuned(&world.issuer_toml(), &amqp_url(), 4);
    let receiver = world
        .start(world.config(&on_cluster(&receiver_toml, &urls)))
        .await;
    let issuer = world
        .start(world.config(&on_cluster(&issuer_toml, &urls)))
        .await;
    let amqp = Amqp::connect_to(&stays.amqp_url()).await;
    let results = Collector::start_on(&stays.amqp_url(), &world.results_queue()).await;

    let before = bridge_connections(cluster, stays).await;
    assert!(
        !before.is_empty() && before.iter().all(|n| *n == stopped.name),
        "every link starts on the first node of amqp.urls ({}); connections are on {before:?}",
        stopped.name
    );

    let n = 30;
    let mut sessions = publish_sessions(&world, &amqp, n / 2, "cluster-a").await;
    wait_for(
        "some imports before the node stops",
        Duration::from_secs(60),
        || async { (imported_sessions(&world).await >= 3).then_some(()) },
    )
    .await;
    stopped.stop_app().await;
    let so_far = imported_sessions(&world).await;
    assert!(
        so_far < n,
        "the node stopped after the stream ended ({so_far} of {n})"
    );
    sessions.extend(publish_sessions(&world, &amqp, n - n / 2, "cluster-b").await);

    // Every link (issuer: onboarding, reshare, tokens; receiver: tokens) is on another node, while the first is down.
    wait_explained(
        "every link to reconnect to another node",
        Duration::from_secs(60),
        || async {
            let now = bridge_connections(cluster, stays).await;
            let reconnects: Vec<f64> = [&issuer, &receiver]
                .iter()
                .map(|b| metric(&b.metrics().encode(), "partner_bridge_amqp_reconnects_total"))
                .collect();
            let moved = now.len() >= before.len() && now.iter().all(|n| *n != stopped.name);
            if moved && reconnects.iter().all(|r| *r >= 1.0) {
                Ok(())
            } else {
                Err(format!(
                    "connections on {now:?}; reconnects (issuer, receiver) {reconnects:?}; readyz {:?} {:?}",
                    issuer.health().check(),
                    receiver.health().check()
                ))
            }
        },
    )
    .await;

    // The whole stream is imported while the first node is still down.
    wait_settled(
        &world,
        &amqp,
        &results,
        &sessions,
        Duration::from_secs(120),
        || async { vec![issuer.metrics().encode(), receiver.metrics().encode()] },
    )
    .await;
    stopped.start_app().await;
    issuer.stop().await.unwrap();
    receiver.stop().await.unwrap();
    assert_exactly_once(&world, &amqp, &sessions).await;

    let mut quorum = work_queues(&world);
    quorum.extend(dead_queues(&world));
    for queue in quorum {
        let members = tokio::task::spawn_blocking({
            let queue = queue.clone();
            move || cluster.quorum_members(&queue)
        })
        .await
        .unwrap();
        for node in cluster.nodes {
            assert!(
                members.contains(&node.name),
                "quorum queue {queue} has no member on {}: {members:?}",
                node.name
            );
        }
    }
    results.stop();
    amqp.close().await;
    world.cleanup_on(&stays.amqp_url()).await;
}
