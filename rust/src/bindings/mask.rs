//! Python binding of the forward process (`crate::mask`): numpy in, numpy out, no copies; the outputs
//! are allocated once here and filled by the pure-Rust core with the GIL released.
use numpy::{Element, PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray1, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::IntoPyObjectExt;

use super::zeros;
use crate::mask::{
    crop_length, forward_process_into, validate, ForwardConfig, ForwardOut, Schedule, TokenId,
};

fn run<'py, T: TokenId + Element>(
    py: Python<'py>,
    tokens: &Bound<'py, PyArray2<T>>,
    cfg: ForwardConfig,
    prompt_lens: Option<PyReadonlyArray1<'py, i64>>,
) -> PyResult<Py<PyAny>> {
    if !tokens.is_c_contiguous() {
        return Err(PyValueError::new_err(
            "forward_process: tokens must be a C-contiguous array (use numpy.ascontiguousarray)",
        ));
    }
    let src = tokens
        .try_readonly()
        .map_err(|e| PyValueError::new_err(format!("forward_process: tokens: {e}")))?;
    let src = src.as_slice().map_err(|_| {
        PyValueError::new_err("forward_process: tokens must be aligned and contiguous")
    })?;
    let pl = match &prompt_lens {
        Some(a) => Some(a.as_slice().map_err(|_| {
            PyValueError::new_err("forward_process: prompt_lens must be a contiguous int64 array")
        })?),
        None => None,
    };
    let [batch, seq_len]: [usize; 2] = tokens.shape().try_into().expect("2-D by type");
    validate(&cfg, batch, seq_len, src.len(), pl, T::MAX_ID, T::NAME)?; // before allocating the outputs
    let len = crop_length(cfg.seed, cfg.step, seq_len, cfg.crop_prob);
    // Zeroed (calloc) rather than uninitialised: a &mut [bool] over uninitialised bytes is UB, and
    // large callocs are fresh zero pages that cost no more than the first write.
    let noisy: Bound<PyArray2<T>> = zeros(py, &[batch, len])?;
    let mask: Bound<PyArray2<bool>> = zeros(py, &[batch, len])?;
    let weight: Bound<PyArray2<f32>> = zeros(py, &[batch, len])?;
    let t: Bound<PyArray1<f64>> = zeros(py, &[batch])?;
    let p: Bound<PyArray1<f64>> = zeros(py, &[batch])?;
    let uncond: Bound<PyArray1<bool>> = zeros(py, &[batch])?;
    {
        let (mut nz, mut mk, mut wt) = (noisy.readwrite(), mask.readwrite(), weight.readwrite());
        let (mut tt, mut pp, mut un) = (t.readwrite(), p.readwrite(), uncond.readwrite());
        let fresh = "fresh arrays are contiguous";
        let out = ForwardOut {
            noisy: nz.as_slice_mut().expect(fresh),
            mask: mk.as_slice_mut().expect(fresh),
            t: tt.as_slice_mut().expect(fresh),
            p: pp.as_slice_mut().expect(fresh),
            weight: wt.as_slice_mut().expect(fresh),
            uncond: un.as_slice_mut().expect(fresh),
        };
        py.detach(|| forward_process_into(&cfg, src, batch, seq_len, pl, out))?;
    }
    (noisy, mask, t, p, weight, len, uncond).into_py_any(py)
}

/// forward_process(tokens, *, seed, step, mask_id, sample_offset=0, global_batch=None, eps=1e-3,
/// stratified=False, prompt_lens=None, crop_prob=0.01, p_uncond=0.0, schedule="linear")
/// -> (noisy, mask, t, p, weight, length, uncond)
///
/// The forward process of docs/CONTRACTS.md over a C-contiguous (B, L) uint16/uint32/int64 array.
/// `noisy` has the dtype of `tokens`; `prompt_lens` is an int64 (B,) array; `schedule` is "linear",
/// "cosine" or "polynomial:P" (an unknown name is a ValueError naming it).
#[pyfunction]
#[pyo3(signature = (tokens, *, seed, step, mask_id, sample_offset=0, global_batch=None, eps=1e-3,
                    stratified=false, prompt_lens=None, crop_prob=0.01, p_uncond=0.0,
                    schedule="linear"))]
#[allow(clippy::too_many_arguments)]
fn forward_process<'py>(
    py: Python<'py>,
    tokens: &Bound<'py, PyAny>,
    seed: u64,
    step: u64,
    mask_id: u64,
    sample_offset: u64,
    global_batch: Option<u64>,
    eps: f64,
    stratified: bool,
    prompt_lens: Option<PyReadonlyArray1<'py, i64>>,
    crop_prob: f64,
    p_uncond: f64,
    schedule: &str,
) -> PyResult<Py<PyAny>> {
    let schedule = Schedule::parse(schedule)
        .map_err(|e| PyValueError::new_err(format!("forward_process: {e}")))?;
    let cfg = ForwardConfig {
        seed,
        step,
        sample_offset,
        global_batch,
        mask_id,
        eps,
        stratified,
        crop_prob,
        p_uncond,
        schedule,
    };
    if let Ok(a) = tokens.cast::<PyArray2<i64>>() {
        run(py, a, cfg, prompt_lens)
    } else if let Ok(a) = tokens.cast::<PyArray2<u16>>() {
        run(py, a, cfg, prompt_lens)
    } else if let Ok(a) = tokens.cast::<PyArray2<u32>>() {
        run(py, a, cfg, prompt_lens)
    } else {
        Err(PyValueError::new_err(
            "forward_process: tokens must be a 2-D numpy array of uint16, uint32 or int64 token ids",
        ))
    }
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(forward_process, m)?)?;
    Ok(())
}
