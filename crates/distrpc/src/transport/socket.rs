//! A plain TCP connection's socket, split so that its reading can be paused: while a thread
//! reads the connection itself ([`super::Claim`]), the peer's bytes must not also wake the
//! runtime's I/O thread for the reader task, which would only find the side claimed.
//!
//! ```text
//!  socket ─┬─ ReadHalf:  socket ∈ its own epoll set ─► runtime (readable)   pause / resume
//!          └─ WriteHalf: a dup of the socket ─────────► runtime (writable only)
//! ```
//!
//! The runtime's poller is woken for a socket by every event in the interest it registered;
//! tokio's `TcpStream` registers reading and writing together. So the write half registers a
//! duplicate descriptor for writability alone (an idle socket's arriving bytes do not concern
//! it), and the read half puts the socket in an epoll set of its own, registered with the
//! runtime: taking the socket's read interest out of that set (a claim) silences it, putting it
//! back wakes the reader if bytes came meanwhile.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// The reading side: the socket, in an epoll set the runtime watches.
pub(crate) struct ReadHalf {
    socket: OwnedFd,
    set: AsyncFd<OwnedFd>,
}

/// The writing side: a duplicate of the socket, registered for writability only. Dropping it
/// shuts the socket down for writing (the peer reads the end of the stream).
pub(crate) struct WriteHalf {
    dup: AsyncFd<OwnedFd>,
}

/// Splits a connected, non-blocking socket. Must run in the runtime (it registers both halves).
pub(crate) fn split(socket: OwnedFd) -> io::Result<(ReadHalf, WriteHalf)> {
    let dup = socket.try_clone()?;
    // SAFETY: epoll_create1 takes no pointers; a non-negative result is a descriptor we own.
    let set = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if set < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `set` was just opened and nothing else owns it.
    let set = unsafe { OwnedFd::from_raw_fd(set) };
    let read = ReadHalf {
        socket,
        set: register(set, Interest::READABLE)?,
    };
    read.control(libc::EPOLL_CTL_ADD, libc::EPOLLIN | libc::EPOLLRDHUP)?;
    let write = WriteHalf {
        dup: register(dup, Interest::WRITABLE)?,
    };
    Ok((read, write))
}

/// Registers `fd` with the runtime for `interest`.
fn register(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` is open, and stays the same descriptor, until the `AsyncFd` that
    // owns it drops it.
    Ok(unsafe { AsyncFd::register_with_interest(fd, interest) }?)
}

impl ReadHalf {
    pub(crate) fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    /// Waits until bytes may have come (or the stream ended) since the last wait. The caller
    /// then reads until the socket would block: each new arrival wakes a later wait.
    pub(crate) async fn readable(&self) -> io::Result<()> {
        let mut ready = self.set.readable().await?;
        ready.clear_ready();
        Ok(())
    }

    /// Stops waking [`ReadHalf::readable`] for new bytes (someone else reads them).
    pub(crate) fn pause(&self) {
        // Fails only if the socket left the set, which never happens while we own both.
        let _ = self.control(libc::EPOLL_CTL_MOD, 0);
    }

    /// Wakes [`ReadHalf::readable`] again, at once if bytes are waiting.
    pub(crate) fn resume(&self) {
        let _ = self.control(libc::EPOLL_CTL_MOD, libc::EPOLLIN | libc::EPOLLRDHUP);
    }

    fn control(&self, op: libc::c_int, events: libc::c_int) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: events as u32,
            u64: 0,
        };
        // SAFETY: both descriptors are open while `self` lives; `event` is a valid epoll_event.
        let r = unsafe { libc::epoll_ctl(self.set.as_raw_fd(), op, self.fd(), &mut event) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl WriteHalf {
    /// Writes what the socket takes now of `slices` (at most [`MAX_IOV`](libc::UIO_MAXIOV)
    /// of them); `WouldBlock` if nothing.
    pub(crate) fn try_write_vectored(&self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        sendmsg(self.dup.as_raw_fd(), slices)
    }

    /// Writes some of `slices`, waiting until the socket takes any.
    pub(crate) async fn write_vectored(&self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        loop {
            let mut ready = self.dup.writable().await?;
            match ready.try_io(|fd| sendmsg(fd.as_raw_fd(), slices)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }
}

impl Drop for WriteHalf {
    fn drop(&mut self) {
        // SAFETY: shuts down the open socket for writing; a failure (already shut) is harmless.
        unsafe { libc::shutdown(self.dup.as_raw_fd(), libc::SHUT_WR) };
    }
}

/// One `sendmsg` of `slices`, without SIGPIPE.
fn sendmsg(fd: RawFd, slices: &[IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: a zeroed msghdr is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // IoSlice is guaranteed ABI-compatible with iovec on Unix.
    msg.msg_iov = slices.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = slices.len() as _;
    // SAFETY: `msg` points at `slices`, which outlive the call; sendmsg only reads them.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// A runtime for sockets, and a connected TCP pair on 127.0.0.1: the peer (blocking) and ours
/// (non-blocking, to [`split`] inside the runtime).
#[cfg(test)]
pub(crate) fn test_pair() -> (tokio::runtime::Runtime, std::net::TcpStream, OwnedFd) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (ours, _) = listener.accept().unwrap();
    ours.set_nonblocking(true).unwrap();
    (runtime, peer, OwnedFd::from(ours))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// Whether the read half's epoll set (what the runtime watches) reports bytes now.
    fn reports_bytes(read: &ReadHalf) -> bool {
        let mut event = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: one valid epoll_event to fill, from an open epoll descriptor; no waiting.
        let n = unsafe { libc::epoll_wait(read.set.as_raw_fd(), &mut event, 1, 0) };
        n == 1
    }

    #[test]
    fn a_paused_read_half_does_not_report_bytes_until_resumed_and_the_write_half_shuts_down() {
        let (runtime, mut peer, ours) = test_pair();
        let _inside = runtime.enter();
        let (read, write) = split(ours).unwrap();

        assert!(!reports_bytes(&read));
        read.pause();
        peer.write_all(b"hello").unwrap();
        // The bytes are there (a blocking peek waits for them), but the set stays quiet.
        let mut peeked = [0u8; 5];
        // SAFETY: receives at most 5 bytes into a 5-byte buffer from an open socket.
        let n = unsafe {
            libc::recv(
                read.fd(),
                peeked.as_mut_ptr().cast(),
                5,
                libc::MSG_PEEK | libc::MSG_WAITALL,
            )
        };
        assert_eq!(n, 5);
        assert!(
            !reports_bytes(&read),
            "paused, the bytes must not wake the runtime"
        );
        read.resume();
        assert!(
            reports_bytes(&read),
            "resumed, waiting bytes wake it at once"
        );

        let parts = [IoSlice::new(b"wor"), IoSlice::new(b"ld")];
        let n = runtime.block_on(write.write_vectored(&parts)).unwrap();
        assert_eq!(n, 5);
        drop(write);
        let mut got = Vec::new();
        peer.read_to_end(&mut got).unwrap();
        assert_eq!(
            got, b"world",
            "the peer reads what was written, then the end"
        );
    }
}
