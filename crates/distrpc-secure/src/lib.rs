//! What protects a distrpc group's connections from outsiders: a shared secret that both ends
//! of every connection — worker to worker, worker to store — prove they know before anything
//! else is parsed ([`auth`]), and mutual TLS with a group CA ([`tls`]; its data in TLS 1.3
//! records sealed here, [`records`]).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use distrpc_secure::{Secret, auth};
//! let secret = Secret::new(Secret::generate_token()).unwrap();
//! let (mut a, mut b) = tokio::io::duplex(256);
//! let s = secret.clone();
//! let acceptor = tokio::spawn(async move { auth::accept(&mut b, &s).await });
//! auth::dial(&mut a, &secret).await.unwrap();
//! acceptor.await.unwrap().unwrap();
//! # }
//! ```

pub mod auth;
pub mod records;
mod sealer;
mod secured;
pub mod tls;

pub use auth::{AuthError, Secret};
pub use secured::{SecureError, Secured, Security};
pub use tls::{Tls, TlsError, TlsStream};
