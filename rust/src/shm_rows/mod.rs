//! The data path of the shared-memory all-to-all (python/expertmesh/parallel/shm.py): rows
//! written into peers' receive slots, flags published and waited on, returned rows added up.
//!
//! Python maps one segment per rank (and owns the mappings); this works on their addresses so
//! one call does what took dozens of torch ops per destination (measured: a 1-token dispatch +
//! combine at R=2 spent ~470 us of ~660 us in those ops). Segment layout, as in shm.py:
//!
//! ```text
//! pids   i64 [R]            flags  i64 [P, R]   (flags[p, s] = seq + 1 once source s's call is in slot p)
//! counts i64 [P, R]         data   u8  [P, R, C, Wmax]
//! ```
//!
//! Stores become visible to the other processes in program order on x86 (TSO); the flag is
//! still written with `Release` and read with `Acquire`, so the ordering is the language's too.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::{CoreError, CoreResult};

mod layout;
#[cfg(test)]
mod tests;

use layout::check_source;
pub use layout::{RowSource, SegmentLayout};
#[cfg(test)]
pub(crate) use tests::ranks_in_process;

/// One rank's end of the shared-memory rows.
#[derive(Debug)]
pub struct ShmRows {
    /// Base address of every rank's segment, mapped by the caller for this object's lifetime.
    segments: Vec<usize>,
    /// What every segment holds where.
    layout: SegmentLayout,
    /// This rank.
    rank: usize,
    /// Process id of every rank, to tell a dead peer from a slow one.
    pids: Vec<i64>,
    /// How long one wait may last before it fails.
    timeout: Duration,
    /// Nanoseconds spent waiting for peers so far (the step breakdown's "wait").
    waited_ns: AtomicU64,
}

fn atomic(addr: usize) -> &'static AtomicI64 {
    // SAFETY: callers pass 8-aligned addresses inside a live mapping (ShmRows::new's contract).
    unsafe { &*(addr as *const AtomicI64) }
}

/// Whether process `pid` runs (a zombie counts as dead).
fn alive(pid: i64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            stat.rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

impl ShmRows {
    /// # Safety
    /// Every address must be the 8-aligned start of a mapping of `layout.bytes()` bytes that
    /// stays mapped (and is laid out as above) for as long as this object is used.
    pub unsafe fn new(
        segments: Vec<usize>,
        layout: SegmentLayout,
        rank: usize,
        pids: Vec<i64>,
        timeout: Duration,
    ) -> CoreResult<Self> {
        for (field, expected, got) in [
            ("segments", layout.world, segments.len()),
            ("pids", layout.world, pids.len()),
        ] {
            if got != expected {
                return Err(CoreError::LengthMismatch {
                    field,
                    expected,
                    got,
                });
            }
        }
        crate::error::check_in_range(|| "rank".into(), rank as i128, 0, layout.world as i128 - 1)?;
        if let Some(&addr) = segments.iter().find(|&&a| a % 8 != 0) {
            return Err(CoreError::out_of_range(
                "segment address",
                "a multiple of 8",
                addr as i128,
            ));
        }
        Ok(ShmRows {
            segments,
            layout,
            rank,
            pids,
            timeout,
            waited_ns: AtomicU64::new(0),
        })
    }

    /// The segment layout.
    pub fn layout(&self) -> SegmentLayout {
        self.layout
    }

    /// Write every destination's rows into its slot [phase, me], then publish the flags
    /// (`seq + 1`). With no sources only the counts travel (any values). Rows destined to rank r are sent rows offsets[r]..offsets[r+1], each the
    /// sources side by side; `packed` puts rows back to back instead of `max_row_bytes` apart.
    pub fn send(
        &self,
        phase: usize,
        seq: u64,
        sources: &[RowSource<'_>],
        send_counts: &[usize],
        packed: bool,
    ) -> CoreResult<()> {
        let l = &self.layout;
        self.check_phase(phase)?;
        if send_counts.len() != l.world {
            return Err(CoreError::LengthMismatch {
                field: "send_counts",
                expected: l.world,
                got: send_counts.len(),
            });
        }
        let width: usize = sources.iter().map(|s| s.width).sum();
        if width > l.max_row_bytes {
            return Err(CoreError::out_of_range(
                "row bytes",
                format!("<= max_row_bytes={}", l.max_row_bytes),
                width as i128,
            ));
        }
        // With no sources the counts are plain values (exchange_counts), not rows.
        if let Some(&most) = send_counts
            .iter()
            .max()
            .filter(|&&n| n > l.slot_rows && !sources.is_empty())
        {
            return Err(CoreError::out_of_range(
                "rows sent to one rank",
                format!("<= slot_rows={}", l.slot_rows),
                most as i128,
            ));
        }
        let total: usize = send_counts.iter().sum();
        for src in sources {
            check_source(src, total)?;
        }
        let pitch = if packed { width } else { l.max_row_bytes };
        let mut offsets = vec![0usize; l.world + 1];
        for (r, &n) in send_counts.iter().enumerate() {
            offsets[r + 1] = offsets[r] + n;
        }
        // Peers from the next rank on, me last: my rows to myself may be views of my own slots.
        for step in (1..=l.world).filter(|_| !sources.is_empty()) {
            let dest = (self.rank + step) % l.world;
            let slot = self.segments[dest] + l.slot(phase, self.rank);
            for j in offsets[dest]..offsets[dest + 1] {
                let mut at = slot + (j - offsets[dest]) * pitch;
                for src in sources {
                    let row = src.gather.map_or(j, |g| g[j] as usize);
                    // SAFETY: row < src.rows (check_source) and the slot holds slot_rows rows of
                    // max_row_bytes >= width (checked above); source and slot never overlap
                    // because a sent row is read from caller memory or another phase's slot.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            (src.base + row * src.stride) as *const u8,
                            at as *mut u8,
                            src.width,
                        );
                    }
                    at += src.width;
                }
            }
        }
        let counts: Vec<usize> = send_counts.to_vec();
        self.publish(phase, seq, &counts);
        Ok(())
    }

    /// Tell every destination how many rows of call `seq` it got, then raise its flag. Only
    /// once every row is out: inputs may be views of my slots (shm.py's module comment).
    pub(crate) fn publish(&self, phase: usize, seq: u64, send_counts: &[usize]) {
        let l = &self.layout;
        for (dest, &n) in send_counts.iter().enumerate() {
            atomic(self.segments[dest] + l.count(phase, self.rank))
                .store(n as i64, Ordering::Relaxed);
        }
        for dest in 0..l.world {
            atomic(self.segments[dest] + l.flag(phase, self.rank))
                .store(seq as i64 + 1, Ordering::Release);
        }
    }

    /// Seconds spent waiting for peers since this object was made.
    pub fn waited_s(&self) -> f64 {
        self.waited_ns.load(Ordering::Relaxed) as f64 * 1e-9
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Slot row of every received row, sources in rank order: source s's row r is s * C + r
    /// of the phase's [R * C] slot rows.
    pub fn received_rows(&self, counts: &[usize]) -> Vec<usize> {
        let cap = self.layout.slot_rows;
        counts
            .iter()
            .enumerate()
            .flat_map(|(s, &n)| (0..n).map(move |r| s * cap + r))
            .collect()
    }

    /// Address of slot row `row` (of [R * C], unpacked rows) of phase `phase` in my segment.
    pub(crate) fn slot_row_addr(&self, phase: usize, row: usize) -> usize {
        self.segments[self.rank] + self.layout.slot(phase, 0) + row * self.layout.max_row_bytes
    }

    /// Address of slot [phase, src] in rank `dest`'s segment.
    pub(crate) fn peer_slot_addr(&self, dest: usize, phase: usize, src: usize) -> usize {
        self.segments[dest] + self.layout.slot(phase, src)
    }

    /// Wait until every source's call `seq` is in my slot `phase`; the rows each one sent.
    /// Spins briefly, then yields (a peer sharing the core gets it), then naps; checks peers'
    /// pids twice a second and gives up after the timeout.
    pub fn wait(&self, phase: usize, seq: u64) -> CoreResult<Vec<usize>> {
        let l = &self.layout;
        self.check_phase(phase)?;
        let mine = self.segments[self.rank];
        let want = seq as i64 + 1;
        let ready = |s: usize| atomic(mine + l.flag(phase, s)).load(Ordering::Acquire) == want;
        let (start, mut last_check, mut spins) = (Instant::now(), Instant::now(), 0u32);
        let _count = WaitTimer {
            start,
            total: &self.waited_ns,
        };
        while !(0..l.world).all(ready) {
            spins += 1;
            if spins > 16 {
                if spins < 4096 {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
            if last_check.elapsed() > Duration::from_millis(500) {
                last_check = Instant::now();
                let missing: Vec<usize> = (0..l.world).filter(|&s| !ready(s)).collect();
                let dead: Vec<usize> = missing
                    .iter()
                    .copied()
                    .filter(|&s| !alive(self.pids[s]))
                    .collect();
                if !dead.is_empty() {
                    return Err(CoreError::PeerDied {
                        rank: self.rank,
                        peers: dead,
                        seq,
                    });
                }
                if start.elapsed() > self.timeout {
                    return Err(CoreError::PeerTimeout {
                        rank: self.rank,
                        peers: missing,
                        seconds: self.timeout.as_secs(),
                        seq,
                    });
                }
            }
        }
        Ok((0..l.world)
            .map(|s| atomic(mine + l.count(phase, s)).load(Ordering::Relaxed) as usize)
            .collect())
    }

    /// out[index[j]] += received row j (packed f32 rows of `cols`), sources in rank order and
    /// each source's rows in sent order: the order of additions index_add_ would use.
    pub fn add_rows_f32(
        &self,
        phase: usize,
        counts: &[usize],
        cols: usize,
        out: &mut [f32],
        index: &[i64],
    ) -> CoreResult<()> {
        let l = &self.layout;
        self.check_phase(phase)?;
        let total: usize = counts.iter().sum();
        if counts.len() != l.world || index.len() != total {
            return Err(CoreError::LengthMismatch {
                field: "index",
                expected: total,
                got: index.len(),
            });
        }
        if counts.iter().any(|&n| n > l.slot_rows)
            || cols * 4 * counts.iter().max().unwrap_or(&0) > l.slot_rows * l.max_row_bytes
        {
            return Err(CoreError::out_of_range(
                "rows received",
                format!("<= slot_rows={}", l.slot_rows),
                total as i128,
            ));
        }
        let out_rows = out.len() / cols.max(1);
        let mut j = 0;
        for (src, &n) in counts.iter().enumerate() {
            let slot = self.segments[self.rank] + l.slot(phase, src);
            for r in 0..n {
                let dst = index[j];
                if dst < 0 || dst as usize >= out_rows {
                    return Err(CoreError::out_of_range(
                        format!("index[{j}]"),
                        format!("in [0, {out_rows})"),
                        dst,
                    ));
                }
                let row = &mut out[dst as usize * cols..(dst as usize + 1) * cols];
                let at = (slot + r * cols * 4) as *const f32;
                for (c, o) in row.iter_mut().enumerate() {
                    // SAFETY: inside the slot (checked above); rows may be unaligned for f32.
                    *o += unsafe { at.add(c).read_unaligned() };
                }
                j += 1;
            }
        }
        Ok(())
    }

    fn check_phase(&self, phase: usize) -> CoreResult<()> {
        crate::error::check_in_range(
            || "phase".into(),
            phase as i128,
            0,
            self.layout.phases as i128 - 1,
        )
    }
}

/// Adds the time since `start` to `total` when dropped (every exit of a wait counts).
struct WaitTimer<'a> {
    /// When the wait began.
    start: Instant,
    /// Where the waited nanoseconds go.
    total: &'a AtomicU64,
}

impl Drop for WaitTimer<'_> {
    fn drop(&mut self) {
        self.total
            .fetch_add(self.start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}
