//! The PostgreSQL ledger over TLS, `sslmode` as libpq has it, against a second PostgreSQL server of the tests' own
//! with a CA and server certificate made here (support/pg_tls.rs; the machine's own server is not touched).
//!
//! On the old code (tokio-postgres with `NoTls`) `require` failed at start, `verify-ca`/`verify-full` and
//! `sslrootcert` were refused as unknown, and the default connected in plain text: every test here fails there.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use partner_bridge::ledger::{Ledger, PgTlsSettings};
use partner_bridge::secret::SecretUrl;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::faults::{BIN, Binary, binary_config, test_logs};
use crate::support::pg_tls::{SCRAM_PASSWORD, SCRAM_USER, TLS_ONLY_DB, TlsServer, server};
use crate::support::wait_for;

/// A schema and an `application_name` of the test's own on the TLS server.
async fn fresh(db: &str, tag: &str) -> (&'static TlsServer, String) {
    let server = server();
    let name = format!(
        "pbt_{tag}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    server.schema(db, &name).await;
    (server, name)
}

async fn open(url: &str, tls: &PgTlsSettings) -> Result<Ledger, String> {
    Ledger::open_with_tls(&SecretUrl::new(url), Duration::from_secs(5), tls)
        .await
        .map_err(|e| {
            eprintln!("refused: {e}");
            e.to_string()
        })
}

fn no_settings() -> PgTlsSettings {
    PgTlsSettings::default()
}

fn ca(path: &Path) -> String {
    format!("sslrootcert={}", path.display())
}

/// Opens the ledger, writes through it, and returns what `pg_stat_ssl` says of its sessions.
async fn open_and_write(
    server: &TlsServer,
    url: &str,
    tls: &PgTlsSettings,
    app: &str,
) -> Vec<bool> {
    let ledger = open(url, tls).await.expect("the ledger opens");
    ledger
        .check_writable()
        .await
        .expect("the ledger is writable");
    let ssl = server.ssl_of(app).await;
    assert!(!ssl.is_empty(), "no session of {app} on the server");
    drop(ledger);
    ssl
}

/// verify-full against `localhost`, whose name the certificate carries, signed by the given CA: the ledger works and
/// its session is encrypted (the server's own view, `pg_stat_ssl`).
#[tokio::test]
async fn verify_full_against_localhost_works_and_is_encrypted() {
    let (server, name) = fresh("postgres", "vfull").await;
    let url = server.url(
        "localhost",
        "postgres",
        &name,
        &name,
        &format!("sslmode=verify-full&{}", ca(&server.ca_file)),
    );
    let ssl = open_and_write(server, &url, &no_settings(), &name).await;
    assert!(ssl.iter().all(|s| *s), "pg_stat_ssl: {ssl:?}");

    // The same from the config file's keys instead of the URL.
    let (server, name) = fresh("postgres", "vfullcfg").await;
    let url = server.url("localhost", "postgres", &name, &name, "");
    let tls = PgTlsSettings {
        sslmode: Some("verify-full".into()),
        ca_file: Some(server.ca_file.clone()),
    };
    let ssl = open_and_write(server, &url, &tls, &name).await;
    assert!(ssl.iter().all(|s| *s), "pg_stat_ssl: {ssl:?}");
}

/// verify-full to `127.0.0.1`, a name the certificate (for `localhost` only) does not carry: refused, saying so.
#[tokio::test]
async fn verify_full_refuses_a_host_the_certificate_is_not_for() {
    let (server, name) = fresh("postgres", "vname").await;
    let url = server.url(
        "127.0.0.1",
        "postgres",
        &name,
        &name,
        &format!("sslmode=verify-full&{}", ca(&server.ca_file)),
    );
    let err = open(&url, &no_settings()).await.expect_err("refused");
    assert!(err.contains("not valid for name"), "{err}");
    assert!(
        err.contains("127.0.0.1") && err.contains("sslmode=verify-full"),
        "{err}"
    );
    assert!(server.ssl_of(&name).await.is_empty());
}

/// verify-ca checks the chain, not the name: `127.0.0.1` with the right CA works; with another CA it is refused.
#[tokio::test]
async fn verify_ca_checks_the_chain_not_the_name() {
    let (server, name) = fresh("postgres", "vca").await;
    let url = server.url(
        "127.0.0.1",
        "postgres",
        &name,
        &name,
        &format!("sslmode=verify-ca&{}", ca(&server.ca_file)),
    );
    let ssl = open_and_write(server, &url, &no_settings(), &name).await;
    assert!(ssl.iter().all(|s| *s), "pg_stat_ssl: {ssl:?}");

    let url = server.url(
        "127.0.0.1",
        "postgres",
        &name,
        &name,
        &format!("sslmode=verify-ca&{}", ca(&server.other_ca_file)),
    );
    let err = open(&url, &no_settings()).await.expect_err("refused");
    assert!(
        err.contains("UnknownIssuer") || err.contains("unknown issuer"),
        "{err}"
    );
    assert!(
        err.contains(&server.other_ca_file.display().to_string()),
        "{err}"
    );
}

/// require without a CA takes a certificate no CA anyone trusts vouches for (as libpq); with a CA it checks the
/// chain (libpq: "require" with a root certificate behaves as "verify-ca"), so another CA is refused.
#[tokio::test]
async fn require_encrypts_and_checks_the_chain_only_when_given_a_ca() {
    let (server, name) = fresh("postgres", "req").await;
    let url = server.url("127.0.0.1", "postgres", &name, &name, "sslmode=require");
    let ssl = open_and_write(server, &url, &no_settings(), &name).await;
    assert!(ssl.iter().all(|s| *s), "pg_stat_ssl: {ssl:?}");

    let tls = PgTlsSettings {
        sslmode: Some("require".into()),
        ca_file: Some(server.other_ca_file.clone()),
    };
    let url = server.url("127.0.0.1", "postgres", &name, &name, "");
    let err = open(&url, &tls).await.expect_err("refused");
    assert!(
        err.contains("UnknownIssuer") || err.contains("unknown issuer"),
        "{err}"
    );
}

/// The server refuses plain text to the database `tlsonly`: `disable` is refused, `require` goes through.
#[tokio::test]
async fn disable_is_plain_text_and_a_tls_only_server_refuses_it() {
    let (server, name) = fresh(TLS_ONLY_DB, "dis").await;
    let url = server.url("127.0.0.1", TLS_ONLY_DB, &name, &name, "sslmode=disable");
    let err = open(&url, &no_settings()).await.expect_err("refused");
    assert!(err.contains("no encryption"), "{err}");

    let url = server.url("127.0.0.1", TLS_ONLY_DB, &name, &name, "sslmode=require");
    let ledger = open(&url, &no_settings())
        .await
        .expect("require goes through");
    ledger.check_writable().await.unwrap();

    // And disable is plain text where plain text is allowed.
    let (server, name) = fresh("postgres", "plain").await;
    let url = server.url("127.0.0.1", "postgres", &name, &name, "sslmode=disable");
    let ssl = open_and_write(server, &url, &no_settings(), &name).await;
    assert!(ssl.iter().all(|s| !*s), "pg_stat_ssl: {ssl:?}");
}

/// A TCP relay to the server that answers PostgreSQL's SSLRequest with `N` (as a server without TLS does) and
/// passes everything else on.
async fn tls_refusing_relay(port: u16) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut first = [0u8; 8];
                if client.read_exact(&mut first).await.is_err() {
                    return;
                }
                let mut upstream = tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .unwrap();
                // SSLRequest: length 8, code 80877103.
                if first == [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f] {
                    client.write_all(b"N").await.unwrap();
                } else {
                    upstream.write_all(&first).await.unwrap();
                }
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    addr
}

/// prefer (and no sslmode at all, libpq's default) uses TLS when the server offers it, and falls back to plain text
/// when the server refuses it; require through the same refusal fails.
#[tokio::test]
async fn prefer_uses_tls_when_offered_and_plain_text_only_when_refused() {
    let (server, name) = fresh("postgres", "pref").await;
    let url = server.url("127.0.0.1", "postgres", &name, &name, "");
    let ssl = open_and_write(server, &url, &no_settings(), &name).await;
    assert!(ssl.iter().all(|s| *s), "default: pg_stat_ssl: {ssl:?}");

    let relay = tls_refusing_relay(server.port).await;
    let (server, name) = fresh("postgres", "prefplain").await;
    let via = server
        .url("127.0.0.1", "postgres", &name, &name, "sslmode=prefer")
        .replace(
            &format!(":{}/", server.port),
            &format!(":{}/", relay.port()),
        );
    let ssl = open_and_write(server, &via, &no_settings(), &name).await;
    assert!(ssl.iter().all(|s| !*s), "refused TLS: pg_stat_ssl: {ssl:?}");

    let via = via.replace("sslmode=prefer", "sslmode=require");
    let err = open(&via, &no_settings()).await.expect_err("refused");
    assert!(err.contains("server does not support TLS"), "{err}");
}

/// A password login (SCRAM-SHA-256, as managed databases use) over TLS with `channel_binding=require`: the ledger
/// binds SCRAM to its TLS session (`tls-server-end-point`), which the server checks against its own certificate;
/// the password appears in no error.
#[tokio::test]
async fn scram_login_over_tls_is_bound_to_the_tls_session() {
    let (server, name) = fresh("postgres", "scram").await;
    let url = server
        .url(
            "localhost",
            "postgres",
            &name,
            &name,
            &format!(
                "sslmode=verify-full&{}&channel_binding=require",
                ca(&server.ca_file)
            ),
        )
        .replace("postgres@", &format!("{SCRAM_USER}:{SCRAM_PASSWORD}@"));
    let ssl = open_and_write(server, &url, &no_settings(), &name).await;
    assert!(ssl.iter().all(|s| *s), "pg_stat_ssl: {ssl:?}");

    // A wrong password is refused, and the error shows neither password.
    let wrong = url.replace(SCRAM_PASSWORD, "not-the-Password-0815");
    let err = open(&wrong, &no_settings()).await.expect_err("refused");
    assert!(err.contains("password authentication failed"), "{err}");
    assert!(
        !err.contains("not-the-Password-0815") && !err.contains(SCRAM_PASSWORD),
        "{err}"
    );
}

// ---- through the binary ----------------------------------------------------------------------------------------

/// A valid configuration for `check-config`, with `ledger` as its `[ledger]` section.
fn config_with_ledger(dir: &Path, ledger: &str) -> std::path::PathBuf {
    let key = partner_bridge::envelope::SigningKey::generate();
    std::fs::write(dir.join("signing.key"), key.to_base64()).unwrap();
    let text = format!(
        r#"
state_dir = "{state}"
[didit]
base_url = "http://127.0.0.1:1"
application_id = "dbd20e34-42e9-4f2c-ba91-cf0762016f64"
api_key = "sk_test_key"
[issuer]
enabled = true
signing_key_file = "{dir}/signing.key"
[[issuer.partners]]
name = "sponsor-bank"
application_id = "a5f3bca2-46e2-411e-90ef-a580900a57ee"
public_keys = ["{public}"]
[ledger]
{ledger}
"#,
        state = dir.join("state").display(),
        dir = dir.display(),
        public = key.verifying_key().to_base64(),
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn check_config(path: &Path) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// check-config: a bad mode exits 64 naming the key; verify-full without a CA names `ledger.ca_file`; an unreadable
/// CA file names its path; URL and key disagreeing is refused; a good one passes, and an unset mode warns.
#[test]
fn bad_ledger_tls_settings_exit_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let url = "url = \"postgres://postgres@127.0.0.1:5432/test\"";
    let missing = dir.path().join("no-such-ca.pem");
    let not_pem = dir.path().join("not-pem.pem");
    std::fs::write(&not_pem, "hello\n").unwrap();
    for (ledger, key, also) in [
        (format!("{url}\nsslmode = \"verify_full\""), "ledger.sslmode", "verify_full"),
        (
            "url = \"postgres://postgres@127.0.0.1:5432/test?sslmode=strict\"".to_string(),
            "ledger.url",
            "sslmode=strict",
        ),
        (format!("{url}\nsslmode = \"verify-full\""), "ledger.ca_file", "verify-full"),
        (
            format!("{url}\nsslmode = \"verify-ca\"\nca_file = \"{}\"", missing.display()),
            "ledger.ca_file",
            &missing.display().to_string(),
        ),
        (
            format!("{url}\nsslmode = \"require\"\nca_file = \"{}\"", not_pem.display()),
            "ledger.ca_file",
            "no PEM certificate",
        ),
        (
            format!(
                "url = \"postgres://postgres@127.0.0.1:5432/test?sslrootcert={}\"",
                missing.display()
            ),
            "ledger.url",
            &missing.display().to_string(),
        ),
        (
            "url = \"postgres://postgres@127.0.0.1:5432/test?sslmode=require\"\nsslmode = \"disable\"".to_string(),
            "ledger.sslmode",
            "sslmode=require",
        ),
    ] {
        let path = config_with_ledger(dir.path(), &ledger);
        let (code, _, stderr) = check_config(&path);
        assert_eq!(code, 64, "{ledger}: {stderr}");
        assert!(stderr.contains(key), "{ledger}: {stderr}");
        assert!(stderr.contains(also), "{ledger}: {stderr}");
    }

    let ca = dir.path().join("ca.pem");
    let issuer = rcgen::CertifiedIssuer::self_signed(
        {
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p
        },
        rcgen::KeyPair::generate().unwrap(),
    )
    .unwrap();
    std::fs::write(&ca, issuer.pem()).unwrap();
    let path = config_with_ledger(
        dir.path(),
        &format!(
            "{url}\nsslmode = \"verify-full\"\nca_file = \"{}\"",
            ca.display()
        ),
    );
    let (code, stdout, stderr) = check_config(&path);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("verify-full"), "{stdout}");
    assert!(!stderr.contains("ledger.sslmode"), "{stderr}");

    let path = config_with_ledger(dir.path(), url);
    let (code, _, stderr) = check_config(&path);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("warning: ledger.sslmode is not set"),
        "{stderr}"
    );
}

/// `partner-bridge run` with `ledger.sslmode = "verify-full"` and `ledger.ca_file` becomes ready, and the server sees
/// its ledger sessions encrypted. Then without `sslmode`, against a server that refuses TLS: it runs in plain text
/// (libpq's `prefer`) and its log warns, at start and for the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_runs_on_a_verify_full_ledger() {
    let world = crate::support::bridge::World::new("ledger-tls").await;
    test_logs();
    let (server, name) = fresh("postgres", "bin").await;
    let (config, admin) = binary_config(&world, 4, 5);
    let mut toml = std::fs::read_to_string(&config).unwrap();
    assert!(
        !toml.contains("\n[ledger]"),
        "binary_config has its own [ledger]"
    );
    toml.push_str(&format!(
        "\n[ledger]\nurl = \"{}\"\nsslmode = \"verify-full\"\nca_file = \"{}\"\n",
        server.url("localhost", "postgres", &name, &name, ""),
        server.ca_file.display()
    ));
    std::fs::write(&config, toml).unwrap();
    let log = world.dir.path().join("bridge.log");
    let mut binary = Binary::start(&config, admin, log.clone()).await;
    let ssl = wait_for(
        "the binary's ledger sessions on the server",
        Duration::from_secs(10),
        || async { Some(server.ssl_of(&name).await).filter(|s| !s.is_empty()) },
    )
    .await;
    assert!(ssl.iter().all(|s| *s), "pg_stat_ssl: {ssl:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("sslmode=verify-full"), "{text}");
    assert!(!text.contains("NOT encrypted"), "{text}");
    binary.terminate();
    binary.exited_within(Duration::from_secs(20)).await;

    // No sslmode, and a server that refuses TLS: the default (prefer) runs in plain text and says so.
    let relay = tls_refusing_relay(server.port).await;
    let (server, name) = fresh("postgres", "binplain").await;
    let url = server
        .url("127.0.0.1", "postgres", &name, &name, "")
        .replace(
            &format!(":{}/", server.port),
            &format!(":{}/", relay.port()),
        );
    let admin: SocketAddr = format!("127.0.0.1:{}", crate::support::faults::free_port())
        .parse()
        .unwrap();
    let toml = std::fs::read_to_string(&config).unwrap();
    let toml = toml[..toml.find("\n[ledger]").unwrap()].to_string();
    let toml = crate::support::faults::set_key(&toml, "listen", &format!("\"{admin}\""));
    let plain_config = world.dir.path().join("plain.toml");
    std::fs::write(
        &plain_config,
        format!("{toml}\n[ledger]\nurl = \"{url}\"\n"),
    )
    .unwrap();
    let log = world.dir.path().join("plain.log");
    let mut binary = Binary::start(&plain_config, admin, log.clone()).await;
    let ssl = server.ssl_of(&name).await;
    assert!(
        !ssl.is_empty() && ssl.iter().all(|s| !*s),
        "pg_stat_ssl: {ssl:?}"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("ledger connection NOT encrypted"), "{text}");
    assert!(text.contains("ledger.sslmode is not set"), "{text}");
    binary.terminate();
    binary.exited_within(Duration::from_secs(20)).await;
    world.cleanup().await;
}
