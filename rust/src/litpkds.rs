//! The lit-gpt / TinyLlama `LITPKDS` packed-dataset format (what SMDM's data is stored in).
//!
//! ```text
//! offset size  field (little-endian)
//!      0    7  magic b"LITPKDS"
//!      7    8  u64 version = 1
//!     15    1  u8 dtype code: 1 u8, 2 i8, 3 i16, 4 i32, 5 i64, 6 f32, 7 f64, 8 u16
//!     16    8  u64 chunk_size (number of items that follow)
//!     24       chunk_size items, C order
//! ```
//!
//! lit-gpt's `PackedDatasetBuilder` fills every chunk to exactly `chunk_size` tokens, padding the last
//! one with its separator token, and names files `{prefix}_{counter:010d}.bin`; `write_chunks` does the
//! same (except that it never writes a chunk made only of padding). The format has no checksum and no
//! document table: document starts are the positions after each EOS.
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{try_vec, Error, Result};
use crate::shard::{bad_token_msg, map_with_header, write_atomic};

pub const MAGIC: &[u8; 7] = b"LITPKDS";
pub const VERSION: u64 = 1;
pub const HEADER_LEN: usize = 24;

/// The item type, by its lit-gpt code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LitDtype {
    U8 = 1,
    I8 = 2,
    I16 = 3,
    I32 = 4,
    I64 = 5,
    F32 = 6,
    F64 = 7,
    U16 = 8,
}

impl LitDtype {
    pub fn from_code(c: u8) -> Option<LitDtype> {
        Some(match c {
            1 => LitDtype::U8,
            2 => LitDtype::I8,
            3 => LitDtype::I16,
            4 => LitDtype::I32,
            5 => LitDtype::I64,
            6 => LitDtype::F32,
            7 => LitDtype::F64,
            8 => LitDtype::U16,
            _ => return None,
        })
    }
    pub fn code(self) -> u8 {
        self as u8
    }
    pub fn itemsize(self) -> usize {
        match self {
            LitDtype::U8 | LitDtype::I8 => 1,
            LitDtype::I16 | LitDtype::U16 => 2,
            LitDtype::I32 | LitDtype::F32 => 4,
            LitDtype::I64 | LitDtype::F64 => 8,
        }
    }
    /// lit-gpt's `dtype="auto"` rule: uint16 below 65500 ids, else int32.
    pub fn for_vocab(vocab_size: u32) -> LitDtype {
        if vocab_size < 65500 {
            LitDtype::U16
        } else {
            LitDtype::I32
        }
    }
    /// Largest id this integer type holds (None for floats, which cannot hold token ids exactly).
    fn max_id(self) -> Option<u64> {
        match self {
            LitDtype::U8 => Some(u8::MAX as u64),
            LitDtype::I8 => Some(i8::MAX as u64),
            LitDtype::I16 => Some(i16::MAX as u64),
            LitDtype::U16 => Some(u16::MAX as u64),
            LitDtype::I32 => Some(i32::MAX as u64),
            LitDtype::I64 => Some(i64::MAX as u64),
            LitDtype::F32 | LitDtype::F64 => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LitHeader {
    pub dtype: LitDtype,
    pub chunk_size: u64,
}

impl LitHeader {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..7].copy_from_slice(MAGIC);
        h[7..15].copy_from_slice(&VERSION.to_le_bytes());
        h[15] = self.dtype.code();
        h[16..24].copy_from_slice(&self.chunk_size.to_le_bytes());
        h
    }

    pub fn decode(path: &Path, b: &[u8]) -> Result<LitHeader> {
        if b.len() < HEADER_LEN {
            return Err(Error::format(
                path,
                format!(
                    "truncated: {} bytes, shorter than the {HEADER_LEN}-byte LITPKDS header",
                    b.len()
                ),
            ));
        }
        if &b[0..7] != MAGIC {
            return Err(Error::format(
                path,
                format!(
                    "bad magic at offset 0: {:?}, expected \"LITPKDS\"",
                    String::from_utf8_lossy(&b[0..7])
                ),
            ));
        }
        let mut v = [0u8; 8];
        v.copy_from_slice(&b[7..15]);
        let version = u64::from_le_bytes(v);
        if version != VERSION {
            return Err(Error::format(
                path,
                format!("unsupported LITPKDS version {version} at offset 7 (expected 1)"),
            ));
        }
        let dtype = LitDtype::from_code(b[15]).ok_or_else(|| {
            Error::format(
                path,
                format!("bad dtype code {} at offset 15 (expected 1..=8)", b[15]),
            )
        })?;
        let mut c = [0u8; 8];
        c.copy_from_slice(&b[16..24]);
        Ok(LitHeader {
            dtype,
            chunk_size: u64::from_le_bytes(c),
        })
    }

    pub fn file_len(&self) -> Option<u64> {
        self.chunk_size
            .checked_mul(self.dtype.itemsize() as u64)?
            .checked_add(HEADER_LEN as u64)
    }
}

/// A memory-mapped LITPKDS file with a checked header and exact length.
pub struct LitFile {
    pub path: PathBuf,
    pub header: LitHeader,
    map: Option<Mmap>,
}

impl LitFile {
    pub fn open(path: &Path) -> Result<LitFile> {
        let (map, len) = map_with_header(path, HEADER_LEN, "LITPKDS")?;
        let header = LitHeader::decode(path, &map[..HEADER_LEN])?;
        let want = header.file_len().ok_or_else(|| {
            Error::format(
                path,
                format!(
                    "chunk_size {} at offset 16 is impossible",
                    header.chunk_size
                ),
            )
        })?;
        if len != want {
            return Err(Error::format(
                path,
                format!(
                    "{}: {len} bytes, but chunk_size {} (offset 16) of {}-byte items implies {want}",
                    if len < want { "truncated" } else { "trailing bytes" },
                    header.chunk_size,
                    header.dtype.itemsize()
                ),
            ));
        }
        Ok(LitFile {
            path: path.to_path_buf(),
            header,
            map: Some(map),
        })
    }

    /// The raw item bytes (little-endian, C order).
    pub fn data(&self) -> &[u8] {
        &self.map.as_deref().unwrap_or(&[])[HEADER_LEN..]
    }

    /// The items as token ids, each checked to be a non-negative integer < vocab_size (if given).
    pub fn tokens_u32(&self, vocab_size: Option<u32>) -> Result<Vec<u32>> {
        let dt = self.header.dtype;
        if dt.max_id().is_none() {
            return Err(Error::format(
                &self.path,
                format!(
                    "dtype code {} (offset 15) is a float type; token ids must be integers",
                    dt.code()
                ),
            ));
        }
        let isz = dt.itemsize();
        let limit = vocab_size
            .map(|v| v as i128)
            .unwrap_or(u32::MAX as i128 + 1);
        let mut out = try_vec(
            self.data().len() / isz,
            format_args!("the tokens of {}", self.path.display()),
        )?;
        for (i, c) in self.data().chunks_exact(isz).enumerate() {
            let v: i128 = match dt {
                LitDtype::U8 => c[0] as i128,
                LitDtype::I8 => c[0] as i8 as i128,
                LitDtype::I16 => i16::from_le_bytes([c[0], c[1]]) as i128,
                LitDtype::U16 => u16::from_le_bytes([c[0], c[1]]) as i128,
                LitDtype::I32 => i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i128,
                LitDtype::I64 => {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(c);
                    i64::from_le_bytes(a) as i128
                }
                LitDtype::F32 | LitDtype::F64 => unreachable!("floats rejected above"),
            };
            if v < 0 || v >= limit {
                let at = (HEADER_LEN + i * isz) as u64;
                let msg = match vocab_size {
                    Some(vs) if v >= 0 => bad_token_msg(v as u64, i as u64, at, vs),
                    _ => format!("token id {v} at token {i} (byte offset {at}) is not a valid id"),
                };
                return Err(Error::format(&self.path, msg));
            }
            out.push(v as u32);
        }
        Ok(out)
    }
}

/// Encode ids into LITPKDS item bytes of an integer dtype (error if an id does not fit).
pub fn encode_items(path: &Path, tokens: &[u32], dtype: LitDtype) -> Result<Vec<u8>> {
    let max = dtype.max_id().ok_or_else(|| {
        Error::Invalid(format!(
            "{}: LITPKDS dtype code {} is a float type; write token ids with an integer dtype",
            path.display(),
            dtype.code()
        ))
    })?;
    if let Some(i) = tokens.iter().position(|&t| t as u64 > max) {
        return Err(Error::Invalid(format!(
            "{}: token id {} at token {i} does not fit LITPKDS dtype code {}",
            path.display(),
            tokens[i],
            dtype.code()
        )));
    }
    let mut out = Vec::with_capacity(tokens.len() * dtype.itemsize());
    for &t in tokens {
        match dtype {
            LitDtype::U8 | LitDtype::I8 => out.push(t as u8),
            LitDtype::I16 | LitDtype::U16 => out.extend_from_slice(&(t as u16).to_le_bytes()),
            LitDtype::I32 => out.extend_from_slice(&t.to_le_bytes()),
            LitDtype::I64 => out.extend_from_slice(&(t as u64).to_le_bytes()),
            LitDtype::F32 | LitDtype::F64 => unreachable!("floats rejected above"),
        }
    }
    Ok(out)
}

/// Write one LITPKDS file holding exactly `tokens` (chunk_size = tokens.len()), atomically.
/// Returns the CRC-32 of the whole file.
pub fn write_file(path: &Path, tokens: &[u32], dtype: LitDtype) -> Result<u32> {
    let body = encode_items(path, tokens, dtype)?;
    let h = LitHeader {
        dtype,
        chunk_size: tokens.len() as u64,
    }
    .encode();
    write_atomic(path, &[&h, &body])?;
    let mut c = crc32fast::Hasher::new();
    c.update(&h);
    c.update(&body);
    Ok(c.finalize())
}

/// lit-gpt's builder over a whole stream: cut into chunks of `chunk_size`, pad the last with `pad`, write
/// `{dir}/{prefix}_{counter:010}.bin` starting at `first_counter`. Returns (path, file CRC-32) per chunk.
pub fn write_chunks(
    dir: &Path,
    prefix: &str,
    first_counter: usize,
    stream: &[u32],
    chunk_size: usize,
    pad: u32,
    dtype: LitDtype,
) -> Result<Vec<(PathBuf, u32)>> {
    if chunk_size == 0 {
        return Err(Error::Invalid("chunk_size must be positive".into()));
    }
    let mut out = Vec::new();
    for (k, chunk) in stream.chunks(chunk_size).enumerate() {
        let path = dir.join(format!("{prefix}_{:010}.bin", first_counter + k));
        let crc = if chunk.len() == chunk_size {
            write_file(&path, chunk, dtype)?
        } else {
            let mut full = chunk.to_vec();
            full.resize(chunk_size, pad);
            write_file(&path, &full, dtype)?
        };
        out.push((path, crc));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_layout() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.bin");
        write_file(&p, &[1, 2, 300], LitDtype::U16).unwrap();
        let b = std::fs::read(&p).unwrap();
        assert_eq!(&b[..7], b"LITPKDS");
        assert_eq!(b[15], 8);
        assert_eq!(b.len(), 24 + 6);
        let f = LitFile::open(&p).unwrap();
        assert_eq!(f.tokens_u32(Some(301)).unwrap(), vec![1, 2, 300]);
        assert!(f
            .tokens_u32(Some(300))
            .unwrap_err()
            .to_string()
            .contains("mask id"));
    }

    #[test]
    fn chunks_pad_like_lit_gpt() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_chunks(
            dir.path(),
            "train",
            0,
            &[1, 2, 3, 4, 5],
            2,
            9,
            LitDtype::I32,
        )
        .unwrap();
        assert_eq!(files.len(), 3);
        let last = LitFile::open(&files[2].0).unwrap();
        assert_eq!(last.tokens_u32(None).unwrap(), vec![5, 9]);
        assert!(files[0].0.ends_with("train_0000000000.bin"));
    }

    #[test]
    fn rejects_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.bin");
        write_file(&p, &[1, 2, 3], LitDtype::I64).unwrap();
        let good = std::fs::read(&p).unwrap();
        std::fs::write(&p, &good[..good.len() - 1]).unwrap();
        assert!(LitFile::open(&p)
            .err()
            .unwrap()
            .to_string()
            .contains("truncated"));
        let mut b = good.clone();
        b[15] = 9;
        std::fs::write(&p, &b).unwrap();
        assert!(LitFile::open(&p)
            .err()
            .unwrap()
            .to_string()
            .contains("dtype"));
        let mut b = good.clone();
        b[24 + 7] = 0x80; // first item negative
        std::fs::write(&p, &b).unwrap();
        assert!(LitFile::open(&p).unwrap().tokens_u32(None).is_err());
    }
}
