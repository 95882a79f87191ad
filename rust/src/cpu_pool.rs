//! The worker threads of the core's CPU kernels: one rayon pool, sized by the caller (the
//! engine passes torch's intra-op thread count, which the rank's core binding set).
//!
//! Workers are started by the thread that first asks for a pool of that size, so they inherit
//! its CPU affinity; the binding code in Python re-pins every thread of the process anyway.

use std::sync::{Arc, Mutex};

use rayon::{ThreadPool, ThreadPoolBuilder};

/// The pool in use and its size; rebuilt when a caller asks for another size.
static POOL: Mutex<Option<(usize, Arc<ThreadPool>)>> = Mutex::new(None);

/// A pool of `threads` workers (>= 1), shared by every kernel call that asks for that size.
pub fn pool(threads: usize) -> Arc<ThreadPool> {
    let threads = threads.max(1);
    let mut slot = POOL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((size, pool)) = slot.as_ref() {
        if *size == threads {
            return Arc::clone(pool);
        }
    }
    let pool = Arc::new(
        ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("expertmesh-cpu-{i}"))
            .build()
            .expect("rayon cannot start its worker threads"),
    );
    *slot = Some((threads, Arc::clone(&pool)));
    pool
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_is_reused_per_size() {
        let a = pool(2);
        assert!(Arc::ptr_eq(&a, &pool(2)));
        assert_eq!(a.current_num_threads(), 2);
        assert_eq!(pool(3).current_num_threads(), 3);
        assert_eq!(pool(0).current_num_threads(), 1);
    }
}
