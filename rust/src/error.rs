//! The one error type of the crate. The bindings map it onto Python exceptions once
//! (`smdm.SmdmFormatError` is a ValueError, `smdm.SmdmIOError` an OSError).
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Malformed or inconsistent data: bad magic, version, dtype, checksum, token id, ...
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// Bad argument values passed by the caller (shapes, ranges).
    #[error("{0}")]
    Invalid(String),
    /// The operating system refused: unreadable file, disk full, ...
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Tokenizer load/encode/train failures.
    #[error("{path}: tokenizer error: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    /// Memory for an output could not be allocated (a shard larger than the free memory, ...).
    #[error("{0}")]
    OutOfMemory(String),
    /// The worker threads of the parallel sections could not be started (a process or thread limit).
    #[error(
        "cannot start the Rust core's worker threads: {0} (RAYON_NUM_THREADS=1 still needs one)"
    )]
    Threads(String),
}

impl Error {
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// An empty Vec with room for `n` elements, or `Error::OutOfMemory` naming `what` (Vec::with_capacity aborts
/// the whole process when the allocation fails).
pub fn try_vec<T>(n: usize, what: impl std::fmt::Display) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| {
        Error::OutOfMemory(format!(
            "cannot allocate {n} elements of {} bytes for {what}",
            std::mem::size_of::<T>()
        ))
    })?;
    Ok(v)
}

/// `items` collected into a Vec allocated with `try_vec` (collect() aborts when memory runs out).
pub fn try_collect<T>(
    items: impl ExactSizeIterator<Item = T>,
    what: impl std::fmt::Display,
) -> Result<Vec<T>> {
    let mut v = try_vec(items.len(), what)?;
    v.extend(items);
    Ok(v)
}
