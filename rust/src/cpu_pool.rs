//! Where the core's CPU kernels run their parallel loops: on torch's own OpenMP threads when
//! Python has pointed us at the libgomp torch loaded (`use_openmp`), else on a rayon pool.
//!
//! Why not always rayon: after every torch op its OpenMP workers spin for a while before they
//! sleep, so a second pool's threads compete with them for the same cores. Measured on the
//! 2-core VM, one decode attention call (32 sequences x 166 keys) took 290 us alone and 750 us
//! when each call followed a small torch matmul; on torch's threads nothing competes.
//!
//! Tasks are claimed from an atomic counter, so which thread runs a task never changes what
//! the task computes: results are the same with any thread count or backend.

use std::ffi::{c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use rayon::{ThreadPool, ThreadPoolBuilder};

use crate::error::{CoreError, CoreResult};

/// `GOMP_parallel(fn, data, num_threads, flags)`: libgomp's entry for `#pragma omp parallel`.
type GompParallel = unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, u32, u32);

/// libgomp's parallel entry, once `use_openmp` found it.
static OPENMP: OnceLock<GompParallel> = OnceLock::new();

/// The rayon fallback pool and its size; rebuilt when a caller asks for another size.
static POOL: Mutex<Option<(usize, Arc<ThreadPool>)>> = Mutex::new(None);

/// Runs later parallel loops on the OpenMP runtime at `library`, which must already be loaded
/// in this process (torch's libgomp): the same threads torch's intra-op parallelism uses.
pub fn use_openmp(library: &str) -> CoreResult<()> {
    let not_loaded = || CoreError::Unavailable {
        what: format!("an already loaded OpenMP runtime at {library:?}"),
    };
    let path = CString::new(library).map_err(|_| not_loaded())?;
    // SAFETY: RTLD_NOLOAD only returns a handle to a library the process has loaded already;
    // the symbol is libgomp's documented ABI entry, with the signature of `GompParallel`.
    unsafe {
        let handle = libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
        if handle.is_null() {
            return Err(not_loaded());
        }
        let symbol = libc::dlsym(handle, c"GOMP_parallel".as_ptr());
        if symbol.is_null() {
            return Err(not_loaded());
        }
        let _ = OPENMP.set(std::mem::transmute::<*mut c_void, GompParallel>(symbol));
    }
    Ok(())
}

/// Whether parallel loops run on an OpenMP runtime (else on rayon).
pub fn uses_openmp() -> bool {
    OPENMP.get().is_some()
}

fn rayon_pool(threads: usize) -> Arc<ThreadPool> {
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

/// What every thread of an OpenMP team works through.
struct Team<'a> {
    /// The next unclaimed task.
    next: AtomicUsize,
    /// Tasks in all.
    tasks: usize,
    /// Set if a task panicked (a panic must not unwind through libgomp's frames).
    panicked: AtomicBool,
    /// The task body.
    body: &'a (dyn Fn(usize) + Sync),
}

extern "C" fn team_member(data: *mut c_void) {
    // SAFETY: `data` is the `Team` that `for_each_index` keeps alive until GOMP_parallel returns.
    let team = unsafe { &*(data as *const Team<'_>) };
    loop {
        let task = team.next.fetch_add(1, Ordering::Relaxed);
        if task >= team.tasks || team.panicked.load(Ordering::Relaxed) {
            return;
        }
        if catch_unwind(AssertUnwindSafe(|| (team.body)(task))).is_err() {
            team.panicked.store(true, Ordering::Relaxed);
        }
    }
}

/// Runs `body(i)` for every i in 0..tasks on up to `threads` threads (1: on this thread).
pub fn for_each_index(threads: usize, tasks: usize, body: &(dyn Fn(usize) + Sync)) {
    if threads <= 1 || tasks <= 1 {
        (0..tasks).for_each(body);
        return;
    }
    if let Some(parallel) = OPENMP.get() {
        let team = Team {
            next: AtomicUsize::new(0),
            tasks,
            panicked: AtomicBool::new(false),
            body,
        };
        // SAFETY: `team` outlives the call (GOMP_parallel returns once every member is done).
        unsafe {
            parallel(
                team_member,
                &team as *const Team<'_> as *mut c_void,
                threads.min(tasks) as u32,
                0,
            )
        };
        if team.panicked.load(Ordering::Relaxed) {
            panic!("a parallel CPU kernel task panicked");
        }
        return;
    }
    let next = AtomicUsize::new(0);
    rayon_pool(threads).broadcast(|_| loop {
        let task = next.fetch_add(1, Ordering::Relaxed);
        if task >= tasks {
            return;
        }
        body(task);
    });
}

/// A pointer that may cross threads: each index is handed to exactly one task.
struct Shared<T>(*mut T);
// SAFETY: `for_each_mut` gives every element to one task only, so no two threads alias one.
unsafe impl<T: Send> Sync for Shared<T> {}

/// Runs `body(i, &mut items[i])` for every item, in parallel as `for_each_index`.
pub fn for_each_mut<T: Send>(threads: usize, items: &mut [T], body: impl Fn(usize, &mut T) + Sync) {
    let base = Shared(items.as_mut_ptr());
    let base = &base;
    for_each_index(threads, items.len(), &|i| {
        // SAFETY: i < items.len(), and each i is claimed by exactly one task.
        body(i, unsafe { &mut *base.0.add(i) })
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_on_any_thread_count() {
        for threads in [1, 2, 5] {
            let mut hits = vec![0u32; 1000];
            for_each_mut(threads, &mut hits, |i, h| *h += i as u32 + 1);
            assert!(
                hits.iter().enumerate().all(|(i, &h)| h == i as u32 + 1),
                "threads {threads}"
            );
        }
    }

    #[test]
    fn an_unloaded_runtime_is_an_error_naming_it() {
        let err = use_openmp("/nonexistent/libgomp.so.1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/libgomp.so.1"), "{err}");
        assert!(!uses_openmp());
    }
}
