//! Python binding of the CPU token choice (`crate::sampler`): numpy in, numpy out, the rows run with the GIL
//! released.
use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::IntoPyObjectExt;

use crate::sampler::{choose_rows, Choice, Confidence};

fn column<'a>(name: &str, a: &'a PyReadonlyArray1<'_, i64>, rows: usize) -> PyResult<&'a [i64]> {
    let s = a.as_slice().map_err(|_| {
        PyValueError::new_err(format!(
            "choose_tokens: {name} must be a contiguous int64 array"
        ))
    })?;
    if s.len() != rows {
        return Err(PyValueError::new_err(format!(
            "choose_tokens: {name} has {} entries, logits has {rows} rows",
            s.len()
        )));
    }
    Ok(s)
}

/// choose_tokens(logits, seeds, steps, positions, temperature, confidence, top_k=0, top_p=1.0)
/// -> (tokens, confidence)
///
/// One token (int64) and its confidence (float32) per row of a C-contiguous float32 (N, V) array, with the
/// Gumbel noise of (seeds[n], steps[n], positions[n]) (int64 arrays of N entries); bit for bit
/// `smdm.kernels._reference.choose_tokens_reference`. `confidence`: "prob", "margin" or "entropy";
/// `top_k` <= 0 and `top_p` >= 1 filter nothing.
#[pyfunction]
#[pyo3(signature = (logits, seeds, steps, positions, temperature, confidence, top_k=0, top_p=1.0))]
#[allow(clippy::too_many_arguments)]
fn choose_tokens<'py>(
    py: Python<'py>,
    logits: PyReadonlyArray2<'py, f32>,
    seeds: PyReadonlyArray1<'py, i64>,
    steps: PyReadonlyArray1<'py, i64>,
    positions: PyReadonlyArray1<'py, i64>,
    temperature: f64,
    confidence: &str,
    top_k: i64,
    top_p: f64,
) -> PyResult<Py<PyAny>> {
    let conf = Confidence::parse(confidence).ok_or_else(|| {
        PyValueError::new_err(format!(
            "choose_tokens: confidence must be prob, margin or entropy, got {confidence:?}"
        ))
    })?;
    if !temperature.is_finite() || temperature < 0.0 {
        return Err(PyValueError::new_err(format!(
            "choose_tokens: temperature must be finite and >= 0, got {temperature}"
        )));
    }
    let [rows, vocab]: [usize; 2] = logits.shape().try_into().expect("2-D by type");
    if vocab == 0 {
        return Err(PyValueError::new_err(
            "choose_tokens: logits has no columns (vocab 0)",
        ));
    }
    // as_slice also takes a Fortran-ordered array (columns first), which would be read as the wrong rows
    let l = logits
        .as_slice()
        .ok()
        .filter(|_| logits.is_c_contiguous())
        .ok_or_else(|| {
            PyValueError::new_err("choose_tokens: logits must be a C-contiguous float32 array")
        })?;
    let (s, st, p) = (
        column("seeds", &seeds, rows)?,
        column("steps", &steps, rows)?,
        column("positions", &positions, rows)?,
    );
    let tokens: Bound<PyArray1<i64>> = super::zeros(py, &[rows])?;
    let confs: Bound<PyArray1<f32>> = super::zeros(py, &[rows])?;
    {
        let (mut tk, mut cf) = (tokens.readwrite(), confs.readwrite());
        let fresh = "fresh arrays are contiguous";
        let (tk, cf) = (
            tk.as_slice_mut().expect(fresh),
            cf.as_slice_mut().expect(fresh),
        );
        let choice = Choice {
            temperature: temperature as f32, // round to nearest, as the reference's np.float32(temperature)
            confidence: conf,
            top_k: top_k.max(0) as usize,
            top_p,
        };
        py.detach(|| choose_rows(l, vocab, s, st, p, &choice, tk, cf))?;
    }
    (tokens, confs).into_py_any(py)
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(choose_tokens, m)?)?;
    Ok(())
}
