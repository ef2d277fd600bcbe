//! Authentication by a shared secret: both ends of a connection prove they know the group's
//! [`Secret`] before either parses anything else the other sent.
//!
//! A mutual challenge–response over fresh nonces, with HMAC-SHA256 (ring) and a constant-time
//! check; every message has a fixed size, so nothing a stranger sends is allocated for:
//!
//! ```text
//!  dialer                                             acceptor
//!    ── "DRPCAUTH" · version · dialer nonce (32) ──►
//!    ◄── acceptor nonce (32) · HMAC(k, "acceptor" · version · nonces) ──   (acceptor proves k)
//!    ── HMAC(k, "dialer" · version · nonces) ──►                           (dialer proves k)
//!    ◄── 0x01 (accepted) ──   or the connection closes
//! ```
//!
//! The two proofs are told apart by their labels, and both nonces are fresh, so a proof cannot
//! be replayed or reflected back. This proves who is at each end when the connection opens; it
//! does not protect what follows from someone on the path between them: that is TLS's job.

use std::sync::Arc;

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The environment variable holding a group's auth token (what `distrpc launch` sets).
pub const TOKEN_ENV: &str = "DISTRPC_AUTH_TOKEN";
/// The environment variable naming a file that holds a group's auth token.
pub const TOKEN_FILE_ENV: &str = "DISTRPC_AUTH_TOKEN_FILE";
/// The shortest token accepted, in bytes.
pub const MIN_TOKEN_LEN: usize = 16;

const MAGIC: &[u8; 8] = b"DRPCAUTH";
const VERSION: u8 = 1;
const NONCE: usize = 32;
const TAG: usize = 32;
const ACCEPTED: u8 = 1;

/// Why a connection did not authenticate, or a secret could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The token is too short to be a secret.
    #[error("an auth token must have at least {MIN_TOKEN_LEN} bytes (this one has {0})")]
    ShortToken(usize),
    /// The token file could not be read.
    #[error("cannot read the auth token file {path}: {source}")]
    TokenFile {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The peer did not start the handshake: it has no auth token, or is not distrpc.
    #[error("the peer did not authenticate (is it configured without an auth token?)")]
    NotAuthenticating,
    /// The peer speaks another version of the handshake.
    #[error("the peer speaks auth handshake version {0} (this build speaks {VERSION})")]
    Version(u8),
    /// The peer's proof is wrong: it does not know the group's secret.
    #[error("the peer does not know the group's auth token")]
    Rejected,
    /// The peer closed the connection during the handshake — it may have rejected our proof
    /// (a different token), or have none.
    #[error(
        "the peer closed the connection during authentication (does it have the same auth token?)"
    )]
    Closed,
    /// The socket failed.
    #[error("authentication failed: {0}")]
    Io(#[from] std::io::Error),
}

/// A group's shared secret. Its `Debug` shows nothing of it.
#[derive(Clone)]
pub struct Secret {
    key: Arc<hmac::Key>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// The secret of `token` (at least [`MIN_TOKEN_LEN`] bytes; surrounding whitespace, as a
    /// file's trailing newline, is not part of it).
    ///
    /// ```
    /// let secret = distrpc_secure::Secret::new("a token of 16+ bytes").unwrap();
    /// assert!(distrpc_secure::Secret::new("short").is_err());
    /// ```
    ///
    /// # Errors
    /// [`AuthError::ShortToken`].
    pub fn new(token: impl AsRef<[u8]>) -> Result<Self, AuthError> {
        let token = token.as_ref().trim_ascii();
        if token.len() < MIN_TOKEN_LEN {
            return Err(AuthError::ShortToken(token.len()));
        }
        Ok(Self {
            key: Arc::new(hmac::Key::new(hmac::HMAC_SHA256, token)),
        })
    }

    /// The secret in the file at `path`.
    ///
    /// # Errors
    /// If the file cannot be read, or holds too short a token.
    pub fn from_file(path: &std::path::Path) -> Result<Self, AuthError> {
        let token = std::fs::read(path).map_err(|source| AuthError::TokenFile {
            path: path.display().to_string(),
            source,
        })?;
        Self::new(token)
    }

    /// The secret the environment gives: [`TOKEN_ENV`], else the file [`TOKEN_FILE_ENV`]
    /// names; `None` if neither is set.
    ///
    /// # Errors
    /// If the token is too short, or its file cannot be read.
    pub fn from_env() -> Result<Option<Self>, AuthError> {
        if let Some(token) = std::env::var_os(TOKEN_ENV) {
            return Self::new(token.as_encoded_bytes()).map(Some);
        }
        match std::env::var_os(TOKEN_FILE_ENV) {
            Some(path) => Self::from_file(path.as_ref()).map(Some),
            None => Ok(None),
        }
    }

    /// A fresh random token (64 hexadecimal characters), for a group to share.
    ///
    /// ```
    /// let token = distrpc_secure::Secret::generate_token();
    /// assert_eq!(token.len(), 64);
    /// assert_ne!(token, distrpc_secure::Secret::generate_token());
    /// ```
    pub fn generate_token() -> String {
        let mut bytes = [0u8; 32];
        fill_random(&mut bytes);
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn proof(&self, label: &[u8], dialer: &[u8; NONCE], acceptor: &[u8; NONCE]) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.key);
        for part in [label, &[VERSION], dialer, acceptor] {
            ctx.update(part);
        }
        ctx.sign()
    }

    fn check(
        &self,
        label: &[u8],
        dialer: &[u8; NONCE],
        acceptor: &[u8; NONCE],
        tag: &[u8],
    ) -> Result<(), AuthError> {
        let mut message = Vec::with_capacity(label.len() + 1 + 2 * NONCE);
        for part in [label, &[VERSION], dialer, acceptor] {
            message.extend_from_slice(part);
        }
        // Constant time: ring compares the tags without an early exit.
        hmac::verify(&self.key, &message, tag).map_err(|_| AuthError::Rejected)
    }
}

fn fill_random(buf: &mut [u8]) {
    // The system's generator fails only where no entropy source exists at all, which would
    // make every nonce guessable: nothing safe can go on.
    SystemRandom::new()
        .fill(buf)
        .expect("the system random number generator failed");
}

async fn read_exact<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut [u8]) -> Result<(), AuthError> {
    match stream.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(AuthError::Closed),
        Err(e) => Err(AuthError::Io(e)),
    }
}

/// The dialing end's half of the handshake (see the module docs): returns once both ends
/// proved they know `secret`.
///
/// # Errors
/// If the acceptor does not prove it, rejects our proof, or the socket fails.
pub async fn dial<S>(stream: &mut S, secret: &Secret) -> Result<(), AuthError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut dialer = [0u8; NONCE];
    fill_random(&mut dialer);
    let mut hello = [0u8; MAGIC.len() + 1 + NONCE];
    hello[..MAGIC.len()].copy_from_slice(MAGIC);
    hello[MAGIC.len()] = VERSION;
    hello[MAGIC.len() + 1..].copy_from_slice(&dialer);
    stream.write_all(&hello).await?;
    stream.flush().await?;

    let mut answer = [0u8; NONCE + TAG];
    read_exact(stream, &mut answer).await?;
    let mut acceptor = [0u8; NONCE];
    acceptor.copy_from_slice(&answer[..NONCE]);
    secret.check(b"acceptor", &dialer, &acceptor, &answer[NONCE..])?;

    let proof = secret.proof(b"dialer", &dialer, &acceptor);
    stream.write_all(proof.as_ref()).await?;
    stream.flush().await?;
    let mut verdict = [0u8; 1];
    read_exact(stream, &mut verdict).await?;
    if verdict[0] != ACCEPTED {
        return Err(AuthError::Rejected);
    }
    Ok(())
}

/// The accepting end's half of the handshake (see the module docs): returns once both ends
/// proved they know `secret`. On an error the caller closes the connection; nothing the peer
/// sent was parsed beyond the handshake's fixed-size messages.
///
/// # Errors
/// If the dialer does not start the handshake, does not prove it knows `secret`, or the
/// socket fails.
pub async fn accept<S>(stream: &mut S, secret: &Secret) -> Result<(), AuthError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut magic = [0u8; MAGIC.len()];
    read_exact(stream, &mut magic).await?;
    if &magic != MAGIC {
        return Err(AuthError::NotAuthenticating);
    }
    let mut rest = [0u8; 1 + NONCE];
    read_exact(stream, &mut rest).await?;
    if rest[0] != VERSION {
        return Err(AuthError::Version(rest[0]));
    }
    let mut dialer = [0u8; NONCE];
    dialer.copy_from_slice(&rest[1..]);

    let mut acceptor = [0u8; NONCE];
    fill_random(&mut acceptor);
    let proof = secret.proof(b"acceptor", &dialer, &acceptor);
    let mut answer = [0u8; NONCE + TAG];
    answer[..NONCE].copy_from_slice(&acceptor);
    answer[NONCE..].copy_from_slice(proof.as_ref());
    stream.write_all(&answer).await?;
    stream.flush().await?;

    let mut tag = [0u8; TAG];
    read_exact(stream, &mut tag).await?;
    secret.check(b"dialer", &dialer, &acceptor, &tag)?;
    stream.write_all(&[ACCEPTED]).await?;
    stream.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    fn secret(token: &str) -> Secret {
        Secret::new(token).unwrap()
    }

    async fn pair(a: &Secret, b: &Secret) -> (Result<(), AuthError>, Result<(), AuthError>) {
        let (mut x, mut y) = duplex(1024);
        let (a, b) = (a.clone(), b.clone());
        let dialer = tokio::spawn(async move { dial(&mut x, &a).await });
        let acceptor = tokio::spawn(async move { accept(&mut y, &b).await });
        (dialer.await.unwrap(), acceptor.await.unwrap())
    }

    #[tokio::test]
    async fn same_secret_authenticates_both_ends() {
        let s = secret("sixteen bytes at least");
        let (d, a) = pair(&s, &s).await;
        d.unwrap();
        a.unwrap();
    }

    #[tokio::test]
    async fn different_secrets_fail_at_the_dialer_first() {
        // The acceptor proves itself first: the dialer sees the wrong proof and stops, before
        // sending a proof of its own.
        let (d, a) = pair(
            &secret("the first group's token"),
            &secret("another group's token"),
        )
        .await;
        assert!(matches!(d, Err(AuthError::Rejected)), "{d:?}");
        assert!(matches!(a, Err(AuthError::Closed)), "{a:?}");
    }

    #[tokio::test]
    async fn a_peer_without_the_handshake_is_refused() {
        let (mut x, mut y) = duplex(1024);
        let s = secret("sixteen bytes at least");
        let acceptor = tokio::spawn(async move { accept(&mut y, &s).await });
        x.write_all(b"DRPC\x01\x01 a frame, not a handshake")
            .await
            .unwrap();
        let err = acceptor.await.unwrap().unwrap_err();
        assert!(matches!(err, AuthError::NotAuthenticating), "{err}");
    }

    /// A dialer that replays the acceptor's own proof as its answer is refused: the proofs
    /// are labelled by role.
    #[tokio::test]
    async fn a_reflected_proof_is_refused() {
        let (mut x, mut y) = duplex(1024);
        let s = secret("sixteen bytes at least");
        let acceptor = tokio::spawn(async move { accept(&mut y, &s).await });
        let mut hello = MAGIC.to_vec();
        hello.push(VERSION);
        hello.extend_from_slice(&[7u8; NONCE]);
        x.write_all(&hello).await.unwrap();
        let mut answer = [0u8; NONCE + TAG];
        x.read_exact(&mut answer).await.unwrap();
        x.write_all(&answer[NONCE..]).await.unwrap();
        let err = acceptor.await.unwrap().unwrap_err();
        assert!(matches!(err, AuthError::Rejected), "{err}");
        let mut verdict = [0u8; 1];
        assert_eq!(x.read(&mut verdict).await.unwrap(), 0, "no verdict: closed");
    }

    #[test]
    fn tokens_are_checked_and_trimmed() {
        assert!(matches!(
            Secret::new("short"),
            Err(AuthError::ShortToken(5))
        ));
        let dir = std::env::temp_dir().join(format!("distrpc-token-{}", std::process::id()));
        std::fs::write(&dir, "0123456789abcdef0123\n").unwrap();
        Secret::from_file(&dir).unwrap();
        std::fs::remove_file(&dir).unwrap();
        let missing = Secret::from_file(&dir).unwrap_err();
        assert!(missing.to_string().contains("cannot read"), "{missing}");
        assert_eq!(
            format!("{:?}", secret("sixteen bytes at least")),
            "Secret(..)"
        );
    }
}
