//! The threads that run function calls, kept for reuse.
//!
//! A call runs on a thread of its own so that its caller can give up at the deadline while
//! the call is still being stopped (see [`super::runtime::FunctionRuntime::invoke`]). Starting
//! an OS thread per call cost a `clone3`, a stack mapping and Wasmer's per-thread signal stack
//! set-up every time; here a finished call's thread waits for the next one instead. A call
//! goes to an idle thread if there is one, else to a new thread, so a call that runs away past
//! its deadline never holds up the next. A thread idle for [`IDLE_EXIT`] ends.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// How long a thread waits for another call before it ends.
pub const IDLE_EXIT: Duration = Duration::from_secs(30);

type Job = Box<dyn FnOnce() + Send>;

/// An idle thread: its id, and where to send it a call.
struct Idle {
    id: u64,
    jobs: mpsc::Sender<Job>,
}

/// A cached pool of call threads (grows on demand, shrinks when idle).
#[derive(Default)]
pub struct CallThreads {
    idle: Arc<Mutex<IdleList>>,
}

#[derive(Default)]
struct IdleList {
    threads: Vec<Idle>,
    next_id: u64,
    started: u64,
}

impl std::fmt::Debug for CallThreads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = self.lock();
        f.debug_struct("CallThreads")
            .field("idle", &list.threads.len())
            .field("started", &list.started)
            .finish()
    }
}

impl CallThreads {
    fn lock(&self) -> std::sync::MutexGuard<'_, IdleList> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Threads started so far (for tests and diagnostics).
    pub fn started(&self) -> u64 {
        self.lock().started
    }

    /// Threads waiting for a call right now.
    pub fn idle(&self) -> usize {
        self.lock().threads.len()
    }

    /// Runs `job` on an idle thread, or on a new one named `meshwork-fn`.
    pub fn run(&self, job: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
        let mut job: Job = Box::new(job);
        loop {
            let idle = self.lock().threads.pop();
            let Some(idle) = idle else { break };
            match idle.jobs.send(job) {
                Ok(()) => return Ok(()),
                // That thread ended meanwhile (it panicked): try the next one.
                Err(mpsc::SendError(back)) => job = back,
            }
        }
        let id = {
            let mut list = self.lock();
            list.next_id += 1;
            list.started += 1;
            list.next_id
        };
        let (tx, rx) = mpsc::channel::<Job>();
        let list = self.idle.clone();
        let spawned = std::thread::Builder::new()
            .name("meshwork-fn".to_owned())
            .spawn(move || serve(id, job, tx, rx, list));
        if let Err(e) = spawned {
            self.lock().started -= 1;
            return Err(e);
        }
        Ok(())
    }
}

/// A call thread's life: run the first call, then offer itself for the next until idle for
/// [`IDLE_EXIT`].
fn serve(
    id: u64,
    first: Job,
    jobs_tx: mpsc::Sender<Job>,
    jobs: mpsc::Receiver<Job>,
    list: Arc<Mutex<IdleList>>,
) {
    let lock = || list.lock().unwrap_or_else(PoisonError::into_inner);
    first();
    loop {
        lock().threads.push(Idle {
            id,
            jobs: jobs_tx.clone(),
        });
        let job = match jobs.recv_timeout(IDLE_EXIT) {
            Ok(job) => job,
            Err(RecvTimeoutError::Timeout) => {
                let mut idle = lock();
                match idle.threads.iter().position(|t| t.id == id) {
                    Some(at) => {
                        idle.threads.swap_remove(at);
                        return;
                    }
                    // Taken off the list just now: its call is on the way.
                    None => {
                        drop(idle);
                        match jobs.recv() {
                            Ok(job) => job,
                            Err(_) => return,
                        }
                    }
                }
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        job();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;
    use std::time::Instant;

    fn wait_for(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::yield_now();
        }
    }

    #[test]
    fn sequential_calls_reuse_one_thread() {
        let pool = CallThreads::default();
        let mut names = Vec::new();
        for _ in 0..20 {
            let (tx, rx) = mpsc::channel();
            pool.run(move || {
                tx.send(std::thread::current().id()).unwrap();
            })
            .unwrap();
            names.push(rx.recv().unwrap());
            wait_for("the thread to be idle again", || pool.idle() == 1);
        }
        assert_eq!(pool.started(), 1);
        assert!(names.windows(2).all(|w| w[0] == w[1]));
    }

    #[test]
    fn a_busy_thread_never_delays_the_next_call() {
        let pool = CallThreads::default();
        let release = Arc::new(Barrier::new(2));
        let hold = release.clone();
        // A call that runs until released, like one past its deadline.
        pool.run(move || {
            hold.wait();
        })
        .unwrap();
        let (tx, rx) = mpsc::channel();
        pool.run(move || tx.send(()).unwrap()).unwrap();
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the second call ran while the first was busy");
        assert_eq!(pool.started(), 2);
        release.wait();
        wait_for("both threads idle", || pool.idle() == 2);
        // Both are reused from now on.
        for _ in 0..4 {
            let (tx, rx) = mpsc::channel();
            pool.run(move || tx.send(()).unwrap()).unwrap();
            rx.recv().unwrap();
        }
        assert_eq!(pool.started(), 2);
    }

    #[test]
    fn a_thread_whose_call_panicked_is_not_reused() {
        let pool = CallThreads::default();
        pool.run(|| panic!("call panicked (expected in this test)"))
            .unwrap();
        let (tx, rx) = mpsc::channel();
        pool.run(move || tx.send(()).unwrap()).unwrap();
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(pool.started(), 2);
    }
}
