//! expertmesh core: the parts of the engine that are pure bookkeeping and must be fast.
//!
//! - [`block_pool`]: paged KV blocks, reference counts, prefix cache with an LRU free queue
//!   (`free_queue`) per context-parallel rank; chained block hashes in [`block_hash`]; which
//!   rank holds each block of a sequence in [`kv_placement`].
//! - [`scheduler`]: continuous batching: admission ([`scheduler_config`] validates requests),
//!   `update` after sampling, finish/abort; the step itself (token budget, decodes first,
//!   chunked prefill, preemption) in `schedule_step`; the batch arrays in `scheduler_output`.
//! - [`kv_transfer`]: prefix blocks pinned for and imported from another engine
//!   (disaggregated prefill and decode).
//! - [`request`]: per-request state, plain data.
//! - [`routing`]: top-k expert choices -> expert-sorted order and per-rank send counts.
//! - [`a2a`]: expert-parallel dispatch/combine plans; [`a2a_buffers`]: worst-case buffer
//!   capacity and the double-buffer phase ring; [`shm_rows`]: the shared-memory all-to-all's
//!   data path (rows into peers' slots, flags, waits, adding returned rows); [`moe_exchange`]:
//!   dispatch and combine over it, one call each.
//! - [`paged_attention`]: CPU attention over the paged KV cache, read in place; what a work
//!   item is in [`attention_item`], its inner loop (tiles of keys, online softmax) in
//!   [`attention_tile`], its AVX-512 version in
//!   `attention_avx512`; worker threads in
//!   [`cpu_pool`].
//! - [`quant_linear`]: a linear layer with int8 or fp8 (e4m3, block scales) weights on the CPU.
//! - `py` (feature `python`): the PyO3 module `expertmesh._core` (rust/src/py/, one file per
//!   area); the only code using pyo3.

pub mod a2a;
pub mod a2a_buffers;
#[cfg(target_arch = "x86_64")]
pub mod attention_avx512;
pub mod attention_item;
pub mod attention_tile;
pub mod block_hash;
pub mod block_pool;
pub mod cpu_pool;
pub mod error;
mod free_queue;
pub mod kv_placement;
pub mod kv_transfer;
pub mod moe_exchange;
pub mod paged_attention;
pub mod quant_linear;
pub mod request;
pub mod routing;
mod schedule_step;
pub mod scheduler;
pub mod scheduler_config;
mod scheduler_output;
pub mod shm_rows;

#[cfg(feature = "python")]
mod py;

pub use a2a::{plan_dispatch, plan_receive, DispatchPlan, ReceivePlan};
pub use a2a_buffers::{A2aCapacity, PhaseHandle, PhaseRing};
pub use block_pool::{BlockHash, BlockId, BlockPool, KvPlacement};
pub use error::{CoreError, CoreResult};
pub use request::{FinishReason, Request, RequestStatus, StopConditions, TokenId};
pub use routing::{route, RoutingPlan};
pub use scheduler::{NewRequest, Scheduler, SchedulerConfig, SchedulerStats};
pub use scheduler_output::SchedulerOutput;
