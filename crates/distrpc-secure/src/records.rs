//! TLS 1.3 records, sealed and opened by distrpc once rustls has made the handshake — what
//! kernel TLS does with a TLS library's secrets, in user space (RFC 8446 §5).
//!
//! rustls's own buffered stream reads the socket 4 KiB at a time, copies each record's
//! plaintext out twice, and encrypts 64 KiB ahead of the socket; a 16 MiB tensor moved at
//! under half the speed of plain TCP. Here each direction keeps one buffer: the writer
//! seals a full record of one slice (a tensor's bytes) from where it lies, in one pass
//! ([`crate::sealer`]), gathers smaller pieces into a record and seals it in place (AEAD), and
//! writes many records at once; the reader takes what the socket has, up to [`READ_BUFFER`],
//! opens each record in place and hands its plaintext out with one copy. Reading and writing
//! are independent halves ([`RecordStream::into_split`]): a connection's reader and writer
//! tasks never wait on each other.
//!
//! ```text
//!  writer: plaintext ─seal─► [hdr|ciphertext|23|tag] [hdr|…] … ─one write─► socket
//!          (small pieces: ─copy─► [hdr|plaintext|23] ─seal in place─►)
//!  reader: socket ─one read─► [hdr|ciphertext|tag] [hdr|…] … ─open in place─► plaintext ─copy─► caller
//! ```
//!
//! Only what TLS 1.3 carries after its handshake is spoken: application data, `key_update`
//! (each direction moves to its next traffic secret before its key has sealed
//! [`RECORDS_PER_KEY`] records, and answers a peer that asks for it), and the `close_notify`
//! alert. Anything else — another record type, a record that fails authentication, a
//! length past the protocol's bound — is an error that ends the connection; nothing a peer
//! sends is allocated for beyond the fixed buffers.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use aws_lc_rs::{aead, hkdf};

use crate::sealer::{Aead, Sealer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// A record's header: content type, legacy version, length.
const HEADER: usize = 5;
/// The most plaintext one record carries (RFC 8446 §5.1).
pub const MAX_PLAIN: usize = 1 << 14;
/// The longest ciphertext a record may declare (RFC 8446 §5.2).
const MAX_CIPHER: usize = MAX_PLAIN + 256;
/// The AEAD tag of every suite used here.
const TAG: usize = crate::sealer::TAG;
const APPLICATION_DATA: u8 = 23;
const HANDSHAKE: u8 = 22;
const ALERT: u8 = 21;
const KEY_UPDATE: u8 = 24;
const CLOSE_NOTIFY: u8 = 0;
/// The reader's buffer: how much one read of the socket may take.
pub const READ_BUFFER: usize = 1 << 20;
/// Sealed records the writer holds before it waits for the socket.
const WRITE_BUFFER: usize = 1 << 20;
/// Records one key seals before its direction moves to the next secret: well under AES-GCM's
/// limit of 2^24.5 full-size records per key (RFC 8446 §5.5).
pub const RECORDS_PER_KEY: u64 = 1 << 23;

/// A TLS 1.3 cipher suite, as the records need it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Suite {
    /// `TLS_AES_128_GCM_SHA256`.
    Aes128Gcm,
    /// `TLS_AES_256_GCM_SHA384`.
    Aes256Gcm,
    /// `TLS_CHACHA20_POLY1305_SHA256`.
    Chacha20Poly1305,
}

impl Suite {
    fn aead(self) -> &'static aead::Algorithm {
        match self {
            Suite::Aes128Gcm => &aead::AES_128_GCM,
            Suite::Aes256Gcm => &aead::AES_256_GCM,
            Suite::Chacha20Poly1305 => &aead::CHACHA20_POLY1305,
        }
    }

    fn sealer(self) -> Aead {
        match self {
            Suite::Aes128Gcm => Aead::Aes128Gcm,
            Suite::Aes256Gcm => Aead::Aes256Gcm,
            Suite::Chacha20Poly1305 => Aead::Chacha20Poly1305,
        }
    }

    fn hkdf(self) -> hkdf::Algorithm {
        match self {
            Suite::Aes256Gcm => hkdf::HKDF_SHA384,
            Suite::Aes128Gcm | Suite::Chacha20Poly1305 => hkdf::HKDF_SHA256,
        }
    }
}

/// An output length for HKDF.
struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// `HKDF-Expand-Label(secret, label, "", len)` (RFC 8446 §7.1).
fn expand_label(alg: hkdf::Algorithm, secret: &[u8], label: &[u8], len: usize) -> Vec<u8> {
    let prk = hkdf::Prk::new_less_safe(alg, secret);
    let length = (len as u16).to_be_bytes();
    let label_len = [6 + label.len() as u8];
    let info: [&[u8]; 5] = [&length, &label_len, b"tls13 ", label, &[0]];
    let mut out = vec![0; len];
    prk.expand(&info, Len(len))
        .and_then(|okm| okm.fill(&mut out))
        .expect("HKDF output lengths here are far below the limit");
    out
}

/// One direction's keys: the traffic secret (for `key_update`), the key and IV made from it,
/// and the sequence number of the next record.
pub struct Keys {
    suite: Suite,
    secret: Vec<u8>,
    key: aead::LessSafeKey,
    /// The same key, sealing out of place (`None` if AWS-LC could not make its context:
    /// records are then copied and sealed in place).
    sealer: Option<Sealer>,
    iv: [u8; 12],
    seq: u64,
    /// Records per key before moving on (a test makes it small).
    limit: u64,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret stays out of logs.
        f.debug_struct("Keys")
            .field("suite", &self.suite)
            .field("seq", &self.seq)
            .finish()
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        self.secret.fill(0);
        self.iv.fill(0);
    }
}

impl Keys {
    /// The keys of a traffic secret, from sequence number `seq`.
    pub fn new(suite: Suite, secret: &[u8], seq: u64) -> Self {
        let (key, sealer, iv) = Self::derive(suite, secret);
        Self {
            suite,
            secret: secret.to_vec(),
            key,
            sealer,
            iv,
            seq,
            limit: RECORDS_PER_KEY,
        }
    }

    /// These keys, moving on after `limit` records (to test `key_update`).
    pub fn with_limit(mut self, limit: u64) -> Self {
        self.limit = limit.max(1);
        self
    }

    fn derive(suite: Suite, secret: &[u8]) -> (aead::LessSafeKey, Option<Sealer>, [u8; 12]) {
        let alg = suite.aead();
        let mut key = expand_label(suite.hkdf(), secret, b"key", alg.key_len());
        let iv = expand_label(suite.hkdf(), secret, b"iv", 12);
        let sealer = Sealer::new(suite.sealer(), &key).ok();
        let unbound = aead::UnboundKey::new(alg, &key).expect("the key has the suite's length");
        key.fill(0);
        (
            aead::LessSafeKey::new(unbound),
            sealer,
            iv.try_into().expect("12 bytes"),
        )
    }

    /// Whether these keys are the key and IV rustls reported (a check of the derivation).
    pub fn matches(&self, key: &[u8], iv: &[u8]) -> bool {
        let derived = expand_label(
            self.suite.hkdf(),
            &self.secret,
            b"key",
            self.suite.aead().key_len(),
        );
        derived == key && self.iv == iv
    }

    /// The next secret, key and IV (`key_update`), from sequence number 0.
    fn update(&mut self) {
        let hash_len = hkdf::KeyType::len(&self.suite.hkdf());
        let next = expand_label(self.suite.hkdf(), &self.secret, b"traffic upd", hash_len);
        self.secret.fill(0);
        (self.key, self.sealer, self.iv) = Self::derive(self.suite, &next);
        self.secret = next;
        self.seq = 0;
    }

    fn nonce(&mut self) -> io::Result<aead::Nonce> {
        Ok(aead::Nonce::assume_unique_for_key(self.next_nonce()?))
    }

    /// The next record's nonce: the IV with the sequence number mixed in (RFC 8446 §5.3).
    fn next_nonce(&mut self) -> io::Result<[u8; 12]> {
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or_else(|| invalid("TLS record sequence number exhausted"))?;
        Ok(nonce)
    }

    /// Whether this direction must move to its next key before sealing another record.
    fn worn(&self) -> bool {
        self.seq >= self.limit
    }
}

/// The header of a record of `len` bytes after it (as TLS 1.3 labels every record).
fn record_header(len: usize) -> [u8; HEADER] {
    [APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8]
}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// Both halves of a connection speaking TLS records.
#[derive(Debug)]
pub struct RecordStream {
    reader: RecordReader,
    writer: RecordWriter,
}

impl RecordStream {
    /// Records over `tcp` with the keys each direction starts from (`tx`: what this end seals,
    /// `rx`: what it opens).
    pub fn new(tcp: TcpStream, tx: Keys, rx: Keys) -> Self {
        let (r, w) = tcp.into_split();
        let asked = Arc::new(AtomicBool::new(false));
        Self {
            reader: RecordReader {
                tcp: r,
                keys: rx,
                buf: vec![0; READ_BUFFER].into_boxed_slice(),
                lo: 0,
                hi: 0,
                plain: 0..0,
                closed: false,
                update_asked: asked.clone(),
            },
            writer: RecordWriter {
                tcp: w,
                keys: tx,
                out: Vec::with_capacity(WRITE_BUFFER + HEADER + MAX_PLAIN + 1 + TAG),
                sent: 0,
                closing: false,
                update_asked: asked,
            },
        }
    }

    /// The reading and the writing half, each usable from its own task.
    pub fn into_split(self) -> (RecordReader, RecordWriter) {
        (self.reader, self.writer)
    }
}

/// The reading half: opens records and hands out their plaintext.
#[derive(Debug)]
pub struct RecordReader {
    tcp: OwnedReadHalf,
    keys: Keys,
    buf: Box<[u8]>,
    /// `buf[lo..hi]`: read and not yet opened.
    lo: usize,
    hi: usize,
    /// Opened plaintext not yet handed out (inside `buf`, before `lo`).
    plain: std::ops::Range<usize>,
    /// The peer sent `close_notify`, or the socket ended between records.
    closed: bool,
    /// Set when the peer asks for a `key_update` of this end's sending keys.
    update_asked: Arc<AtomicBool>,
}

impl RecordReader {
    /// Bytes read from the socket and not yet handed out: opened plaintext, and records (or
    /// parts of one) not yet opened. Each of those carries at most its length in plaintext.
    pub fn buffered(&self) -> usize {
        self.plain.len() + (self.hi - self.lo)
    }

    /// Opens the next record if `buf` holds all of it: `Ok(true)` if it did.
    fn open_next(&mut self) -> io::Result<bool> {
        if self.hi - self.lo < HEADER {
            return Ok(false);
        }
        let header: [u8; HEADER] = self.buf[self.lo..self.lo + HEADER]
            .try_into()
            .expect("HEADER bytes");
        if header[0] != APPLICATION_DATA || header[1..3] != [3, 3] {
            return Err(invalid(format!(
                "not a TLS 1.3 record: type {}, version {:#04x}{:02x}",
                header[0], header[1], header[2]
            )));
        }
        let len = u16::from_be_bytes([header[3], header[4]]) as usize;
        if !(TAG + 1..=MAX_CIPHER).contains(&len) {
            return Err(invalid(format!("TLS record of {len} bytes")));
        }
        if self.hi - self.lo < HEADER + len {
            return Ok(false);
        }
        let start = self.lo + HEADER;
        let body = &mut self.buf[start..start + len];
        let nonce = self.keys.nonce()?;
        let opened = self
            .keys
            .key
            .open_in_place(nonce, aead::Aad::from(header), body)
            .map_err(|_| invalid("a TLS record failed authentication"))?
            .len();
        self.lo = start + len;
        // The content type is the last non-zero byte; zeros after it are padding.
        let Some(end) = self.buf[start..start + opened]
            .iter()
            .rposition(|&b| b != 0)
        else {
            return Err(invalid("a TLS record with no content type"));
        };
        let (kind, end) = (self.buf[start + end], start + end);
        match kind {
            APPLICATION_DATA => self.plain = start..end,
            HANDSHAKE => self.handshake(start, end)?,
            ALERT => match &self.buf[start..end] {
                [_, CLOSE_NOTIFY] => self.closed = true,
                [_, alert] => return Err(invalid(format!("the peer sent TLS alert {alert}"))),
                _ => return Err(invalid("a malformed TLS alert")),
            },
            other => {
                return Err(invalid(format!(
                    "TLS content type {other} after the handshake"
                )));
            }
        }
        Ok(true)
    }

    /// A handshake message after the handshake: only `key_update` is.
    fn handshake(&mut self, start: usize, end: usize) -> io::Result<()> {
        match &self.buf[start..end] {
            [KEY_UPDATE, 0, 0, 1, request] if *request <= 1 => {
                self.keys.update();
                if *request == 1 {
                    self.update_asked.store(true, Ordering::Release);
                }
                Ok(())
            }
            _ => Err(invalid("a TLS handshake message other than key_update")),
        }
    }
}

impl std::os::fd::AsRawFd for RecordReader {
    /// The socket's descriptor (to set its options; the records are read only through this).
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.tcp.as_ref().as_raw_fd()
    }
}

impl AsyncRead for RecordReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if dst.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !this.plain.is_empty() {
                let n = this.plain.len().min(dst.remaining());
                dst.put_slice(&this.buf[this.plain.start..this.plain.start + n]);
                this.plain.start += n;
                return Poll::Ready(Ok(()));
            }
            if this.closed {
                return Poll::Ready(Ok(()));
            }
            if this.open_next()? {
                continue;
            }
            // A partial record: room for the rest of it after what is there.
            if this.lo == this.hi {
                (this.lo, this.hi) = (0, 0);
            } else if this.buf.len() - this.lo < HEADER + MAX_CIPHER {
                this.buf.copy_within(this.lo..this.hi, 0);
                (this.lo, this.hi) = (0, this.hi - this.lo);
            }
            let mut room = ReadBuf::new(&mut this.buf[this.hi..]);
            ready!(Pin::new(&mut this.tcp).poll_read(cx, &mut room))?;
            let n = room.filled().len();
            if n == 0 {
                if this.lo != this.hi {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the connection ended inside a TLS record",
                    )));
                }
                this.closed = true;
                return Poll::Ready(Ok(()));
            }
            this.hi += n;
        }
    }
}

/// The writing half: seals what each write is given into records, writes many at once.
#[derive(Debug)]
pub struct RecordWriter {
    tcp: OwnedWriteHalf,
    keys: Keys,
    /// Sealed records, from `sent` on not yet taken by the socket.
    out: Vec<u8>,
    sent: usize,
    closing: bool,
    update_asked: Arc<AtomicBool>,
}

impl RecordWriter {
    /// Sealed bytes the socket has not taken yet.
    fn unsent(&self) -> usize {
        self.out.len() - self.sent
    }

    /// Seals as much of `bufs` as fits into records, gathering slices into each (a record
    /// per write call at least): how many bytes it took.
    fn push(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let mut taken = 0;
        let mut open: Option<usize> = None;
        'bufs: for buf in bufs {
            let mut data = &buf[..];
            while !data.is_empty() {
                let start = match open {
                    Some(start) => start,
                    None if self.unsent() >= WRITE_BUFFER => break 'bufs,
                    None if data.len() >= MAX_PLAIN => {
                        // A whole record of this slice: sealed from where it lies (copied in
                        // and sealed in place if the key has no AWS-LC context).
                        self.seal_from(&data[..MAX_PLAIN])?;
                        (data, taken) = (&data[MAX_PLAIN..], taken + MAX_PLAIN);
                        continue;
                    }
                    None => *open.insert(self.begin()?),
                };
                let room = MAX_PLAIN - (self.out.len() - start - HEADER);
                let n = room.min(data.len());
                self.out.extend_from_slice(&data[..n]);
                (data, taken) = (&data[n..], taken + n);
                if n == room {
                    self.seal(open.take().expect("open"), APPLICATION_DATA)?;
                }
            }
        }
        if let Some(start) = open {
            self.seal(start, APPLICATION_DATA)?;
        }
        Ok(taken)
    }

    /// Starts a record at the end of `out` (its header reserved): where it starts. If this
    /// key is worn or the peer asked, a `key_update` record under it goes first and the
    /// record is the next key's.
    fn begin(&mut self) -> io::Result<usize> {
        if self.keys.worn() || self.update_asked.swap(false, Ordering::AcqRel) {
            let start = self.out.len();
            self.out.extend_from_slice(&[0; HEADER]);
            self.out.extend_from_slice(&[KEY_UPDATE, 0, 0, 1, 0]);
            self.seal(start, HANDSHAKE)?;
            self.keys.update();
        }
        let start = self.out.len();
        self.out.extend_from_slice(&[0; HEADER]);
        Ok(start)
    }

    /// Appends a record of application data `plain`, sealed out of place: its bytes are read
    /// once, by the encryption (see [`crate::sealer`]); copied and sealed in place if the key
    /// has no context.
    fn seal_from(&mut self, plain: &[u8]) -> io::Result<()> {
        let start = self.begin()?;
        if self.keys.sealer.is_none() {
            self.out.extend_from_slice(plain);
            return self.seal(start, APPLICATION_DATA);
        }
        let len = plain.len() + 1 + TAG;
        let header = record_header(len);
        self.out[start..start + HEADER].copy_from_slice(&header);
        let nonce = self.keys.next_nonce()?;
        self.out.reserve(len);
        let Some(sealer) = self.keys.sealer.as_ref() else {
            unreachable!("checked above");
        };
        let (body, rest) = self.out.spare_capacity_mut()[..len].split_at_mut(plain.len());
        let tail: &mut [_; 1 + TAG] = rest.try_into().expect("1 + TAG bytes");
        sealer.seal(&nonce, &header, plain, APPLICATION_DATA, body, tail)?;
        // SAFETY: `seal` wrote all `len` bytes after the current end.
        unsafe { self.out.set_len(self.out.len() + len) };
        Ok(())
    }

    /// Seals `out[start + HEADER..]` as a record of `kind`.
    fn seal(&mut self, start: usize, kind: u8) -> io::Result<()> {
        self.out.push(kind);
        let header = record_header(self.out.len() - start - HEADER + TAG);
        self.out[start..start + HEADER].copy_from_slice(&header);
        let nonce = self.keys.nonce()?;
        let tag = self
            .keys
            .key
            .seal_in_place_separate_tag(
                nonce,
                aead::Aad::from(header),
                &mut self.out[start + HEADER..],
            )
            .map_err(|_| invalid("a TLS record could not be sealed"))?;
        self.out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Writes sealed records to the socket until none is left unsent.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.out.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.out[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.out.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for RecordWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.unsent() >= WRITE_BUFFER {
            ready!(this.poll_send(cx))?;
        }
        let taken = this.push(bufs)?;
        // What was written goes now, as far as the socket takes it without waiting (the rest
        // at the next write or flush).
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(taken))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.closing {
            // close_notify (a warning-level alert).
            this.closing = true;
            let start = this.out.len();
            this.out.extend_from_slice(&[0; HEADER]);
            this.out.extend_from_slice(&[1, CLOSE_NOTIFY]);
            this.seal(start, ALERT)?;
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

impl AsyncRead for RecordStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().reader).poll_read(cx, buf)
    }
}

impl AsyncWrite for RecordStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().writer).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().writer).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().writer).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().writer).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn keys() -> Keys {
        Keys::new(Suite::Aes128Gcm, &[7; 32], 0)
    }

    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dial = TcpStream::connect(listener.local_addr().unwrap());
        let (dialed, accepted) = tokio::join!(dial, listener.accept());
        (dialed.unwrap(), accepted.unwrap().0)
    }

    /// The bytes a writer puts on the wire for `data`.
    async fn sealed(data: &[u8]) -> Vec<u8> {
        sealed_with(data, keys()).await
    }

    /// The bytes a writer sealing with `tx` puts on the wire for `data`.
    async fn sealed_with(data: &[u8], tx: Keys) -> Vec<u8> {
        let (a, mut b) = tcp_pair().await;
        let mut w = RecordStream::new(a, tx, keys());
        w.write_all(data).await.unwrap();
        w.flush().await.unwrap();
        drop(w);
        let mut wire = Vec::new();
        b.read_to_end(&mut wire).await.unwrap();
        wire
    }

    /// What a reader makes of `wire`: the plaintext, or its error.
    async fn opened(wire: &[u8]) -> io::Result<Vec<u8>> {
        let (mut a, b) = tcp_pair().await;
        a.write_all(wire).await.unwrap();
        drop(a);
        let mut r = RecordStream::new(b, keys(), keys());
        let mut out = Vec::new();
        r.read_to_end(&mut out).await.map(|_| out)
    }

    #[tokio::test]
    async fn records_round_trip_and_a_changed_byte_is_refused() {
        let data: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
        let wire = sealed(&data).await;
        // Three records: two full, one of the rest; each 5 + plaintext + 1 + 16 bytes.
        assert_eq!(wire.len(), data.len() + 3 * (HEADER + 1 + TAG));
        assert_eq!(opened(&wire).await.unwrap(), data);

        let mut tampered = wire.clone();
        tampered[HEADER + 100] ^= 1;
        let e = opened(&tampered).await.unwrap_err();
        assert!(e.to_string().contains("failed authentication"), "{e}");

        // Cut inside a record: not a clean end.
        let e = opened(&wire[..wire.len() - 3]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn records_sealed_where_their_data_lies_are_those_sealed_in_place() {
        // Full records of one slice are sealed out of place (AWS-LC's scatter), the rest
        // copied and sealed in place (aws-lc-rs): the same bytes either way.
        for len in [MAX_PLAIN, 3 * MAX_PLAIN + 1000] {
            let data: Vec<u8> = (0..len).map(|i| (i * 13) as u8).collect();
            let mut in_place = keys();
            in_place.sealer = None;
            let wire = sealed_with(&data, in_place).await;
            assert_eq!(sealed(&data).await, wire);
            assert_eq!(opened(&wire).await.unwrap(), data);
        }
    }

    #[tokio::test]
    async fn headers_past_the_protocol_are_refused_before_anything_is_read_for_them() {
        let long = [APPLICATION_DATA, 3, 3, 0xff, 0xff];
        let e = opened(&long).await.unwrap_err();
        assert!(e.to_string().contains("TLS record of 65535 bytes"), "{e}");
        let handshake = [HANDSHAKE, 3, 3, 0, 40];
        let e = opened(&handshake).await.unwrap_err();
        assert!(e.to_string().contains("not a TLS 1.3 record"), "{e}");
        let tls12 = [APPLICATION_DATA, 3, 1, 0, 40];
        assert!(opened(&tls12).await.is_err());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Whatever is done to the bytes on the wire — bytes changed, cut short, garbage
        /// after — a reader hands out a prefix of what was sealed, or fails: never bytes
        /// that were not sent.
        #[test]
        fn changed_wire_bytes_never_come_out_as_data(
            len in 0usize..40_000,
            flips in proptest::collection::vec((0usize..50_000, 1u8..=255), 0..3),
            cut in proptest::option::of(0usize..50_000),
            garbage in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let (got, out) = rt.block_on(async {
                let mut wire = sealed(&data).await;
                for (at, x) in &flips {
                    if !wire.is_empty() {
                        let at = at % wire.len();
                        wire[at] ^= x;
                    }
                }
                if let Some(cut) = cut {
                    wire.truncate(cut.min(wire.len()));
                }
                wire.extend_from_slice(&garbage);
                let (mut a, b) = tcp_pair().await;
                a.write_all(&wire).await.unwrap();
                drop(a);
                let mut r = RecordStream::new(b, keys(), keys());
                let mut out = Vec::new();
                let got = tokio::time::timeout(
                    std::time::Duration::from_secs(10),
                    r.read_to_end(&mut out),
                )
                .await
                .expect("a reader of a closed stream ends");
                (got, out)
            });
            proptest::prop_assert!(data.starts_with(&out), "bytes that were not sent came out");
            if flips.is_empty() && cut.is_none() && garbage.is_empty() {
                proptest::prop_assert!(got.is_ok() && out == data);
            }
        }
    }

    #[tokio::test]
    async fn keys_move_on_before_they_wear_out() {
        let (a, b) = tcp_pair().await;
        let mut w = RecordStream::new(a, keys().with_limit(2), keys());
        let mut r = RecordStream::new(b, keys(), keys());
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, data);
        // 7 records of data and the alert, 2 per key: 3 updates on each side.
        assert_eq!(w.writer.keys.secret, r.reader.keys.secret);
        assert_ne!(w.writer.keys.secret, keys().secret);
    }
}
