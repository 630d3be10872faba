//! The thin PyO3 layer: numpy buffers in/out without copies, GIL released for long work, and the one
//! mapping of `crate::error::Error` onto Python exceptions. Each submodule registers its functions.
use pyo3::create_exception;
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;

use crate::error::Error;

mod data;
mod mask;
mod sampler;

create_exception!(
    _core,
    SmdmFormatError,
    PyValueError,
    "Malformed or inconsistent smdm data (names the file and offset)."
);
create_exception!(
    _core,
    SmdmIOError,
    PyOSError,
    "An I/O failure on an smdm file (names the file)."
);

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        match &e {
            Error::Io { .. } => SmdmIOError::new_err(e.to_string()),
            Error::Threads(_) => PyOSError::new_err(e.to_string()),
            Error::Invalid(_) => PyValueError::new_err(e.to_string()),
            Error::Format { .. } | Error::Tokenizer { .. } => {
                SmdmFormatError::new_err(e.to_string())
            }
        }
    }
}

#[pyfunction]
fn splitmix64(x: u64) -> u64 {
    crate::rng::splitmix64(x)
}

#[pyfunction]
fn rng_key(words: Vec<u64>) -> u64 {
    crate::rng::key(&words)
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("SmdmFormatError", m.py().get_type::<SmdmFormatError>())?;
    m.add("SmdmIOError", m.py().get_type::<SmdmIOError>())?;
    m.add_function(wrap_pyfunction!(splitmix64, m)?)?;
    m.add_function(wrap_pyfunction!(rng_key, m)?)?;
    data::register(m)?;
    mask::register(m)?;
    sampler::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
