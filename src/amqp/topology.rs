//! The broker topology of DESIGN.md §3 as data: each role's plan is a list of [`Entity`] values that
//! `partner-bridge topology show` prints and [`declare`] applies (consumers re-apply their plan on every start).
//!
//! Work queues are quorum queues with an explicit `x-delivery-limit` (RabbitMQ 3.10 has no default) and a
//! dead-letter exchange, so a message the broker gives up on (too many redeliveries, `nack` without requeue) lands
//! in `<queue>.dead` through `{p}.dead-letter` with the queue's own name as routing key. `.dead` queues are quorum
//! queues without a delivery limit (listing them with get + requeue must never drop anything) and without a
//! dead-letter exchange. `.retry` queues are durable classic queues with one `x-message-ttl` for the whole queue
//! (per-message TTLs only expire at the head of a queue, so one TTL per queue keeps FIFO order and no message
//! blocks another); an expired message dead-letters through the default exchange straight back into its queue.
//!
//! Declaring is idempotent as long as the arguments are unchanged. RabbitMQ refuses to change the arguments of an
//! existing queue (`PRECONDITION_FAILED`), so changing `amqp.delivery_limit` or `amqp.retry_delay_ms` for queues
//! that already exist needs them drained and deleted so they are recreated: [`declare`] fails with
//! [`AmqpError::TopologyMismatch`], whose message says exactly that.

use std::fmt;
use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, ExchangeKind};

use super::{AmqpError, HeaderValue, Names, field_table, short};
use crate::config::AmqpConfig;

/// How long one declaration may take before the connection is presumed wedged.
const DECLARE_TIMEOUT: Duration = Duration::from_secs(15);

/// Settings shared by every work queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSettings {
    /// `x-delivery-limit`: redeliveries before the broker dead-letters a message.
    pub delivery_limit: u32,
    /// TTL of the `.retry` queues: how long a retried message waits before it returns.
    pub retry_delay_ms: u64,
    /// `.retry` queues are quorum queues (`amqp.retry_queue_type = "quorum"`, for a cluster) rather than classic.
    pub quorum_retry: bool,
}

impl QueueSettings {
    /// The settings the configuration asks for.
    pub fn from_config(amqp: &AmqpConfig) -> QueueSettings {
        QueueSettings {
            delivery_limit: amqp.delivery_limit,
            retry_delay_ms: amqp.retry_delay_ms,
            quorum_retry: amqp.retry_queue_type == "quorum",
        }
    }
}

/// One thing to declare on the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entity {
    /// A durable exchange.
    Exchange {
        /// Its name.
        name: String,
        /// `topic` or `direct`.
        kind: &'static str,
    },
    /// A durable queue with its arguments (`x-queue-type`, `x-delivery-limit`, dead-lettering, TTL).
    Queue {
        /// Its name.
        name: String,
        /// Its arguments, exactly as declared.
        arguments: Vec<(String, HeaderValue)>,
    },
    /// A binding of a queue to an exchange.
    Binding {
        /// The queue.
        queue: String,
        /// The exchange.
        exchange: String,
        /// The binding key.
        routing_key: String,
    },
}

impl Entity {
    fn rank(&self) -> u8 {
        match self {
            Entity::Exchange { .. } => 0,
            Entity::Queue { .. } => 1,
            Entity::Binding { .. } => 2,
        }
    }

    /// The argument `key` of a queue, if set.
    pub fn argument(&self, key: &str) -> Option<&HeaderValue> {
        match self {
            Entity::Queue { arguments, .. } => {
                arguments.iter().find(|(k, _)| k == key).map(|(_, v)| v)
            }
            _ => None,
        }
    }
}

impl fmt::Display for Entity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Entity::Exchange { name, kind } => write!(f, "exchange {name} ({kind}, durable)"),
            Entity::Queue { name, arguments } => {
                write!(f, "queue    {name} (durable")?;
                for (key, value) in arguments {
                    write!(f, ", {key}={value}")?;
                }
                f.write_str(")")
            }
            Entity::Binding {
                queue,
                exchange,
                routing_key,
            } => write!(f, "binding  {exchange} --[{routing_key}]--> {queue}"),
        }
    }
}

fn exchange(name: String, kind: &'static str) -> Entity {
    Entity::Exchange { name, kind }
}

fn binding(queue: &str, exchange: &str, routing_key: &str) -> Entity {
    Entity::Binding {
        queue: queue.to_string(),
        exchange: exchange.to_string(),
        routing_key: routing_key.to_string(),
    }
}

fn arg(key: &str, value: impl Into<HeaderValue>) -> (String, HeaderValue) {
    (key.to_string(), value.into())
}

/// A work queue with its `.dead` and `.retry` companions, bound to `source` with `routing_key`.
fn work_queue(
    names: &Names,
    settings: &QueueSettings,
    queue: &str,
    source: &str,
    routing_key: &str,
) -> Vec<Entity> {
    let dlx = names.dead_letter_exchange();
    let dead = Names::dead_queue(queue);
    let retry = Names::retry_queue(queue);
    vec![
        Entity::Queue {
            name: queue.to_string(),
            arguments: vec![
                arg("x-queue-type", "quorum"),
                arg("x-delivery-limit", i64::from(settings.delivery_limit)),
                arg("x-dead-letter-exchange", dlx.clone()),
                arg("x-dead-letter-routing-key", queue),
            ],
        },
        Entity::Queue {
            name: dead.clone(),
            arguments: vec![arg("x-queue-type", "quorum")],
        },
        Entity::Queue {
            name: retry,
            arguments: retry_arguments(settings, queue),
        },
        binding(queue, source, routing_key),
        binding(&dead, &dlx, queue),
    ]
}

/// Exchanges first, then queues, then bindings; duplicates dropped (plans of several roles may be combined).
fn ordered(mut entities: Vec<Entity>) -> Vec<Entity> {
    let mut seen = Vec::with_capacity(entities.len());
    entities.retain(|e| {
        if seen.contains(e) {
            false
        } else {
            seen.push(e.clone());
            true
        }
    });
    entities.sort_by_key(Entity::rank);
    entities
}

/// Combines several plans into one (for a process running both roles, or `topology show`).
pub fn combine(plans: impl IntoIterator<Item = Vec<Entity>>) -> Vec<Entity> {
    ordered(plans.into_iter().flatten().collect())
}

/// The issuer's intake broker: onboarding exchange and queue, reshare exchange and queue (bound to
/// `reshare.<own>`), the notice request and acknowledgement queues, each queue with `.dead` and `.retry`, and the
/// dead-letter exchange.
pub fn issuer_intake_plan(
    names: &Names,
    settings: &QueueSettings,
    own_application_id: &str,
) -> Vec<Entity> {
    let mut plan = vec![exchange(names.onboarding_exchange(), "topic")];
    plan.extend(work_queue(
        names,
        settings,
        &names.issuer_onboarding_queue(),
        &names.onboarding_exchange(),
        crate::envelope::types::ONBOARDING_FINISHED,
    ));
    plan.extend(issuer_remote_reshare_plan(
        names,
        settings,
        own_application_id,
    ));
    // Notices are requested on `amqp.url` only; their acknowledgements come in with the reshare half.
    plan.extend(work_queue(
        names,
        settings,
        &names.issuer_notices_queue(),
        &names.onboarding_exchange(),
        crate::envelope::types::NOTICE_REQUESTED,
    ));
    ordered(plan)
}

/// The issuer's reshare intake on a token broker that is not `amqp.url` (the partner's broker, where its receiver
/// publishes `reshare.request`): the reshare exchange and queue (bound to `reshare.<own>`) with `.dead` and
/// `.retry`, and the dead-letter exchange: the reshare half of [`issuer_intake_plan`].
pub fn issuer_remote_reshare_plan(
    names: &Names,
    settings: &QueueSettings,
    own_application_id: &str,
) -> Vec<Entity> {
    let mut plan = vec![
        exchange(names.reshare_exchange(), "topic"),
        exchange(names.dead_letter_exchange(), "direct"),
    ];
    plan.extend(work_queue(
        names,
        settings,
        &names.issuer_reshare_queue(),
        &names.reshare_exchange(),
        &Names::reshare_key(own_application_id),
    ));
    // Receivers acknowledge notices on their own broker, like reshare requests.
    plan.extend(work_queue(
        names,
        settings,
        &names.issuer_notice_acks_queue(),
        &names.reshare_exchange(),
        &Names::notice_ack_key(own_application_id),
    ));
    ordered(plan)
}

/// The issuer's token broker: the tokens exchange only (receivers own their queues).
pub fn issuer_tokens_plan(names: &Names) -> Vec<Entity> {
    vec![exchange(names.tokens_exchange(), "topic")]
}

/// The receiver's broker: tokens exchange and queue (bound to `token.<own>`, with `.dead` and `.retry`), the
/// reshare exchange (requests go out there), the imports exchange (outcomes) and the dead-letter exchange.
pub fn receiver_plan(
    names: &Names,
    settings: &QueueSettings,
    own_application_id: &str,
) -> Vec<Entity> {
    receiver_plan_on(
        names,
        settings,
        own_application_id,
        &names.receiver_tokens_queue(),
        &names.receiver_notices_queue(),
    )
}

/// [`receiver_plan`] with the token queue named `queue` and the notice queue `notices_queue` (`receiver.queue_name`:
/// several receiving applications on one broker and prefix, each with its own queues bound with its own
/// `token.<application id>` and `notice.<application id>`).
pub fn receiver_plan_on(
    names: &Names,
    settings: &QueueSettings,
    own_application_id: &str,
    queue: &str,
    notices_queue: &str,
) -> Vec<Entity> {
    let mut plan = vec![
        exchange(names.tokens_exchange(), "topic"),
        exchange(names.reshare_exchange(), "topic"),
        exchange(names.imports_exchange(), "topic"),
        exchange(names.dead_letter_exchange(), "direct"),
    ];
    plan.extend(work_queue(
        names,
        settings,
        queue,
        &names.tokens_exchange(),
        &Names::token_key(own_application_id),
    ));
    plan.extend(work_queue(
        names,
        settings,
        notices_queue,
        &names.tokens_exchange(),
        &Names::notice_key(own_application_id),
    ));
    ordered(plan)
}

/// Declares every entity of `plan` on `channel`, in order. Stops at the first refusal (the broker closes the
/// channel on any declaration error, so the caller must open a new one).
pub async fn declare(channel: &Channel, plan: &[Entity]) -> Result<(), AmqpError> {
    for entity in plan {
        declare_one(channel, entity).await?;
    }
    Ok(())
}

/// Deletes every queue and exchange of `plan` (bindings go with them). For the demo and tests, which must not leave
/// quorum queues behind on a shared broker; never called by the bridge itself.
pub async fn delete(channel: &Channel, plan: &[Entity]) -> Result<(), AmqpError> {
    for entity in plan {
        match entity {
            Entity::Queue { name, .. } => {
                channel
                    .queue_delete(
                        name.as_str().into(),
                        lapin::options::QueueDeleteOptions::default(),
                    )
                    .await
                    .map_err(|e| AmqpError::from_lapin(format!("deleting queue {name}"), &e))?;
            }
            Entity::Exchange { name, .. } => {
                channel
                    .exchange_delete(
                        name.as_str().into(),
                        lapin::options::ExchangeDeleteOptions::default(),
                    )
                    .await
                    .map_err(|e| AmqpError::from_lapin(format!("deleting exchange {name}"), &e))?;
            }
            Entity::Binding { .. } => {}
        }
    }
    Ok(())
}

async fn declare_one(channel: &Channel, entity: &Entity) -> Result<(), AmqpError> {
    let what = match entity {
        Entity::Exchange { name, .. } => format!("exchange {name}"),
        Entity::Queue { name, .. } => format!("queue {name}"),
        Entity::Binding {
            queue,
            exchange,
            routing_key,
        } => format!("binding of queue {queue} to exchange {exchange} with key {routing_key}"),
    };
    let result = match entity {
        Entity::Exchange { name, kind } => {
            let kind = match *kind {
                "topic" => ExchangeKind::Topic,
                "direct" => ExchangeKind::Direct,
                "fanout" => ExchangeKind::Fanout,
                other => ExchangeKind::Custom(other.to_string()),
            };
            let options = ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            };
            super::timed(
                &what,
                DECLARE_TIMEOUT,
                channel.exchange_declare(short(name)?, kind, options, FieldTable::default()),
            )
            .await
        }
        Entity::Queue { name, arguments } => {
            let options = QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            };
            let args = field_table(arguments.iter().map(|(k, v)| (k.as_str(), v)))?;
            super::timed(
                &what,
                DECLARE_TIMEOUT,
                channel.queue_declare(short(name)?, options, args),
            )
            .await
            .map(|_| ())
        }
        Entity::Binding {
            queue,
            exchange,
            routing_key,
        } => {
            super::timed(
                &what,
                DECLARE_TIMEOUT,
                channel.queue_bind(
                    short(queue)?,
                    short(exchange)?,
                    short(routing_key)?,
                    QueueBindOptions::default(),
                    FieldTable::default(),
                ),
            )
            .await
        }
    };
    result.map_err(|error| match error {
        AmqpError::Precondition { operation, reason } => AmqpError::TopologyMismatch {
            entity: operation,
            reason,
        },
        other => other,
    })
}

/// Messages ready in `queue` (not counting unacked deliveries), by a passive declare. A missing queue is
/// [`AmqpError::NotFound`] and, as with any refused declare, closes `channel`.
pub async fn queue_depth(channel: &Channel, queue: &str) -> Result<u32, AmqpError> {
    let options = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let found = super::timed(
        &format!("queue {queue}"),
        DECLARE_TIMEOUT,
        channel.queue_declare(short(queue)?, options, FieldTable::default()),
    )
    .await?;
    Ok(found.message_count())
}

/// The arguments of `<queue>.retry`. Classic by default. A classic queue lives on one node only, and while that
/// node is down the queue cannot be declared or used from the others, so on a cluster `.retry` queues are quorum
/// queues (`amqp.retry_queue_type = "quorum"`, RabbitMQ 3.10 or later) with at-least-once dead-lettering, which
/// needs `x-overflow=reject-publish`: an expired message leaves the retry queue only once its work queue took it.
fn retry_arguments(settings: &QueueSettings, queue: &str) -> Vec<(String, HeaderValue)> {
    let ttl = arg(
        "x-message-ttl",
        i64::try_from(settings.retry_delay_ms).unwrap_or(i64::MAX),
    );
    let back = [
        arg("x-dead-letter-exchange", ""),
        arg("x-dead-letter-routing-key", queue),
    ];
    let mut arguments = if settings.quorum_retry {
        vec![
            arg("x-queue-type", "quorum"),
            ttl,
            arg("x-dead-letter-strategy", "at-least-once"),
            arg("x-overflow", "reject-publish"),
        ]
    } else {
        vec![arg("x-queue-type", "classic"), ttl]
    };
    arguments.extend(back);
    arguments
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: QueueSettings = QueueSettings {
        delivery_limit: 20,
        retry_delay_ms: 30_000,
        quorum_retry: false,
    };

    fn queues(plan: &[Entity]) -> Vec<&str> {
        plan.iter()
            .filter_map(|e| match e {
                Entity::Queue { name, .. } => Some(name.as_str()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn issuer_intake_plan_has_every_entity_of_the_table() {
        let names = Names::new("pb");
        let plan = issuer_intake_plan(&names, &SETTINGS, "issuer-app");
        assert_eq!(
            queues(&plan),
            [
                "pb.issuer.onboarding",
                "pb.issuer.onboarding.dead",
                "pb.issuer.onboarding.retry",
                "pb.issuer.reshare",
                "pb.issuer.reshare.dead",
                "pb.issuer.reshare.retry",
                "pb.issuer.notice-acks",
                "pb.issuer.notice-acks.dead",
                "pb.issuer.notice-acks.retry",
                "pb.issuer.notices",
                "pb.issuer.notices.dead",
                "pb.issuer.notices.retry"
            ]
        );
        assert!(plan.contains(&exchange("pb.onboarding".into(), "topic")));
        assert!(plan.contains(&exchange("pb.reshare".into(), "topic")));
        assert!(plan.contains(&exchange("pb.dead-letter".into(), "direct")));
        assert!(plan.contains(&binding(
            "pb.issuer.onboarding",
            "pb.onboarding",
            "onboarding.finished"
        )));
        assert!(plan.contains(&binding(
            "pb.issuer.reshare",
            "pb.reshare",
            "reshare.issuer-app"
        )));
        assert!(plan.contains(&binding(
            "pb.issuer.reshare.dead",
            "pb.dead-letter",
            "pb.issuer.reshare"
        )));
        // Exchanges before queues before bindings: a binding never names something not yet declared.
        let ranks: Vec<u8> = plan.iter().map(Entity::rank).collect();
        assert!(ranks.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn quorum_retry_queues_dead_letter_at_least_once_and_keep_no_group_size() {
        let names = Names::new("pb");
        let settings = QueueSettings {
            quorum_retry: true,
            ..SETTINGS
        };
        let plan = receiver_plan(&names, &settings, "recv-app");
        let retry = plan
            .iter()
            .find(|e| matches!(e, Entity::Queue { name, .. } if name == "pb.receiver.tokens.retry"))
            .unwrap();
        for (key, value) in [
            ("x-queue-type", "quorum"),
            ("x-dead-letter-strategy", "at-least-once"),
            ("x-overflow", "reject-publish"),
            ("x-dead-letter-routing-key", "pb.receiver.tokens"),
        ] {
            assert_eq!(
                retry.argument(key),
                Some(&HeaderValue::Str(value.into())),
                "{key}"
            );
        }
        assert_eq!(
            retry.argument("x-message-ttl"),
            Some(&HeaderValue::Int(30_000))
        );
        // The group size is the cluster's default (every node of a three-node cluster), never pinned here.
        for entity in &plan {
            assert_eq!(entity.argument("x-quorum-initial-group-size"), None);
        }
    }

    #[test]
    fn queue_arguments_are_explicit() {
        let names = Names::new("pb");
        let plan = receiver_plan(&names, &SETTINGS, "recv-app");
        let find = |n: &str| {
            plan.iter()
                .find(|e| matches!(e, Entity::Queue { name, .. } if name == n))
                .unwrap()
        };
        let work = find("pb.receiver.tokens");
        assert_eq!(
            work.argument("x-queue-type"),
            Some(&HeaderValue::Str("quorum".into()))
        );
        assert_eq!(
            work.argument("x-delivery-limit"),
            Some(&HeaderValue::Int(20))
        );
        assert_eq!(
            work.argument("x-dead-letter-exchange"),
            Some(&HeaderValue::Str("pb.dead-letter".into()))
        );
        assert_eq!(
            work.argument("x-dead-letter-routing-key"),
            Some(&HeaderValue::Str("pb.receiver.tokens".into()))
        );
        let dead = find("pb.receiver.tokens.dead");
        assert_eq!(
            dead.argument("x-queue-type"),
            Some(&HeaderValue::Str("quorum".into()))
        );
        assert_eq!(dead.argument("x-delivery-limit"), None);
        assert_eq!(dead.argument("x-dead-letter-exchange"), None);
        let retry = find("pb.receiver.tokens.retry");
        assert_eq!(
            retry.argument("x-message-ttl"),
            Some(&HeaderValue::Int(30_000))
        );
        assert_eq!(
            retry.argument("x-dead-letter-exchange"),
            Some(&HeaderValue::Str(String::new()))
        );
        assert_eq!(
            retry.argument("x-dead-letter-routing-key"),
            Some(&HeaderValue::Str("pb.receiver.tokens".into()))
        );
        assert!(plan.contains(&binding(
            "pb.receiver.tokens",
            "pb.tokens",
            "token.recv-app"
        )));
        assert!(plan.contains(&exchange("pb.imports".into(), "topic")));
        assert!(plan.contains(&exchange("pb.reshare".into(), "topic")));
    }

    #[test]
    fn plans_print_for_an_operator() {
        let names = Names::new("pb");
        let text: Vec<String> = issuer_tokens_plan(&names)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(text, ["exchange pb.tokens (topic, durable)"]);
        let plan = receiver_plan(&names, &SETTINGS, "r");
        let shown: Vec<String> = plan.iter().map(ToString::to_string).collect();
        assert!(shown.contains(
            &"queue    pb.receiver.tokens (durable, x-queue-type=\"quorum\", x-delivery-limit=20, \
              x-dead-letter-exchange=\"pb.dead-letter\", x-dead-letter-routing-key=\"pb.receiver.tokens\")"
                .to_string()
        ));
        assert!(
            shown.contains(&"binding  pb.tokens --[token.r]--> pb.receiver.tokens".to_string())
        );
    }

    #[test]
    fn combined_plans_declare_shared_exchanges_once() {
        let names = Names::new("pb");
        let both = combine([
            issuer_intake_plan(&names, &SETTINGS, "a"),
            issuer_tokens_plan(&names),
            receiver_plan(&names, &SETTINGS, "a"),
        ]);
        let reshare = both
            .iter()
            .filter(|e| matches!(e, Entity::Exchange { name, .. } if name == "pb.reshare"))
            .count();
        assert_eq!(reshare, 1);
        assert_eq!(queues(&both).len(), 18);
    }
}
