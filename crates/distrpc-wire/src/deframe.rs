//! [`Deframer`]: a byte stream, in pieces of any size, turned into frames — with no I/O. The
//! transport reads into [`Deframer::read_buf`] and takes frames out of
//! [`Deframer::next_frame`]; tests and the fuzz target push bytes split anywhere.
//!
//! ```text
//!  stream ─► read_buf (bulk buffer, or a large body's own aligned buffer)
//!         ─► header checked against Limits ─► body (64-byte aligned) ─► Frame::decode
//! ```
//!
//! Small frames are read in bulk into one growing buffer and handed out as slices of it (one
//! read serves many frames, no allocation per frame); a body of [`BufPool::MIN_POOLED`] bytes
//! or more gets a reused 64-byte aligned buffer of its own, which reads fill directly. Either
//! way the tensors of a frame start on a 64-byte boundary: a small body that lands unaligned
//! and carries tensors is copied once into an aligned buffer. Nothing is allocated for a frame
//! before its header has passed the limits.

use std::mem::MaybeUninit;

use bytes::{Buf, BytesMut};

use crate::aligned::{ALIGN, AlignedBuf, BufPool};
use crate::frame::{Frame, FrameError, HEADER_LEN, Header, Limits};

/// How much the bulk buffer grows by per read.
pub const READ_CHUNK: usize = 64 * 1024;

/// Frames out of a byte stream; see the module docs.
#[derive(Debug)]
pub struct Deframer {
    buf: BytesMut,
    limits: Limits,
    buffers: BufPool,
    /// A large body being read into its own buffer, and how much of it has arrived.
    large: Option<(Header, AlignedBuf, usize)>,
    /// The last [`Deframer::read_buf`] was the large body's (not the bulk buffer's).
    reading_large: bool,
}

impl Deframer {
    /// A deframer that refuses frames past `limits`.
    ///
    /// ```
    /// use distrpc_wire::deframe::Deframer;
    /// use distrpc_wire::{Kind, Limits, OutFrame};
    ///
    /// let frame = OutFrame::new(Kind::Call, 7, b"payload", &[]).unwrap();
    /// let bytes: Vec<u8> = frame.slices().flatten().copied().collect();
    /// let mut deframer = Deframer::new(Limits::default());
    /// let (first, rest) = bytes.split_at(5);
    /// deframer.push(first);
    /// assert!(deframer.next_frame().unwrap().is_none());
    /// deframer.push(rest);
    /// let frame = deframer.next_frame().unwrap().unwrap();
    /// assert_eq!((frame.id, &frame.payload[..]), (7, &b"payload"[..]));
    /// ```
    pub fn new(limits: Limits) -> Self {
        Self {
            buf: BytesMut::with_capacity(READ_CHUNK),
            limits,
            buffers: BufPool::default(),
            large: None,
            reading_large: false,
        }
    }

    /// Changes the limits for the frames not yet parsed: a connection takes only a small hello
    /// first, then frames of any size its receiver accepts.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Whether bytes of a frame not yet handed out are held (the stream may not end here).
    pub fn holds_bytes(&self) -> bool {
        !self.buf.is_empty() || self.large.is_some()
    }

    /// How many bytes of a large body are still to come, if one is being read.
    pub fn large_remaining(&self) -> Option<usize> {
        self.large
            .as_ref()
            .map(|(_, body, filled)| body.as_slice().len() - filled)
            .filter(|&left| left > 0)
    }

    /// Where the next read should write: the rest of a large body, or the bulk buffer's spare
    /// room (at least [`READ_CHUNK`] bytes). Report what was written with
    /// [`Deframer::filled`].
    pub fn read_buf(&mut self) -> &mut [MaybeUninit<u8>] {
        // A complete large body waits for `next_frame`; what follows it goes to the bulk buffer.
        let large = self
            .large
            .as_mut()
            .filter(|(_, body, filled)| *filled < body.as_slice().len());
        self.reading_large = large.is_some();
        match large {
            Some((_, body, filled)) => {
                let rest = &mut body.as_mut_slice()[*filled..];
                // SAFETY: initialised bytes are valid `MaybeUninit` bytes; whoever writes here
                // writes bytes, never uninitialised memory.
                unsafe { &mut *(rest as *mut [u8] as *mut [MaybeUninit<u8>]) }
            }
            None => {
                self.buf.reserve(READ_CHUNK);
                self.buf.spare_capacity_mut()
            }
        }
    }

    /// Records that the first `n` bytes of the slice [`Deframer::read_buf`] returned were
    /// written.
    ///
    /// # Safety
    /// Those `n` bytes must have been initialised (written), `n` must not exceed that slice's
    /// length, and no other method may have been called since that `read_buf`.
    pub unsafe fn filled(&mut self, n: usize) {
        if self.reading_large {
            if let Some((_, body, filled)) = &mut self.large {
                *filled = (*filled + n).min(body.as_slice().len());
            }
            return;
        }
        // SAFETY: the caller initialised the first `n` bytes of the spare capacity, which
        // `read_buf` reserved and nothing has touched since.
        unsafe { self.buf.set_len(self.buf.len() + n) }
    }

    /// Appends `bytes` to the stream (a copy: for tests and decoders fed from memory).
    pub fn push(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let dst = self.read_buf();
            let n = dst.len().min(bytes.len());
            // SAFETY: `dst` has room for `n` bytes and cannot overlap `bytes`, which we borrow.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst.as_mut_ptr().cast(), n) };
            // SAFETY: the copy above wrote the first `n` bytes.
            unsafe { self.filled(n) };
            bytes = &bytes[n..];
        }
    }

    /// The next frame, if the bytes so far hold a whole one. An error means the stream is not
    /// distrpc frames (or breaks the limits): the connection must close.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if let Some((_, body, filled)) = &self.large {
            if *filled < body.as_slice().len() {
                return Ok(None);
            }
            return match self.large.take() {
                Some((header, body, _)) => Frame::decode(&header, body.freeze()).map(Some),
                None => Ok(None),
            };
        }
        let Some(head) = self.buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let head: &[u8; HEADER_LEN] = head
            .try_into()
            .map_err(|_| FrameError::Malformed("short header"))?;
        let header = Header::parse(head, &self.limits)?;
        // `parse` bounded body_len by `limits.max_body`, which the caller chose to fit memory.
        let len = usize::try_from(header.body_len)
            .map_err(|_| FrameError::Malformed("frame body larger than memory"))?;
        if len >= BufPool::MIN_POOLED {
            self.buf.advance(HEADER_LEN);
            let mut body = self
                .buffers
                .take(len)
                .ok_or(FrameError::Malformed("no memory for the frame body"))?;
            let have = self.buf.len().min(len);
            body.as_mut_slice()[..have].copy_from_slice(&self.buf[..have]);
            self.buf.advance(have);
            self.large = Some((header, body, have));
            return self.next_frame();
        }
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        self.buf.advance(HEADER_LEN);
        let body = self.buf.split_to(len).freeze();
        let body = if header.tensor_count > 0 && !(body.as_ptr() as usize).is_multiple_of(ALIGN) {
            let mut aligned = AlignedBuf::zeroed(len);
            aligned.as_mut_slice().copy_from_slice(&body);
            aligned.freeze()
        } else {
            body
        };
        Frame::decode(&header, body).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Kind, OutFrame, Tensor};
    use proptest::prelude::*;

    fn encoded(id: u64, payload_len: usize, tensor_len: usize) -> (Vec<u8>, Vec<u8>) {
        let payload: Vec<u8> = (0..payload_len).map(|i| i as u8).collect();
        let tensors = if tensor_len > 0 {
            vec![Tensor::from_slice(&vec![id as f32; tensor_len])]
        } else {
            Vec::new()
        };
        let frame = OutFrame::new(Kind::Call, id, &payload, &tensors).unwrap();
        (frame.slices().flatten().copied().collect(), payload)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Frames of every size class (bulk, large), split anywhere, come out whole, in order,
        /// with their tensors aligned.
        #[test]
        fn frames_survive_any_split(
            sizes in proptest::collection::vec((0usize..300, 0usize..24_000), 1..6),
            cuts in proptest::collection::vec(1usize..70_000, 1..20),
        ) {
            let mut stream = Vec::new();
            let mut expected = Vec::new();
            for (i, (payload, tensor)) in sizes.iter().enumerate() {
                let (bytes, payload) = encoded(i as u64, *payload, *tensor);
                stream.extend_from_slice(&bytes);
                expected.push((i as u64, payload, *tensor));
            }
            let mut d = Deframer::new(Limits::default());
            let mut got = Vec::new();
            let mut rest = &stream[..];
            let mut cut = cuts.iter().cycle();
            while !rest.is_empty() {
                let n = (*cut.next().unwrap()).min(rest.len());
                d.push(&rest[..n]);
                rest = &rest[n..];
                while let Some(frame) = d.next_frame().unwrap() {
                    for t in &frame.tensors {
                        prop_assert!((t.data().as_ptr() as usize).is_multiple_of(ALIGN));
                    }
                    let numel = frame.tensors.first().map_or(0, |t| t.numel());
                    got.push((frame.id, frame.payload.to_vec(), numel));
                }
            }
            prop_assert!(!d.holds_bytes());
            prop_assert_eq!(got, expected);
        }

        /// Random bytes in random pieces: errors or frames, never a panic.
        #[test]
        fn random_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..2000),
            cuts in proptest::collection::vec(1usize..64, 1..8),
        ) {
            let mut d = Deframer::new(Limits { max_body: 1 << 16, max_tensors: 8 });
            let mut rest = &bytes[..];
            let mut cut = cuts.iter().cycle();
            'feed: while !rest.is_empty() {
                let n = (*cut.next().unwrap()).min(rest.len());
                d.push(&rest[..n]);
                rest = &rest[n..];
                loop {
                    match d.next_frame() {
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(_) => break 'feed,
                    }
                }
            }
        }
    }
}
