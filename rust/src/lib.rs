//! smdm's Rust core. Pure-Rust modules (no pyo3 types) plus one thin `bindings` module that converts
//! types and errors for Python (`smdm._core`).
pub mod error;
pub mod litpkds;
pub mod mask;
pub mod pack;
pub mod pool;
pub mod rng;
pub mod sampler;
pub mod shard;
pub mod tokenize;

mod bindings;
