//! Frames: how one message is laid out on the wire.
//!
//! ```text
//!  header (32 bytes, little-endian)
//!  ┌────────┬─────┬──────┬───────┬────────────┬─────────────┬──────────────┬──────────┐
//!  │ "DRPC" │ ver │ kind │ flags │ message id │ payload len │ tensor count │ body len │
//!  │   4    │  1  │  1   │   2   │     8      │      4      │      4       │    8     │
//!  └────────┴─────┴──────┴───────┴────────────┴─────────────┴──────────────┴──────────┘
//!  body (body len bytes; offsets below are from the start of the body)
//!  ┌──────────────────────────────┬─────────┬─────┬──────────┬─────┬──────────┬ ─ ─
//!  │ tensor descriptors           │ payload │ pad │ tensor 0 │ pad │ tensor 1 │ ...
//!  │ (dtype u8, ndim u8, 6 zero,  │         │     │ @64·k    │     │ @64·m    │
//!  │  nbytes u64, ndim × dim u64) │         │     │          │     │          │
//!  └──────────────────────────────┴─────────┴─────┴──────────┴─────┴──────────┴ ─ ─
//! ```
//!
//! The receiver reads the header, checks it against its [`Limits`] before allocating anything,
//! reads the body into a 64-byte aligned buffer ([`crate::aligned`]) and [decodes](Frame::decode)
//! it: every tensor is then a slice of that buffer, aligned, never copied. The sender keeps the
//! tensors' own storage and writes the frame as a list of I/O slices ([`OutFrame::slices`]).

use bytes::{BufMut, Bytes, BytesMut};

use crate::aligned::{ALIGN, align_up};
use crate::tensor::{DType, Tensor, byte_len};

/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"DRPC";
/// The protocol version this crate speaks.
pub const VERSION: u8 = 1;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 32;
/// Largest number of dimensions a tensor may have.
pub const MAX_NDIM: usize = 32;

/// What a frame carries. Codes follow torch's `MessageType` where the meaning is the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
#[non_exhaustive]
pub enum Kind {
    /// A call of a registered function (torch `PYTHON_CALL`).
    Call = 0x02,
    /// The result of a call (torch `PYTHON_RET`).
    Result = 0x03,
    /// A call whose result stays on the callee behind a remote reference.
    RemoteCall = 0x05,
    /// Acknowledges a remote call.
    RemoteResult = 0x06,
    /// Asks the owner of a remote reference for its value.
    RRefFetch = 0x08,
    /// The value of a remote reference.
    RRefFetchResult = 0x0a,
    /// A user reference was deleted.
    RRefUserDelete = 0x0b,
    /// A user reference was forked.
    RRefForkRequest = 0x0c,
    /// The owner accepted a forked child reference.
    RRefChildAccept = 0x0d,
    /// Acknowledges a reference control message.
    RRefAck = 0x0e,
    /// A request failed; the payload says why (torch `EXCEPTION`).
    Exception = 0x37,
    /// First frame on a connection: who the connecting worker is.
    Hello = 0x40,
    /// The caller no longer wants the result of a call.
    Cancel = 0x41,
    /// Liveness probe.
    Heartbeat = 0x42,
}

impl Kind {
    /// The kind with wire code `code`, if there is one.
    pub const fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0x02 => Kind::Call,
            0x03 => Kind::Result,
            0x05 => Kind::RemoteCall,
            0x06 => Kind::RemoteResult,
            0x08 => Kind::RRefFetch,
            0x0a => Kind::RRefFetchResult,
            0x0b => Kind::RRefUserDelete,
            0x0c => Kind::RRefForkRequest,
            0x0d => Kind::RRefChildAccept,
            0x0e => Kind::RRefAck,
            0x37 => Kind::Exception,
            0x40 => Kind::Hello,
            0x41 => Kind::Cancel,
            0x42 => Kind::Heartbeat,
            _ => return None,
        })
    }
}

/// How a call's payload (its arguments, and its reply's value) is encoded: a mark in bits 1–2
/// of the header flags (bit 0 marks a call on a remote reference's value).
///
/// ```
/// use distrpc_wire::frame::Codec;
///
/// let flags = Codec::Pickle.flags() | 1;
/// assert_eq!(Codec::of(flags), Some(Codec::Pickle));
/// assert_eq!(Codec::of(1), Some(Codec::MessagePack));
/// assert_eq!(Codec::of(0b110), None);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Codec {
    /// MessagePack through serde (Rust functions, and any front calling them).
    MessagePack,
    /// A Python pickle (torch's `PythonUDF`), opaque to Rust: a front's foreign handler runs it.
    Pickle,
}

impl Codec {
    /// Where the mark sits in the flags.
    pub const MASK: u16 = 0b110;

    /// The flag bits of this codec.
    pub const fn flags(self) -> u16 {
        match self {
            Codec::MessagePack => 0,
            Codec::Pickle => 1 << 1,
        }
    }

    /// The codec marked in `flags`; `None` for a mark this build does not know.
    pub const fn of(flags: u16) -> Option<Codec> {
        match (flags & Self::MASK) >> 1 {
            0 => Some(Codec::MessagePack),
            1 => Some(Codec::Pickle),
            _ => None,
        }
    }
}

/// Limits a receiver enforces before it allocates anything for a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted body, in bytes.
    pub max_body: u64,
    /// Largest accepted number of tensors in one frame.
    pub max_tensors: u32,
}

impl Default for Limits {
    /// 4 GiB bodies and 65 536 tensors per frame.
    fn default() -> Self {
        Self {
            max_body: 4 << 30,
            max_tensors: 1 << 16,
        }
    }
}

/// Why bytes from the network are not a valid frame.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// The frame does not start with [`MAGIC`].
    #[error("bad magic {0:02x?}: not a distrpc frame")]
    Magic([u8; 4]),
    /// The frame speaks another protocol version.
    #[error("protocol version {0} is not supported (this build speaks {VERSION})")]
    Version(u8),
    /// The kind code is unknown.
    #[error("unknown message kind 0x{0:02x}")]
    Kind(u8),
    /// The body is larger than the receiver accepts.
    #[error("frame body of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Declared body length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// More tensors than the receiver accepts.
    #[error("frame has {count} tensors, more than the limit of {max}")]
    TooManyTensors {
        /// Declared tensor count.
        count: u32,
        /// The limit.
        max: u32,
    },
    /// The body does not match its header or its descriptors.
    #[error("malformed frame body: {0}")]
    Malformed(&'static str),
}

/// The fixed header of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// What the frame carries.
    pub kind: Kind,
    /// Kind-specific flags (the agent defines a method-call bit for calls on remote references).
    pub flags: u16,
    /// Matches a response to its request.
    pub id: u64,
    /// Length of the MessagePack payload.
    pub payload_len: u32,
    /// Number of tensors.
    pub tensor_count: u32,
    /// Length of everything after the header.
    pub body_len: u64,
}

impl Header {
    /// Parses and checks a header: magic, version, kind, and the declared sizes against `limits`.
    pub fn parse(buf: &[u8; HEADER_LEN], limits: &Limits) -> Result<Self, FrameError> {
        let magic = [buf[0], buf[1], buf[2], buf[3]];
        if magic != MAGIC {
            return Err(FrameError::Magic(magic));
        }
        if buf[4] != VERSION {
            return Err(FrameError::Version(buf[4]));
        }
        let kind = Kind::from_code(buf[5]).ok_or(FrameError::Kind(buf[5]))?;
        let u16_at = |i: usize| u16::from_le_bytes([buf[i], buf[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[i..i + 8]);
            u64::from_le_bytes(b)
        };
        let header = Header {
            kind,
            flags: u16_at(6),
            id: u64_at(8),
            payload_len: u32_at(16),
            tensor_count: u32_at(20),
            body_len: u64_at(24),
        };
        if header.body_len > limits.max_body {
            return Err(FrameError::TooLarge {
                len: header.body_len,
                max: limits.max_body,
            });
        }
        if header.tensor_count > limits.max_tensors {
            return Err(FrameError::TooManyTensors {
                count: header.tensor_count,
                max: limits.max_tensors,
            });
        }
        if u64::from(header.payload_len) > header.body_len {
            return Err(FrameError::Malformed("payload longer than body"));
        }
        // Each descriptor takes at least 16 bytes.
        if u64::from(header.tensor_count) * 16 > header.body_len {
            return Err(FrameError::Malformed(
                "more tensors than the body can describe",
            ));
        }
        Ok(header)
    }

    fn write(&self, out: &mut BytesMut) {
        out.put_slice(&MAGIC);
        out.put_u8(VERSION);
        out.put_u8(self.kind as u8);
        out.put_u16_le(self.flags);
        out.put_u64_le(self.id);
        out.put_u32_le(self.payload_len);
        out.put_u32_le(self.tensor_count);
        out.put_u64_le(self.body_len);
    }
}

/// A decoded frame: its header fields, payload and tensors, all sharing the receive buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct Frame {
    /// What the frame carries.
    pub kind: Kind,
    /// Flags from the header.
    pub flags: u16,
    /// Message id.
    pub id: u64,
    /// The MessagePack payload.
    pub payload: Bytes,
    /// The tensor table.
    pub tensors: Vec<Tensor>,
}

/// Reads little-endian integers from a slice, failing instead of panicking at its end.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], FrameError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or(FrameError::Malformed("descriptor table runs past the body"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u64(&mut self) -> Result<u64, FrameError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }
}

impl Frame {
    /// Decodes the body of a frame whose header was checked by [`Header::parse`]. `body` must be
    /// exactly `header.body_len` bytes; for tensors to be aligned it should start 64-byte aligned.
    pub fn decode(header: &Header, body: Bytes) -> Result<Frame, FrameError> {
        if body.len() as u64 != header.body_len {
            return Err(FrameError::Malformed("body length differs from header"));
        }
        let mut cur = Cursor { buf: &body, pos: 0 };
        let mut descs = Vec::with_capacity(header.tensor_count as usize);
        for _ in 0..header.tensor_count {
            let head = cur.take(8)?;
            let dtype = DType::from_code(head[0]).ok_or(FrameError::Malformed("unknown dtype"))?;
            let ndim = head[1] as usize;
            if ndim > MAX_NDIM {
                return Err(FrameError::Malformed("tensor has too many dimensions"));
            }
            if head[2..8] != [0; 6] {
                return Err(FrameError::Malformed(
                    "reserved descriptor bytes are not zero",
                ));
            }
            let nbytes = cur.u64()?;
            let mut shape = Vec::with_capacity(ndim);
            for _ in 0..ndim {
                let dim = usize::try_from(cur.u64()?)
                    .map_err(|_| FrameError::Malformed("dimension too large"))?;
                shape.push(dim);
            }
            if byte_len(dtype, &shape).map(|n| n as u64) != Some(nbytes) {
                return Err(FrameError::Malformed(
                    "tensor byte length does not match its shape",
                ));
            }
            descs.push((dtype, shape, nbytes as usize));
        }
        let payload_start = cur.pos;
        let payload_end = payload_start + header.payload_len as usize;
        if payload_end > body.len() {
            return Err(FrameError::Malformed("payload runs past the body"));
        }
        let mut pos = payload_end;
        let mut tensors = Vec::with_capacity(descs.len());
        for (dtype, shape, nbytes) in descs {
            let start = align_up(pos);
            let end = start
                .checked_add(nbytes)
                .filter(|&e| e <= body.len())
                .ok_or(FrameError::Malformed("tensor runs past the body"))?;
            let data = body.slice(start..end);
            let tensor = Tensor::from_bytes(dtype, shape, data)
                .map_err(|_| FrameError::Malformed("tensor does not match its descriptor"))?;
            tensors.push(tensor);
            pos = end;
        }
        if pos != body.len() {
            return Err(FrameError::Malformed(
                "trailing bytes after the last tensor",
            ));
        }
        Ok(Frame {
            kind: header.kind,
            flags: header.flags,
            id: header.id,
            payload: body.slice(payload_start..payload_end),
            tensors,
        })
    }
}

static PADDING: [u8; ALIGN] = [0; ALIGN];

/// A frame ready to send: one buffer with header, descriptors, payload and padding, then the
/// tensors' own storage (never copied), each followed by the padding that aligns the next.
#[derive(Clone, Debug)]
pub struct OutFrame {
    head: Bytes,
    tensors: Vec<(Bytes, usize)>,
    len: usize,
}

impl OutFrame {
    /// Builds a frame. Fails only if the payload is longer than `u32::MAX` bytes.
    pub fn new(
        kind: Kind,
        id: u64,
        payload: &[u8],
        tensors: &[Tensor],
    ) -> Result<Self, FrameError> {
        Self::with_flags(kind, 0, id, payload, tensors)
    }

    /// [`OutFrame::new`] with header flags.
    pub fn with_flags(
        kind: Kind,
        flags: u16,
        id: u64,
        payload: &[u8],
        tensors: &[Tensor],
    ) -> Result<Self, FrameError> {
        let payload_len = u32::try_from(payload.len())
            .map_err(|_| FrameError::Malformed("payload longer than 4 GiB"))?;
        let tensor_count =
            u32::try_from(tensors.len()).map_err(|_| FrameError::Malformed("too many tensors"))?;
        let desc_len: usize = tensors.iter().map(|t| 16 + 8 * t.shape().len()).sum();
        let mut pos = desc_len + payload.len();
        let mut pieces = Vec::with_capacity(tensors.len());
        let mut first_pad = 0;
        for (i, t) in tensors.iter().enumerate() {
            if t.shape().len() > MAX_NDIM {
                return Err(FrameError::Malformed("tensor has too many dimensions"));
            }
            let pad = align_up(pos) - pos;
            if i == 0 {
                first_pad = pad;
            } else if let Some(last) = pieces.last_mut() {
                let (_, p): &mut (Bytes, usize) = last;
                *p = pad;
            }
            pos += pad + t.data().len();
            pieces.push((t.data().clone(), 0));
        }
        let header = Header {
            kind,
            flags,
            id,
            payload_len,
            tensor_count,
            body_len: pos as u64,
        };
        let mut head = BytesMut::with_capacity(HEADER_LEN + desc_len + payload.len() + first_pad);
        header.write(&mut head);
        for t in tensors {
            head.put_u8(t.dtype() as u8);
            head.put_u8(t.shape().len() as u8);
            head.put_slice(&[0; 6]);
            head.put_u64_le(t.data().len() as u64);
            for &d in t.shape() {
                head.put_u64_le(d as u64);
            }
        }
        head.put_slice(payload);
        head.put_slice(&PADDING[..first_pad]);
        Ok(Self {
            head: head.freeze(),
            tensors: pieces,
            len: HEADER_LEN + pos,
        })
    }

    /// The whole frame as one buffer, when it has no tensors.
    pub fn as_contiguous(&self) -> Option<&[u8]> {
        self.tensors.is_empty().then_some(&self.head[..])
    }

    /// Total bytes on the wire.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a frame has at least its header.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The pieces to write, in order.
    pub fn slices(&self) -> impl Iterator<Item = &[u8]> {
        std::iter::once(&self.head[..]).chain(
            self.tensors
                .iter()
                .flat_map(|(data, pad)| [&data[..], &PADDING[..*pad]])
                .filter(|s| !s.is_empty()),
        )
    }

    /// The frame as one contiguous buffer (for tests and tools; the agent writes [`slices`]).
    ///
    /// [`slices`]: OutFrame::slices
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len);
        for s in self.slices() {
            v.extend_from_slice(s);
        }
        v
    }
}

/// Decodes one frame from a contiguous buffer (for tests, tools and fuzzing; the agent reads
/// header and body separately). Returns the frame and the bytes it took.
pub fn decode_slice(buf: &[u8], limits: &Limits) -> Result<Option<(Frame, usize)>, FrameError> {
    let Some(head) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let header = Header::parse(head, limits)?;
    let total = HEADER_LEN as u64 + header.body_len;
    if (buf.len() as u64) < total {
        return Ok(None);
    }
    let body_len = header.body_len as usize;
    let mut aligned = crate::aligned::AlignedBuf::zeroed(body_len);
    aligned
        .as_mut_slice()
        .copy_from_slice(&buf[HEADER_LEN..HEADER_LEN + body_len]);
    let frame = Frame::decode(&header, aligned.freeze())?;
    Ok(Some((frame, HEADER_LEN + body_len)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(kind: Kind, id: u64, payload: &[u8], tensors: &[Tensor]) -> Frame {
        let out = OutFrame::new(kind, id, payload, tensors).unwrap();
        let bytes = out.to_vec();
        assert_eq!(bytes.len(), out.len());
        let (frame, used) = decode_slice(&bytes, &Limits::default()).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        frame
    }

    #[test]
    fn tensors_arrive_aligned_and_equal() {
        let t1 = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        let t2 = Tensor::from_vec(vec![2, 2], vec![1i64, 2, 3, 4]).unwrap();
        let frame = round_trip(Kind::Call, 7, b"hello", &[t1.clone(), t2.clone()]);
        assert_eq!(frame.kind, Kind::Call);
        assert_eq!(frame.id, 7);
        assert_eq!(&frame.payload[..], b"hello");
        assert_eq!(frame.tensors, vec![t1, t2]);
        for t in &frame.tensors {
            assert_eq!(t.data().as_ptr() as usize % ALIGN, 0);
        }
    }

    #[test]
    fn header_checks_come_before_allocation() {
        let mut bytes = OutFrame::new(Kind::Call, 1, b"x", &[]).unwrap().to_vec();
        let limits = Limits {
            max_body: 16,
            max_tensors: 4,
        };
        bytes[24..32].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let head = bytes.first_chunk::<HEADER_LEN>().unwrap();
        assert!(matches!(
            Header::parse(head, &limits),
            Err(FrameError::TooLarge { .. })
        ));
        let mut bad_kind = *head;
        bad_kind[5] = 0xee;
        assert_eq!(
            Header::parse(&bad_kind, &limits),
            Err(FrameError::Kind(0xee))
        );
        let mut bad_magic = *head;
        bad_magic[0] = b'X';
        assert!(matches!(
            Header::parse(&bad_magic, &limits),
            Err(FrameError::Magic(_))
        ));
    }

    #[test]
    fn lying_descriptors_are_rejected() {
        let t = Tensor::from_slice(&[1.0f64, 2.0]);
        let mut bytes = OutFrame::new(Kind::Result, 1, b"", &[t]).unwrap().to_vec();
        // Claim 3 elements in the shape while nbytes stays 16.
        bytes[HEADER_LEN + 16..HEADER_LEN + 24].copy_from_slice(&3u64.to_le_bytes());
        let err = decode_slice(&bytes, &Limits::default()).unwrap_err();
        assert!(matches!(err, FrameError::Malformed(_)), "{err}");
    }

    fn arb_tensor() -> impl Strategy<Value = Tensor> {
        prop_oneof![
            proptest::collection::vec(any::<f32>(), 0..40).prop_map(|v| Tensor::from_slice(&v)),
            (proptest::collection::vec(any::<i64>(), 0..12), 1usize..4).prop_map(|(v, rows)| {
                let cols = v.len() / rows;
                Tensor::from_vec(vec![rows, cols], v[..rows * cols].to_vec()).unwrap()
            }),
            any::<u8>().prop_map(Tensor::scalar),
        ]
    }

    proptest! {
        #[test]
        fn any_frame_round_trips(
            id in any::<u64>(),
            payload in proptest::collection::vec(any::<u8>(), 0..300),
            tensors in proptest::collection::vec(arb_tensor(), 0..5),
        ) {
            let frame = round_trip(Kind::Call, id, &payload, &tensors);
            prop_assert_eq!(&frame.payload[..], &payload[..]);
            prop_assert_eq!(frame.tensors.len(), tensors.len());
            for (a, b) in frame.tensors.iter().zip(&tensors) {
                prop_assert_eq!(a.shape(), b.shape());
                prop_assert_eq!(&a.data()[..], &b.data()[..]);
            }
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_slice(&bytes, &Limits::default());
        }

        #[test]
        fn corrupted_frames_never_panic(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            tensors in proptest::collection::vec(arb_tensor(), 0..3),
        ) {
            let mut bytes = OutFrame::new(Kind::Call, 3, b"payload", &tensors).unwrap().to_vec();
            for (i, v) in flips {
                let i = i.index(bytes.len());
                bytes[i] = v;
            }
            let limits = Limits { max_body: 1 << 20, max_tensors: 64 };
            let _ = decode_slice(&bytes, &limits);
        }
    }
}
