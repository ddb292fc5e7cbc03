//! Dead-letter queues for the CLI (`dead-letters list|replay`): look at what is in `<queue>.dead` and move it back.
//!
//! [`list_dead`] takes up to `limit` messages with `basic.get` (no auto-ack), reads them, and hands them all back
//! with `nack(requeue = true)`, so nothing is taken — but **listing is not invisible**: the listed messages come
//! back marked `redelivered`, and their order in the queue may change. `.dead` queues have no delivery limit, so
//! listing never makes the broker drop or move a message.
//!
//! [`replay_dead`] moves messages from `<queue>.dead` back into `<queue>` through the default exchange: each is
//! republished with a confirm (without `x-pb-reason` and `x-pb-detail`, with `x-pb-attempt` back at 1 and
//! `x-pb-replayed` set to this replay's id) and only then acked in `.dead`, so a failure leaves it in `.dead`, never
//! nowhere.
//!
//! A replay moves **at most the messages present when it starts**: it reads the `.dead` queue's message count with
//! a passive declare first and stops after that many (or `limit`, if smaller). A replayed message that fails again
//! while the replay is still running is dead-lettered to the back of `.dead`, behind the ones counted, so it is not
//! taken a second time; as a second guard, a message that already carries this run's `x-pb-replayed` id is handed
//! back and ends the replay. The count returned is the number of messages confirmed in `<queue>` and removed from
//! `.dead`.
//!
//! What a replayed message means to its consumer: the receiver resets the session's reshare counter on a token
//! carrying `x-pb-replayed` (a replayed `expired` token asks for a fresh token again); the issuer serves a
//! dead-lettered onboarding copy (`x-pb-partner`) for that one partner only.
//!
//! Bodies are shown only as a short preview, with the values of JSON fields that look like secrets (`share_token`,
//! anything named `*token*`, `*secret*`, `*password*`, `*api_key*`) masked.

use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions};
use lapin::types::AMQPValue;

use super::consumer::copy_properties;
use super::publisher::Publisher;
use super::{AmqpError, HeaderValue, Names, short, truncate};
use crate::envelope::{HEADER_ATTEMPT, HEADER_DETAIL, HEADER_REASON, HEADER_REPLAYED};

/// Bytes of body shown in a listing.
pub const PREVIEW_BYTES: usize = 200;

/// One dead-lettered message, as `dead-letters list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterInfo {
    /// AMQP `message_id`.
    pub message_id: Option<String>,
    /// AMQP `type`.
    pub kind: Option<String>,
    /// `x-pb-reason`, or else the broker's own reason from `x-death` (`delivery_limit`, `rejected`, `expired`).
    pub reason: String,
    /// `x-pb-detail`.
    pub detail: Option<String>,
    /// The start of the body, secrets masked.
    pub body_preview: String,
    /// The body's full length.
    pub body_bytes: usize,
    /// How many times the broker dead-lettered it (sum of the `x-death` counts).
    pub death_count: u64,
    /// AMQP `timestamp` (unix seconds).
    pub timestamp: Option<u64>,
}

/// Lists up to `limit` messages of `<queue>.dead` without removing them (see the module doc).
pub async fn list_dead(
    channel: &Channel,
    queue: &str,
    limit: usize,
) -> Result<Vec<DeadLetterInfo>, AmqpError> {
    let dead = Names::dead_queue(queue);
    let mut held = Vec::new();
    let mut infos = Vec::new();
    let result = async {
        while held.len() < limit {
            let got = super::timed(
                &format!("queue {dead}"),
                std::time::Duration::from_secs(15),
                channel.basic_get(short(&dead)?, BasicGetOptions { no_ack: false }),
            )
            .await?;
            let Some(message) = got else { break };
            infos.push(describe(&message.delivery));
            held.push(message.delivery);
        }
        Ok::<_, AmqpError>(())
    }
    .await;
    for delivery in held {
        // Hand it back; if the channel died, the broker requeues it anyway.
        let _ = delivery
            .acker
            .nack(BasicNackOptions {
                multiple: false,
                requeue: true,
            })
            .await;
    }
    result.map(|()| infos)
}

/// What [`replay_dead`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replayed {
    /// Messages confirmed in `queue` and removed from `.dead`.
    pub moved: usize,
    /// Messages `.dead` held when the replay started.
    pub present: u32,
}

/// Moves up to `limit` of the messages present in `<queue>.dead` when it starts back into `queue` (see the module
/// doc).
pub async fn replay_dead(
    channel: &Channel,
    publisher: &Publisher,
    queue: &str,
    limit: usize,
) -> Result<Replayed, AmqpError> {
    let dead = Names::dead_queue(queue);
    let present = super::queue_depth(channel, &dead).await?;
    let budget = limit.min(usize::try_from(present).unwrap_or(usize::MAX));
    let run = uuid::Uuid::new_v4().to_string();
    let mut replayed = 0;
    while replayed < budget {
        let got = super::timed(
            &format!("queue {dead}"),
            std::time::Duration::from_secs(15),
            channel.basic_get(short(&dead)?, BasicGetOptions { no_ack: false }),
        )
        .await?;
        let Some(message) = got else { break };
        let delivery = message.delivery;
        let ours = delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(HEADER_REPLAYED))
            .and_then(HeaderValue::from_amqp)
            .is_some_and(|v| v.as_str() == Some(run.as_str()));
        if ours {
            // Replayed by this very run and failed again already: everything present at the start is done.
            let _ = delivery
                .acker
                .nack(BasicNackOptions {
                    multiple: false,
                    requeue: true,
                })
                .await;
            break;
        }
        let properties = copy_properties(
            &delivery.properties,
            &[
                (HEADER_ATTEMPT.to_string(), HeaderValue::Int(1)),
                (HEADER_REPLAYED.to_string(), HeaderValue::Str(run.clone())),
            ],
            &[HEADER_REASON, HEADER_DETAIL],
        )?;
        if let Err(error) = publisher
            .publish_raw("", queue, &delivery.data, properties)
            .await
        {
            let _ = delivery
                .acker
                .nack(BasicNackOptions {
                    multiple: false,
                    requeue: true,
                })
                .await;
            return Err(AmqpError::Channel {
                operation: format!("replaying into {queue} (after {replayed} replayed)"),
                reason: error.to_string(),
            });
        }
        match delivery.acker.ack(BasicAckOptions::default()).await {
            Ok(true) => replayed += 1,
            Ok(false) | Err(_) => {
                return Err(AmqpError::Channel {
                    operation: format!(
                        "removing a replayed message from {dead} (after {replayed} replayed)"
                    ),
                    reason:
                        "the ack failed; the message is in both queues and will be handled twice \
                             (the ledger absorbs the duplicate)"
                            .into(),
                });
            }
        }
    }
    Ok(Replayed {
        moved: replayed,
        present,
    })
}

fn describe(delivery: &lapin::message::Delivery) -> DeadLetterInfo {
    let properties = &delivery.properties;
    let headers = properties.headers().as_ref();
    let header = |name: &str| {
        headers
            .and_then(|h| h.inner().get(name))
            .and_then(HeaderValue::from_amqp)
            .and_then(|v| v.as_str().map(str::to_string))
    };
    let deaths: Vec<(u64, Option<String>)> = headers
        .and_then(|h| h.inner().get("x-death"))
        .map(|value| match value {
            AMQPValue::FieldArray(entries) => entries
                .as_slice()
                .iter()
                .filter_map(|entry| match entry {
                    AMQPValue::FieldTable(t) => {
                        let count = t
                            .inner()
                            .get("count")
                            .and_then(HeaderValue::from_amqp)
                            .and_then(|v| v.as_int())
                            .and_then(|c| u64::try_from(c).ok())
                            .unwrap_or(1);
                        let reason = t
                            .inner()
                            .get("reason")
                            .and_then(HeaderValue::from_amqp)
                            .and_then(|v| v.as_str().map(str::to_string));
                        Some((count, reason))
                    }
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        })
        .unwrap_or_default();
    let reason = header(HEADER_REASON)
        .or_else(|| deaths.first().and_then(|(_, r)| r.clone()))
        .unwrap_or_else(|| "unknown".to_string());
    DeadLetterInfo {
        message_id: properties.message_id().as_ref().map(|id| id.to_string()),
        kind: properties.kind().as_ref().map(|k| k.to_string()),
        reason,
        detail: header(HEADER_DETAIL),
        body_preview: preview(&delivery.data),
        body_bytes: delivery.data.len(),
        death_count: deaths.iter().map(|(count, _)| count).sum(),
        timestamp: *properties.timestamp(),
    }
}

/// The start of a body for a person: JSON with secret-looking fields masked, or lossy UTF-8.
pub fn preview(body: &[u8]) -> String {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(mut value) => {
            mask_secrets(&mut value);
            truncate(&value.to_string(), PREVIEW_BYTES)
        }
        // Not JSON: it cannot be parsed for secrets, so only its first bytes are shown.
        Err(_) => truncate(
            &String::from_utf8_lossy(&body[..body.len().min(PREVIEW_BYTES)]),
            PREVIEW_BYTES,
        ),
    }
}

fn mask_secrets(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                let key = key.to_ascii_lowercase();
                let secret = [
                    "token", "secret", "password", "api_key", "apikey", "private",
                ]
                .iter()
                .any(|word| key.contains(word));
                if secret && !value.is_object() && !value.is_array() && !value.is_null() {
                    *value = serde_json::Value::String("<redacted>".into());
                } else {
                    mask_secrets(value);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(mask_secrets),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previews_mask_tokens_and_stay_short() {
        let body = br#"{"type":"share_token","share_token":"eyJhbGciOi.secret.part","nested":{"api_key":"k"},"n":1}"#;
        let p = preview(body);
        assert!(!p.contains("eyJ"), "{p}");
        assert!(!p.contains("\"k\""), "{p}");
        assert!(p.contains("share_token"));
        assert!(p.contains("<redacted>"));
        let long = vec![b'a'; 1000];
        assert!(preview(&long).len() <= PREVIEW_BYTES + 3);
    }
}
