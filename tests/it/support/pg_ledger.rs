//! A PostgreSQL ledger for bridge-level fault tests: a schema of its own in the `test` database at 127.0.0.1:5432
//! (dropped when the guard goes), and the `[ledger]` section that points a bridge at it, directly or through a
//! [`super::proxy::Proxy`].

/// The PostgreSQL server the tests use (override with `PB_TEST_POSTGRES_URL`).
pub fn postgres_url() -> String {
    std::env::var("PB_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// `host:port` of the server, for [`super::proxy::Proxy::start_to`].
pub fn postgres_address() -> String {
    let url = postgres_url();
    let rest = url.split_once('@').map(|(_, r)| r).unwrap_or(&url);
    rest.split('/')
        .next()
        .unwrap_or("127.0.0.1:5432")
        .to_string()
}

/// A schema of its own, dropped on drop.
pub struct PgSchema {
    pub schema: String,
}

impl PgSchema {
    /// Creates `pb_<tag>_<random>`.
    pub async fn create(tag: &str) -> PgSchema {
        let schema = format!(
            "pb_{tag}_{}",
            uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
        );
        let client = admin().await.expect("postgres at 127.0.0.1:5432");
        client
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await
            .expect("create the test schema");
        PgSchema { schema }
    }

    /// The ledger URL for this schema, on the server itself.
    pub fn url(&self) -> String {
        self.url_via(&postgres_address())
    }

    /// The ledger URL for this schema, through `address` (`host:port`: the server, or a proxy in front of it).
    pub fn url_via(&self, address: &str) -> String {
        let url = postgres_url().replacen(&postgres_address(), address, 1);
        format!("{url}?options=-c%20search_path%3D{}", self.schema)
    }

    /// A `[ledger]` section for a bridge's TOML (appended at the end of it).
    pub fn ledger_section(&self, address: &str, timeout_ms: u64, lease_ms: u64) -> String {
        format!(
            "\n[ledger]\nurl = \"{}\"\ntimeout_ms = {timeout_ms}\nlease_ms = {lease_ms}\n",
            self.url_via(address)
        )
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let schema = self.schema.clone();
        // Drop cannot await; a thread with its own runtime can, without blocking the test's runtime on itself.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(client) = admin().await {
                    let _ = client
                        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                        .await;
                }
            });
        })
        .join();
    }
}

/// A client on the server itself (outside any test schema), for setting a schema up by hand.
pub async fn admin() -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) =
        tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}
