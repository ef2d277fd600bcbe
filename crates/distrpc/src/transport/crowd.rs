//! Whether this host's CPUs are all taken: a thread spinning for a reply or a call
//! ([`RpcOptions::spin_wait`](crate::RpcOptions::spin_wait)) gives its core up as soon as more
//! threads are runnable than the host has CPUs — there, the spin takes the core that the work
//! it waits for (another worker on the host, its peer) needs. MPI libraries do the same on an
//! oversubscribed node, once at start; this looks while it spins, so that a group whose busy
//! workers fit the host (a trainer and its parameter server among idle ones) still spins.
//!
//! The count is the kernel's: the runnable threads of `/proc/loadavg` (spinning ones
//! included), against the CPUs this process may use. Where it cannot be read, never crowded.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How often a spinning thread looks again (a look costs about a microsecond).
const LOOK_EVERY: Duration = Duration::from_micros(20);

/// `/proc/loadavg`, open, and the CPUs to compare with.
struct Host {
    loadavg: File,
    cpus: usize,
}

static HOST: OnceLock<Option<Host>> = OnceLock::new();

fn host() -> Option<&'static Host> {
    HOST.get_or_init(|| {
        let loadavg = File::open("/proc/loadavg").ok()?;
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        Some(Host { loadavg, cpus })
    })
    .as_ref()
}

/// Whether more threads are runnable on this host now than it has CPUs.
pub(crate) fn crowded() -> bool {
    let Some(host) = host() else {
        return false;
    };
    let mut buf = [0u8; 128];
    let Ok(n) = host.loadavg.read_at(&mut buf, 0) else {
        return false;
    };
    runnable(&buf[..n]).is_some_and(|running| running > host.cpus)
}

/// The runnable threads of a `/proc/loadavg` line: `0.50 0.40 0.30 3/345 12345` → 3.
fn runnable(line: &[u8]) -> Option<usize> {
    let line = std::str::from_utf8(line).ok()?;
    let (running, _) = line.split_whitespace().nth(3)?.split_once('/')?;
    running.parse().ok()
}

/// A spin's end that moves closer once the host is crowded: [`Spin::going`] says whether to
/// go on spinning, looking at the host every [`LOOK_EVERY`].
pub(crate) struct Spin {
    until: Option<Instant>,
    next_look: Instant,
}

impl Spin {
    /// A spin of `spin` from now (none if `None`).
    pub(crate) fn new(spin: Option<Duration>) -> Self {
        let now = Instant::now();
        Self {
            until: spin.map(|spin| now + spin),
            next_look: now,
        }
    }

    /// Whether the spin goes on at `now`: not after its end, nor once the host was found
    /// crowded (then it ends for good).
    pub(crate) fn going(&mut self, now: Instant) -> bool {
        self.going_with(now, crowded)
    }

    /// [`Spin::going`], looking at the host with `crowded`.
    fn going_with(&mut self, now: Instant, crowded: impl Fn() -> bool) -> bool {
        if self.until.is_none_or(|t| now >= t) {
            return false;
        }
        if now >= self.next_look {
            if crowded() {
                self.until = None;
                return false;
            }
            self.next_look = now + LOOK_EVERY;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runnable_count_is_the_fourth_fields_first_half() {
        assert_eq!(runnable(b"0.50 0.40 0.30 3/345 12345\n"), Some(3));
        assert_eq!(runnable(b"1.75 1.66 1.53 12/81 22218"), Some(12));
        assert_eq!(runnable(b"0.50 0.40 0.30"), None);
        assert_eq!(runnable(b"0.50 0.40 0.30 x/345 1"), None);
        assert_eq!(runnable(b"\xff\xfe"), None);
    }

    #[test]
    fn a_spin_ends_at_its_end_or_for_good_once_the_host_is_crowded() {
        let start = Instant::now();
        let free = || false;
        let crowd = || true;
        assert!(!Spin::new(None).going_with(start, free), "no spin");
        let mut spin = Spin::new(Some(Duration::from_secs(3600)));
        assert!(spin.going_with(start, free));
        assert!(
            !spin.going_with(start + Duration::from_secs(7200), free),
            "past its end"
        );

        let mut spin = Spin::new(Some(Duration::from_secs(3600)));
        assert!(spin.going_with(start, free));
        // Between looks the host is not looked at.
        assert!(spin.going_with(spin.next_look - Duration::from_nanos(1), crowd));
        let look = spin.next_look;
        assert!(!spin.going_with(look, crowd), "crowded at the next look");
        assert!(!spin.going_with(look, free), "and it stays ended");
    }

    #[test]
    fn this_host_can_be_looked_at() {
        // Linux has /proc/loadavg: the look is a real one, whatever its answer.
        assert!(host().is_some());
        let _ = crowded();
    }
}
