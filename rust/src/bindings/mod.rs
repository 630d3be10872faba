//! The thin PyO3 layer: numpy buffers in/out without copies, GIL released for long work, and the one
//! mapping of `crate::error::Error` onto Python exceptions. Each submodule registers its functions.
use pyo3::create_exception;
use pyo3::exceptions::{PyMemoryError, PyOSError, PyValueError};
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
            Error::OutOfMemory(_) => PyMemoryError::new_err(e.to_string()),
            Error::Invalid(_) => PyValueError::new_err(e.to_string()),
            Error::Format { .. } | Error::Tokenizer { .. } => {
                SmdmFormatError::new_err(e.to_string())
            }
        }
    }
}

/// A new C-ordered numpy array of `shape`, zero-filled (`PyArray_Zeros`) or uninitialised (`PyArray_Empty`),
/// where memory running out is a MemoryError: rust-numpy's own constructors panic when numpy returns no
/// array, so this calls the same C API and checks the result.
fn new_array<'py, T: numpy::Element, D: numpy::ndarray::Dimension>(
    py: Python<'py>,
    shape: &[usize],
    zeroed: bool,
) -> PyResult<Bound<'py, numpy::PyArray<T, D>>> {
    use numpy::npyffi::{npy_intp, PY_ARRAY_API};
    use numpy::PyArrayDescrMethods;
    let mut dims = shape
        .iter()
        .map(|&d| npy_intp::try_from(d))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| PyMemoryError::new_err(format!("array shape {shape:?} is too large")))?;
    let descr = T::get_dtype(py).into_dtype_ptr();
    // SAFETY: dims holds shape.len() sizes; the call steals the descr reference and returns a new array
    // reference or NULL with a Python error set.
    let ptr = unsafe {
        if zeroed {
            PY_ARRAY_API.PyArray_Zeros(py, dims.len() as _, dims.as_mut_ptr(), descr, 0)
        } else {
            PY_ARRAY_API.PyArray_Empty(py, dims.len() as _, dims.as_mut_ptr(), descr, 0)
        }
    };
    // SAFETY: an owned reference (or NULL, turned into the error numpy set)
    let a = unsafe { Bound::from_owned_ptr_or_err(py, ptr) }?;
    Ok(a.cast_into::<numpy::PyArray<T, D>>()?)
}

fn zeros<'py, T: numpy::Element, D: numpy::ndarray::Dimension>(
    py: Python<'py>,
    shape: &[usize],
) -> PyResult<Bound<'py, numpy::PyArray<T, D>>> {
    new_array(py, shape, true)
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
