//! [`Security`]: a group's secret and TLS together, and the connections they make
//! ([`Secured`]): TLS first, if configured, then the secret's handshake inside it.
//!
//! ```text
//!  dialer:   TcpStream ─► Security::dial ─────────────► Secured (TLS, then proof both ways)
//!  acceptor: TcpStream ─► Security::accept_tls ─► Secured ─► Security::authenticate
//! ```
//!
//! The acceptor's two steps are apart so that it may still answer a peer that failed the
//! second (the store tells a worker without the token why it is refused).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::{AuthError, Secret, Tls, TlsStream, auth};

/// What protects a group's connections: its secret and its TLS, each if configured.
#[derive(Clone, Debug, Default)]
pub struct Security {
    /// Both ends prove they know this secret ([`auth`]).
    pub auth: Option<Secret>,
    /// Mutual TLS with the group CA ([`crate::tls`]); the auth handshake, if any, runs
    /// inside it.
    pub tls: Option<Tls>,
}

/// Why a connection could not be secured.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecureError {
    /// The TLS handshake failed: the peer has no certificate of the group's CA (or refused
    /// ours).
    #[error("TLS: {0}")]
    Tls(#[source] io::Error),
    /// The secret's handshake failed.
    #[error(transparent)]
    Auth(#[from] AuthError),
}

/// A connection as the group's [`Security`] made it: plain TCP, or TLS over it.
#[derive(Debug)]
pub enum Secured {
    /// Plain TCP (authenticated, if the group has a secret).
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<TlsStream>),
}

impl Security {
    /// Secures a dialed connection: TLS, then the secret's handshake, as configured.
    ///
    /// # Errors
    /// If either handshake fails.
    pub async fn dial(&self, tcp: TcpStream) -> Result<Secured, SecureError> {
        let mut stream = match &self.tls {
            None => Secured::Plain(tcp),
            Some(tls) => Secured::Tls(Box::new(tls.connect(tcp).await.map_err(SecureError::Tls)?)),
        };
        if let Some(secret) = &self.auth {
            auth::dial(&mut stream, secret).await?;
        }
        Ok(stream)
    }

    /// The accepting end's first step: TLS, if configured. Then [`Security::authenticate`].
    ///
    /// # Errors
    /// If the TLS handshake fails.
    pub async fn accept_tls(&self, tcp: TcpStream) -> Result<Secured, SecureError> {
        Ok(match &self.tls {
            None => Secured::Plain(tcp),
            Some(tls) => Secured::Tls(Box::new(tls.accept(tcp).await.map_err(SecureError::Tls)?)),
        })
    }

    /// The accepting end's second step: the secret's handshake, if the group has a secret.
    ///
    /// # Errors
    /// If the peer does not prove it knows the secret.
    pub async fn authenticate(&self, stream: &mut Secured) -> Result<(), AuthError> {
        match &self.auth {
            Some(secret) => auth::accept(stream, secret).await,
            None => Ok(()),
        }
    }
}

impl AsyncRead for Secured {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Secured::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Secured::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Secured {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Secured::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Secured::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Secured::Plain(s) => Pin::new(s).poll_flush(cx),
            Secured::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Secured::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Secured::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}
