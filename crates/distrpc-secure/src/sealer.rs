//! Sealing a TLS 1.3 record out of place: its plaintext read where it lies (a tensor's
//! memory) and its ciphertext written into the record being built, in one pass.
//!
//! ring (and aws-lc-rs) seal in place only, so a record's plaintext would first be copied into the
//! record and then encrypted there: two passes over every byte a large tensor sends, the first
//! from memory. AWS-LC's `EVP_AEAD_CTX_seal_scatter` takes the plaintext and the ciphertext
//! apart, and a second, short plaintext (`extra_in`: the record's content type, which follows
//! the content in TLS 1.3) whose ciphertext goes before the tag:
//!
//! ```text
//!  plaintext:  [content (where it lies) ...........] [type]
//!  record:     [hdr][ciphertext of content ........] [enc type][tag]
//!                    └ out                            └ tail
//! ```
//!
//! The records are AWS-LC's (aws-lc-rs opens them, its AES-GCM being the faster here too);
//! the handshake, certificates and the auth token's HMAC and nonces stay with ring: AWS-LC's
//! random generator seeds itself from CPU jitter on first use, ~30 ms of each process's start.

use std::io;
use std::mem::MaybeUninit;
use std::ptr::NonNull;

use aws_lc_sys::{
    EVP_AEAD_CTX, EVP_AEAD_CTX_free, EVP_AEAD_CTX_new, EVP_AEAD_CTX_seal_scatter,
    EVP_aead_aes_128_gcm, EVP_aead_aes_256_gcm, EVP_aead_chacha20_poly1305,
};

/// The tag of every suite the record layer speaks.
pub(crate) const TAG: usize = 16;

/// The AEADs of the TLS 1.3 suites the record layer speaks.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Aead {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

/// One direction's sealing key, as an AWS-LC AEAD context of its own.
pub(crate) struct Sealer(NonNull<EVP_AEAD_CTX>);

// SAFETY: the context is only read by sealing (`EVP_AEAD_CTX_seal_scatter` takes it `const`),
// and this owner frees it once; it holds no thread-affine state.
unsafe impl Send for Sealer {}
unsafe impl Sync for Sealer {}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer") // the key stays out of logs
    }
}

impl Sealer {
    /// A sealer with `key` (of the AEAD's length).
    pub(crate) fn new(aead: Aead, key: &[u8]) -> io::Result<Self> {
        // SAFETY: the AEAD constructors return static descriptions; `EVP_AEAD_CTX_new` reads
        // `key.len()` bytes of `key` and returns an owned context or null.
        let ctx = unsafe {
            let aead = match aead {
                Aead::Aes128Gcm => EVP_aead_aes_128_gcm(),
                Aead::Aes256Gcm => EVP_aead_aes_256_gcm(),
                Aead::Chacha20Poly1305 => EVP_aead_chacha20_poly1305(),
            };
            EVP_AEAD_CTX_new(aead, key.as_ptr(), key.len(), TAG)
        };
        NonNull::new(ctx)
            .map(Self)
            .ok_or_else(|| io::Error::other("AWS-LC could not make an AEAD context"))
    }

    /// Seals `plain` followed by the byte `kind` under `nonce`, authenticating `aad`: the
    /// ciphertext of `plain` into `out` (exactly as long), then the ciphertext of `kind` and
    /// the tag into `tail`. Both are written whole on success.
    pub(crate) fn seal(
        &self,
        nonce: &[u8; 12],
        aad: &[u8],
        plain: &[u8],
        kind: u8,
        out: &mut [MaybeUninit<u8>],
        tail: &mut [MaybeUninit<u8>; 1 + TAG],
    ) -> io::Result<()> {
        if out.len() != plain.len() {
            return Err(io::Error::other(
                "a record's output does not fit its plaintext",
            ));
        }
        let mut tail_len = 0usize;
        // SAFETY: every pointer is valid for the length passed with it (`out` for writes of
        // `plain.len()` bytes, `tail` for 1 + TAG, the inputs for reads); `plain` and `out`
        // do not overlap (a shared and a unique borrow); the context is live.
        let ok = unsafe {
            EVP_AEAD_CTX_seal_scatter(
                self.0.as_ptr(),
                out.as_mut_ptr().cast(),
                tail.as_mut_ptr().cast(),
                &mut tail_len,
                tail.len(),
                nonce.as_ptr(),
                nonce.len(),
                plain.as_ptr(),
                plain.len(),
                &kind,
                1,
                aad.as_ptr(),
                aad.len(),
            )
        };
        if ok != 1 || tail_len != tail.len() {
            return Err(io::Error::other("a TLS record could not be sealed"));
        }
        Ok(())
    }
}

impl Drop for Sealer {
    fn drop(&mut self) {
        // SAFETY: made by `EVP_AEAD_CTX_new`, freed once, here.
        unsafe { EVP_AEAD_CTX_free(self.0.as_ptr()) }
    }
}
