//! A small pool of I/O helper threads for large requests.
//!
//! A queue's worker thread owns the ring; when one batch of available
//! requests holds several large transfers, the worker hands all but its own
//! share to these helpers, processes the rest itself, then waits for the
//! helpers before it publishes the used entries. The worker therefore still
//! completes every request inside its event handler (queue stop needs no
//! extra synchronisation), while copies between the image and guest memory
//! run on several CPUs.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crate::request::Scratch;

type Task = Box<dyn FnOnce(&mut Scratch) + Send>;

struct Shared {
    state: Mutex<State>,
    cv: Condvar,
}

struct State {
    tasks: VecDeque<Task>,
    stop: bool,
}

/// The helper threads; stopped and joined on drop.
pub struct IoPool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl IoPool {
    /// Start `n` helper threads (`n == 0`: no helpers, [`IoPool::spawn`]
    /// must not be used).
    pub fn new(n: usize) -> std::io::Result<IoPool> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                tasks: VecDeque::new(),
                stop: false,
            }),
            cv: Condvar::new(),
        });
        let mut threads = Vec::new();
        for i in 0..n {
            let s = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("blk-io-{i}"))
                    .spawn(move || helper(&s))?,
            );
        }
        Ok(IoPool { shared, threads })
    }

    /// Queue a task for the helpers.
    pub fn spawn(&self, task: Task) {
        self.shared.state.lock().unwrap().tasks.push_back(task);
        self.shared.cv.notify_one();
    }

    /// Run one queued task on the calling thread, if any is left.
    pub fn run_one(&self, scratch: &mut Scratch) -> bool {
        let task = self.shared.state.lock().unwrap().tasks.pop_front();
        match task {
            Some(t) => {
                t(scratch);
                true
            }
            None => false,
        }
    }
}

fn helper(s: &Shared) {
    // The helpers do the workers' I/O: the same seccomp list (sandbox.rs).
    mic_backend_common::sandbox::enter(mic_backend_common::sandbox::ThreadKind::Worker);
    let mut scratch = Scratch::default();
    loop {
        let task = {
            let mut st = s.state.lock().unwrap();
            loop {
                if let Some(t) = st.tasks.pop_front() {
                    break t;
                }
                if st.stop {
                    return;
                }
                st = s.cv.wait(st).unwrap();
            }
        };
        task(&mut scratch);
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        self.shared.state.lock().unwrap().stop = true;
        self.shared.cv.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Completion tracking for the tasks of one batch.
pub struct Batch {
    state: Mutex<(Vec<(u16, u32)>, usize)>,
    cv: Condvar,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Arc<Batch> {
        Arc::new(Batch {
            state: Mutex::new((Vec::new(), 0)),
            cv: Condvar::new(),
        })
    }

    /// Count one more outstanding task.
    pub fn add(&self) {
        self.state.lock().unwrap().1 += 1;
    }

    /// Record a finished task's (head, used length).
    pub fn done(&self, head: u16, len: u32) {
        let mut st = self.state.lock().unwrap();
        st.0.push((head, len));
        st.1 -= 1;
        if st.1 == 0 {
            self.cv.notify_all();
        }
    }

    /// Wait until every task finished; returns the remaining results.
    pub fn wait(&self) -> Vec<(u16, u32)> {
        let mut st = self.state.lock().unwrap();
        while st.1 > 0 {
            st = self.cv.wait(st).unwrap();
        }
        std::mem::take(&mut st.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_run_and_batch_waits() {
        let pool = IoPool::new(2).unwrap();
        let batch = Batch::new();
        for i in 0..16u16 {
            batch.add();
            let b = batch.clone();
            pool.spawn(Box::new(move |_s| b.done(i, u32::from(i) * 2)));
        }
        let mut s = Scratch::default();
        while pool.run_one(&mut s) {}
        let mut all = batch.wait();
        all.sort();
        assert_eq!(all.len(), 16);
        assert_eq!(all[5], (5, 10));
    }
}
