//! Listening sockets with an accept queue deep enough for a whole group joining at once.

use std::net::SocketAddr;

/// The accept queue asked for (the kernel caps it at `net.core.somaxconn`). Hundreds of workers
/// connect to the store and to one another at init; with std's and tokio's 128, a full queue
/// drops a connection's SYN, which its client sends again only after a second.
pub(crate) const BACKLOG: i32 = 4096;

/// A listening socket on `addr` with a [`BACKLOG`]-deep accept queue.
pub(crate) fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // As std does: a restarted group may bind its port again at once.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// [`listen`] for the async runtime (call inside it).
pub(crate) fn listen_async(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let listener = listen(addr)?;
    listener.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_connections_is_not_dropped() {
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        // More than the default queue of 128 (if the kernel allows as many), none accepted
        // yet: all must connect at once (a dropped SYN would wait a second for its retry).
        let cap = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(128);
        let clients: Vec<_> = (0..cap.min(300))
            .map(|i| {
                std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2))
                    .unwrap_or_else(|e| panic!("connection {i} was not taken in: {e}"))
            })
            .collect();
        for _ in &clients {
            listener.accept().unwrap();
        }
    }
}
