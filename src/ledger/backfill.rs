//! The checkpoint of `partner-bridge backfill`, in the ledger's database (schema v3, section `-- backfill:`): one row
//! per backfill in `backfill_runs`, keyed by a hash of its partner and filters, holding the listing lane and offset
//! it reached; and one row per session it has published in `backfill_sent`.
//!
//! A row in `backfill_sent` is written only after the broker confirmed the session's event, so a crash between the
//! confirm and the row costs one repeated event, which the issuer's share ledger absorbs (the token is still valid:
//! nothing is minted); the reverse order could lose a session. SQLite runs these statements on the ledger's writer
//! thread (group-committed with the live bridge's writes when both use one file), PostgreSQL on a connection of its
//! own. Every call is bounded by the ledger's timeout.

use std::collections::HashSet;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, params};

use super::sqlite::db_error;
use super::{Ledger, LedgerError, PostgresLedger, bounded, from_millis, millis};

/// Where a backfill stands.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// The listing lane (one `GET /v3/sessions/` query of the run) being listed.
    pub lane: u32,
    /// The offset in that lane every row before which has been handled.
    pub offset: u64,
    /// When the backfill first started.
    pub started_at: DateTime<Utc>,
    /// When it last finished, if it did.
    pub finished_at: Option<DateTime<Utc>>,
    /// Sessions published so far.
    pub sent: HashSet<String>,
}

/// The backfill tables on one of the ledger's backends.
#[derive(Clone)]
pub enum BackfillStore {
    /// On the SQLite ledger's writer thread.
    Sqlite(super::SqliteLedger),
    /// On a PostgreSQL connection of its own.
    Postgres(Arc<PgStore>),
}

/// The PostgreSQL side: the ledger (to connect as it does) and a connection of the store's own.
pub struct PgStore {
    ledger: PostgresLedger,
    client: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
}

impl std::fmt::Debug for BackfillStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackfillStore::Sqlite(l) => f.debug_tuple("Sqlite").field(&l.path()).finish(),
            BackfillStore::Postgres(_) => f.write_str("Postgres"),
        }
    }
}

/// One statement with its values, written once for both backends (`?N` placeholders; PostgreSQL gets `$N`).
struct Statement {
    sql: &'static str,
    values: Vec<Value>,
}

#[derive(Debug, Clone)]
enum Value {
    Int(i64),
    Text(String),
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        match self {
            Value::Int(i) => i.to_sql(),
            Value::Text(s) => s.to_sql(),
        }
    }
}

const BEGIN: &str = "INSERT INTO backfill_runs (run_key, partner, arguments, lane, next_offset, started_at, updated_at)
    VALUES (?1, ?2, ?3, 0, 0, ?4, ?4) ON CONFLICT (run_key) DO NOTHING";
const READ_RUN: &str =
    "SELECT lane, next_offset, started_at, finished_at FROM backfill_runs WHERE run_key = ?1";
const READ_SENT: &str = "SELECT session_id FROM backfill_sent WHERE run_key = ?1";
const RESTART_RUN: &str =
    "UPDATE backfill_runs SET lane = 0, next_offset = 0, started_at = ?2, updated_at = ?2,
    finished_at = NULL WHERE run_key = ?1";
const RESTART_SENT: &str = "DELETE FROM backfill_sent WHERE run_key = ?1";
const SENT: &str = "INSERT INTO backfill_sent (run_key, session_id, sent_at) VALUES (?1, ?2, ?3)
    ON CONFLICT (run_key, session_id) DO NOTHING";
const ADVANCE: &str =
    "UPDATE backfill_runs SET lane = ?2, next_offset = ?3, updated_at = ?4 WHERE run_key = ?1";
const FINISH: &str =
    "UPDATE backfill_runs SET finished_at = ?2, updated_at = ?2 WHERE run_key = ?1";

fn int(n: u64) -> Value {
    Value::Int(i64::try_from(n).unwrap_or(i64::MAX))
}

impl BackfillStore {
    /// The store on `ledger`'s database (the tables come with the schema).
    pub fn new(ledger: &Ledger) -> BackfillStore {
        match ledger {
            Ledger::Sqlite(l) => BackfillStore::Sqlite(l.clone()),
            Ledger::Postgres(l) => BackfillStore::Postgres(Arc::new(PgStore {
                ledger: l.clone(),
                client: tokio::sync::Mutex::new(None),
            })),
        }
    }

    /// The checkpoint of `run_key`, created (empty) when there is none. `arguments` describes the run for a person
    /// reading the table.
    pub async fn begin(
        &self,
        run_key: &str,
        partner: &str,
        arguments: &str,
        now: DateTime<Utc>,
    ) -> Result<Checkpoint, LedgerError> {
        self.execute(vec![Statement {
            sql: BEGIN,
            values: vec![
                Value::Text(run_key.into()),
                Value::Text(partner.into()),
                Value::Text(arguments.into()),
                Value::Int(millis(now)),
            ],
        }])
        .await?;
        self.required(run_key).await
    }

    /// The checkpoint of `run_key`, if there is one (writes nothing: `--dry-run`).
    pub async fn peek(&self, run_key: &str) -> Result<Option<Checkpoint>, LedgerError> {
        self.read(run_key).await
    }

    async fn required(&self, run_key: &str) -> Result<Checkpoint, LedgerError> {
        self.read(run_key)
            .await?
            .ok_or_else(|| LedgerError::Io("the backfill checkpoint row is missing".into()))
    }

    /// Starts the backfill `run_key` over: lane 0, offset 0, no session sent (a new pass after a finished one).
    pub async fn restart(
        &self,
        run_key: &str,
        now: DateTime<Utc>,
    ) -> Result<Checkpoint, LedgerError> {
        self.execute(vec![
            Statement {
                sql: RESTART_SENT,
                values: vec![Value::Text(run_key.into())],
            },
            Statement {
                sql: RESTART_RUN,
                values: vec![Value::Text(run_key.into()), Value::Int(millis(now))],
            },
        ])
        .await?;
        self.required(run_key).await
    }

    /// Records that `session_id`'s event was confirmed by the broker.
    pub async fn sent(&self, run_key: &str, session_id: &str) -> Result<(), LedgerError> {
        self.execute(vec![Statement {
            sql: SENT,
            values: vec![
                Value::Text(run_key.into()),
                Value::Text(session_id.into()),
                Value::Int(millis(Utc::now())),
            ],
        }])
        .await
    }

    /// Moves the checkpoint: every row of `lane` before `offset` (and every earlier lane) is handled.
    pub async fn advance(&self, run_key: &str, lane: u32, offset: u64) -> Result<(), LedgerError> {
        self.execute(vec![Statement {
            sql: ADVANCE,
            values: vec![
                Value::Text(run_key.into()),
                Value::Int(i64::from(lane)),
                int(offset),
                Value::Int(millis(Utc::now())),
            ],
        }])
        .await
    }

    /// Marks the backfill finished (a later run with the same arguments starts a new pass).
    pub async fn finish(&self, run_key: &str) -> Result<(), LedgerError> {
        self.execute(vec![Statement {
            sql: FINISH,
            values: vec![Value::Text(run_key.into()), Value::Int(millis(Utc::now()))],
        }])
        .await
    }

    fn timeout(&self) -> std::time::Duration {
        match self {
            BackfillStore::Sqlite(l) => l.timeout(),
            BackfillStore::Postgres(pg) => pg.ledger.timeout(),
        }
    }

    /// Runs the statements in one transaction.
    async fn execute(&self, statements: Vec<Statement>) -> Result<(), LedgerError> {
        let work = async {
            match self {
                BackfillStore::Sqlite(l) => {
                    l.run(false, move |conn| {
                        for st in &statements {
                            conn.prepare_cached(st.sql)
                                .and_then(|mut prepared| {
                                    prepared.execute(rusqlite::params_from_iter(st.values.iter()))
                                })
                                .map_err(db_error)?;
                        }
                        Ok(())
                    })
                    .await
                }
                BackfillStore::Postgres(pg) => pg.execute(&statements).await,
            }
        };
        bounded("backfill", self.timeout(), work, || self.reset()).await
    }

    async fn read(&self, run_key: &str) -> Result<Option<Checkpoint>, LedgerError> {
        let key = run_key.to_string();
        let work = async {
            match self {
                BackfillStore::Sqlite(l) => {
                    l.run(false, move |conn| {
                        let run = conn
                            .prepare_cached(READ_RUN)
                            .and_then(|mut st| {
                                st.query_row(params![key], |row| {
                                    Ok((
                                        row.get::<_, i64>(0)?,
                                        row.get::<_, i64>(1)?,
                                        row.get::<_, i64>(2)?,
                                        row.get::<_, Option<i64>>(3)?,
                                    ))
                                })
                                .optional()
                            })
                            .map_err(db_error)?;
                        let mut sent = HashSet::new();
                        let mut st = conn.prepare_cached(READ_SENT).map_err(db_error)?;
                        let rows = st
                            .query_map(params![key], |row| row.get::<_, String>(0))
                            .map_err(db_error)?;
                        for row in rows {
                            sent.insert(row.map_err(db_error)?);
                        }
                        checkpoint(run, sent)
                    })
                    .await
                }
                BackfillStore::Postgres(pg) => pg.read(&key).await,
            }
        };
        bounded("backfill", self.timeout(), work, || self.reset()).await
    }

    /// Forgets the PostgreSQL connection after a call that hung (the next call connects afresh).
    fn reset(&self) {
        if let BackfillStore::Postgres(pg) = self
            && let Ok(mut c) = pg.client.try_lock()
        {
            *c = None;
        }
    }
}

type RunRow = Option<(i64, i64, i64, Option<i64>)>;

fn checkpoint(run: RunRow, sent: HashSet<String>) -> Result<Option<Checkpoint>, LedgerError> {
    let Some((lane, offset, started, finished)) = run else {
        return Ok(None);
    };
    Ok(Some(Checkpoint {
        lane: u32::try_from(lane)
            .map_err(|_| LedgerError::Corrupt(format!("backfill_runs.lane {lane}")))?,
        offset: u64::try_from(offset)
            .map_err(|_| LedgerError::Corrupt(format!("backfill_runs.next_offset {offset}")))?,
        started_at: from_millis(started, "backfill_runs.started_at")?,
        finished_at: finished
            .map(|t| from_millis(t, "backfill_runs.finished_at"))
            .transpose()?,
        sent,
    }))
}

/// `?N` → `$N`.
fn pg_sql(sql: &str) -> String {
    sql.replace('?', "$")
}

impl PgStore {
    async fn client(
        &self,
    ) -> Result<tokio::sync::MutexGuard<'_, Option<tokio_postgres::Client>>, LedgerError> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(|c| c.is_closed()) {
            *guard = Some(self.ledger.dedicated_client().await?);
        }
        Ok(guard)
    }

    async fn execute(&self, statements: &[Statement]) -> Result<(), LedgerError> {
        let mut guard = self.client().await?;
        let client = guard.as_mut().expect("connected above");
        let result = async {
            let tx = client.transaction().await?;
            for st in statements {
                let values: Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>> = st
                    .values
                    .iter()
                    .map(|v| -> Box<dyn tokio_postgres::types::ToSql + Sync + Send> {
                        match v {
                            Value::Int(i) => Box::new(*i),
                            Value::Text(s) => Box::new(s.clone()),
                        }
                    })
                    .collect();
                let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = values
                    .iter()
                    .map(|v| v.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
                    .collect();
                tx.execute(&pg_sql(st.sql), &refs).await?;
            }
            tx.commit().await
        }
        .await;
        result.map_err(|e| {
            *guard = None;
            self.ledger.error_of(e)
        })
    }

    async fn read(&self, run_key: &str) -> Result<Option<Checkpoint>, LedgerError> {
        let mut guard = self.client().await?;
        let client = guard.as_mut().expect("connected above");
        let result = async {
            let run = client
                .query_opt(&pg_sql(READ_RUN), &[&run_key])
                .await?
                .map(|row| -> Result<_, tokio_postgres::Error> {
                    Ok((
                        row.try_get::<_, i64>(0)?,
                        row.try_get::<_, i64>(1)?,
                        row.try_get::<_, i64>(2)?,
                        row.try_get::<_, Option<i64>>(3)?,
                    ))
                })
                .transpose()?;
            let sent = client
                .query(&pg_sql(READ_SENT), &[&run_key])
                .await?
                .iter()
                .map(|row| row.try_get::<_, String>(0))
                .collect::<Result<HashSet<_>, _>>()?;
            Ok::<_, tokio_postgres::Error>((run, sent))
        }
        .await;
        match result {
            Ok((run, sent)) => checkpoint(run, sent),
            Err(e) => {
                *guard = None;
                Err(self.ledger.error_of(e))
            }
        }
    }
}
