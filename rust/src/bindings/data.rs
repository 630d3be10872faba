//! Python binding of the data core (`shard`, `litpkds`, `pack`, `tokenize`): numpy in and out, the GIL
//! released for every pass over data, errors mapped by `bindings::mod`.
use std::path::PathBuf;

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use pyo3::IntoPyObjectExt;

use crate::error::{try_collect, Error};
use crate::litpkds::{self, LitDtype, LitFile};
use crate::pack;
use crate::shard::{self, Dtype, Header, Shard, Tokens};
use crate::tokenize::Tok;

fn header_dict<'py>(py: Python<'py>, h: &Header) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("version", shard::VERSION)?;
    d.set_item("dtype", h.dtype.name())?;
    d.set_item("num_tokens", h.n_tokens)?;
    d.set_item("num_docs", h.n_docs)?;
    d.set_item("vocab_size", h.vocab_size)?;
    d.set_item("eos_id", h.eos_id)?;
    d.set_item("bos_id", h.bos_id)?;
    d.set_item("payload_crc32", h.payload_crc)?;
    Ok(d)
}

fn contiguous<'a, T: numpy::Element>(
    a: &'a PyReadonlyArray1<'_, T>,
    what: &str,
) -> PyResult<&'a [T]> {
    a.as_slice()
        .map_err(|_| PyValueError::new_err(format!("{what} must be a contiguous 1-D array")))
}

/// Write one smdm shard atomically; returns the header as a dict plus `file_crc32` and `file_bytes`.
/// `tokens` is a uint16 or uint32 array; it is stored in the dtype the vocabulary implies.
#[pyfunction]
#[pyo3(signature = (path, tokens, doc_starts, vocab_size, eos_id, bos_id=None))]
fn shard_write<'py>(
    py: Python<'py>,
    path: PathBuf,
    tokens: &Bound<'py, PyAny>,
    doc_starts: PyReadonlyArray1<'py, u64>,
    vocab_size: u32,
    eos_id: u32,
    bos_id: Option<u32>,
) -> PyResult<Bound<'py, PyDict>> {
    let starts = contiguous(&doc_starts, "doc_starts")?;
    let written = if let Ok(a) = tokens.cast::<PyArray1<u16>>() {
        let r = a.readonly();
        let t = contiguous(&r, "tokens")?;
        py.detach(|| shard::write_shard(&path, Tokens::U16(t), starts, vocab_size, eos_id, bos_id))?
    } else if let Ok(a) = tokens.cast::<PyArray1<u32>>() {
        let r = a.readonly();
        let t = contiguous(&r, "tokens")?;
        py.detach(|| shard::write_shard(&path, Tokens::U32(t), starts, vocab_size, eos_id, bos_id))?
    } else {
        return Err(PyValueError::new_err(
            "shard_write: tokens must be a 1-D numpy array of dtype uint16 or uint32",
        ));
    };
    let d = header_dict(py, &written.header)?;
    d.set_item("file_crc32", written.file_crc)?;
    d.set_item("file_bytes", written.file_len)?;
    Ok(d)
}

/// Header of a shard (checked: magic, version, dtype, header CRC, exact size). With `verify`, also the
/// payload CRC, document starts and token ids, and the dict gains `file_crc32`.
#[pyfunction]
#[pyo3(signature = (path, verify=true))]
fn shard_info<'py>(py: Python<'py>, path: PathBuf, verify: bool) -> PyResult<Bound<'py, PyDict>> {
    let (header, crc, len) = py.detach(|| -> Result<_, Error> {
        let s = Shard::open(&path)?;
        let crc = if verify {
            s.verify()?;
            Some(s.file_crc())
        } else {
            None
        };
        let len = s.header.file_len().unwrap_or(0);
        Ok((s.header, crc, len))
    })?;
    let d = header_dict(py, &header)?;
    if let Some(c) = crc {
        d.set_item("file_crc32", c)?;
    }
    d.set_item("file_bytes", len)?;
    Ok(d)
}

/// (header dict, tokens, document starts) as handed to Python.
type ShardArrays<'py> = (Bound<'py, PyDict>, Py<PyAny>, Bound<'py, PyArray1<u64>>);

/// Read a whole shard (verified): (header dict, tokens in the file's dtype, document starts uint64).
#[pyfunction]
#[pyo3(signature = (path, verify=true))]
fn shard_read<'py>(py: Python<'py>, path: PathBuf, verify: bool) -> PyResult<ShardArrays<'py>> {
    enum Toks {
        U16(Vec<u16>),
        U32(Vec<u32>),
    }
    let (header, toks, starts, crc) = py.detach(|| -> Result<_, Error> {
        let s = Shard::open(&path)?;
        let crc = if verify {
            s.verify()?;
            Some(s.file_crc())
        } else {
            None
        };
        let toks = match s.header.dtype {
            Dtype::U16 => Toks::U16(s.tokens()?),
            Dtype::U32 => Toks::U32(s.tokens()?),
        };
        Ok((s.header, toks, s.doc_starts()?, crc))
    })?;
    let arr = match toks {
        Toks::U16(v) => PyArray1::from_vec(py, v).into_py_any(py)?,
        Toks::U32(v) => PyArray1::from_vec(py, v).into_py_any(py)?,
    };
    let d = header_dict(py, &header)?;
    d.set_item("file_bytes", header.file_len().unwrap_or(0))?;
    if let Some(c) = crc {
        d.set_item("file_crc32", c)?;
    }
    Ok((d, arr, PyArray1::from_vec(py, starts)))
}

fn lit_dtype(code: u8) -> PyResult<LitDtype> {
    LitDtype::from_code(code).ok_or_else(|| {
        PyValueError::new_err(format!("LITPKDS dtype code must be 1..=8, got {code}"))
    })
}

/// Write one LITPKDS file holding exactly `tokens` (chunk_size = len(tokens)); returns the file's CRC-32.
#[pyfunction]
fn litpkds_write(
    py: Python<'_>,
    path: PathBuf,
    tokens: PyReadonlyArray1<'_, u32>,
    dtype_code: u8,
) -> PyResult<u32> {
    let dt = lit_dtype(dtype_code)?;
    let t = contiguous(&tokens, "tokens")?;
    Ok(py.detach(|| litpkds::write_file(&path, t, dt))?)
}

/// Read a LITPKDS file: (dtype code, chunk_size, items as a numpy array of the file's dtype).
#[pyfunction]
fn litpkds_read(py: Python<'_>, path: PathBuf) -> PyResult<(u8, u64, Py<PyAny>)> {
    let f = py.detach(|| LitFile::open(&path))?;
    let b = f.data();
    macro_rules! arr {
        ($t:ty, $n:expr) => {{
            let v: Vec<$t> = try_collect(
                b.chunks_exact($n).map(|c| {
                    let mut a = [0u8; $n];
                    a.copy_from_slice(c);
                    <$t>::from_le_bytes(a)
                }),
                format_args!("the items of {}", path.display()),
            )?;
            PyArray1::from_vec(py, v).into_py_any(py)?
        }};
    }
    let a = match f.header.dtype {
        LitDtype::U8 => arr!(u8, 1),
        LitDtype::I8 => arr!(i8, 1),
        LitDtype::I16 => arr!(i16, 2),
        LitDtype::U16 => arr!(u16, 2),
        LitDtype::I32 => arr!(i32, 4),
        LitDtype::I64 => arr!(i64, 8),
        LitDtype::F32 => arr!(f32, 4),
        LitDtype::F64 => arr!(f64, 8),
    };
    Ok((f.header.dtype.code(), f.header.chunk_size, a))
}

/// The items of a LITPKDS file as token ids (uint32), each checked to be an integer in [0, vocab_size).
#[pyfunction]
#[pyo3(signature = (path, vocab_size=None))]
fn litpkds_tokens<'py>(
    py: Python<'py>,
    path: PathBuf,
    vocab_size: Option<u32>,
) -> PyResult<Bound<'py, PyArray1<u32>>> {
    let v = py.detach(|| LitFile::open(&path)?.tokens_u32(vocab_size))?;
    Ok(PyArray1::from_vec(py, v))
}

fn stream_out<'py, I: pack::Id, T: pack::Item + numpy::Element>(
    py: Python<'py>,
    tokens: &[I],
    lengths: &[u64],
    eos_id: u32,
    vocab_size: u32,
) -> PyResult<(Py<PyAny>, Bound<'py, PyArray1<u64>>)> {
    let (starts, n) = pack::doc_starts(lengths, tokens.len())?;
    // Uninitialised (malloc, not calloc): a reused heap block is not zeroed first, and every element is
    // written below through `MaybeUninit` before Python can see the array.
    let out: Bound<PyArray1<T>> = super::new_array(py, &[n], false)?; // fresh, owned, C-contiguous
    {
        // SAFETY: `out` is ours alone (not yet shared with Python); viewed as MaybeUninit, never read.
        let o = unsafe {
            std::slice::from_raw_parts_mut(out.data() as *mut std::mem::MaybeUninit<T>, n)
        };
        py.detach(|| pack::pack_into(tokens, lengths, eos_id, vocab_size, o))?;
    }
    Ok((out.into_py_any(py)?, PyArray1::from_vec(py, starts)))
}

fn pack_any<'py, I: pack::Id + numpy::Element>(
    py: Python<'py>,
    tokens: &Bound<'py, PyArray1<I>>,
    lengths: &[u64],
    eos_id: u32,
    vocab_size: u32,
) -> PyResult<(Py<PyAny>, Bound<'py, PyArray1<u64>>)> {
    let r = tokens.readonly();
    let t = contiguous(&r, "tokens")?;
    match Dtype::for_vocab(vocab_size) {
        Dtype::U16 => stream_out::<I, u16>(py, t, lengths, eos_id, vocab_size),
        Dtype::U32 => stream_out::<I, u32>(py, t, lengths, eos_id, vocab_size),
    }
}

/// Pack documents: `tokens` (uint16 or uint32, the documents concatenated) and `lengths` (uint64 per
/// document) -> (stream with an EOS after each document, in uint16 if vocab_size < 65536 else uint32;
/// document starts uint64).
#[pyfunction]
fn pack_documents<'py>(
    py: Python<'py>,
    tokens: &Bound<'py, PyAny>,
    lengths: PyReadonlyArray1<'py, u64>,
    eos_id: u32,
    vocab_size: u32,
) -> PyResult<(Py<PyAny>, Bound<'py, PyArray1<u64>>)> {
    // A copy (8 bytes per document): the lengths are read twice, once to size and check the output and once
    // to fill it, and another Python thread may write to the array while the GIL is released; the output is
    // uninitialised memory, so both reads must see the same lengths.
    let l = contiguous(&lengths, "lengths")?.to_vec();
    if let Ok(a) = tokens.cast::<PyArray1<u16>>() {
        pack_any(py, a, &l, eos_id, vocab_size)
    } else if let Ok(a) = tokens.cast::<PyArray1<u32>>() {
        pack_any(py, a, &l, eos_id, vocab_size)
    } else {
        Err(PyValueError::new_err(
            "pack_documents: tokens must be a 1-D numpy array of dtype uint16 or uint32",
        ))
    }
}

/// A tokenizer for `smdm prepare` (the `tokenizers` crate), encoding in parallel with the GIL released.
#[pyclass(frozen, name = "Tokenizer", module = "smdm._core")]
struct PyTokenizer {
    tok: Tok,
}

#[pymethods]
impl PyTokenizer {
    /// Load a tokenizer.json; `eos_token` names the EOS token (default: the first of the usual names).
    #[staticmethod]
    #[pyo3(signature = (path, eos_token=None))]
    fn from_file(py: Python<'_>, path: PathBuf, eos_token: Option<String>) -> PyResult<Self> {
        let tok = py.detach(|| Tok::from_file(&path, eos_token.as_deref()))?;
        Ok(PyTokenizer { tok })
    }

    /// Train a byte-level BPE tokenizer of `vocab_size` ids on `texts` (EOS `<|endoftext|>` = 0).
    #[staticmethod]
    fn train_bpe(py: Python<'_>, texts: Vec<String>, vocab_size: u32) -> PyResult<Self> {
        let tok = py.detach(|| {
            let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
            Tok::train_bpe(&refs, vocab_size)
        })?;
        Ok(PyTokenizer { tok })
    }

    #[getter]
    fn vocab_size(&self) -> u32 {
        self.tok.vocab_size
    }
    #[getter]
    fn eos_id(&self) -> u32 {
        self.tok.eos_id
    }
    #[getter]
    fn bos_id(&self) -> Option<u32> {
        self.tok.bos_id
    }

    /// The tokenizer.json text.
    fn to_json(&self) -> PyResult<String> {
        Ok(self.tok.to_json()?)
    }

    /// Ids of each text, without special tokens (parallel).
    fn encode(&self, py: Python<'_>, texts: Vec<String>) -> PyResult<Vec<Vec<u32>>> {
        Ok(py.detach(|| {
            let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
            self.tok.encode_docs(&refs)
        })?)
    }

    /// Encode and pack: (stream = ids + [EOS] per text, uint16/uint32 by vocabulary; doc starts uint64).
    fn encode_pack<'py>(
        &self,
        py: Python<'py>,
        texts: Vec<String>,
    ) -> PyResult<(Py<PyAny>, Bound<'py, PyArray1<u64>>)> {
        let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
        let tok = &self.tok;
        let starts;
        let arr = match Dtype::for_vocab(tok.vocab_size) {
            Dtype::U16 => {
                let (s, st) = py.detach(|| tok.encode_pack::<u16>(&refs))?;
                starts = st;
                PyArray1::from_vec(py, s).into_py_any(py)?
            }
            Dtype::U32 => {
                let (s, st) = py.detach(|| tok.encode_pack::<u32>(&refs))?;
                starts = st;
                PyArray1::from_vec(py, s).into_py_any(py)?
            }
        };
        Ok((arr, PyArray1::from_vec(py, starts)))
    }

    fn decode(&self, ids: Vec<u32>) -> PyResult<String> {
        let tok = &self.tok;
        Ok(crate::tokenize::guard(&tok.path, "decoding", || {
            tok.inner
                .decode(&ids, false)
                .map_err(|e| Error::Invalid(format!("decode failed: {e}")))
        })?)
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(shard_write, m)?)?;
    m.add_function(wrap_pyfunction!(shard_info, m)?)?;
    m.add_function(wrap_pyfunction!(shard_read, m)?)?;
    m.add_function(wrap_pyfunction!(litpkds_write, m)?)?;
    m.add_function(wrap_pyfunction!(litpkds_read, m)?)?;
    m.add_function(wrap_pyfunction!(litpkds_tokens, m)?)?;
    m.add_function(wrap_pyfunction!(pack_documents, m)?)?;
    m.add_class::<PyTokenizer>()?;
    m.add("SHARD_HEADER_LEN", shard::HEADER_LEN)?;
    m.add("LITPKDS_HEADER_LEN", litpkds::HEADER_LEN)?;
    Ok(())
}
