//! The extra RabbitMQ nodes the multi-broker tests stand on (tests/it/support/rabbit_nodes.rs): separate brokers are
//! separate, the cluster is one, and a quorum queue on it has a member on every node.

use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};

use crate::support::{rabbit_nodes, unique_prefix};

async fn connect(url: &str) -> Connection {
    Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"))
}

#[tokio::test]
async fn separate_brokers_do_not_share_queues() {
    let (a, b) =
        tokio::task::spawn_blocking(|| (rabbit_nodes::separate(0), rabbit_nodes::separate(1)))
            .await
            .unwrap();
    // Not while another test has one of them stopped (brokers::a_partner_whose_broker_stops_…).
    let (_a, _b) = (a.exclusive().await, b.exclusive().await);
    let queue = unique_prefix("sep");
    let ca = connect(&a.amqp_url()).await.create_channel().await.unwrap();
    let cb = connect(&b.amqp_url()).await.create_channel().await.unwrap();
    ca.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let err = cb
        .queue_declare(queue.as_str().into(), passive, FieldTable::default())
        .await
        .expect_err("a queue declared on one separate broker must not exist on the other");
    assert!(err.to_string().contains("NOT_FOUND"), "{err}");
    ca.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_quorum_queue_on_the_cluster_has_a_member_on_every_node() {
    let cluster = tokio::task::spawn_blocking(rabbit_nodes::cluster)
        .await
        .unwrap();
    // Every node up: not while another test has one of them stopped (cluster::the_node_the_bridge_is_on_stops_…).
    let mut up = Vec::new();
    for node in &cluster.nodes {
        up.push(node.exclusive().await);
    }
    let queue = unique_prefix("quorum");
    let ch = connect(&cluster.nodes[1].amqp_url())
        .await
        .create_channel()
        .await
        .unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(queue.as_str().into(), durable, args)
        .await
        .unwrap();
    let members = tokio::task::spawn_blocking({
        let queue = queue.clone();
        move || cluster.quorum_members(&queue)
    })
    .await
    .unwrap();
    assert_eq!(members.len(), 3, "members of {queue}: {members:?}");
    ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
}
