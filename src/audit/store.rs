//! Where the audit log lives: the ledger's database, on either backend. The same tables and statements on both;
//! SQLite runs them on the ledger's writer thread (group-committed with the ledger's writes, one writer by
//! construction), PostgreSQL on a connection of its own, each call one transaction holding an advisory lock so that
//! replicas sharing the database append to one chain in turn.

use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, params, params_from_iter};
use tokio_postgres::Client;
use tokio_postgres::types::ToSql;

use super::{AuditRow, Checkpoint, Draft, Filter, GENESIS, Recipient, kinds, sign_checkpoint};
use crate::envelope::SigningKey;
use crate::ledger::sqlite::db_error;
use crate::ledger::{Ledger, LedgerError, PostgresLedger, SqliteLedger};

/// The tables, created when missing (the same text serves both backends).
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS audit_log (
    seq                    BIGINT NOT NULL PRIMARY KEY,
    at_ms                  BIGINT NOT NULL,
    side                   TEXT   NOT NULL,
    act                    TEXT   NOT NULL,
    partner                TEXT,
    partner_application_id TEXT,
    agreement_id           TEXT,
    session_id             TEXT,
    imported_session_id    TEXT,
    event_id               TEXT,
    message_id             TEXT,
    token_id               TEXT,
    status                 TEXT,
    reason                 TEXT,
    vendor_data_hash       TEXT,
    dedupe_key             TEXT,
    prev_hash              TEXT   NOT NULL,
    hash                   TEXT   NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS audit_log_dedupe ON audit_log (dedupe_key);
CREATE INDEX IF NOT EXISTS audit_log_session ON audit_log (session_id);
CREATE INDEX IF NOT EXISTS audit_log_at ON audit_log (at_ms);
CREATE TABLE IF NOT EXISTS audit_checkpoints (
    id        BIGINT NOT NULL PRIMARY KEY,
    seq       BIGINT NOT NULL,
    hash      TEXT   NOT NULL,
    at_ms     BIGINT NOT NULL,
    kind      TEXT   NOT NULL,
    key_id    TEXT,
    signature TEXT
);
CREATE INDEX IF NOT EXISTS audit_checkpoints_seq ON audit_checkpoints (seq);
";

const COLUMNS: &str = "seq, at_ms, side, act, partner, partner_application_id, agreement_id, session_id, \
    imported_session_id, event_id, message_id, token_id, status, reason, vendor_data_hash, dedupe_key, prev_hash, hash";
const CHECKPOINT_COLUMNS: &str = "id, seq, hash, at_ms, kind, key_id, signature";
const LOCK: &str = "SELECT pg_advisory_xact_lock(hashtext('partner-bridge-audit:' || coalesce(current_schema(), '')))";

fn insert_sql(p: char) -> String {
    let marks: Vec<String> = (1..=18).map(|i| format!("{p}{i}")).collect();
    format!(
        "INSERT INTO audit_log ({COLUMNS}) VALUES ({})",
        marks.join(", ")
    )
}

fn checkpoint_sql(p: char) -> String {
    let marks: Vec<String> = (1..=7).map(|i| format!("{p}{i}")).collect();
    format!(
        "INSERT INTO audit_checkpoints ({CHECKPOINT_COLUMNS}) VALUES ({})",
        marks.join(", ")
    )
}

/// `WHERE` text and its values for a filter, placeholders numbered from `first` (`p` is `?` or `$`).
fn filter_sql(filter: &Filter, after: i64, p: char) -> (String, Vec<FilterValue>) {
    let mut clauses = vec![format!("seq > {p}1")];
    let mut values = vec![FilterValue::Int(after)];
    let next = |v: FilterValue, values: &mut Vec<FilterValue>| {
        values.push(v);
        format!("{p}{}", values.len())
    };
    if let Some(s) = &filter.session {
        let a = next(FilterValue::Text(s.clone()), &mut values);
        clauses.push(format!("(session_id = {a} OR imported_session_id = {a})"));
    }
    if let Some(s) = &filter.partner {
        let a = next(FilterValue::Text(s.clone()), &mut values);
        clauses.push(format!("(partner = {a} OR partner_application_id = {a})"));
    }
    if let Some(t) = filter.since {
        let a = next(FilterValue::Int(t.timestamp_millis()), &mut values);
        clauses.push(format!("at_ms >= {a}"));
    }
    if let Some(t) = filter.until {
        let a = next(FilterValue::Int(t.timestamp_millis()), &mut values);
        clauses.push(format!("at_ms <= {a}"));
    }
    (clauses.join(" AND "), values)
}

#[derive(Debug, Clone)]
enum FilterValue {
    Int(i64),
    Text(String),
}

const RECIPIENTS: &str = "SELECT partner_application_id, MAX(partner), MAX(agreement_id), COUNT(*), MIN(at_ms), MAX(at_ms)
    FROM audit_log WHERE act = 'token_published' AND session_id = {p}1 AND partner_application_id IS NOT NULL
    GROUP BY partner_application_id ORDER BY MIN(at_ms), partner_application_id";

/// The audit tables on one of the ledger's backends.
#[derive(Clone)]
pub enum AuditStore {
    /// On the SQLite ledger's writer thread.
    Sqlite(SqliteLedger),
    /// On a PostgreSQL connection of its own.
    Postgres(Arc<PgStore>),
}

/// The PostgreSQL side: the ledger (to connect as it does) and the audit's own connection.
pub struct PgStore {
    ledger: PostgresLedger,
    client: tokio::sync::Mutex<Option<Client>>,
}

impl AuditStore {
    /// Creates the tables when missing.
    pub async fn open(ledger: &Ledger) -> Result<AuditStore, LedgerError> {
        match ledger {
            Ledger::Sqlite(l) => {
                l.run(false, |conn| conn.execute_batch(SCHEMA).map_err(db_error))
                    .await
                    .map_err(open_error)?;
                Ok(AuditStore::Sqlite(l.clone()))
            }
            Ledger::Postgres(l) => {
                let store = PgStore {
                    ledger: l.clone(),
                    client: tokio::sync::Mutex::new(None),
                };
                store
                    .transaction(|tx| {
                        Box::pin(async move {
                            tx.batch_execute(SCHEMA).await?;
                            Ok(())
                        })
                    })
                    .await
                    .map_err(open_error)?;
                Ok(AuditStore::Postgres(Arc::new(store)))
            }
        }
    }

    /// Forgets the PostgreSQL connection after a call that hung (the next call connects afresh).
    pub fn reset(&self) {
        if let AuditStore::Postgres(pg) = self
            && let Ok(mut c) = pg.client.try_lock()
        {
            *c = None;
        }
    }

    /// Inserts a row and rolls it back at once (see [`super::AuditLog::check_writable`]).
    pub(crate) async fn check_writable(&self) -> Result<(), LedgerError> {
        const PROBE: &str = "INSERT INTO audit_log (seq, at_ms, side, act, prev_hash, hash) \
            VALUES (-1, 0, 'probe', 'probe', '', '')";
        match self {
            AuditStore::Sqlite(l) => {
                l.run(false, |conn| {
                    conn.execute_batch("SAVEPOINT audit_probe")
                        .map_err(db_error)?;
                    let probed = conn.execute(PROBE, []);
                    let undone = conn.execute_batch("ROLLBACK TO audit_probe; RELEASE audit_probe");
                    probed.map_err(db_error)?;
                    undone.map_err(db_error)?;
                    Ok(())
                })
                .await
            }
            AuditStore::Postgres(pg) => {
                pg.with_client(|client| {
                    Box::pin(async move {
                        let tx = client.transaction().await?;
                        tx.execute(PROBE, &[]).await?;
                        tx.rollback().await?;
                        Ok(())
                    })
                })
                .await
            }
        }
    }

    /// Chains and inserts `drafts` in one transaction; `None` for a draft whose `dedupe_key` is there already.
    pub(crate) async fn append(&self, drafts: Vec<Draft>) -> Result<Vec<Option<i64>>, LedgerError> {
        match self {
            AuditStore::Sqlite(l) => {
                l.run(true, move |conn| {
                    let mut out = Vec::new();
                    for d in drafts {
                        if let Some(k) = &d.dedupe_key {
                            let seen = conn
                                .prepare_cached("SELECT 1 FROM audit_log WHERE dedupe_key = ?1")
                                .and_then(|mut st| st.query_row(params![k], |_| Ok(())).optional())
                                .map_err(db_error)?;
                            if seen.is_some() {
                                out.push(None);
                                continue;
                            }
                        }
                        let (seq, hash) = sqlite_head(conn)?;
                        let row = d.chain(seq, &hash);
                        let sql = insert_sql('?');
                        let values: Vec<Option<String>> =
                            row.columns().into_iter().map(|(_, v)| v).collect();
                        conn.prepare_cached(&sql)
                            .and_then(|mut st| {
                                st.execute(params![
                                    row.seq, row.at_ms, values[2], values[3], values[4], values[5],
                                    values[6], values[7], values[8], values[9], values[10],
                                    values[11], values[12], values[13], values[14], values[15],
                                    values[16], values[17],
                                ])
                            })
                            .map_err(db_error)?;
                        out.push(Some(row.seq));
                    }
                    Ok(out)
                })
                .await
            }
            AuditStore::Postgres(pg) => {
                pg.transaction(move |tx| {
                    Box::pin(async move {
                        let mut out = Vec::new();
                        for d in drafts {
                            if let Some(k) = &d.dedupe_key
                                && tx
                                    .query_opt(
                                        "SELECT 1 FROM audit_log WHERE dedupe_key = $1",
                                        &[k],
                                    )
                                    .await?
                                    .is_some()
                            {
                                out.push(None);
                                continue;
                            }
                            let (seq, hash) = pg_head(tx).await?;
                            let row = d.chain(seq, &hash);
                            let values: Vec<Option<String>> =
                                row.columns().into_iter().map(|(_, v)| v).collect();
                            let mut args: Vec<&(dyn ToSql + Sync)> = vec![&row.seq, &row.at_ms];
                            for v in &values[2..] {
                                args.push(v);
                            }
                            tx.execute(&insert_sql('$'), &args).await?;
                            out.push(Some(row.seq));
                        }
                        Ok(out)
                    })
                })
                .await
            }
        }
    }

    /// Rows matching `filter` with `seq > after`, at most `limit`, in order.
    pub(crate) async fn rows(
        &self,
        filter: &Filter,
        after: i64,
        limit: i64,
    ) -> Result<Vec<AuditRow>, LedgerError> {
        match self {
            AuditStore::Sqlite(l) => {
                let (clause, values) = filter_sql(filter, after, '?');
                let sql = format!(
                    "SELECT {COLUMNS} FROM audit_log WHERE {clause} ORDER BY seq LIMIT {limit}"
                );
                l.run(false, move |conn| {
                    let values: Vec<rusqlite::types::Value> = values
                        .into_iter()
                        .map(|v| match v {
                            FilterValue::Int(i) => rusqlite::types::Value::Integer(i),
                            FilterValue::Text(s) => rusqlite::types::Value::Text(s),
                        })
                        .collect();
                    let mut st = conn.prepare(&sql).map_err(db_error)?;
                    let rows = st
                        .query_map(params_from_iter(values), sqlite_row)
                        .map_err(db_error)?;
                    rows.map(|r| r.map_err(db_error)).collect()
                })
                .await
            }
            AuditStore::Postgres(pg) => {
                let (clause, values) = filter_sql(filter, after, '$');
                let sql = format!(
                    "SELECT {COLUMNS} FROM audit_log WHERE {clause} ORDER BY seq LIMIT {limit}"
                );
                pg.with_client(move |client| {
                    Box::pin(async move {
                        let owned: Vec<Box<dyn ToSql + Sync + Send>> = values
                            .into_iter()
                            .map(|v| -> Box<dyn ToSql + Sync + Send> {
                                match v {
                                    FilterValue::Int(i) => Box::new(i),
                                    FilterValue::Text(s) => Box::new(s),
                                }
                            })
                            .collect();
                        let args: Vec<&(dyn ToSql + Sync)> = owned
                            .iter()
                            .map(|b| b.as_ref() as &(dyn ToSql + Sync))
                            .collect();
                        let rows = client.query(&sql, &args).await?;
                        rows.iter().map(pg_row).collect()
                    })
                })
                .await
            }
        }
    }

    /// Every checkpoint, by id.
    pub(crate) async fn checkpoints(&self) -> Result<Vec<Checkpoint>, LedgerError> {
        let sql = format!("SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints ORDER BY id");
        match self {
            AuditStore::Sqlite(l) => {
                l.run(false, move |conn| {
                    let mut st = conn.prepare(&sql).map_err(db_error)?;
                    let rows = st.query_map([], sqlite_checkpoint).map_err(db_error)?;
                    rows.map(|r| r.map_err(db_error)).collect()
                })
                .await
            }
            AuditStore::Postgres(pg) => {
                pg.with_client(move |client| {
                    Box::pin(async move {
                        let rows = client.query(&sql, &[]).await?;
                        rows.iter().map(pg_checkpoint).collect()
                    })
                })
                .await
            }
        }
    }

    /// Who received a session (see [`super::AuditLog::recipients`]).
    pub(crate) async fn recipients(&self, session_id: &str) -> Result<Vec<Recipient>, LedgerError> {
        let session = session_id.to_string();
        match self {
            AuditStore::Sqlite(l) => {
                l.run(false, move |conn| {
                    let sql = RECIPIENTS.replace("{p}", "?");
                    let mut st = conn.prepare(&sql).map_err(db_error)?;
                    let rows = st
                        .query_map(params![session], |r| {
                            Ok(Recipient {
                                partner_application_id: r.get(0)?,
                                partner: r.get(1)?,
                                agreement_id: r.get(2)?,
                                tokens: r.get(3)?,
                                first_ms: r.get(4)?,
                                last_ms: r.get(5)?,
                            })
                        })
                        .map_err(db_error)?;
                    rows.map(|r| r.map_err(db_error)).collect()
                })
                .await
            }
            AuditStore::Postgres(pg) => {
                pg.with_client(move |client| {
                    Box::pin(async move {
                        let sql = RECIPIENTS.replace("{p}", "$");
                        let rows = client.query(&sql, &[&session]).await?;
                        let mut out = Vec::new();
                        for r in rows {
                            out.push(Recipient {
                                partner_application_id: r.try_get(0)?,
                                partner: r.try_get(1)?,
                                agreement_id: r.try_get(2)?,
                                tokens: r.try_get(3)?,
                                first_ms: r.try_get(4)?,
                                last_ms: r.try_get(5)?,
                            });
                        }
                        Ok(out)
                    })
                })
                .await
            }
        }
    }

    /// Writes a checkpoint of the head (see [`super::AuditLog::checkpoint`]).
    pub(crate) async fn checkpoint(
        &self,
        kind: &'static str,
        signer: Option<SigningKey>,
    ) -> Result<Option<Checkpoint>, LedgerError> {
        match self {
            AuditStore::Sqlite(l) => {
                l.run(true, move |conn| {
                    let (seq, hash) = sqlite_head(conn)?;
                    let last = sqlite_last_checkpoint(conn)?;
                    if seq == 0
                        || last
                            .as_ref()
                            .is_some_and(|c| c.seq == seq && c.hash == hash)
                    {
                        return Ok(None);
                    }
                    let id = last.map(|c| c.id).unwrap_or(0) + 1;
                    let c = sign_checkpoint(id, kind, seq, &hash, signer.as_ref());
                    sqlite_insert_checkpoint(conn, &c)?;
                    Ok(Some(c))
                })
                .await
            }
            AuditStore::Postgres(pg) => {
                pg.transaction(move |tx| {
                    Box::pin(async move {
                        let (seq, hash) = pg_head(tx).await?;
                        let last = pg_last_checkpoint(tx).await?;
                        if seq == 0
                            || last
                                .as_ref()
                                .is_some_and(|c| c.seq == seq && c.hash == hash)
                        {
                            return Ok(None);
                        }
                        let id = last.map(|c| c.id).unwrap_or(0) + 1;
                        let c = sign_checkpoint(id, kind, seq, &hash, signer.as_ref());
                        pg_insert_checkpoint(tx, &c).await?;
                        Ok(Some(c))
                    })
                })
                .await
            }
        }
    }

    /// Prunes rows older than `cutoff_ms` behind a `prune` checkpoint (see [`super::AuditLog::prune`]).
    pub(crate) async fn prune(
        &self,
        cutoff_ms: i64,
        signer: Option<SigningKey>,
    ) -> Result<u64, LedgerError> {
        match self {
            AuditStore::Sqlite(l) => {
                l.run(true, move |conn| {
                    let bounds: (Option<i64>, Option<i64>, Option<i64>) = conn
                        .query_row(
                            "SELECT MIN(seq), MAX(seq), (SELECT MIN(seq) FROM audit_log WHERE at_ms >= ?1)
                             FROM audit_log",
                            params![cutoff_ms],
                            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                        )
                        .map_err(db_error)?;
                    let Some(point) = prune_point(bounds) else {
                        return Ok(0);
                    };
                    let hash: String = conn
                        .query_row("SELECT hash FROM audit_log WHERE seq = ?1", params![point], |r| r.get(0))
                        .map_err(db_error)?;
                    let id = sqlite_last_checkpoint(conn)?.map(|c| c.id).unwrap_or(0) + 1;
                    let c = sign_checkpoint(id, kinds::PRUNE, point, &hash, signer.as_ref());
                    sqlite_insert_checkpoint(conn, &c)?;
                    let n = conn
                        .execute("DELETE FROM audit_log WHERE seq <= ?1", params![point])
                        .map_err(db_error)?;
                    conn.execute("DELETE FROM audit_checkpoints WHERE seq < ?1", params![point])
                        .map_err(db_error)?;
                    Ok(n as u64)
                })
                .await
            }
            AuditStore::Postgres(pg) => {
                pg.transaction(move |tx| {
                    Box::pin(async move {
                        let r = tx
                            .query_one(
                                "SELECT MIN(seq), MAX(seq), (SELECT MIN(seq) FROM audit_log WHERE at_ms >= $1)
                                 FROM audit_log",
                                &[&cutoff_ms],
                            )
                            .await?;
                        let Some(point) = prune_point((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)) else {
                            return Ok(0);
                        };
                        let hash: String = tx
                            .query_one("SELECT hash FROM audit_log WHERE seq = $1", &[&point])
                            .await?
                            .try_get(0)?;
                        let id = pg_last_checkpoint(tx).await?.map(|c| c.id).unwrap_or(0) + 1;
                        let c = sign_checkpoint(id, kinds::PRUNE, point, &hash, signer.as_ref());
                        pg_insert_checkpoint(tx, &c).await?;
                        let n = tx
                            .execute("DELETE FROM audit_log WHERE seq <= $1", &[&point])
                            .await?;
                        tx.execute("DELETE FROM audit_checkpoints WHERE seq < $1", &[&point])
                            .await?;
                        Ok(n)
                    })
                })
                .await
            }
        }
    }
}

/// The last row to prune: the one before the first young row (all rows when none is young), if any is old.
fn prune_point((min, max, first_young): (Option<i64>, Option<i64>, Option<i64>)) -> Option<i64> {
    let (min, max) = (min?, max?);
    let point = match first_young {
        Some(young) => young - 1,
        None => max,
    };
    (point >= min).then_some(point)
}

fn open_error(e: LedgerError) -> LedgerError {
    match e {
        LedgerError::Open(t) => LedgerError::Open(t),
        other => LedgerError::Open(format!("cannot prepare the audit tables: {other}")),
    }
}

/// The chain's head: the last row, else the last checkpoint (everything pruned), else the genesis.
fn sqlite_head(conn: &Connection) -> Result<(i64, String), LedgerError> {
    let last = conn
        .prepare_cached("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
        .and_then(|mut st| st.query_row([], |r| Ok((r.get(0)?, r.get(1)?))).optional())
        .map_err(db_error)?;
    if let Some(head) = last {
        return Ok(head);
    }
    let cp = conn
        .prepare_cached(
            "SELECT seq, hash FROM audit_checkpoints ORDER BY seq DESC, id DESC LIMIT 1",
        )
        .and_then(|mut st| st.query_row([], |r| Ok((r.get(0)?, r.get(1)?))).optional())
        .map_err(db_error)?;
    Ok(cp.unwrap_or((0, GENESIS.to_string())))
}

fn sqlite_last_checkpoint(conn: &Connection) -> Result<Option<Checkpoint>, LedgerError> {
    conn.prepare_cached(&format!(
        "SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints ORDER BY id DESC LIMIT 1"
    ))
    .and_then(|mut st| st.query_row([], sqlite_checkpoint).optional())
    .map_err(db_error)
}

fn sqlite_insert_checkpoint(conn: &Connection, c: &Checkpoint) -> Result<(), LedgerError> {
    conn.prepare_cached(&checkpoint_sql('?'))
        .and_then(|mut st| {
            st.execute(params![
                c.id,
                c.seq,
                c.hash,
                c.at_ms,
                c.kind,
                c.key_id,
                c.signature
            ])
        })
        .map_err(db_error)?;
    Ok(())
}

fn sqlite_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AuditRow> {
    Ok(AuditRow {
        seq: r.get(0)?,
        at_ms: r.get(1)?,
        side: r.get(2)?,
        act: r.get(3)?,
        partner: r.get(4)?,
        partner_application_id: r.get(5)?,
        agreement_id: r.get(6)?,
        session_id: r.get(7)?,
        imported_session_id: r.get(8)?,
        event_id: r.get(9)?,
        message_id: r.get(10)?,
        token_id: r.get(11)?,
        status: r.get(12)?,
        reason: r.get(13)?,
        vendor_data_hash: r.get(14)?,
        dedupe_key: r.get(15)?,
        prev_hash: r.get(16)?,
        hash: r.get(17)?,
    })
}

fn sqlite_checkpoint(r: &rusqlite::Row<'_>) -> rusqlite::Result<Checkpoint> {
    Ok(Checkpoint {
        id: r.get(0)?,
        seq: r.get(1)?,
        hash: r.get(2)?,
        at_ms: r.get(3)?,
        kind: r.get(4)?,
        key_id: r.get(5)?,
        signature: r.get(6)?,
    })
}

fn pg_row(r: &tokio_postgres::Row) -> Result<AuditRow, tokio_postgres::Error> {
    Ok(AuditRow {
        seq: r.try_get(0)?,
        at_ms: r.try_get(1)?,
        side: r.try_get(2)?,
        act: r.try_get(3)?,
        partner: r.try_get(4)?,
        partner_application_id: r.try_get(5)?,
        agreement_id: r.try_get(6)?,
        session_id: r.try_get(7)?,
        imported_session_id: r.try_get(8)?,
        event_id: r.try_get(9)?,
        message_id: r.try_get(10)?,
        token_id: r.try_get(11)?,
        status: r.try_get(12)?,
        reason: r.try_get(13)?,
        vendor_data_hash: r.try_get(14)?,
        dedupe_key: r.try_get(15)?,
        prev_hash: r.try_get(16)?,
        hash: r.try_get(17)?,
    })
}

fn pg_checkpoint(r: &tokio_postgres::Row) -> Result<Checkpoint, tokio_postgres::Error> {
    Ok(Checkpoint {
        id: r.try_get(0)?,
        seq: r.try_get(1)?,
        hash: r.try_get(2)?,
        at_ms: r.try_get(3)?,
        kind: r.try_get(4)?,
        key_id: r.try_get(5)?,
        signature: r.try_get(6)?,
    })
}

async fn pg_head(
    tx: &tokio_postgres::Transaction<'_>,
) -> Result<(i64, String), tokio_postgres::Error> {
    if let Some(r) = tx
        .query_opt(
            "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1",
            &[],
        )
        .await?
    {
        return Ok((r.try_get(0)?, r.try_get(1)?));
    }
    match tx
        .query_opt(
            "SELECT seq, hash FROM audit_checkpoints ORDER BY seq DESC, id DESC LIMIT 1",
            &[],
        )
        .await?
    {
        Some(r) => Ok((r.try_get(0)?, r.try_get(1)?)),
        None => Ok((0, GENESIS.to_string())),
    }
}

async fn pg_last_checkpoint(
    tx: &tokio_postgres::Transaction<'_>,
) -> Result<Option<Checkpoint>, tokio_postgres::Error> {
    tx.query_opt(
        &format!("SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints ORDER BY id DESC LIMIT 1"),
        &[],
    )
    .await?
    .as_ref()
    .map(pg_checkpoint)
    .transpose()
}

async fn pg_insert_checkpoint(
    tx: &tokio_postgres::Transaction<'_>,
    c: &Checkpoint,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        &checkpoint_sql('$'),
        &[
            &c.id,
            &c.seq,
            &c.hash,
            &c.at_ms,
            &c.kind,
            &c.key_id,
            &c.signature,
        ],
    )
    .await?;
    Ok(())
}

type PgFuture<'a, T> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<T, tokio_postgres::Error>> + Send + 'a>,
>;

impl PgStore {
    /// Runs `work` on the audit connection (connecting when there is none), dropping it on an error so that the
    /// next call connects afresh.
    async fn with_client<T, F>(&self, work: F) -> Result<T, LedgerError>
    where
        F: for<'a> FnOnce(&'a mut Client) -> PgFuture<'a, T>,
    {
        let mut slot = self.client.lock().await;
        if slot.as_ref().is_none_or(|c| c.is_closed()) {
            *slot = Some(self.ledger.dedicated_client().await?);
        }
        let client = slot.as_mut().expect("connected above");
        match work(client).await {
            Ok(v) => Ok(v),
            Err(e) => {
                *slot = None;
                Err(self.ledger.error_of(e))
            }
        }
    }

    /// Runs `work` in one transaction holding the audit's advisory lock, and commits.
    async fn transaction<T, F>(&self, work: F) -> Result<T, LedgerError>
    where
        F: for<'a> FnOnce(&'a tokio_postgres::Transaction<'a>) -> PgFuture<'a, T>,
    {
        let mut slot = self.client.lock().await;
        if slot.as_ref().is_none_or(|c| c.is_closed()) {
            *slot = Some(self.ledger.dedicated_client().await?);
        }
        let client = slot.as_mut().expect("connected above");
        let result = async {
            let tx = client.transaction().await?;
            tx.execute(LOCK, &[]).await?;
            let value = work(&tx).await?;
            tx.commit().await?;
            Ok::<T, tokio_postgres::Error>(value)
        }
        .await;
        match result {
            Ok(v) => Ok(v),
            Err(e) => {
                *slot = None;
                Err(self.ledger.error_of(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prune_point_keeps_every_young_row() {
        assert_eq!(prune_point((None, None, None)), None);
        assert_eq!(prune_point((Some(1), Some(9), Some(1))), None);
        assert_eq!(prune_point((Some(1), Some(9), Some(5))), Some(4));
        assert_eq!(prune_point((Some(3), Some(9), None)), Some(9));
    }
}
