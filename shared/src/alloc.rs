//! The allocator of every Herald binary (and of the tests and benches, which link this crate
//! too): mimalloc instead of glibc's malloc. Profiled at a paced 1k mutations/s, glibc's
//! `malloc`, `free` and their chunk consolidation took 15–20% of the gateway's and the action
//! worker's CPU: a service's work is many short-lived buffers (messages, JSON, HTTP heads) freed
//! on other threads than the ones that made them, which mimalloc's per-thread free lists serve
//! with far less bookkeeping.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
