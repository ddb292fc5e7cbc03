//! A second PostgreSQL server of the tests' own, with TLS, for the ledger's `sslmode` tests (tests/it/ledger_tls.rs).
//! The machine's own server (127.0.0.1:5432) is never touched.
//!
//! Started once per test binary, on first use: `initdb` into a temporary directory (as the `postgres` user: the
//! server refuses to run as root), `ssl = on` with a CA and a server certificate for `localhost` only that
//! [`rcgen`] makes here, `listen_addresses = '127.0.0.1'` on a free port, its Unix socket in the directory too.
//! `pg_hba.conf` allows TLS and plain text from 127.0.0.1 without a password, except to the database `tlsonly`,
//! which refuses plain text (`hostnossl … reject`), and for the role `pbt_scram`, which logs in with SCRAM.
//!
//! Stopped whatever happens: a detached watcher shell polls this process's pid and, once it is gone (the tests
//! ended, panicked or were killed), stops the server (`pg_ctl stop -m immediate`) and removes the directory.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use super::{is_root, on_exit, run};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// The database whose `pg_hba.conf` line refuses plain text.
pub const TLS_ONLY_DB: &str = "tlsonly";

/// A role that logs in with a password (SCRAM-SHA-256, over TLS only), as managed databases have them.
pub const SCRAM_USER: &str = "pbt_scram";
/// Its password.
pub const SCRAM_PASSWORD: &str = "pbt-scram-Secret-4711";

/// The running TLS server.
pub struct TlsServer {
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
    /// The directory (data, certificates, socket, log).
    pub dir: PathBuf,
    /// The CA that signed the server's certificate (PEM).
    pub ca_file: PathBuf,
    /// Another CA, which signed nothing the server shows (PEM).
    pub other_ca_file: PathBuf,
}

static SERVER: OnceLock<TlsServer> = OnceLock::new();

/// The server, started on first call (blocking, about two seconds).
pub fn server() -> &'static TlsServer {
    SERVER.get_or_init(start)
}

impl TlsServer {
    /// A ledger URL on this server: `host` (`localhost` or `127.0.0.1`), `db`, a schema of its own through
    /// `search_path`, `application_name` set to `app` (so that the test can find the ledger's sessions in
    /// `pg_stat_ssl`), then `extra` query parameters (`&`-joined, may be empty).
    pub fn url(&self, host: &str, db: &str, schema: &str, app: &str, extra: &str) -> String {
        let extra = if extra.is_empty() {
            String::new()
        } else {
            format!("&{extra}")
        };
        format!(
            "postgres://postgres@{host}:{}/{db}?options=-c%20search_path%3D{schema}&application_name={app}{extra}",
            self.port
        )
    }

    /// A plain-text client on the server (database `postgres`), for setting up and for looking at `pg_stat_ssl`.
    pub async fn admin(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(
            &format!(
                "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=disable",
                self.port
            ),
            tokio_postgres::NoTls,
        )
        .await
        .expect("connect to the test TLS server");
        tokio::spawn(connection);
        client
    }

    /// Creates a schema `name` in `db` (databases `postgres` and `tlsonly` exist).
    pub async fn schema(&self, db: &str, name: &str) {
        let (client, connection) = tokio_postgres::connect(
            &format!(
                "host={} port={} user=postgres dbname={db}",
                self.dir.display(),
                self.port
            ),
            tokio_postgres::NoTls,
        )
        .await
        .expect("connect to the test TLS server over its socket");
        tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE SCHEMA {name}"))
            .await
            .expect("create the schema");
    }

    /// `pg_stat_ssl.ssl` of every session with `application_name = app`.
    pub async fn ssl_of(&self, app: &str) -> Vec<bool> {
        self.admin()
            .await
            .query(
                "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name = $1",
                &[&app],
            )
            .await
            .expect("query pg_stat_ssl")
            .iter()
            .map(|r| r.get::<_, bool>(0))
            .collect()
    }
}

/// `/usr/lib/postgresql/<newest>/bin` (or `PB_TEST_PG_BIN`).
fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("PB_TEST_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries under /usr/lib/postgresql (or set PB_TEST_PG_BIN)")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("no initdb under /usr/lib/postgresql/*/bin (or set PB_TEST_PG_BIN)")
        .1
}

/// Runs `program args` as the `postgres` user (as root) or as is (as anyone else).
fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

/// A CA: its certificate and the issuer to sign with.
fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key"))
        .expect("CA certificate")
}

fn start() -> TlsServer {
    let bin = bin_dir();
    let dir = tempfile::Builder::new()
        .prefix("pbt-pgtls-")
        .tempdir()
        .expect("temporary directory")
        .keep();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();

    // The certificates: a CA, a server certificate for `localhost` only (not 127.0.0.1) signed by it, and a second
    // CA that signed nothing.
    let ca_cert = ca("partner-bridge test CA");
    let other = ca("partner-bridge other CA");
    let server_key = KeyPair::generate().expect("server key");
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("server params");
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = params
        .signed_by(&server_key, &ca_cert)
        .expect("server certificate");
    let ca_file = dir.join("ca.crt");
    let other_ca_file = dir.join("other-ca.crt");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();
    std::fs::write(&other_ca_file, other.pem()).unwrap();
    std::fs::write(dir.join("server.crt"), server_cert.pem()).unwrap();
    let key_path = dir.join("server.key");
    std::fs::write(&key_path, server_key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();

    let data = dir.join("data");
    if is_root() {
        run(
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir),
            "chown the test server's directory",
        );
    }
    run(
        as_postgres(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"])
            .stdin(Stdio::null()),
        "initdb",
    );

    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        listener.local_addr().unwrap().port()
    };
    let mut conf = std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("postgresql.conf"))
        .unwrap();
    write!(
        conf,
        "\n# partner-bridge ledger TLS tests\nport = {port}\nlisten_addresses = '127.0.0.1'\n\
         unix_socket_directories = '{dir}'\nssl = on\nssl_cert_file = '{dir}/server.crt'\n\
         ssl_key_file = '{dir}/server.key'\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\n\
         max_connections = 40\nshared_buffers = 16MB\n",
        dir = dir.display()
    )
    .unwrap();
    std::fs::write(
        data.join("pg_hba.conf"),
        format!(
            "local all all trust\nhostnossl {TLS_ONLY_DB} all 127.0.0.1/32 reject\n\
             hostssl all {SCRAM_USER} 127.0.0.1/32 scram-sha-256\n\
             hostssl all all 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 trust\n"
        ),
    )
    .unwrap();

    run(
        as_postgres(&bin.join("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.join("server.log"))
            .args(["-w", "-t", "30", "start"])
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
        "pg_ctl start (see the server.log in the directory)",
    );

    // The watcher: stops the server and removes the directory once this process is gone, however it ended.
    let stop = format!(
        "{} -D '{}' -m immediate stop",
        bin.join("pg_ctl").display(),
        data.display()
    );
    let stop = if is_root() {
        format!("runuser -u postgres -- {stop}")
    } else {
        stop
    };
    on_exit(
        &format!("{stop} >/dev/null 2>&1; rm -rf '{}'", dir.display()),
        "the test TLS server",
    );

    // pg_ctl -w waited for the server. The database that refuses plain text and the password role (each `-c` is
    // its own transaction: CREATE DATABASE cannot run inside one).
    run(
        as_postgres(&bin.join("psql"))
            .arg("-h")
            .arg(&dir)
            .args(["-p", &port.to_string(), "-U", "postgres", "-d", "postgres"])
            .args(["-v", "ON_ERROR_STOP=1", "-q", "-c"])
            .arg(format!("CREATE DATABASE {TLS_ONLY_DB}"))
            .arg("-c")
            .arg(format!(
                "CREATE ROLE {SCRAM_USER} LOGIN SUPERUSER PASSWORD '{SCRAM_PASSWORD}'"
            ))
            .stdin(Stdio::null()),
        "psql: create the test database and role",
    );
    eprintln!(
        "test TLS PostgreSQL on 127.0.0.1:{port}, directory {}",
        dir.display()
    );
    TlsServer {
        port,
        dir,
        ca_file,
        other_ca_file,
    }
}
