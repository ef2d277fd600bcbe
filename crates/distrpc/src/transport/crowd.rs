//! Whether this host's CPUs are all taken, and how long a spin may last for it: a thread
//! spinning for a reply or a call ([`RpcOptions::spin_wait`](crate::RpcOptions::spin_wait))
//! keeps its virtual CPU from halting, so the frame it waits for is read at once and the work
//! after it runs on a warm CPU — while the CPU is not needed by other work.
//!
//! Two looks at the host, both cheap enough for every wait:
//! - **Busy workers** ([`budget`]): each distrpc process of this user on the host stamps, in a
//!   small shared board (`/dev/shm/distrpc-<uid>.spin`, one slot per process), when it last
//!   waited for a reply or a call (at most once every [`LOOK_AGAIN`]). While the processes
//!   that waited in the last [`BUSY_WINDOW`] fit the CPUs (a trainer and its parameter server;
//!   idle workers of the group do not count), a spin lasts all of `spin_wait`; while they
//!   outnumber the CPUs (four stages of a model on two), a [`CROWDED_SHARE`]th of it: there
//!   the spinning threads would take turns on the cores the work they wait for needs. MPI
//!   libraries make this choice once, at start, from the ranks placed on the node; the board
//!   makes it from the processes busy now.
//! - **Runnable threads** ([`Spin::going`]): a spin ends as soon as more threads are runnable
//!   than the host has CPUs (the runnable count of `/proc/loadavg`, spinning ones included):
//!   the spinning thread would take the core a woken thread needs.
//!
//! Without a board (no /dev/shm, a link in its place, 64 busy processes, a child forked after
//! the board was opened) a spin is the crowded one; where `/proc/loadavg` cannot be read, no
//! spin is ended by the count.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// A process that waited for a reply or a call within this window is busy.
const BUSY_WINDOW: Duration = Duration::from_millis(20);
/// A process stamps and counts the board at most this often (its waits in between take the
/// last count): the board's cache lines, written by every process, are not touched per wait.
const LOOK_AGAIN: Duration = Duration::from_millis(1);
/// On a host whose busy workers outnumber its CPUs, a spin lasts this share of `spin_wait`.
const CROWDED_SHARE: u32 = 10;
/// Processes a board has room for (a host with more busy ones is crowded anyway).
const SLOTS: usize = 64;

/// The host's board of busy workers: per slot, the pid owning it and when (`CLOCK_MONOTONIC`,
/// ns, which all processes of the host share) it last waited; shared memory, mapped by every
/// distrpc process of the user.
struct Board {
    words: &'static [AtomicU64],
    /// The process the slot is for: a child forked after the board was opened inherits the
    /// mapping and the slot, and stamps none (its waits are the crowded kind).
    me: u64,
    /// Its slot (none if the board was full).
    slot: Option<usize>,
    /// When this process last stamped and counted (ns), and the count then.
    looked: AtomicU64,
    counted: AtomicU64,
}

impl Board {
    /// The board in the file at `path` (made if missing), with a slot for process `me`.
    fn open(path: &std::path::Path, me: u64) -> Option<Board> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            // (/dev/shm is everyone's: a link planted there is not followed.)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .ok()?;
        let bytes = SLOTS * 2 * std::mem::size_of::<u64>();
        if file.metadata().ok()?.len() < bytes as u64 {
            file.set_len(bytes as u64).ok()?;
        }
        // SAFETY: a shared mapping of `bytes` bytes of a file at least that long, never
        // unmapped (it lives as long as the process); page-aligned, so the `u64`s are aligned,
        // and every access to them is atomic, from this process and the others.
        let words = unsafe {
            let at = libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
            );
            if at == libc::MAP_FAILED {
                return None;
            }
            std::slice::from_raw_parts(at.cast::<AtomicU64>(), SLOTS * 2)
        };
        let mut board = Board {
            words,
            me,
            slot: None,
            looked: AtomicU64::new(0),
            counted: AtomicU64::new(0),
        };
        board.slot = board.claim(me, alive);
        Some(board)
    }

    /// A slot for `me`: its own from before, or one whose owner is gone (`is_alive` says).
    fn claim(&self, me: u64, is_alive: impl Fn(u64) -> bool) -> Option<usize> {
        for slot in 0..SLOTS {
            let owner = &self.words[2 * slot];
            let held = owner.load(Ordering::Acquire);
            if held == me {
                return Some(slot);
            }
            if (held == 0 || !is_alive(held))
                && owner
                    .compare_exchange(held, me, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                self.words[2 * slot + 1].store(0, Ordering::Release);
                return Some(slot);
            }
        }
        None
    }

    /// Stamps this process busy at `now`; then how many processes are busy (this one too),
    /// which [`Board::recent`] gives until [`LOOK_AGAIN`] has passed.
    fn busy(&self, now: u64) -> usize {
        let Some(slot) = self.slot else {
            return usize::MAX; // no room on the board: a crowded host
        };
        self.words[2 * slot + 1].store(now, Ordering::Relaxed);
        let window = BUSY_WINDOW.as_nanos() as u64;
        let busy = (0..SLOTS)
            .filter(|&s| {
                self.words[2 * s].load(Ordering::Relaxed) != 0
                    && now.saturating_sub(self.words[2 * s + 1].load(Ordering::Relaxed)) < window
            })
            .count();
        self.counted.store(busy as u64, Ordering::Relaxed);
        self.looked.store(now, Ordering::Relaxed);
        busy
    }

    /// The last [`Board::busy`] count, if it was made less than [`LOOK_AGAIN`] before `now`.
    fn recent(&self, now: u64) -> Option<usize> {
        let looked = self.looked.load(Ordering::Relaxed);
        (looked != 0 && now.saturating_sub(looked) < LOOK_AGAIN.as_nanos() as u64)
            .then(|| self.counted.load(Ordering::Relaxed) as usize)
    }
}

/// Whether process `pid` exists (one that is not ours to signal exists too).
fn alive(pid: u64) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 || *libc::__errno_location() == libc::EPERM }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the same clock in every process of the host.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

static BOARD: OnceLock<Option<Board>> = OnceLock::new();

fn board() -> Option<&'static Board> {
    BOARD
        .get_or_init(|| {
            // SAFETY: getuid cannot fail.
            let uid = unsafe { libc::getuid() };
            let path = format!("/dev/shm/distrpc-{uid}.spin");
            Board::open(std::path::Path::new(&path), u64::from(std::process::id()))
        })
        .as_ref()
}

/// How long a wait that may spin for `spin` spins now: all of it while the host's busy distrpc
/// processes (this one, stamped busy by the call, among them) fit its CPUs, else a
/// [`CROWDED_SHARE`]th of it (see the module docs).
pub(crate) fn budget(spin: Duration) -> Duration {
    if spin.is_zero() {
        return spin; // no spin: nothing to stamp
    }
    let (Some(board), Some(host)) = (board(), host()) else {
        return spin / CROWDED_SHARE;
    };
    let now = monotonic_ns();
    let busy = match board.recent(now) {
        Some(busy) => busy,
        None if board.me == u64::from(std::process::id()) => board.busy(now),
        None => usize::MAX, // a child forked after the board was opened
    };
    share(spin, busy, host.cpus)
}

/// The spin of `spin` with `busy` busy processes on `cpus` CPUs.
fn share(spin: Duration, busy: usize, cpus: usize) -> Duration {
    if busy <= cpus {
        spin
    } else {
        spin / CROWDED_SHARE
    }
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

    fn scratch_board(name: &str, me: u64) -> Board {
        let path = std::env::temp_dir().join(format!("distrpc-{}-{name}.spin", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let board = Board::open(&path, me).expect("a board in the temporary directory");
        std::fs::remove_file(&path).unwrap();
        board
    }

    #[test]
    fn a_process_is_busy_for_a_window_after_it_began_to_spin() {
        let mut board = scratch_board("window", 7);
        assert_eq!(board.slot, Some(0));
        let second = board.claim(8, |_| true).unwrap();
        assert_eq!(
            board.claim(7, |_| true),
            Some(0),
            "a process keeps its slot"
        );
        let start = 1_000_000_000_000;
        assert_eq!(board.busy(start), 1, "the other has not spun");
        board.slot = Some(second);
        assert_eq!(board.busy(start + 1_000), 2);
        let window = BUSY_WINDOW.as_nanos() as u64;
        assert_eq!(
            board.busy(start + window),
            1,
            "the first one's stamp is out of the window"
        );
    }

    #[test]
    fn a_count_stands_for_a_millisecond() {
        let board = scratch_board("recent", 7);
        let start = 1_000_000_000_000;
        assert_eq!(board.recent(start), None, "never counted");
        assert_eq!(board.busy(start), 1);
        let again = LOOK_AGAIN.as_nanos() as u64;
        assert_eq!(board.recent(start + again - 1), Some(1));
        assert_eq!(
            board.recent(start + again),
            None,
            "counted again after a millisecond"
        );
    }

    #[test]
    fn the_slot_of_a_process_that_is_gone_is_taken_again() {
        let board = scratch_board("gone", 7);
        for pid in 8..(8 + SLOTS as u64 - 1) {
            assert!(board.claim(pid, |_| true).is_some());
        }
        assert_eq!(
            board.claim(1_000, |_| true),
            None,
            "full, every owner alive"
        );
        let taken = board.claim(1_000, |pid| pid != 9).expect("9 is gone");
        assert_eq!(board.words[2 * taken].load(Ordering::Relaxed), 1_000);
        assert_eq!(
            board
                .slot
                .map(|s| board.words[2 * s].load(Ordering::Relaxed)),
            Some(7)
        );
    }

    #[test]
    fn a_link_in_place_of_the_board_is_not_followed() {
        let dir = std::env::temp_dir();
        let target = dir.join(format!("distrpc-{}-target.spin", std::process::id()));
        let link = dir.join(format!("distrpc-{}-link.spin", std::process::id()));
        std::fs::write(&target, b"not a board").unwrap();
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let opened = Board::open(&link, 7);
        let untouched = std::fs::read(&target).unwrap();
        std::fs::remove_file(&link).unwrap();
        std::fs::remove_file(&target).unwrap();
        assert!(opened.is_none(), "the board was opened through a link");
        assert_eq!(untouched, b"not a board");
    }

    #[test]
    fn a_spin_lasts_all_of_spin_wait_while_the_busy_processes_fit_the_cpus() {
        let spin = Duration::from_millis(2);
        assert_eq!(share(spin, 1, 2), spin);
        assert_eq!(share(spin, 2, 2), spin);
        assert_eq!(share(spin, 3, 2), spin / CROWDED_SHARE);
        assert_eq!(share(spin, usize::MAX, 64), spin / CROWDED_SHARE);
    }

    #[test]
    fn this_process_has_a_slot_on_the_hosts_board() {
        assert!(alive(u64::from(std::process::id())));
        let board = board().expect("/dev/shm on Linux");
        assert!(board.slot.is_some() && board.me == u64::from(std::process::id()));
        let _ = budget(Duration::from_millis(2));
    }

    #[test]
    fn this_host_can_be_looked_at() {
        // Linux has /proc/loadavg: the look is a real one, whatever its answer.
        assert!(host().is_some());
        let _ = crowded();
    }
}
