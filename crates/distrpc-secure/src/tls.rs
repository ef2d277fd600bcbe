//! Mutual TLS on a group's connections (rustls with ring makes the handshake; the records
//! after it are distrpc's, sealed with AWS-LC: [`crate::records`]): every worker has a
//! certificate signed by the group's CA, and both ends of a connection check the other's
//! against that CA.
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
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::records::{Keys, RecordStream, Suite};

/// A TLS stream over TCP, either end: rustls makes the handshake, then distrpc's own record
/// layer ([`crate::records`]) carries the data with the keys it agreed.
pub type TlsStream = RecordStream;

/// What the accepting end sends first once both ends hold the keys: the dialer sends nothing
/// before it, so nothing of the dialer's can have reached rustls's buffers with the last
/// handshake message (the handshake's buffers are dropped, not read from, at the switch).
const READY: u8 = 0x5a;

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
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
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

/// ring's provider, TLS 1.3 suites only (the record layer speaks 1.3), AES-128-GCM first: the
/// fastest suite with AES instructions (ten rounds to AES-256's fourteen), which is what bulk
/// tensor traffic needs.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as suite;
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        suite::TLS13_AES_128_GCM_SHA256,
        suite::TLS13_AES_256_GCM_SHA384,
        suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(provider)
}

/// The two traffic secrets of one handshake, as rustls reports them to a key log (the record
/// layer needs them for `key_update`; rustls's extracted keys are made from them).
#[derive(Debug, Default)]
struct Secrets(std::sync::Mutex<[Option<Vec<u8>>; 2]>);

impl rustls::KeyLog for Secrets {
    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        let slot = match label {
            "CLIENT_TRAFFIC_SECRET_0" => 0,
            "SERVER_TRAFFIC_SECRET_0" => 1,
            _ => return,
        };
        let mut secrets = self.0.lock().unwrap_or_else(|e| e.into_inner());
        secrets[slot] = Some(secret.to_vec());
    }

    fn will_log(&self, label: &str) -> bool {
        label.ends_with("_TRAFFIC_SECRET_0")
    }
}

impl Drop for Secrets {
    fn drop(&mut self) {
        let secrets = self.0.get_mut().unwrap_or_else(|e| e.into_inner());
        for secret in secrets.iter_mut().flatten() {
            secret.fill(0);
        }
    }
}

/// The record layer's keys (sending, receiving) for one end of a finished handshake: rustls's
/// extracted keys and sequence numbers, with the traffic secrets the key log caught (checked
/// to make the same keys).
fn record_keys(conn: rustls::Connection, secrets: &Secrets) -> std::io::Result<(Keys, Keys)> {
    use rustls::ConnectionTrafficSecrets as S;
    let client = matches!(conn, rustls::Connection::Client(_));
    let extracted = conn
        .dangerous_extract_secrets()
        .map_err(std::io::Error::other)?;
    let broken = |what: &str| std::io::Error::other(format!("TLS keys: {what}"));
    let secrets = secrets.0.lock().unwrap_or_else(|e| e.into_inner());
    let [Some(client_secret), Some(server_secret)] = &*secrets else {
        return Err(broken("the handshake logged no traffic secrets"));
    };
    let (tx_secret, rx_secret) = if client {
        (client_secret, server_secret)
    } else {
        (server_secret, client_secret)
    };
    let keys = |(seq, traffic): (u64, S), secret: &[u8]| {
        let (suite, key, iv) = match &traffic {
            S::Aes128Gcm { key, iv } => (Suite::Aes128Gcm, key, iv),
            S::Aes256Gcm { key, iv } => (Suite::Aes256Gcm, key, iv),
            S::Chacha20Poly1305 { key, iv } => (Suite::Chacha20Poly1305, key, iv),
            _ => return Err(broken("a cipher suite the record layer does not speak")),
        };
        let keys = Keys::new(suite, secret, seq);
        if !keys.matches(key.as_ref(), iv.as_ref()) {
            return Err(broken("the logged secret does not make rustls's key"));
        }
        Ok(keys)
    };
    Ok((
        keys(extracted.tx, tx_secret)?,
        keys(extracted.rx, rx_secret)?,
    ))
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
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())?;
        // No session tickets: connections live long, and nothing is resumed.
        server.send_tls13_tickets = 0;
        server.enable_secret_extraction = true;
        let mut client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        client.enable_secret_extraction = true;
        Ok(Self {
            client: Arc::new(client),
            server: Arc::new(server),
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
        let (tcp, tx, rx) = self.dial_handshake(stream).await?;
        let mut records = RecordStream::new(tcp, tx, rx);
        if records.read_u8().await? != READY {
            return Err(std::io::Error::other(
                "TLS: the accepting end did not start the record layer",
            ));
        }
        Ok(records)
    }

    /// The accepting end's TLS handshake on `stream`.
    ///
    /// # Errors
    /// If the handshake fails: the peer has no certificate the group CA signed.
    pub async fn accept(&self, stream: TcpStream) -> std::io::Result<TlsStream> {
        let (tcp, tx, rx) = self.accept_handshake(stream).await?;
        let mut records = RecordStream::new(tcp, tx, rx);
        records.write_all(&[READY]).await?;
        records.flush().await?;
        Ok(records)
    }

    /// The dialing end's rustls handshake: the socket and the keys it sends and receives with.
    async fn dial_handshake(&self, stream: TcpStream) -> std::io::Result<(TcpStream, Keys, Keys)> {
        let name = ServerName::try_from(SERVER_NAME).map_err(std::io::Error::other)?;
        // Each connection logs its own handshake's secrets.
        let secrets = Arc::new(Secrets::default());
        let mut config = (*self.client).clone();
        config.key_log = secrets.clone();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, stream)
            .await?;
        let (tcp, conn) = tls.into_inner();
        let (tx, rx) = record_keys(conn.into(), &secrets)?;
        Ok((tcp, tx, rx))
    }

    /// The accepting end's rustls handshake (see [`Tls::dial_handshake`]).
    async fn accept_handshake(
        &self,
        stream: TcpStream,
    ) -> std::io::Result<(TcpStream, Keys, Keys)> {
        let secrets = Arc::new(Secrets::default());
        let mut config = (*self.server).clone();
        config.key_log = secrets.clone();
        let tls = tokio_rustls::TlsAcceptor::from(Arc::new(config))
            .accept(stream)
            .await?;
        let (tcp, conn) = tls.into_inner();
        let (tx, rx) = record_keys(conn.into(), &secrets)?;
        Ok((tcp, tx, rx))
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
            tls.flush().await?;
            let mut b = [0u8; 1];
            tls.read_exact(&mut b).await.map(|_| ())
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let dialed = async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut tls = client.connect(tcp).await?;
            tls.write_all(b"c").await?;
            tls.flush().await?;
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

    /// Data patterned by its offset, to check what arrives.
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    /// The record layer against rustls itself: the dialer speaks distrpc's records, the
    /// acceptor stays a rustls stream. Data both ways, the dialer moving to new keys every 3
    /// records, rustls asking for new keys (the dialer follows and answers), and
    /// `close_notify` both ways.
    #[tokio::test]
    async fn our_records_are_tls_1_3_records_to_rustls() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = std::env::temp_dir().join(format!("distrpc-tls-rl-{}", std::process::id()));
        generate(&dir, &["a", "b"]).unwrap();
        let (a, b) = (tls_of(&dir, "a"), tls_of(&dir, "b"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = b.server.clone();
        let accepted = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            tokio_rustls::TlsAcceptor::from(server).accept(tcp).await
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (tcp, tx, rx) = a.dial_handshake(tcp).await.unwrap();
        let mut ours = RecordStream::new(tcp, tx.with_limit(3), rx);
        let mut theirs = accepted.await.unwrap().unwrap();

        // Ours to rustls: 200 KiB in one write (13 records, 4 key updates), then a small one.
        let big = pattern(200 << 10, 1);
        ours.write_all(&big).await.unwrap();
        ours.write_all(b"tail").await.unwrap();
        ours.flush().await.unwrap();
        let mut got = vec![0u8; big.len() + 4];
        theirs.read_exact(&mut got).await.unwrap();
        assert!(got[..big.len()] == big[..] && &got[big.len()..] == b"tail");

        // rustls to ours.
        let back = pattern(100 << 10, 2);
        theirs.write_all(&back).await.unwrap();
        theirs.flush().await.unwrap();
        let mut got = vec![0u8; back.len()];
        ours.read_exact(&mut got).await.unwrap();
        assert!(got == back);

        // rustls moves to new keys and asks ours to: ours follows, and answers before its
        // next data.
        theirs.get_mut().1.refresh_traffic_keys().unwrap();
        theirs.write_all(b"after their update").await.unwrap();
        theirs.flush().await.unwrap();
        let mut got = [0u8; 18];
        ours.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"after their update");
        ours.write_all(b"after ours").await.unwrap();
        ours.flush().await.unwrap();
        let mut got = [0u8; 10];
        theirs.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"after ours");

        // close_notify each way: a clean end of stream.
        ours.shutdown().await.unwrap();
        assert_eq!(theirs.read(&mut [0u8; 8]).await.unwrap(), 0);
        theirs.shutdown().await.unwrap();
        assert_eq!(ours.read(&mut [0u8; 8]).await.unwrap(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_pem_is_an_error() {
        let err = Tls::from_pem(b"nothing", b"", b"").unwrap_err();
        assert!(err.to_string().contains("no certificate"), "{err}");
    }
}
