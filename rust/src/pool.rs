//! The crate's rayon thread pool, rebuilt in a forked child.
//!
//! rayon's global pool is built once per process. A child made by `fork` (a PyTorch DataLoader worker,
//! `multiprocessing` on Linux) inherits the parent's pool object but none of its threads, so the child's
//! first parallel call would queue its work for threads that do not exist and wait forever. Every parallel
//! section of the crate therefore runs inside [`install`], on a pool that belongs to the current process:
//! a pid that differs from the pool's builder means a fork, and a fresh pool is built. The parent's pool is
//! leaked in the child, not dropped: dropping would signal threads that are not there.
//!
//! rayon work started inside `install` (the `tokenizers` crate's own parallel loops included) runs on this
//! pool. Thread count: `RAYON_NUM_THREADS` when the pool is built, else every CPU (rayon's rule).
use crate::error::{Error, Result};
use rayon::{ThreadPool, ThreadPoolBuilder};
use std::sync::{Arc, Mutex};

static POOL: Mutex<Option<(u32, Arc<ThreadPool>)>> = Mutex::new(None);

/// This process's pool. The lock is never held while threads start, so a fork from another thread cannot
/// catch it held for long.
fn pool() -> Result<Arc<ThreadPool>> {
    let pid = std::process::id();
    {
        // A panic elsewhere cannot leave the Option half-written: take the value regardless of poisoning.
        let mut slot = POOL.lock().unwrap_or_else(|e| e.into_inner());
        match slot.as_ref() {
            Some((p, pool)) if *p == pid => return Ok(pool.clone()),
            Some(_) => std::mem::forget(slot.take()), // the parent's, in a forked child
            None => {}
        }
    }
    let fresh = Arc::new(
        ThreadPoolBuilder::new()
            .build()
            .map_err(|e| Error::Threads(e.to_string()))?,
    );
    let mut slot = POOL.lock().unwrap_or_else(|e| e.into_inner());
    match slot.as_ref() {
        Some((p, pool)) if *p == pid => Ok(pool.clone()), // another thread was first: use its pool
        _ => {
            *slot = Some((pid, fresh.clone()));
            Ok(fresh)
        }
    }
}

/// Run `f` on this process's pool (see the module docs). A pool that cannot be built (no thread can be
/// started) is `Error::Threads`, never a panic: rayon's global pool, the only other place `f`'s parallel
/// work could go, would fail the same way and panic.
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> Result<R> {
    Ok(pool()?.install(f))
}

/// The pool's thread count (what `rayon::current_num_threads` says inside `install`).
pub fn threads() -> Result<usize> {
    Ok(pool()?.current_num_threads())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn install_runs_parallel_work_on_one_pool() {
        let a = install(|| rayon::current_thread_index().is_some()).unwrap();
        assert!(a, "install runs f on a worker of the pool");
        let sum: u64 = install(|| (0..100_000u64).into_par_iter().sum()).unwrap();
        assert_eq!(sum, 100_000 * 99_999 / 2);
        assert_eq!(
            threads().unwrap(),
            install(rayon::current_num_threads).unwrap()
        );
        let p1 = pool().unwrap();
        let p2 = pool().unwrap();
        assert!(Arc::ptr_eq(&p1, &p2), "one pool per process");
    }
}
