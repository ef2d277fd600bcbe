//! The pool that runs blocking (sync) handlers: torch's `ThreadPool(num_worker_threads)`, with one
//! difference that removes torch's nested-call deadlock.
//!
//! At most `size` handlers *run* at once. A handler that blocks waiting on a call of its own
//! (`rpc_sync` inside a handler) stops counting as running for as long as it waits, and if work is
//! queued the pool starts another thread to keep `size` handlers running. So nested calls never
//! starve the pool, however deep, and CPU-bound handlers are still bounded by `size`. Threads
//! start lazily; surplus threads exit once the blocked ones resume.
//!
//! One idle thread at a time waits by reading the connection the latest job's call came in on
//! ([`Origin::serve`]): the peer's next call is read and run by that thread, with no hand-off
//! from the connection's reader task (the others sleep on a condition variable).

use crate::sync::{Doorbell, lock};
use crate::transport::{IdleReaders, Origin};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

type Job = Box<dyn FnOnce() + Send>;

/// The most threads a pool runs, blocked ones included: nested calls cannot make a worker
/// start threads without bound.
pub(crate) const MAX_THREADS: usize = 512;

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    threads: usize,
    /// Threads waiting for a job: sleeping on `work`, or reading a connection.
    idle: usize,
    blocked: usize,
    closed: bool,
    /// How the idle threads wait (one reads the connection of the latest job's call).
    readers: IdleReaders,
}

/// How long an idle thread reads a connection before it looks again (it goes on if nothing
/// else came up).
const READ_SLICE: std::time::Duration = std::time::Duration::from_millis(100);

struct Shared {
    size: usize,
    name: String,
    state: Mutex<State>,
    work: Condvar,
    /// Wakes the thread that reads a connection (`None`: no thread does).
    bell: Option<Arc<Doorbell>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Threads that are not blocked in a nested wait.
    fn running(state: &State) -> usize {
        state.threads - state.blocked
    }

    /// Whether queued jobs outnumber the idle threads that will take them while the pool may
    /// still run another thread (never past [`MAX_THREADS`], blocked ones included: past it,
    /// jobs wait in the queue).
    fn short_of_threads(state: &State, size: usize) -> bool {
        state.jobs.len() > state.idle
            && Self::running(state) < size
            && state.threads < MAX_THREADS.max(size)
    }
}

/// A cheap handle to the pool.
#[derive(Clone)]
pub(crate) struct Pool {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("size", &self.shared.size)
            .finish()
    }
}

thread_local! {
    /// The pool this thread belongs to, if it is a pool thread.
    static CURRENT: RefCell<Option<Arc<Shared>>> = const { RefCell::new(None) };
}

impl Pool {
    pub(crate) fn new(size: usize, name: String) -> Self {
        Self {
            shared: Arc::new(Shared {
                size: size.max(1),
                name,
                state: Mutex::new(State::default()),
                work: Condvar::new(),
                bell: Doorbell::new().ok().map(Arc::new),
            }),
        }
    }

    /// Queues `job`, whose call came in on `origin`. Returns it back if the pool is closed.
    pub(crate) fn execute(&self, job: Job, origin: Option<Origin>) -> Result<(), Job> {
        let mut state = self.shared.lock();
        if state.closed {
            return Err(job);
        }
        state.jobs.push_back(job);
        let queued = state.jobs.len();
        let bell = self.shared.bell.as_deref();
        state
            .readers
            .arrived(origin, queued, bell, &self.shared.work);
        // Each idle thread takes one queued job; a woken thread still counts as idle until it
        // runs, so the jobs it cannot take are counted against `idle`, not `idle > 0`.
        if Shared::short_of_threads(&state, self.shared.size) {
            self.spawn(&mut state);
        }
        Ok(())
    }

    fn spawn(&self, state: &mut State) {
        let shared = self.shared.clone();
        let name = format!("{}-{}", shared.name, state.threads);
        if std::thread::Builder::new()
            .name(name)
            .spawn(move || worker(shared))
            .is_ok()
        {
            state.threads += 1;
        } else {
            tracing::error!(
                "could not start a handler thread; queued handlers wait for a free one"
            );
        }
    }

    /// Stops taking jobs; threads exit once the queue is empty.
    pub(crate) fn close(&self) {
        self.shared.lock().closed = true;
        self.shared.work.notify_all();
        if let Some(bell) = &self.shared.bell {
            bell.ring();
        }
    }

    /// Configured number of concurrently running handlers (`agent.thread_pool_size`).
    pub(crate) fn size(&self) -> usize {
        self.shared.size
    }

    /// Threads waiting for work (`agent.num_idle_threads`).
    pub(crate) fn idle(&self) -> usize {
        self.shared.lock().idle
    }
}

fn worker(shared: Arc<Shared>) {
    CURRENT.with(|c| *c.borrow_mut() = Some(shared.clone()));
    let mut state = shared.lock();
    loop {
        if let Some(job) = state.jobs.pop_front() {
            drop(state);
            // Jobs catch their handlers' panics; one that escapes anyway must not take the
            // thread (and so a slot of the pool) with it.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                tracing::error!("a handler job panicked");
            }
            state = shared.lock();
            continue;
        }
        // Leave if the pool is closed, or if this thread is surplus now that blocked threads
        // have resumed.
        if state.closed || Shared::running(&state) > shared.size {
            state.threads -= 1;
            drop(state);
            Origin::let_go();
            return;
        }
        state.idle += 1;
        if let Some(origin) = shared
            .bell
            .is_some()
            .then(|| state.readers.start_reading())
            .flatten()
        {
            let (read, again) = read_while_idle(&shared, state, &origin);
            state = again;
            // Jobs queued while it read rang a bell no one may hear now (it could not claim
            // the connection, or the slice ended): look at the queue again before sleeping.
            if read || !state.jobs.is_empty() || state.closed {
                state.idle -= 1;
                continue;
            }
        }
        if Origin::keeps() {
            // This thread kept the connection of the job it ran: others read it now.
            drop(state);
            Origin::let_go();
            state = shared.lock();
            state.idle -= 1;
            continue;
        }
        state.readers.asleep();
        state = shared.work.wait(state).unwrap_or_else(|e| e.into_inner());
        state.readers.awake();
        state.idle -= 1;
    }
}

/// An idle thread waits for its next job by reading the connection the latest one came in on
/// (see [`Origin::serve`]; it is the reading one of [`IdleReaders`]): the peer's next call is
/// read, queued and run by this thread, with no hand-off from the reader task's thread. Returns
/// whether it could read.
fn read_while_idle<'a>(
    shared: &'a Shared,
    state: std::sync::MutexGuard<'a, State>,
    origin: &Origin,
) -> (bool, std::sync::MutexGuard<'a, State>) {
    drop(state);
    let ready = || {
        let state = shared.lock();
        !state.jobs.is_empty() || state.closed
    };
    let read = shared
        .bell
        .as_ref()
        .is_some_and(|bell| origin.serve(&ready, std::time::Instant::now() + READ_SLICE, bell));
    let mut state = shared.lock();
    let queued = state.jobs.len();
    state.readers.stopped_reading(queued, &shared.work);
    (read, state)
}

/// Marks the current pool thread (if it is one) as blocked for the life of the guard, starting a
/// replacement thread if handlers are queued.
pub(crate) struct BlockedGuard(Option<Arc<Shared>>);

pub(crate) fn enter_blocking() -> BlockedGuard {
    // A connection this thread kept while running a call is read by others while it waits.
    Origin::let_go();
    let shared = CURRENT.with(|c| c.borrow().clone());
    if let Some(shared) = &shared {
        let pool = Pool {
            shared: shared.clone(),
        };
        let mut state = shared.lock();
        state.blocked += 1;
        if Shared::short_of_threads(&state, shared.size) {
            pool.spawn(&mut state);
        }
    }
    BlockedGuard(shared)
}

impl Drop for BlockedGuard {
    fn drop(&mut self) {
        if let Some(shared) = &self.0 {
            shared.lock().blocked -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn blocked_jobs_do_not_starve_the_pool() {
        let pool = Pool::new(1, "test".into());
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Arc::new(Mutex::new(release_rx));
        let (done_tx, done_rx) = mpsc::channel();
        // Four jobs that each block until released: with one thread they would deadlock unless
        // the pool adds threads for blocked ones.
        for _ in 0..4 {
            let rx = release_rx.clone();
            let done = done_tx.clone();
            let p = pool.clone();
            let _ = p.execute(
                Box::new(move || {
                    let _guard = enter_blocking();
                    rx.lock()
                        .unwrap()
                        .recv_timeout(Duration::from_secs(10))
                        .unwrap();
                    done.send(()).unwrap();
                }),
                None,
            );
        }
        // A fifth job must still run while the four wait.
        let (tx, rx) = mpsc::channel();
        let _ = pool.execute(Box::new(move || tx.send(()).unwrap()), None);
        rx.recv_timeout(Duration::from_secs(10))
            .expect("pool starved");
        for _ in 0..4 {
            release_tx.send(()).unwrap();
        }
        for _ in 0..4 {
            done_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        }
        pool.close();
    }

    /// However many jobs block, the pool runs at most MAX_THREADS threads; the rest wait in
    /// the queue and run once blocked ones finish.
    #[test]
    fn blocked_jobs_grow_the_pool_only_up_to_its_maximum() {
        let pool = Pool::new(1, "test".into());
        let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let (done_tx, done_rx) = mpsc::channel();
        let jobs = MAX_THREADS + 40;
        for _ in 0..jobs {
            let (gate, done) = (gate.clone(), done_tx.clone());
            let _ = pool.execute(
                Box::new(move || {
                    let _guard = enter_blocking();
                    let (open, cv) = &*gate;
                    let open = open.lock().unwrap();
                    let _ = cv.wait_timeout_while(open, Duration::from_secs(30), |o| !*o);
                    done.send(()).unwrap();
                }),
                None,
            );
        }
        // Threads start as jobs block: wait (bounded) until every running one is blocked.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while pool.shared.lock().blocked < MAX_THREADS && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let (threads, queued) = {
            let state = pool.shared.lock();
            (state.threads, state.jobs.len())
        };
        assert_eq!((threads, queued), (MAX_THREADS, 40), "{jobs} blocked jobs");
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        for _ in 0..jobs {
            done_rx.recv_timeout(Duration::from_secs(30)).unwrap();
        }
        pool.close();
    }
}
