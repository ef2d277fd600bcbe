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
///
/// A large one ([`BufPool::take`]) is an anonymous memory mapping that is not reserved
/// against the machine's memory: its pages are committed as bytes are written to them, so a
/// peer that declares a large body and sends little of it costs little memory.
pub struct AlignedBuf {
    storage: Storage,
    len: usize,
    /// Where the buffer goes back to when the last `Bytes` made from it is dropped.
    pool: Option<BufPool>,
}

enum Storage {
    Heap(Vec<Block>),
    Mapped(Mapping),
    /// Moved back into the pool.
    Gone,
}

/// Anonymous memory, page-aligned, zero until written, unmapped on drop.
struct Mapping {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: a `Mapping` owns its memory exclusively, like a `Vec<u8>`.
unsafe impl Send for Mapping {}
// SAFETY: shared access only reads.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// `len` (> 0) bytes, or `None` if the system refuses them.
    fn new(len: usize) -> Option<Self> {
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing touches
        // no existing memory.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        std::ptr::NonNull::new(ptr.cast()).map(|ptr| Self { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr..ptr+len` is the mapping `new` made, and nothing refers to it any more.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes, on the heap.
    pub fn zeroed(len: usize) -> Self {
        let blocks = vec![Block([0; ALIGN]); len.div_ceil(ALIGN)];
        Self {
            storage: Storage::Heap(blocks),
            len,
            pool: None,
        }
    }

    /// Bytes this buffer can hold.
    pub fn capacity(&self) -> usize {
        match &self.storage {
            Storage::Heap(blocks) => blocks.len() * ALIGN,
            Storage::Mapped(m) => m.len,
            Storage::Gone => 0,
        }
    }

    /// The buffer as bytes.
    pub fn as_slice(&self) -> &[u8] {
        match &self.storage {
            Storage::Heap(blocks) => &bytemuck::cast_slice(blocks)[..self.len],
            // SAFETY: the mapping holds at least `len` bytes, readable (zero or written) while
            // `self` lives.
            Storage::Mapped(m) => unsafe { std::slice::from_raw_parts(m.ptr.as_ptr(), self.len) },
            Storage::Gone => &[],
        }
    }

    /// The buffer as mutable bytes, to read into.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match &mut self.storage {
            Storage::Heap(blocks) => &mut bytemuck::cast_slice_mut(blocks)[..self.len],
            // SAFETY: as in `as_slice`, and `&mut self` makes this the only access.
            Storage::Mapped(m) => unsafe {
                std::slice::from_raw_parts_mut(m.ptr.as_ptr(), self.len)
            },
            Storage::Gone => &mut [],
        }
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
        if let (Some(pool), Storage::Mapped(_)) = (self.pool.take(), &self.storage)
            && let Storage::Mapped(m) = std::mem::replace(&mut self.storage, Storage::Gone)
        {
            pool.give_back(m);
        }
    }
}

/// Large receive buffers ([`AlignedBuf`]s mapped on demand) kept for reuse, so that a stream
/// of big frames does not map, fault in and unmap fresh pages for every frame. A buffer comes
/// back when the last `Bytes` made from it (say, a tensor the user kept) is dropped. Small
/// buffers are not pooled: the allocator already serves them fast.
#[derive(Clone, Default)]
pub struct BufPool {
    free: std::sync::Arc<std::sync::Mutex<Vec<Mapping>>>,
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

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Mapping>> {
        // A push or a pop: a poisoned lock holds a valid list.
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A buffer of `len` bytes, reused when one of the right size is free; `None` if the
    /// system has no address space for it (an error to report, not an abort). Its contents are
    /// whatever the last user left: the caller must fill all of it. Memory is committed only
    /// as the buffer is written.
    pub fn take(&self, len: usize) -> Option<AlignedBuf> {
        if len < Self::MIN_POOLED {
            return Some(AlignedBuf::zeroed(len));
        }
        let need = align_up(len);
        let reused = {
            let mut free = self.lock();
            // Fits, and wastes at most half of itself.
            free.iter()
                .position(|m| m.len >= need && m.len <= 2 * need)
                .map(|i| free.swap_remove(i))
        };
        let mapping = match reused {
            Some(m) => m,
            None => Mapping::new(need)?,
        };
        Some(AlignedBuf {
            storage: Storage::Mapped(mapping),
            len,
            pool: Some(self.clone()),
        })
    }

    fn give_back(&self, mapping: Mapping) {
        let mut free = self.lock();
        if free.len() < Self::MAX_FREE {
            free.push(mapping);
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
        let first = pool.take(1 << 20).unwrap().freeze();
        let ptr = first.as_ptr();
        let kept = first.slice(100..200);
        drop(first);
        assert_eq!(pool.lock().len(), 0, "a slice still uses it");
        drop(kept);
        assert_eq!(pool.lock().len(), 1);
        let again = pool.take((1 << 20) - 10).unwrap();
        assert_eq!(again.as_slice().as_ptr(), ptr, "reused");
        assert_eq!(again.as_slice().len(), (1 << 20) - 10);
        // Too small to pool, or too big for the free one: fresh buffers.
        assert!(pool.take(100).unwrap().pool.is_none());
        assert_ne!(pool.take(4 << 20).unwrap().as_slice().as_ptr(), ptr);
    }

    /// A large buffer's memory is committed as it is written: a declared body of 1 GiB costs
    /// nothing until its bytes come; and a size the system cannot map is `None`, not an abort.
    #[test]
    fn large_buffers_cost_memory_only_as_they_are_written() {
        let pool = BufPool::default();
        let mut buf = pool.take(1 << 30).unwrap();
        assert_eq!(buf.as_slice().as_ptr() as usize % ALIGN, 0);
        buf.as_mut_slice()[(1 << 30) - 1] = 9;
        assert_eq!(buf.as_slice()[0], 0);
        assert_eq!(buf.as_slice()[(1 << 30) - 1], 9);
        assert!(pool.take(usize::MAX / 2).is_none());
    }
}
