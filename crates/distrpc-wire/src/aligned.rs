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

/// A byte buffer whose start is aligned to [`ALIGN`] bytes.
pub struct AlignedBuf {
    blocks: Vec<Block>,
    len: usize,
    /// Where the buffer goes back to when the last `Bytes` made from it is dropped.
    pool: Option<BufPool>,
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
        Self {
            blocks,
            len,
            pool: None,
        }
    }

    /// Bytes this buffer can hold.
    pub fn capacity(&self) -> usize {
        self.blocks.len() * ALIGN
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

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.give_back(std::mem::take(&mut self.blocks));
        }
    }
}

/// Large receive buffers kept for reuse, so that a stream of big frames does not map, fault in
/// and unmap fresh pages for every frame. A buffer comes back when the last `Bytes` made from
/// it (say, a tensor the user kept) is dropped. Small buffers are not pooled: the allocator
/// already serves them fast.
#[derive(Clone, Default)]
pub struct BufPool {
    free: std::sync::Arc<std::sync::Mutex<Vec<Vec<Block>>>>,
}

impl std::fmt::Debug for BufPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufPool")
            .field("free", &self.lock().len())
            .finish()
    }
}

impl BufPool {
    /// Buffers smaller than this are not pooled.
    pub const MIN_POOLED: usize = 64 << 10;
    /// At most this many buffers wait for reuse.
    const MAX_FREE: usize = 4;

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Vec<Block>>> {
        // A push or a pop: a poisoned lock holds a valid list.
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A buffer of `len` bytes, reused when one of the right size is free. Its contents are
    /// whatever the last user left: the caller must fill all of it.
    pub fn take(&self, len: usize) -> AlignedBuf {
        if len < Self::MIN_POOLED {
            return AlignedBuf::zeroed(len);
        }
        let need = len.div_ceil(ALIGN);
        let reused = {
            let mut free = self.lock();
            // Fits, and wastes at most half of itself.
            free.iter()
                .position(|b| b.len() >= need && b.len() <= 2 * need)
                .map(|i| free.swap_remove(i))
        };
        let blocks = reused.unwrap_or_else(|| vec![Block([0; ALIGN]); need]);
        AlignedBuf {
            blocks,
            len,
            pool: Some(self.clone()),
        }
    }

    fn give_back(&self, blocks: Vec<Block>) {
        let mut free = self.lock();
        if free.len() < Self::MAX_FREE {
            free.push(blocks);
        }
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

    #[test]
    fn pooled_buffers_come_back_when_their_last_slice_goes() {
        let pool = BufPool::default();
        let first = pool.take(1 << 20).freeze();
        let ptr = first.as_ptr();
        let kept = first.slice(100..200);
        drop(first);
        assert_eq!(pool.lock().len(), 0, "a slice still uses it");
        drop(kept);
        assert_eq!(pool.lock().len(), 1);
        let again = pool.take((1 << 20) - 10);
        assert_eq!(again.as_slice().as_ptr(), ptr, "reused");
        assert_eq!(again.as_slice().len(), (1 << 20) - 10);
        // Too small to pool, or too big for the free one: fresh buffers.
        assert!(pool.take(100).pool.is_none());
        assert_ne!(pool.take(4 << 20).as_slice().as_ptr(), ptr);
    }
}
