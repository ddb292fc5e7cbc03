//! The notice tables (schema v3, section `-- notices:`): what makes erasure and rectification notices exactly-once in
//! effect and retried until acknowledged.
//!
//! - Issuer side, `notices_sent`, one row per (request, recipient): written before the notice is first published
//!   ([`Ledger::record_notice`]; a redelivered request finds its rows and adds none), counted on every send
//!   ([`Ledger::notice_sent`]), closed by the recipient's acknowledgement ([`Ledger::ack_notice`]). Rows without an
//!   acknowledgement are what the retry loop sends again ([`Ledger::notices_due`]) and what the
//!   `notices_unacknowledged` gauge counts ([`Ledger::unacknowledged_notices`]).
//! - Receiver side, `notices_received`, one row per (issuer, notice): what was done already — the imported copy
//!   deleted (`deleted_at`), the notice passed on to the backend (`published_at`) — so that a redelivered or resent
//!   notice repeats neither and is only acknowledged again.
//!
//! The same statements serve both backends (`$n` placeholders, rewritten to `?n` for SQLite). Rows are never pruned
//! with the ledger's `retention_days`: an open notice must stay open, and a received one must stay received.

use chrono::{DateTime, Utc};

use super::{Ledger, LedgerError, from_millis, millis, to_u32};

/// Issuer side: a notice for one recipient.
#[derive(Debug, Clone, PartialEq)]
pub struct SentNotice {
    /// Also the AMQP `message_id` of every send.
    pub notice_id: String,
    /// The request it answers (`subject.notice.requested`'s `request_id`, or the one `notify` made).
    pub request_id: String,
    /// The issuer's session.
    pub session_id: String,
    /// The recipient's configured name.
    pub partner: String,
    /// The recipient's Didit application.
    pub partner_application_id: String,
    /// The agreement with the recipient.
    pub agreement_id: Option<String>,
    /// `erasure` or `rectification`.
    pub kind: String,
    /// The reason given with the request.
    pub reason: Option<String>,
    /// When it was requested (the notice's `issued_at`).
    pub requested_at: DateTime<Utc>,
    /// How many times it was published (confirmed by the broker).
    pub sends: u32,
    /// When it was last published.
    pub last_sent_at: Option<DateTime<Utc>>,
    /// When the recipient's acknowledgement arrived.
    pub acked_at: Option<DateTime<Utc>>,
    /// What the recipient did (`notified`, `deleted`).
    pub action: Option<String>,
    /// The recipient's imported copy, as it reported it.
    pub imported_session_id: Option<String>,
}

/// Receiver side: a notice taken in.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedNotice {
    /// The issuer's application.
    pub issuer_application_id: String,
    /// The notice.
    pub notice_id: String,
    /// The issuer's session.
    pub source_session_id: String,
    /// `erasure` or `rectification`.
    pub kind: String,
    /// When it first arrived.
    pub received_at: DateTime<Utc>,
    /// This application's imported copy, when there is one.
    pub imported_session_id: Option<String>,
    /// When the imported copy was deleted in Didit.
    pub deleted_at: Option<DateTime<Utc>>,
    /// When the notice was confirmed on its way to the backend.
    pub published_at: Option<DateTime<Utc>>,
    /// `notified` or `deleted`, once decided.
    pub action: Option<String>,
}

/// What an acknowledgement changed.
#[derive(Debug, Clone, PartialEq)]
pub enum AckRecorded {
    /// The notice was open and is acknowledged now.
    New(SentNotice),
    /// It was acknowledged before (a redelivered or repeated ack).
    Again(SentNotice),
    /// No such notice for that recipient.
    Unknown,
}

/// A value bound to or read from a statement.
#[derive(Debug, Clone, PartialEq)]
enum V {
    T(Option<String>),
    I(Option<i64>),
}

#[derive(Clone, Copy)]
enum Ty {
    T,
    I,
}

fn t(s: &str) -> V {
    V::T(Some(s.to_string()))
}

fn ot(s: &Option<String>) -> V {
    V::T(s.clone())
}

fn at(d: DateTime<Utc>) -> V {
    V::I(Some(millis(d)))
}

impl V {
    fn text(self, column: &str) -> Result<String, LedgerError> {
        self.opt_text()
            .ok_or_else(|| LedgerError::Corrupt(format!("`{column}` is NULL")))
    }
    fn opt_text(self) -> Option<String> {
        match self {
            V::T(s) => s,
            V::I(i) => i.map(|i| i.to_string()),
        }
    }
    fn opt_int(self) -> Option<i64> {
        match self {
            V::I(i) => i,
            V::T(_) => None,
        }
    }
    fn time(self, column: &str) -> Result<DateTime<Utc>, LedgerError> {
        match self.opt_int() {
            Some(ms) => from_millis(ms, column),
            None => Err(LedgerError::Corrupt(format!("`{column}` is NULL"))),
        }
    }
    fn opt_time(self, column: &str) -> Result<Option<DateTime<Utc>>, LedgerError> {
        self.opt_int().map(|ms| from_millis(ms, column)).transpose()
    }
}

/// Runs `sql` with `params` on either backend; returns the rows, each column read as `columns` says.
async fn query(
    ledger: &Ledger,
    sql: &'static str,
    params: Vec<V>,
    columns: &'static [Ty],
) -> Result<Vec<Vec<V>>, LedgerError> {
    match ledger {
        Ledger::Sqlite(l) => {
            let call = l.run(false, move |conn| {
                let sql = sql.replace('$', "?");
                let mut st = conn.prepare_cached(&sql).map_err(super::sqlite::db_error)?;
                let bound: Vec<rusqlite::types::Value> = params
                    .into_iter()
                    .map(|v| match v {
                        V::T(Some(s)) => rusqlite::types::Value::Text(s),
                        V::I(Some(i)) => rusqlite::types::Value::Integer(i),
                        V::T(None) | V::I(None) => rusqlite::types::Value::Null,
                    })
                    .collect();
                let mut rows = st
                    .query(rusqlite::params_from_iter(bound))
                    .map_err(super::sqlite::db_error)?;
                let mut out = Vec::new();
                while let Some(row) = rows.next().map_err(super::sqlite::db_error)? {
                    let mut values = Vec::with_capacity(columns.len());
                    for (i, ty) in columns.iter().enumerate() {
                        values.push(match ty {
                            Ty::T => V::T(row.get(i).map_err(super::sqlite::db_error)?),
                            Ty::I => V::I(row.get(i).map_err(super::sqlite::db_error)?),
                        });
                    }
                    out.push(values);
                }
                Ok(out)
            });
            super::bounded("notices", l.timeout(), call, || {}).await
        }
        Ledger::Postgres(l) => {
            let call = async {
                let owned: Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>> = params
                    .into_iter()
                    .map(|v| -> Box<dyn tokio_postgres::types::ToSql + Sync + Send> {
                        match v {
                            V::T(s) => Box::new(s),
                            V::I(i) => Box::new(i),
                        }
                    })
                    .collect();
                let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = owned
                    .iter()
                    .map(|b| b.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
                    .collect();
                let rows = l.query_rows(sql, &refs).await?;
                let mut out = Vec::with_capacity(rows.len());
                for row in rows {
                    let mut values = Vec::with_capacity(columns.len());
                    for (i, ty) in columns.iter().enumerate() {
                        values.push(match ty {
                            Ty::T => V::T(row.try_get(i).map_err(|e| l.error_of(e))?),
                            Ty::I => V::I(row.try_get(i).map_err(|e| l.error_of(e))?),
                        });
                    }
                    out.push(values);
                }
                Ok(out)
            };
            super::bounded("notices", l.timeout(), call, || l.drop_connections()).await
        }
    }
}

const SENT_COLUMNS: &[Ty] = &[
    Ty::T,
    Ty::T,
    Ty::T,
    Ty::T,
    Ty::T,
    Ty::T,
    Ty::T,
    Ty::T,
    Ty::I,
    Ty::I,
    Ty::I,
    Ty::I,
    Ty::T,
    Ty::T,
];
macro_rules! sent_select {
    ($rest:literal) => {
        concat!(
            "SELECT notice_id, request_id, session_id, partner, partner_application_id, agreement_id, kind, reason, \
             requested_at, sends, last_sent_at, acked_at, action, imported_session_id FROM notices_sent ",
            $rest
        )
    };
}

fn sent_from(row: Vec<V>) -> Result<SentNotice, LedgerError> {
    let mut it = row.into_iter();
    let mut next = || it.next().unwrap_or(V::T(None));
    Ok(SentNotice {
        notice_id: next().text("notice_id")?,
        request_id: next().text("request_id")?,
        session_id: next().text("session_id")?,
        partner: next().text("partner")?,
        partner_application_id: next().text("partner_application_id")?,
        agreement_id: next().opt_text(),
        kind: next().text("kind")?,
        reason: next().opt_text(),
        requested_at: next().time("requested_at")?,
        sends: to_u32(next().opt_int().unwrap_or(0), "sends")?,
        last_sent_at: next().opt_time("last_sent_at")?,
        acked_at: next().opt_time("acked_at")?,
        action: next().opt_text(),
        imported_session_id: next().opt_text(),
    })
}

const RECEIVED_COLUMNS: &[Ty] = &[
    Ty::T,
    Ty::T,
    Ty::T,
    Ty::T,
    Ty::I,
    Ty::T,
    Ty::I,
    Ty::I,
    Ty::T,
];
const RECEIVED_SELECT: &str = "SELECT issuer_application_id, notice_id, source_session_id, kind, received_at, \
    imported_session_id, deleted_at, published_at, action FROM notices_received \
    WHERE issuer_application_id = $1 AND notice_id = $2";

fn received_from(row: Vec<V>) -> Result<ReceivedNotice, LedgerError> {
    let mut it = row.into_iter();
    let mut next = || it.next().unwrap_or(V::T(None));
    Ok(ReceivedNotice {
        issuer_application_id: next().text("issuer_application_id")?,
        notice_id: next().text("notice_id")?,
        source_session_id: next().text("source_session_id")?,
        kind: next().text("kind")?,
        received_at: next().time("received_at")?,
        imported_session_id: next().opt_text(),
        deleted_at: next().opt_time("deleted_at")?,
        published_at: next().opt_time("published_at")?,
        action: next().opt_text(),
    })
}

impl Ledger {
    /// Issuer: records the notice for one recipient unless its (request, recipient) row exists; returns the stored
    /// row either way (a redelivered request gets the first notice id back, and sends nothing new).
    pub async fn record_notice(&self, n: &SentNotice) -> Result<SentNotice, LedgerError> {
        query(
            self,
            "INSERT INTO notices_sent (notice_id, request_id, session_id, partner, partner_application_id, \
             agreement_id, kind, reason, requested_at, sends) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 0) \
             ON CONFLICT (request_id, partner_application_id) DO NOTHING",
            vec![
                t(&n.notice_id),
                t(&n.request_id),
                t(&n.session_id),
                t(&n.partner),
                t(&n.partner_application_id),
                ot(&n.agreement_id),
                t(&n.kind),
                ot(&n.reason),
                at(n.requested_at),
            ],
            &[],
        )
        .await?;
        let rows = query(
            self,
            sent_select!("WHERE request_id = $1 AND partner_application_id = $2"),
            vec![t(&n.request_id), t(&n.partner_application_id)],
            SENT_COLUMNS,
        )
        .await?;
        rows.into_iter()
            .next()
            .map(sent_from)
            .transpose()?
            .ok_or_else(|| LedgerError::Io("the notice row vanished right after its insert".into()))
    }

    /// Issuer: the notice was published (the broker confirmed it).
    pub async fn notice_sent(
        &self,
        notice_id: &str,
        now: DateTime<Utc>,
    ) -> Result<(), LedgerError> {
        query(
            self,
            "UPDATE notices_sent SET sends = sends + 1, last_sent_at = $2 WHERE notice_id = $1",
            vec![t(notice_id), at(now)],
            &[],
        )
        .await
        .map(drop)
    }

    /// Issuer: a notice by id.
    pub async fn sent_notice(&self, notice_id: &str) -> Result<Option<SentNotice>, LedgerError> {
        let rows = query(
            self,
            sent_select!("WHERE notice_id = $1"),
            vec![t(notice_id)],
            SENT_COLUMNS,
        )
        .await?;
        rows.into_iter().next().map(sent_from).transpose()
    }

    /// Issuer: every notice about `session_id`, oldest first.
    pub async fn notices_for_session(
        &self,
        session_id: &str,
    ) -> Result<Vec<SentNotice>, LedgerError> {
        let rows = query(
            self,
            sent_select!("WHERE session_id = $1 ORDER BY requested_at, notice_id"),
            vec![t(session_id)],
            SENT_COLUMNS,
        )
        .await?;
        rows.into_iter().map(sent_from).collect()
    }

    /// Issuer: the unacknowledged notices never sent, or last sent at or before `sent_before`, oldest first (at most
    /// `limit`).
    pub async fn notices_due(
        &self,
        sent_before: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<SentNotice>, LedgerError> {
        let rows = query(
            self,
            sent_select!(
                "WHERE acked_at IS NULL AND (last_sent_at IS NULL OR last_sent_at <= $1) \
                 ORDER BY requested_at, notice_id LIMIT $2"
            ),
            vec![at(sent_before), V::I(Some(limit))],
            SENT_COLUMNS,
        )
        .await?;
        rows.into_iter().map(sent_from).collect()
    }

    /// Issuer: unacknowledged notices per recipient name.
    pub async fn unacknowledged_notices(&self) -> Result<Vec<(String, u64)>, LedgerError> {
        let rows = query(
            self,
            "SELECT partner, COUNT(*) FROM notices_sent WHERE acked_at IS NULL GROUP BY partner ORDER BY partner",
            Vec::new(),
            &[Ty::T, Ty::I],
        )
        .await?;
        rows.into_iter()
            .map(|row| {
                let mut it = row.into_iter();
                let partner = it.next().unwrap_or(V::T(None)).text("partner")?;
                let n = it.next().and_then(V::opt_int).unwrap_or(0);
                Ok((partner, u64::try_from(n).unwrap_or(0)))
            })
            .collect()
    }

    /// Issuer: records the recipient's acknowledgement of `notice_id` (the first one counts; later ones change
    /// nothing).
    pub async fn ack_notice(
        &self,
        notice_id: &str,
        partner_application_id: &str,
        action: &str,
        imported_session_id: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<AckRecorded, LedgerError> {
        let Some(before) = self.sent_notice(notice_id).await? else {
            return Ok(AckRecorded::Unknown);
        };
        if before.partner_application_id != partner_application_id {
            return Ok(AckRecorded::Unknown);
        }
        let changed = query(
            self,
            "UPDATE notices_sent SET acked_at = $2, action = $3, imported_session_id = $4 \
             WHERE notice_id = $1 AND acked_at IS NULL RETURNING notice_id",
            vec![
                t(notice_id),
                at(now),
                t(action),
                V::T(imported_session_id.map(str::to_string)),
            ],
            &[Ty::T],
        )
        .await?;
        let after = self.sent_notice(notice_id).await?.unwrap_or(before);
        Ok(if changed.is_empty() {
            AckRecorded::Again(after)
        } else {
            AckRecorded::New(after)
        })
    }

    /// Receiver: records a notice unless it was received before; returns the stored row either way.
    pub async fn receive_notice(&self, n: &ReceivedNotice) -> Result<ReceivedNotice, LedgerError> {
        query(
            self,
            "INSERT INTO notices_received (issuer_application_id, notice_id, source_session_id, kind, received_at, \
             imported_session_id) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (issuer_application_id, notice_id) DO NOTHING",
            vec![
                t(&n.issuer_application_id),
                t(&n.notice_id),
                t(&n.source_session_id),
                t(&n.kind),
                at(n.received_at),
                ot(&n.imported_session_id),
            ],
            &[],
        )
        .await?;
        let rows = query(
            self,
            RECEIVED_SELECT,
            vec![t(&n.issuer_application_id), t(&n.notice_id)],
            RECEIVED_COLUMNS,
        )
        .await?;
        rows.into_iter()
            .next()
            .map(received_from)
            .transpose()?
            .ok_or_else(|| LedgerError::Io("the notice row vanished right after its insert".into()))
    }

    /// Receiver: the imported copy named in the notice's row was deleted in Didit.
    pub async fn notice_deleted(
        &self,
        issuer_application_id: &str,
        notice_id: &str,
        now: DateTime<Utc>,
    ) -> Result<(), LedgerError> {
        query(
            self,
            "UPDATE notices_received SET deleted_at = $3, action = 'deleted' \
             WHERE issuer_application_id = $1 AND notice_id = $2 AND deleted_at IS NULL",
            vec![t(issuer_application_id), t(notice_id), at(now)],
            &[],
        )
        .await
        .map(drop)
    }

    /// Receiver: the notice was confirmed on its way to the backend, after `action`.
    pub async fn notice_published(
        &self,
        issuer_application_id: &str,
        notice_id: &str,
        action: &str,
        now: DateTime<Utc>,
    ) -> Result<(), LedgerError> {
        query(
            self,
            "UPDATE notices_received SET published_at = $3, action = $4 \
             WHERE issuer_application_id = $1 AND notice_id = $2 AND published_at IS NULL",
            vec![t(issuer_application_id), t(notice_id), at(now), t(action)],
            &[],
        )
        .await
        .map(drop)
    }
}
