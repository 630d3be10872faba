//! The smdm shard format, version 1: one file holds a packed token stream and its document starts.
//!
//! All integers are little-endian. The file is exactly `64 + pad8(n_tokens * itemsize) + 8 * n_docs` bytes.
//!
//! ```text
//! offset size  field
//!      0    8  magic  b"SMDMSHRD"
//!      8    4  u32 version = 1
//!     12    4  u32 dtype = itemsize of a token: 2 (uint16, when vocab_size < 65536) or 4 (uint32)
//!     16    8  u64 n_tokens  (tokens in the stream, every document's EOS included)
//!     24    8  u64 n_docs    (documents; each starts at one entry of the offsets table)
//!     32    4  u32 vocab_size (token ids are < vocab_size; the MDM mask id is vocab_size itself)
//!     36    4  u32 eos_id
//!     40    4  u32 bos_id    (0xFFFFFFFF = the tokenizer has none)
//!     44    4  u32 payload CRC-32 (IEEE, = Python zlib.crc32) of every byte after the header
//!     48   12  reserved, zero
//!     60    4  u32 header CRC-32 of bytes 0..60
//!     64       token stream: n_tokens * itemsize bytes, then zero padding to a multiple of 8 bytes
//!      .       document start offsets: n_docs * u64, strictly increasing, the first is 0, all < n_tokens
//! ```
//!
//! The payload (tokens + padding + offsets) starts at byte 64 and its CRC is in the header, so one
//! pass over the file checks it. The dtype is fixed by the vocabulary size (so every shard of a dataset
//! has the same one). Writers write to a temporary name in the target directory, fsync, then rename,
//! so a reader never sees a half-written shard. The Python reference (`smdm.data.write_shard_numpy`,
//! `read_shard_numpy`) defines the same bytes; tests check both directions.
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{try_collect, Error, Result};

pub const MAGIC: &[u8; 8] = b"SMDMSHRD";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 64;
/// `bos_id` value meaning "no BOS token".
pub const NO_BOS: u32 = u32::MAX;

/// Token storage type, named by its itemsize in the header.
/// A token type a shard stores: u16 or u32, little-endian.
pub trait ShardItem: Copy {
    const DTYPE: Dtype;
    const SIZE: usize;
    fn from_le(b: &[u8]) -> Self;
}

impl ShardItem for u16 {
    const DTYPE: Dtype = Dtype::U16;
    const SIZE: usize = 2;
    fn from_le(b: &[u8]) -> Self {
        u16::from_le_bytes([b[0], b[1]])
    }
}

impl ShardItem for u32 {
    const DTYPE: Dtype = Dtype::U32;
    const SIZE: usize = 4;
    fn from_le(b: &[u8]) -> Self {
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    U16,
    U32,
}

impl Dtype {
    pub fn itemsize(self) -> usize {
        match self {
            Dtype::U16 => 2,
            Dtype::U32 => 4,
        }
    }
    /// uint16 when every id and the mask id (= vocab_size) fit, else uint32.
    pub fn for_vocab(vocab_size: u32) -> Dtype {
        if vocab_size < 65536 {
            Dtype::U16
        } else {
            Dtype::U32
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Dtype::U16 => "uint16",
            Dtype::U32 => "uint32",
        }
    }
}

/// The decoded fixed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub dtype: Dtype,
    pub n_tokens: u64,
    pub n_docs: u64,
    pub vocab_size: u32,
    pub eos_id: u32,
    pub bos_id: Option<u32>,
    pub payload_crc: u32,
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// `pad8(n_tokens * itemsize)`, or None on overflow (a corrupt header can claim anything).
fn tokens_region_len(dtype: Dtype, n_tokens: u64) -> Option<u64> {
    let raw = n_tokens.checked_mul(dtype.itemsize() as u64)?;
    raw.checked_add(7).map(|x| x & !7)
}

impl Header {
    /// Bytes after the header: tokens, padding, offsets. None on overflow.
    pub fn payload_len(&self) -> Option<u64> {
        tokens_region_len(self.dtype, self.n_tokens)?.checked_add(self.n_docs.checked_mul(8)?)
    }

    /// Total file size this header implies.
    pub fn file_len(&self) -> Option<u64> {
        self.payload_len()?.checked_add(HEADER_LEN as u64)
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(self.dtype.itemsize() as u32).to_le_bytes());
        h[16..24].copy_from_slice(&self.n_tokens.to_le_bytes());
        h[24..32].copy_from_slice(&self.n_docs.to_le_bytes());
        h[32..36].copy_from_slice(&self.vocab_size.to_le_bytes());
        h[36..40].copy_from_slice(&self.eos_id.to_le_bytes());
        h[40..44].copy_from_slice(&self.bos_id.unwrap_or(NO_BOS).to_le_bytes());
        h[44..48].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32fast::hash(&h[..60]);
        h[60..64].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Decode and check the 64 header bytes (magic, version, dtype, reserved bytes, header CRC, ids).
    pub fn decode(path: &Path, b: &[u8]) -> Result<Header> {
        if b.len() < HEADER_LEN {
            return Err(Error::format(
                path,
                format!(
                    "truncated: {} bytes, shorter than the {HEADER_LEN}-byte smdm shard header",
                    b.len()
                ),
            ));
        }
        if &b[0..8] != MAGIC {
            return Err(Error::format(
                path,
                format!(
                    "bad magic at offset 0: {:?}, expected {:?} (not an smdm shard)",
                    String::from_utf8_lossy(&b[0..8]),
                    "SMDMSHRD"
                ),
            ));
        }
        let version = u32_at(b, 8);
        if version != VERSION {
            return Err(Error::format(
                path,
                format!("unsupported shard version {version} at offset 8 (this smdm reads version {VERSION})"),
            ));
        }
        let stored = u32_at(b, 60);
        let actual = crc32fast::hash(&b[..60]);
        if stored != actual {
            return Err(Error::format(
                path,
                format!("header checksum mismatch at offset 60: stored {stored:#010x}, computed {actual:#010x}"),
            ));
        }
        let dtype = match u32_at(b, 12) {
            2 => Dtype::U16,
            4 => Dtype::U32,
            d => {
                return Err(Error::format(
                    path,
                    format!("bad dtype {d} at offset 12 (expected itemsize 2 or 4)"),
                ))
            }
        };
        if b[48..60].iter().any(|&x| x != 0) {
            return Err(Error::format(
                path,
                "reserved header bytes 48..60 are not zero",
            ));
        }
        let vocab_size = u32_at(b, 32);
        let eos_id = u32_at(b, 36);
        let bos = u32_at(b, 40);
        let h = Header {
            dtype,
            n_tokens: u64_at(b, 16),
            n_docs: u64_at(b, 24),
            vocab_size,
            eos_id,
            bos_id: if bos == NO_BOS { None } else { Some(bos) },
            payload_crc: u32_at(b, 44),
        };
        h.check_ids(path)?;
        Ok(h)
    }

    fn check_ids(&self, path: &Path) -> Result<()> {
        if self.vocab_size == 0 {
            return Err(Error::format(path, "vocab_size is 0 (offset 32)"));
        }
        if self.dtype != Dtype::for_vocab(self.vocab_size) {
            return Err(Error::format(
                path,
                format!(
                    "dtype {} (offset 12) does not match vocab_size {} (expected {})",
                    self.dtype.name(),
                    self.vocab_size,
                    Dtype::for_vocab(self.vocab_size).name()
                ),
            ));
        }
        if self.eos_id >= self.vocab_size {
            return Err(Error::format(
                path,
                format!(
                    "eos_id {} (offset 36) >= vocab_size {}",
                    self.eos_id, self.vocab_size
                ),
            ));
        }
        if let Some(b) = self.bos_id {
            if b >= self.vocab_size {
                return Err(Error::format(
                    path,
                    format!("bos_id {b} (offset 40) >= vocab_size {}", self.vocab_size),
                ));
            }
        }
        Ok(())
    }
}

/// Tokens handed to the writer; stored in the dtype the vocabulary implies.
#[derive(Clone, Copy, Debug)]
pub enum Tokens<'a> {
    U16(&'a [u16]),
    U32(&'a [u32]),
}

impl Tokens<'_> {
    pub fn len(&self) -> usize {
        match self {
            Tokens::U16(t) => t.len(),
            Tokens::U32(t) => t.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn get(&self, i: usize) -> u32 {
        match self {
            Tokens::U16(t) => t[i] as u32,
            Tokens::U32(t) => t[i],
        }
    }
    /// Index of the first id >= vocab_size, if any.
    fn first_out_of_range(&self, vocab_size: u32) -> Option<usize> {
        match self {
            Tokens::U16(t) => t.iter().position(|&x| x as u32 >= vocab_size),
            Tokens::U32(t) => t.iter().position(|&x| x >= vocab_size),
        }
    }
}

/// Message for a token id that is not a vocabulary entry (the mask id gets its own words).
pub fn bad_token_msg(id: u64, index: u64, byte_offset: u64, vocab_size: u32) -> String {
    if id == vocab_size as u64 {
        format!(
            "token id {id} at token {index} (byte offset {byte_offset}) equals the mask id (vocab_size {vocab_size})"
        )
    } else {
        format!(
            "token id {id} at token {index} (byte offset {byte_offset}) >= vocab_size {vocab_size}"
        )
    }
}

/// Check document starts: strictly increasing, first 0, all < n_tokens; n_docs > 0 iff n_tokens > 0.
pub fn check_doc_starts(
    path: &Path,
    starts: &[u64],
    n_tokens: u64,
    table_offset: u64,
) -> Result<()> {
    if (n_tokens == 0) != starts.is_empty() {
        return Err(Error::format(
            path,
            format!(
                "{} documents for {n_tokens} tokens (offset table at byte {table_offset})",
                starts.len()
            ),
        ));
    }
    let mut prev: Option<u64> = None;
    for (i, &s) in starts.iter().enumerate() {
        let at = table_offset + 8 * i as u64;
        let ok = match prev {
            None => s == 0,
            Some(p) => s > p,
        } && s < n_tokens;
        if !ok {
            return Err(Error::format(
                path,
                format!(
                    "bad document start {s} for document {i} at byte offset {at} (starts must be strictly \
                     increasing from 0 and < n_tokens {n_tokens})"
                ),
            ));
        }
        prev = Some(s);
    }
    Ok(())
}

/// Write `bytes` to `path` atomically: a temporary name in the same directory, fsync, rename.
pub fn write_atomic(path: &Path, parts: &[&[u8]]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{}: not a file path", path.display())))?;
    // A name no other write uses: two threads writing the same path must not share (and truncate) one
    // temporary file; built from the OS string, so distinct non-UTF-8 names stay distinct.
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}-{n}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        for p in parts {
            f.write_all(p)?;
        }
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        // Make the rename durable too (best effort: some filesystems refuse to fsync a directory).
        if let Ok(d) = File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Encode a whole shard (header + payload) in memory. Checks every id and the document starts.
pub fn encode_shard(
    path: &Path,
    tokens: Tokens<'_>,
    doc_starts: &[u64],
    vocab_size: u32,
    eos_id: u32,
    bos_id: Option<u32>,
) -> Result<(Header, Vec<u8>)> {
    let dtype = Dtype::for_vocab(vocab_size);
    let n = tokens.len() as u64;
    let mut header = Header {
        dtype,
        n_tokens: n,
        n_docs: doc_starts.len() as u64,
        vocab_size,
        eos_id,
        bos_id,
        payload_crc: 0,
    };
    header
        .check_ids(path)
        .map_err(|e| Error::Invalid(e.to_string()))?;
    if let Some(i) = tokens.first_out_of_range(vocab_size) {
        let id = tokens.get(i) as u64;
        return Err(Error::Invalid(format!(
            "{}: {}",
            path.display(),
            bad_token_msg(
                id,
                i as u64,
                (HEADER_LEN + i * dtype.itemsize()) as u64,
                vocab_size
            )
        )));
    }
    let tok_len = tokens_region_len(dtype, n).unwrap_or(u64::MAX) as usize;
    check_doc_starts(path, doc_starts, n, (HEADER_LEN + tok_len) as u64)
        .map_err(|e| Error::Invalid(e.to_string()))?;
    let mut payload = Vec::with_capacity(tok_len + 8 * doc_starts.len());
    match (tokens, dtype) {
        (Tokens::U16(t), Dtype::U16) => t
            .iter()
            .for_each(|x| payload.extend_from_slice(&x.to_le_bytes())),
        (Tokens::U32(t), Dtype::U16) => t
            .iter()
            .for_each(|&x| payload.extend_from_slice(&(x as u16).to_le_bytes())),
        (Tokens::U16(t), Dtype::U32) => t
            .iter()
            .for_each(|&x| payload.extend_from_slice(&(x as u32).to_le_bytes())),
        (Tokens::U32(t), Dtype::U32) => t
            .iter()
            .for_each(|x| payload.extend_from_slice(&x.to_le_bytes())),
    }
    payload.resize(tok_len, 0);
    for s in doc_starts {
        payload.extend_from_slice(&s.to_le_bytes());
    }
    header.payload_crc = crc32fast::hash(&payload);
    Ok((header, payload))
}

/// What a writer reports: the header and the CRC-32 and size of the whole file (the manifest records them).
#[derive(Clone, Copy, Debug)]
pub struct Written {
    pub header: Header,
    pub file_crc: u32,
    pub file_len: u64,
}

/// Write one shard atomically.
pub fn write_shard(
    path: &Path,
    tokens: Tokens<'_>,
    doc_starts: &[u64],
    vocab_size: u32,
    eos_id: u32,
    bos_id: Option<u32>,
) -> Result<Written> {
    let (header, payload) = encode_shard(path, tokens, doc_starts, vocab_size, eos_id, bos_id)?;
    let hb = header.encode();
    let mut h = crc32fast::Hasher::new();
    h.update(&hb);
    h.update(&payload);
    write_atomic(path, &[&hb, &payload])?;
    Ok(Written {
        header,
        file_crc: h.finalize(),
        file_len: (HEADER_LEN + payload.len()) as u64,
    })
}

/// Memory-map `path` read-only, checking that it is at least as long as its `header_len`-byte `what` header.
/// Returns the map and the file length, which is the map's length: the file may change size between a
/// stat and the map, and every later bound is checked against what was mapped.
pub fn map_with_header(path: &Path, header_len: usize, what: &str) -> Result<(Mmap, u64)> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let short = |len: u64| {
        Error::format(
            path,
            format!("truncated: {len} bytes, shorter than the {header_len}-byte {what} header"),
        )
    };
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len < header_len as u64 {
        return Err(short(len)); // also keeps an empty file away from mmap
    }
    // SAFETY: the map is read-only; smdm never modifies a published file in place (writers rename a
    // new file over it). A concurrent truncation by another program is outside our contract (reading a
    // page past the new end would raise SIGBUS).
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let len = map.len() as u64;
    if len < header_len as u64 {
        return Err(short(len));
    }
    Ok((map, len))
}

/// A memory-mapped shard whose header and size are checked; `verify` checks the payload too.
pub struct Shard {
    pub path: PathBuf,
    pub header: Header,
    map: Option<Mmap>,
}

impl Shard {
    /// Map the file and check its header and exact length (cheap: O(1)).
    pub fn open(path: &Path) -> Result<Shard> {
        let (map, len) = map_with_header(path, HEADER_LEN, "smdm shard")?;
        let header = Header::decode(path, &map[..HEADER_LEN])?;
        let want = header.file_len().ok_or_else(|| {
            Error::format(
                path,
                format!(
                    "header claims an impossible size ({} tokens, {} documents)",
                    header.n_tokens, header.n_docs
                ),
            )
        })?;
        if len < want {
            return Err(Error::format(
                path,
                format!(
                    "truncated: {len} bytes, the header (offsets 16, 24) implies {want} \
                     ({} tokens, {} documents); data ends at offset {len}",
                    header.n_tokens, header.n_docs
                ),
            ));
        }
        if len > want {
            return Err(Error::format(
                path,
                format!(
                    "{} unexpected trailing bytes after offset {want}",
                    len - want
                ),
            ));
        }
        Ok(Shard {
            path: path.to_path_buf(),
            header,
            map: Some(map),
        })
    }

    fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// Byte offset of the document-start table.
    pub fn table_offset(&self) -> u64 {
        HEADER_LEN as u64 + tokens_region_len(self.header.dtype, self.header.n_tokens).unwrap_or(0)
    }

    /// The raw token bytes (little-endian, itemsize from the header).
    pub fn token_bytes(&self) -> &[u8] {
        let n = self.header.n_tokens as usize * self.header.dtype.itemsize();
        &self.bytes()[HEADER_LEN..HEADER_LEN + n]
    }

    pub fn doc_starts(&self) -> Result<Vec<u64>> {
        let table = &self.bytes()[self.table_offset() as usize..];
        try_collect(
            table.chunks_exact(8).map(|c| u64_at(c, 0)),
            format_args!("the document starts of {}", self.path.display()),
        )
    }

    /// The token ids in the file's dtype (`T` = u16 for a uint16 shard, u32 for uint32; an error otherwise),
    /// or `Error::OutOfMemory` for a shard larger than the free memory.
    pub fn tokens<T: ShardItem>(&self) -> Result<Vec<T>> {
        if T::DTYPE != self.header.dtype {
            return Err(Error::Invalid(format!(
                "{}: tokens are {:?}, asked for {:?}",
                self.path.display(),
                self.header.dtype,
                T::DTYPE
            )));
        }
        try_collect(
            self.token_bytes().chunks_exact(T::SIZE).map(T::from_le),
            format_args!("the tokens of {}", self.path.display()),
        )
    }

    /// Full check: payload CRC, padding, document starts, every token id < vocab_size.
    pub fn verify(&self) -> Result<()> {
        let b = self.bytes();
        let actual = crc32fast::hash(&b[HEADER_LEN..]);
        if actual != self.header.payload_crc {
            return Err(Error::format(
                &self.path,
                format!(
                    "payload checksum mismatch (bytes {HEADER_LEN}..{}): header (offset 44) says {:#010x}, \
                     data gives {actual:#010x}; the file is corrupt",
                    b.len(),
                    self.header.payload_crc
                ),
            ));
        }
        let tok_end = HEADER_LEN + self.token_bytes().len();
        let table = self.table_offset() as usize;
        if let Some(p) = b[tok_end..table].iter().position(|&x| x != 0) {
            return Err(Error::format(
                &self.path,
                format!("non-zero padding byte at offset {}", tok_end + p),
            ));
        }
        check_doc_starts(
            &self.path,
            &self.doc_starts()?,
            self.header.n_tokens,
            table as u64,
        )?;
        let v = self.header.vocab_size;
        let isz = self.header.dtype.itemsize();
        let bad = match self.header.dtype {
            Dtype::U16 => self
                .token_bytes()
                .chunks_exact(2)
                .position(|c| u16::from_le_bytes([c[0], c[1]]) as u32 >= v),
            Dtype::U32 => self
                .token_bytes()
                .chunks_exact(4)
                .position(|c| u32_at(c, 0) >= v),
        };
        if let Some(i) = bad {
            let at = HEADER_LEN + i * isz;
            let id = match self.header.dtype {
                Dtype::U16 => u16::from_le_bytes([b[at], b[at + 1]]) as u64,
                Dtype::U32 => u32_at(b, at) as u64,
            };
            return Err(Error::format(
                &self.path,
                bad_token_msg(id, i as u64, at as u64, v),
            ));
        }
        Ok(())
    }

    /// CRC-32 of the whole file (what the manifest records).
    pub fn file_crc(&self) -> u32 {
        crc32fast::hash(self.bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Vec<u32>, Vec<u64>) {
        (vec![5, 6, 0, 7, 0, 1, 2, 3, 0], vec![0, 3, 5])
    }

    /// Threads writing one path at once each use their own temporary file: the path always holds one
    /// writer's complete bytes (a shared temporary name let one writer truncate another's file before its
    /// rename, publishing a cut file).
    #[test]
    fn concurrent_atomic_writes_of_one_path_publish_whole_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.bin");
        std::thread::scope(|s| {
            for t in 0..8u8 {
                let path = &path;
                s.spawn(move || {
                    let data = vec![t; 1 << 20];
                    for _ in 0..5 {
                        write_atomic(path, &[&data]).unwrap();
                    }
                });
            }
            let path = &path;
            s.spawn(move || {
                for _ in 0..200 {
                    if let Ok(b) = std::fs::read(path) {
                        assert_eq!(b.len(), 1 << 20);
                        assert!(b.iter().all(|&x| x == b[0]));
                    }
                }
            });
        });
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1); // no temporary file left behind
    }

    #[test]
    fn roundtrip_u16_and_u32() {
        let dir = tempfile::tempdir().unwrap();
        let (t, s) = sample();
        for vocab in [10u32, 70_000] {
            let p = dir.path().join(format!("a{vocab}.smdm"));
            let w = write_shard(&p, Tokens::U32(&t), &s, vocab, 0, None).unwrap();
            let sh = Shard::open(&p).unwrap();
            sh.verify().unwrap();
            assert_eq!(sh.header, w.header);
            let got: Vec<u32> = match sh.header.dtype {
                Dtype::U16 => sh
                    .tokens::<u16>()
                    .unwrap()
                    .into_iter()
                    .map(u32::from)
                    .collect(),
                Dtype::U32 => sh.tokens::<u32>().unwrap(),
            };
            assert_eq!(got, t);
            assert_eq!(sh.doc_starts().unwrap(), s);
            assert_eq!(sh.file_crc(), w.file_crc);
            let len = std::fs::metadata(&p).unwrap().len();
            assert_eq!(len, w.file_len);
            assert_eq!(len % 8, 0);
        }
    }

    #[test]
    fn rejects_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let (t, s) = sample();
        let p = dir.path().join("a.smdm");
        write_shard(&p, Tokens::U32(&t), &s, 10, 0, Some(1)).unwrap();
        let good = std::fs::read(&p).unwrap();
        // payload bit flip: open succeeds, verify names the checksum
        let mut b = good.clone();
        b[HEADER_LEN + 2] ^= 1;
        std::fs::write(&p, &b).unwrap();
        let e = Shard::open(&p).unwrap().verify().unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");
        // header bit flip
        let mut b = good.clone();
        b[20] ^= 1;
        std::fs::write(&p, &b).unwrap();
        assert!(Shard::open(&p).is_err());
        // truncated
        std::fs::write(&p, &good[..good.len() - 3]).unwrap();
        let e = Shard::open(&p).err().unwrap().to_string();
        assert!(e.contains("truncated"), "{e}");
        // wrong magic
        let mut b = good.clone();
        b[0] = b'X';
        std::fs::write(&p, &b).unwrap();
        assert!(Shard::open(&p).err().unwrap().to_string().contains("magic"));
    }

    #[test]
    fn writer_rejects_bad_ids_and_starts() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.smdm");
        let e = write_shard(&p, Tokens::U32(&[1, 10]), &[0], 10, 0, None).unwrap_err();
        assert!(e.to_string().contains("mask id"), "{e}");
        assert!(write_shard(&p, Tokens::U32(&[1, 2]), &[1], 10, 0, None).is_err());
        assert!(write_shard(&p, Tokens::U32(&[1, 2]), &[], 10, 0, None).is_err());
        assert!(!p.exists());
    }
}
