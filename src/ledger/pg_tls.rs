//! TLS for the PostgreSQL ledger, with rustls (the same stack and ring provider as AMQP and HTTPS), `sslmode` as
//! libpq has it.
//!
//! | `sslmode`     | TLS                                   | the server's certificate                               |
//! |---------------|---------------------------------------|--------------------------------------------------------|
//! | `disable`     | never                                 | —                                                      |
//! | `prefer`      | if the server agrees, else plain text | not checked; checked as `verify-ca` when a CA is given |
//! | `require`     | always                                | not checked; checked as `verify-ca` when a CA is given |
//! | `verify-ca`   | always                                | signed by the CA (its name is not checked)             |
//! | `verify-full` | always                                | signed by the CA and issued for the host connected to |
//!
//! The mode and the CA come from the URL's `sslmode=` and `sslrootcert=` (as libpq reads them) or from
//! `[ledger] sslmode` / `ca_file`; both places may be used as long as they agree. `sslrootcert=system` (or
//! `ca_file = "system"`) uses the machine's trusted CAs and, as in libpq 16, needs `verify-full`. The default is
//! libpq's, `prefer`, and every connection that ends up in plain text under it is logged as a warning.
//!
//! Where this differs from libpq: a `prefer` connection whose TLS handshake fails is an error, not retried in
//! plain text (libpq retries), so a certificate that fails a given CA never quietly downgrades the connection;
//! `~/.postgresql/root.crt` is not read implicitly (a daemon's home directory is no place for its trust); client
//! certificates (`sslcert`, `sslkey`) are not supported. SCRAM is bound to the TLS session (`tls-server-end-point`)
//! for certificates signed with RSA PKCS#1 or ECDSA, so `channel_binding=require` works with those. As in libpq,
//! `sslmode` does not apply to Unix-domain sockets.
//!
//! tokio-postgres itself knows only `disable`, `prefer` and `require`: it does the `SSLRequest` negotiation (and
//! the fall-back of `prefer`); `verify-ca` and `verify-full` are `require` with the verifier below.

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{WebPkiServerVerifier, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SslMode {
    /// Plain text only.
    Disable,
    /// TLS when the server offers it, else plain text (libpq's default, and ours).
    Prefer,
    /// TLS, the certificate not checked (unless a CA is given: then as `VerifyCa`).
    Require,
    /// TLS, the certificate chain checked against the CA, not its name.
    VerifyCa,
    /// TLS, the chain and the host name checked.
    VerifyFull,
}

impl SslMode {
    /// The values, as written in the URL and the config.
    pub const NAMES: &'static str = "disable, prefer, require, verify-ca, verify-full";

    /// Parses libpq's spelling (`allow` is not offered: it is `prefer` the other way round, plain text first).
    pub fn parse(text: &str) -> Option<SslMode> {
        Some(match text {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    /// libpq's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The ledger's TLS settings from the config file (`[ledger] sslmode`, `[ledger] ca_file`), as written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PgTlsSettings {
    /// `ledger.sslmode`.
    pub sslmode: Option<String>,
    /// `ledger.ca_file`: a PEM file of CA certificates, or `system`.
    pub ca_file: Option<PathBuf>,
}

/// A TLS setting that is wrong, naming the config key it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettingError {
    /// `ledger.sslmode`, `ledger.ca_file` or `ledger.url`.
    pub key: &'static str,
    /// What is wrong, for a person.
    pub reason: String,
}

impl fmt::Display for TlsSettingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

fn bad(key: &'static str, reason: impl Into<String>) -> TlsSettingError {
    TlsSettingError {
        key,
        reason: reason.into(),
    }
}

/// Where the CA certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootSource {
    /// A PEM file.
    File(PathBuf),
    /// The machine's trusted CAs (`system`).
    System,
}

impl fmt::Display for RootSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RootSource::File(p) => write!(f, "CA file {}", p.display()),
            RootSource::System => f.write_str("the system's trusted CAs"),
        }
    }
}

/// The ledger's TLS, resolved: the mode, and the CAs the server's certificate is checked against (if any).
#[derive(Clone)]
pub struct PgTls {
    mode: SslMode,
    /// Whether the mode was written anywhere (an unset mode is `prefer`, and a plain-text connection under it is
    /// worth a warning that suggests setting it).
    explicit: bool,
    root: Option<RootSource>,
    /// `None` for `disable`.
    config: Option<Arc<ClientConfig>>,
}

impl fmt::Debug for PgTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTls")
            .field("mode", &self.mode)
            .field("root", &self.root)
            .finish()
    }
}

impl PgTls {
    /// Resolves the settings of `url` (its `sslmode=` and `sslrootcert=`) and of the config file, reading the CA
    /// certificates. Returns the URL without those two parameters (for tokio-postgres, which would refuse
    /// `verify-*` and `sslrootcert`) and the TLS to connect with.
    pub fn resolve(
        url: &str,
        settings: &PgTlsSettings,
    ) -> Result<(String, PgTls), TlsSettingError> {
        let (rest, from_url) = split_url(url)?;
        let url_mode = from_url
            .sslmode
            .as_deref()
            .map(|m| {
                SslMode::parse(m).ok_or_else(|| {
                    bad(
                        "ledger.url",
                        format!("sslmode={m} is not one of {}", SslMode::NAMES),
                    )
                })
            })
            .transpose()?;
        let config_mode = settings
            .sslmode
            .as_deref()
            .map(|m| {
                SslMode::parse(m).ok_or_else(|| {
                    bad(
                        "ledger.sslmode",
                        format!("\"{m}\" is not one of {}", SslMode::NAMES),
                    )
                })
            })
            .transpose()?;
        let mode = match (url_mode, config_mode) {
            (Some(u), Some(c)) if u != c => {
                return Err(bad(
                    "ledger.sslmode",
                    format!("is {c} but ledger.url says sslmode={u}; set it in one place"),
                ));
            }
            (u, c) => u.or(c),
        };
        let root_of = |p: &Path| {
            if p.as_os_str() == "system" {
                RootSource::System
            } else {
                RootSource::File(p.to_path_buf())
            }
        };
        let url_root = from_url
            .sslrootcert
            .as_deref()
            .map(|p| root_of(Path::new(p)));
        let config_root = settings.ca_file.as_deref().map(root_of);
        let (root, root_key) = match (url_root, config_root) {
            (Some(u), Some(c)) if u != c => {
                return Err(bad(
                    "ledger.ca_file",
                    format!("is {c} but ledger.url says sslrootcert ({u}); set it in one place"),
                ));
            }
            (Some(u), _) => (Some(u), "ledger.url"),
            (None, c) => (c, "ledger.ca_file"),
        };
        let explicit = mode.is_some();
        // libpq 16: sslrootcert=system defaults to, and needs, verify-full (the system's CAs sign certificates for
        // anybody's names; only the name check makes them mean something).
        let mode = match (mode, &root) {
            (None, Some(RootSource::System)) => SslMode::VerifyFull,
            (Some(m), Some(RootSource::System)) if m != SslMode::VerifyFull => {
                return Err(bad(
                    if url_mode.is_some() {
                        "ledger.url"
                    } else {
                        "ledger.sslmode"
                    },
                    format!(
                        "sslmode {m} may not be used with the system's trusted CAs (sslrootcert=system): use verify-full"
                    ),
                ));
            }
            (m, _) => m.unwrap_or(SslMode::Prefer),
        };
        if mode >= SslMode::VerifyCa && root.is_none() {
            return Err(bad(
                "ledger.ca_file",
                format!(
                    "required with sslmode={mode}: the PEM file of the CA certificate(s) that signed the server's \
                     certificate (or \"system\" for the machine's trusted CAs), or a weaker sslmode"
                ),
            ));
        }
        let config = match mode {
            SslMode::Disable => None,
            _ => {
                let roots = root
                    .as_ref()
                    .map(|r| load_roots(r).map_err(|reason| bad(root_key, reason)))
                    .transpose()?;
                Some(Arc::new(
                    client_config(mode, roots).map_err(|reason| bad(root_key, reason))?,
                ))
            }
        };
        Ok((
            rest,
            PgTls {
                mode,
                explicit,
                root,
                config,
            },
        ))
    }

    /// The effective mode.
    pub fn mode(&self) -> SslMode {
        self.mode
    }

    /// Whether the mode was set (in the URL or the config) rather than left at the default.
    pub fn explicit(&self) -> bool {
        self.explicit
    }

    /// Where the CAs come from, if any.
    pub fn root(&self) -> Option<&RootSource> {
        self.root.as_ref()
    }

    /// What tokio-postgres is told: it negotiates TLS and knows no verification.
    pub(crate) fn driver_mode(&self) -> tokio_postgres::config::SslMode {
        match self.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        }
    }

    /// A connector for one connection (`None` for `disable`), and the flag it sets once TLS is up.
    pub(crate) fn connector(&self) -> Option<(MakeRustls, Arc<AtomicBool>)> {
        let config = self.config.clone()?;
        let encrypted = Arc::new(AtomicBool::new(false));
        Some((
            MakeRustls {
                config,
                encrypted: encrypted.clone(),
            },
            encrypted,
        ))
    }

    /// `sslmode=verify-full, CA file /etc/…`, for messages.
    pub fn describe(&self) -> String {
        match &self.root {
            Some(root) if self.mode != SslMode::Disable => format!("sslmode={}, {root}", self.mode),
            _ => format!("sslmode={}", self.mode),
        }
    }
}

/// The two parameters libpq has and tokio-postgres does not, taken from a URL's query.
#[derive(Debug, Default, PartialEq, Eq)]
struct UrlTls {
    sslmode: Option<String>,
    sslrootcert: Option<String>,
}

/// Removes `sslmode` and `sslrootcert` from the query of `url` (percent-decoding their values); refuses the TLS
/// parameters that are not supported, so that they are not silently ignored.
fn split_url(url: &str) -> Result<(String, UrlTls), TlsSettingError> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), UrlTls::default()));
    };
    let mut kept = Vec::new();
    let mut found = UrlTls::default();
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "sslmode" => found.sslmode = Some(percent_decode(value)),
            "sslrootcert" => found.sslrootcert = Some(percent_decode(value)),
            "sslcert" | "sslkey" | "sslpassword" | "sslcrl" | "sslcrldir" | "sslsni" => {
                return Err(bad(
                    "ledger.url",
                    format!(
                        "{key} is not supported (client certificates and CRLs are not); only sslmode and sslrootcert"
                    ),
                ));
            }
            _ => kept.push(pair),
        }
    }
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, found))
}

/// `%XX` and `+`-free percent-decoding, as URLs carry paths; a malformed escape is kept as written.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (
                (bytes[i + 1] as char).to_digit(16),
                (bytes[i + 2] as char).to_digit(16),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads the CA certificates.
fn load_roots(root: &RootSource) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    match root {
        RootSource::File(path) => {
            let text = std::fs::read(path)
                .map_err(|e| format!("cannot read the CA file {}: {e}", path.display()))?;
            let mut count = 0;
            for cert in CertificateDer::pem_slice_iter(&text) {
                let cert = cert
                    .map_err(|e| format!("the CA file {} is not valid PEM: {e}", path.display()))?;
                store.add(cert).map_err(|e| {
                    format!(
                        "the CA file {} holds a certificate that cannot be used as a CA: {e}",
                        path.display()
                    )
                })?;
                count += 1;
            }
            if count == 0 {
                return Err(format!(
                    "the CA file {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                    path.display()
                ));
            }
        }
        RootSource::System => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(format!(
                    "sslrootcert=system: no trusted CA certificate found on this machine{}",
                    found
                        .errors
                        .first()
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default()
                ));
            }
        }
    }
    Ok(store)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls client configuration for `mode`.
fn client_config(mode: SslMode, roots: Option<RootCertStore>) -> Result<ClientConfig, String> {
    let provider = provider();
    let algorithms = provider.signature_verification_algorithms;
    let verifier: Arc<dyn ServerCertVerifier> = match (mode, roots) {
        (SslMode::VerifyFull, Some(roots)) => {
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| format!("cannot use the CA certificates: {e}"))?
        }
        (SslMode::VerifyFull, None) => unreachable!("verify-full without a CA is refused earlier"),
        // libpq: with a CA, prefer and require check the chain as verify-ca does.
        (_, roots) => Arc::new(NameNotChecked {
            roots: roots.map(Arc::new),
            algorithms,
        }),
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    // What libpq 17 sends; needed for PostgreSQL 17's direct TLS (`sslnegotiation=direct`), ignored before.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(config)
}

/// Every mode but `verify-full`: the server's name is not checked. With a CA (`verify-ca`, and `prefer`/`require`
/// given one, as libpq) the chain up to one of the CAs is (validity dates, key usage for a server, signatures);
/// without one (`prefer`/`require`) any certificate is, as libpq. The handshake signatures are always checked, so
/// the server holds the key of the certificate it showed; without a CA, who that server is, nothing says.
#[derive(Debug)]
struct NameNotChecked {
    roots: Option<Arc<RootCertStore>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for NameNotChecked {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = ParsedCertificate::try_from(end_entity)?;
            verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.algorithms.all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// tokio-postgres' connector factory: one [`RustlsConnect`] per host tried.
#[derive(Clone)]
pub(crate) struct MakeRustls {
    config: Arc<ClientConfig>,
    /// Set once a TLS session is up (a `prefer` connection the server refused TLS on stays plain text).
    encrypted: Arc<AtomicBool>,
}

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, io::Error> {
        // An empty domain is a Unix socket (never given a connector: `sslmode` does not apply there) or a bare
        // `hostaddr` without `host`, for which tokio-postgres refuses TLS itself ("no hostname provided").
        let name = (!domain.is_empty())
            .then(|| ServerName::try_from(domain.to_string()))
            .transpose()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{domain}: {e}")))?;
        Ok(RustlsConnect {
            name,
            config: self.config.clone(),
            encrypted: self.encrypted.clone(),
        })
    }
}

/// One TLS handshake.
pub(crate) struct RustlsConnect {
    name: Option<ServerName<'static>>,
    config: Arc<ClientConfig>,
    encrypted: Arc<AtomicBool>,
}

/// A refused certificate said in words (the caller adds the mode and the CA).
fn explain(e: io::Error) -> io::Error {
    let hint = match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)) => {
            "the server's certificate is not signed by the CA in use: "
        }
        Some(rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidForName
            | rustls::CertificateError::NotValidForNameContext { .. },
        )) => "the server's certificate is not issued for the host connected to: ",
        Some(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. },
        )) => "the server's certificate has expired: ",
        Some(rustls::Error::InvalidCertificate(_)) => "the server's certificate was refused: ",
        _ => "",
    };
    io::Error::new(e.kind(), format!("{hint}{e}"))
}

type Handshake<S> = Pin<Box<dyn Future<Output = Result<RustlsStream<S>, io::Error>> + Send>>;

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Handshake<S>;

    fn connect(self, stream: S) -> Handshake<S> {
        Box::pin(async move {
            let name = self.name.ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "no host name to check")
            })?;
            let stream = tokio_rustls::TlsConnector::from(self.config)
                .connect(name, stream)
                .await
                .map_err(explain)?;
            self.encrypted.store(true, Ordering::SeqCst);
            Ok(RustlsStream(Box::new(stream)))
        })
    }
}

/// A TLS connection to the server.
pub struct RustlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    /// `tls-server-end-point` (RFC 5929), so that SCRAM authentication is bound to this TLS session
    /// (`SCRAM-SHA-256-PLUS`; a relay in the middle cannot pass it on). None when the certificate's signature
    /// algorithm has no defined hash (Ed25519, RSA-PSS): SCRAM then goes without binding, as with libpq.
    fn channel_binding(&self) -> ChannelBinding {
        self.0
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|cert| server_end_point(cert.as_ref()))
            .map(ChannelBinding::tls_server_end_point)
            .unwrap_or_else(ChannelBinding::none)
    }
}

/// One DER element: its tag, its contents and what follows it.
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The `tls-server-end-point` channel binding of a certificate: its hash with the hash of its signature algorithm,
/// SHA-256 for MD5 and SHA-1 (RFC 5929 §4.1, as PostgreSQL computes it).
fn server_end_point(cert: &[u8]) -> Option<Vec<u8>> {
    use sha2::Digest;
    const SEQUENCE: u8 = 0x30;
    const OID: u8 = 0x06;
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm AlgorithmIdentifier, signatureValue }
    let (tag, certificate, _) = der_element(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    let (_, _tbs, rest) = der_element(certificate)?;
    let (tag, algorithm, _) = der_element(rest)?;
    let (oid_tag, oid, _) = der_element(algorithm)?;
    if tag != SEQUENCE || oid_tag != OID {
        return None;
    }
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA_SHA2: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03];
    const ECDSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01];
    let hash = match oid {
        // md5 (4), sha1 (5), sha256 (11) WithRSAEncryption: SHA-256; sha384 (12), sha512 (13).
        [p @ .., 0x04 | 0x05 | 0x0b] if p == RSA => 256,
        [p @ .., 0x0c] if p == RSA => 384,
        [p @ .., 0x0d] if p == RSA => 512,
        _ if oid == ECDSA_SHA1 => 256,
        [p @ .., 0x02] if p == ECDSA_SHA2 => 256,
        [p @ .., 0x03] if p == ECDSA_SHA2 => 384,
        [p @ .., 0x04] if p == ECDSA_SHA2 => 512,
        _ => return None,
    };
    Some(match hash {
        256 => sha2::Sha256::digest(cert).to_vec(),
        384 => sha2::Sha384::digest(cert).to_vec(),
        _ => sha2::Sha512::digest(cert).to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parameters_are_taken_out_and_decoded() {
        let (rest, tls) = split_url(
            "postgres://u:p@h/db?options=-c%20x%3D1&sslmode=verify-full&sslrootcert=%2Fetc%2Fca%20x.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u:p@h/db?options=-c%20x%3D1");
        assert_eq!(tls.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(tls.sslrootcert.as_deref(), Some("/etc/ca x.pem"));
        let (rest, tls) = split_url("postgres://h/db?sslmode=require").unwrap();
        assert_eq!(rest, "postgres://h/db");
        assert_eq!(
            tls,
            UrlTls {
                sslmode: Some("require".into()),
                sslrootcert: None
            }
        );
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(
            split_url("postgres://h/db?sslcert=x").unwrap_err().key,
            "ledger.url"
        );
    }

    #[test]
    fn channel_binding_hashes_with_the_signature_hash() {
        use sha2::Digest;
        let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        let p256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let der = params.self_signed(&p256).unwrap().der().to_vec();
        assert_eq!(
            server_end_point(&der),
            Some(sha2::Sha256::digest(&der).to_vec())
        );
        let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let der = params.self_signed(&p384).unwrap().der().to_vec();
        assert_eq!(
            server_end_point(&der),
            Some(sha2::Sha384::digest(&der).to_vec())
        );
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let der = params.self_signed(&ed).unwrap().der().to_vec();
        assert_eq!(server_end_point(&der), None);
        assert_eq!(server_end_point(&[0x30, 0x82]), None);
        assert_eq!(server_end_point(&[]), None);
    }

    #[test]
    fn modes_resolve_as_libpq() {
        let none = PgTlsSettings::default();
        let (_, tls) = PgTls::resolve("postgres://h/db", &none).unwrap();
        assert_eq!((tls.mode(), tls.explicit()), (SslMode::Prefer, false));
        let err = PgTls::resolve("postgres://h/db?sslmode=verify-full", &none).unwrap_err();
        assert_eq!(err.key, "ledger.ca_file");
        let err = PgTls::resolve("postgres://h/db?sslmode=bogus", &none).unwrap_err();
        assert_eq!(err.key, "ledger.url");
        let bogus = PgTlsSettings {
            sslmode: Some("verify_full".into()),
            ca_file: None,
        };
        assert_eq!(
            PgTls::resolve("postgres://h/db", &bogus).unwrap_err().key,
            "ledger.sslmode"
        );
        let require = PgTlsSettings {
            sslmode: Some("require".into()),
            ca_file: None,
        };
        let err = PgTls::resolve("postgres://h/db?sslmode=disable", &require).unwrap_err();
        assert_eq!(err.key, "ledger.sslmode");
        let (_, tls) = PgTls::resolve("postgres://h/db?sslmode=require", &require).unwrap();
        assert_eq!(tls.mode(), SslMode::Require);
        let missing = PgTlsSettings {
            sslmode: Some("verify-ca".into()),
            ca_file: Some("/nonexistent/ca.pem".into()),
        };
        let err = PgTls::resolve("postgres://h/db", &missing).unwrap_err();
        assert_eq!(err.key, "ledger.ca_file");
        assert!(err.reason.contains("/nonexistent/ca.pem"), "{err}");
        let weak = PgTlsSettings {
            sslmode: Some("require".into()),
            ca_file: Some("system".into()),
        };
        assert_eq!(
            PgTls::resolve("postgres://h/db", &weak).unwrap_err().key,
            "ledger.sslmode"
        );
    }
}
