//! Mutual TLS on a group's connections (rustls, with ring): every worker has a certificate
//! signed by the group's CA, and both ends of a connection check the other's against that CA.
//! [`generate`] makes a CA and worker certificates (what `distrpc cert` does).
//!
//! Every worker certificate names [`SERVER_NAME`] (besides the worker's own name), which is
//! the name a dialer checks: a group's members are whoever the group's CA signed, whatever
//! their addresses.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use distrpc_secure::tls::{Tls, generate};
//! let dir = std::env::temp_dir().join(format!("distrpc-doc-tls-{}", std::process::id()));
//! generate(&dir, &["worker0", "worker1"]).unwrap();
//! let files = |n: &str| (dir.join("ca.pem"), dir.join(format!("{n}.pem")), dir.join(format!("{n}-key.pem")));
//! let (ca, cert, key) = files("worker0");
//! let a = Tls::from_pem_files(&ca, &cert, &key).unwrap();
//! let (ca, cert, key) = files("worker1");
//! let b = Tls::from_pem_files(&ca, &cert, &key).unwrap();
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! let addr = listener.local_addr().unwrap();
//! let server = tokio::spawn(async move {
//!     let (tcp, _) = listener.accept().await.unwrap();
//!     b.accept(tcp).await.map(|_| ())
//! });
//! let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
//! a.connect(tcp).await.unwrap();
//! server.await.unwrap().unwrap();
//! std::fs::remove_dir_all(&dir).unwrap();
//! # }
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;

/// A TLS stream over TCP, either end. rustls reads the socket 4 KiB at a time: under it, a
/// buffer takes what the socket has in reads of up to [`READ_BUFFER`] bytes, which keeps the
/// system calls per megabyte of tensor few.
pub type TlsStream = tokio_rustls::TlsStream<tokio::io::BufReader<TcpStream>>;

/// The buffer under rustls's reads.
pub const READ_BUFFER: usize = 256 << 10;

/// The name every worker certificate carries, and every dialer checks.
pub const SERVER_NAME: &str = "distrpc-worker";
/// The environment variable naming the group CA's certificate (PEM).
pub const CA_ENV: &str = "DISTRPC_TLS_CA";
/// The environment variable naming this worker's certificate chain (PEM).
pub const CERT_ENV: &str = "DISTRPC_TLS_CERT";
/// The environment variable naming this worker's private key (PEM).
pub const KEY_ENV: &str = "DISTRPC_TLS_KEY";

/// Why TLS could not be set up, or certificates made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{0}")]
    Pem(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The CA's certificates cannot verify clients.
    #[error("TLS client verification: {0}")]
    Verifier(String),
    /// Certificates could not be made.
    #[error("making certificates: {0}")]
    Generate(#[from] rcgen::Error),
    /// Some of the TLS variables are set, not all.
    #[error("TLS needs all of {CA_ENV}, {CERT_ENV} and {KEY_ENV}; {0} is not set")]
    Incomplete(&'static str),
}

/// One worker's TLS: the group CA to check peers against, and its own certificate and key,
/// as client (it dials) and as server (it accepts).
#[derive(Clone)]
pub struct Tls {
    client: tokio_rustls::TlsConnector,
    server: tokio_rustls::TlsAcceptor,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls(..)")
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::File {
        path: path.display().to_string(),
        source,
    })
}

/// ring's provider, AES-128-GCM first: the fastest suite with AES instructions (ten rounds to
/// AES-256's fourteen), which is what bulk tensor traffic needs.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as suite;
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        suite::TLS13_AES_128_GCM_SHA256,
        suite::TLS13_AES_256_GCM_SHA384,
        suite::TLS13_CHACHA20_POLY1305_SHA256,
        suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    ];
    Arc::new(provider)
}

impl Tls {
    /// From PEM: the group CA's certificate(s), this worker's certificate chain, its key.
    ///
    /// # Errors
    /// If a PEM holds nothing usable, or rustls refuses the certificates.
    pub fn from_pem(ca: &[u8], cert: &[u8], key: &[u8]) -> Result<Self, TlsError> {
        let pem = |what: &str, e: rustls::pki_types::pem::Error| {
            TlsError::Pem(format!("the {what} PEM: {e}"))
        };
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(ca) {
            roots.add(ca.map_err(|e| pem("CA", e))?)?;
        }
        if roots.is_empty() {
            return Err(TlsError::Pem("the CA PEM holds no certificate".into()));
        }
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<_, _>>()
            .map_err(|e| pem("certificate", e))?;
        if chain.is_empty() {
            return Err(TlsError::Pem(
                "the certificate PEM holds no certificate".into(),
            ));
        }
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| pem("key", e))?;
        let roots = Arc::new(roots);

        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())?;
        // No session tickets: connections live long, and nothing is resumed.
        server.send_tls13_tickets = 0;
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        Ok(Self {
            client: tokio_rustls::TlsConnector::from(Arc::new(client)),
            server: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
        })
    }

    /// From PEM files (see [`Tls::from_pem`]).
    ///
    /// # Errors
    /// If a file cannot be read, or [`Tls::from_pem`] fails.
    pub fn from_pem_files(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Self::from_pem(&read(ca)?, &read(cert)?, &read(key)?)
    }

    /// From the files [`CA_ENV`], [`CERT_ENV`] and [`KEY_ENV`] name; `None` if none is set.
    ///
    /// # Errors
    /// If only some are set, or [`Tls::from_pem_files`] fails.
    pub fn from_env() -> Result<Option<Self>, TlsError> {
        let vars = [CA_ENV, CERT_ENV, KEY_ENV].map(|v| (v, std::env::var_os(v)));
        if vars.iter().all(|(_, v)| v.is_none()) {
            return Ok(None);
        }
        let [ca, cert, key] = vars.map(|(name, v)| v.map(PathBuf::from).ok_or(name));
        let path = |p: Result<PathBuf, &'static str>| p.map_err(TlsError::Incomplete);
        Self::from_pem_files(&path(ca)?, &path(cert)?, &path(key)?).map(Some)
    }

    /// The dialing end's TLS handshake on `stream`.
    ///
    /// # Errors
    /// If the handshake fails: the peer's certificate is not the group CA's, or it refused
    /// ours.
    pub async fn connect(&self, stream: TcpStream) -> std::io::Result<TlsStream> {
        let name = ServerName::try_from(SERVER_NAME).map_err(std::io::Error::other)?;
        let stream = tokio::io::BufReader::with_capacity(READ_BUFFER, stream);
        self.client.connect(name, stream).await.map(TlsStream::from)
    }

    /// The accepting end's TLS handshake on `stream`.
    ///
    /// # Errors
    /// If the handshake fails: the peer has no certificate the group CA signed.
    pub async fn accept(&self, stream: TcpStream) -> std::io::Result<TlsStream> {
        let stream = tokio::io::BufReader::with_capacity(READ_BUFFER, stream);
        self.server.accept(stream).await.map(TlsStream::from)
    }
}

/// Makes the certificates of a group in `dir`: a CA (`ca.pem`, `ca-key.pem`; reused if
/// already there) and, for each name, `<name>.pem` and `<name>-key.pem`, signed by it. Key
/// files are readable by their owner only.
///
/// # Errors
/// If a file cannot be read or written, or a certificate made.
pub fn generate(dir: &Path, names: &[&str]) -> Result<(), TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| TlsError::File { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let (ca_pem, ca_key_pem) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    // The CA as an issuer: its name and key (so a CA made earlier, from its key, signs the
    // same way).
    let ca_params = || -> Result<CertificateParams, TlsError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "distrpc group CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        Ok(params)
    };
    let issuer = if ca_pem.exists() && ca_key_pem.exists() {
        let key = KeyPair::from_pem(&String::from_utf8_lossy(&read(&ca_key_pem)?))?;
        Issuer::new(ca_params()?, key)
    } else {
        let key = KeyPair::generate()?;
        let params = ca_params()?;
        let cert = params.self_signed(&key)?;
        write(&ca_pem, cert.pem().as_bytes(), false)?;
        write(&ca_key_pem, key.serialize_pem().as_bytes(), true)?;
        Issuer::new(params, key)
    };
    for name in names {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![SERVER_NAME.to_string(), name.to_string()])?;
        params.distinguished_name.push(DnType::CommonName, *name);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &issuer)?;
        write(
            &dir.join(format!("{name}.pem")),
            cert.pem().as_bytes(),
            false,
        )?;
        write(
            &dir.join(format!("{name}-key.pem")),
            key.serialize_pem().as_bytes(),
            true,
        )?;
    }
    Ok(())
}

/// Writes `bytes` to `path`; a `secret` file is made readable by its owner only.
fn write(path: &Path, bytes: &[u8], secret: bool) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| TlsError::File {
        path: path.display().to_string(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(io)?;
    file.write_all(bytes).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls_of(dir: &Path, name: &str) -> Tls {
        Tls::from_pem_files(
            &dir.join("ca.pem"),
            &dir.join(format!("{name}.pem")),
            &dir.join(format!("{name}-key.pem")),
        )
        .unwrap()
    }

    async fn handshake(client: &Tls, server: &Tls) -> (std::io::Result<()>, std::io::Result<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = server.clone();
        let accepted = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = server.accept(tcp).await?;
            // A byte each way: the handshake is done on both ends (TLS 1.3 checks the
            // client's certificate after the client thinks it is done).
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            tls.write_all(b"s").await?;
            let mut b = [0u8; 1];
            tls.read_exact(&mut b).await.map(|_| ())
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let dialed = async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut tls = client.connect(tcp).await?;
            tls.write_all(b"c").await?;
            let mut b = [0u8; 1];
            tls.read_exact(&mut b).await.map(|_| ())
        }
        .await;
        (dialed, accepted.await.unwrap())
    }

    #[tokio::test]
    async fn members_of_one_group_connect_and_strangers_do_not() {
        let base = std::env::temp_dir().join(format!("distrpc-tls-{}", std::process::id()));
        let (ours, theirs) = (base.join("ours"), base.join("theirs"));
        generate(&ours, &["worker0", "worker1"]).unwrap();
        generate(&theirs, &["mallory"]).unwrap();
        // A CA that is reused: a later worker joins the same group.
        generate(&ours, &["worker2"]).unwrap();
        let (w0, w2) = (tls_of(&ours, "worker0"), tls_of(&ours, "worker2"));
        let mallory = tls_of(&theirs, "mallory");

        let (d, a) = handshake(&w0, &w2).await;
        d.unwrap();
        a.unwrap();
        let (d, a) = handshake(&mallory, &w0).await;
        assert!(d.is_err() && a.is_err(), "a stranger dialing: {d:?} {a:?}");
        let (d, a) = handshake(&w0, &mallory).await;
        assert!(d.is_err() && a.is_err(), "dialing a stranger: {d:?} {a:?}");

        let mode = std::fs::metadata(ours.join("worker0-key.pem")).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn bad_pem_is_an_error() {
        let err = Tls::from_pem(b"nothing", b"", b"").unwrap_err();
        assert!(err.to_string().contains("no certificate"), "{err}");
    }
}
