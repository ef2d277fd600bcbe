//! Receive buffers aligned to 64 bytes.
//!
//! A frame body is read into an [`AlignedBuf`] and then frozen into [`Bytes`]; the tensors of the
//! frame are slices of it, so their data starts on a 64-byte boundary (the frame layout puts every
//! tensor at a 64-byte offset) and can be viewed as `&[f32]`, `&[f64]`, ... without a copy.

use bytes::Bytes;

/// The alignment of receive buffers and of tensor offsets in a frame.
pub const ALIGN: usize = 64;

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Block([u8; ALIGN]);

// SAFETY: `Block` is a `repr(C)` wrapper of a byte array whose size equals its alignment, so it
// has no padding and every bit pattern is valid.
unsafe impl bytemuck::Zeroable for Block {}
// SAFETY: as above.
unsafe impl bytemuck::Pod for Block {}

/// A zeroed byte buffer whose start is aligned to [`ALIGN`] bytes.
pub struct AlignedBuf {
    blocks: Vec<Block>,
    len: usize,
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        let blocks = vec![Block([0; ALIGN]); len.div_ceil(ALIGN)];
        Self { blocks, len }
    }

    /// The buffer as bytes.
    pub fn as_slice(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.blocks)[..self.len]
    }

    /// The buffer as mutable bytes, to read into.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.blocks)[..self.len]
    }

    /// Freezes the buffer into [`Bytes`] without copying it.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

/// Rounds `n` up to a multiple of [`ALIGN`].
pub const fn align_up(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frozen_buffer_stays_aligned() {
        let mut buf = AlignedBuf::zeroed(1000);
        buf.as_mut_slice()[999] = 7;
        let bytes = buf.freeze();
        assert_eq!(bytes.len(), 1000);
        assert_eq!(bytes.as_ptr() as usize % ALIGN, 0);
        assert_eq!(bytes[999], 7);
        assert_eq!(bytes.slice(128..).as_ptr() as usize % ALIGN, 0);
    }
}
