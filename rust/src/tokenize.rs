//! Tokenization for `smdm prepare`, on the `tokenizers` crate (the library behind Python `tokenizers`).
//!
//! - `Tok::from_file` loads a tokenizer.json; `Tok::train_bpe` trains a byte-level BPE tokenizer
//!   (GPT-2 style: byte-level pre-tokenizer without prefix space, all 256 bytes in the alphabet, so no
//!   unknown tokens) with `<|endoftext|>` as special token 0.
//! - `Tok::encode_pack` encodes documents in parallel without the tokenizer's own special tokens
//!   (`add_special_tokens = false`), and packs them as `ids + [EOS]` (see `pack.rs`). Special tokens
//!   written in a document are encoded as the text they are (`encode_special_tokens`), and the
//!   tokenizer.json's truncation and padding are off. Ids equal Python `tokenizers`'
//!   `encode(text, add_special_tokens=False).ids` with `encode_special_tokens = True`, no truncation, no padding.
//! - EOS/BOS are found among the tokenizer's special added tokens by their usual names.
//!
//! Fast path (`FastByteLevel`): for the common GPT-2-style tokenizer (no normalizer, a `ByteLevel`
//! pre-tokenizer with its regex, a BPE model without dropout) the crate spends most of its time in the
//! split regex, whose `\s+(?!\S)` lookahead forces fancy-regex's backtracking engine. We run the same
//! pattern without that alternative on the `regex` crate (a DFA, same Unicode tables) and apply the
//! lookahead by hand: a whitespace run followed by a non-space character gives back its last character
//! (exactly what `\s+(?!\S)|\s+` does under leftmost-first alternation). Each piece is mapped to the
//! byte-level alphabet and tokenized by the tokenizer's own BPE model, with a per-thread cache of pieces.
//! A document that contains an added token's text takes the crate's normal path (added tokens are split
//! out before pre-tokenization). Tests compare every id with Python `tokenizers`.
//!
//! Scaling with cores (fast path):
//! - Tasks are segments of text of about `SEGMENT_BYTES`, not whole documents: a long document is cut
//!   where a non-space ASCII character is followed by an ASCII whitespace character. No piece of the split pattern
//!   crosses such a point (only `\s` matches whitespace and it never matches the character before) and
//!   the pattern has no look-behind, so the pieces, hence the ids, are those of the whole document; one
//!   huge document no longer runs on one core while the others wait.
//! - Nothing mutable is shared between worker threads. Each thread owns a `Worker`: its piece cache, a
//!   clone of the split `Regex` (a shared `regex::Regex` lends its scratch space from a pool whose fast
//!   path serves only the first thread that used it; the others take a mutex on every search) and a clone
//!   of the BPE model with its internal cache turned off (the crate's cache is one `RwLock` whose lock
//!   word every thread writes on every lookup).
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::pool;
use rayon::prelude::*;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::ModelWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, Model, NormalizerWrapper, PostProcessorWrapper,
    PreTokenizerWrapper, Tokenizer, TokenizerBuilder, TokenizerImpl, Trainer,
};

use crate::error::{Error, Result};
use crate::pack;

/// Special-token names tried (in order) for the end of a document and for the start.
pub const EOS_NAMES: &[&str] = &[
    "<|endoftext|>",
    "</s>",
    "<eos>",
    "<|end_of_text|>",
    "<|eot_id|>",
    "[SEP]",
];
pub const BOS_NAMES: &[&str] = &[
    "<s>",
    "<|startoftext|>",
    "<bos>",
    "<|begin_of_text|>",
    "[CLS]",
];
/// The special token of a tokenizer trained by smdm.
pub const TRAINED_EOS: &str = "<|endoftext|>";

/// GPT-2's byte -> printable character table (the byte-level alphabet).
fn bytes_to_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap_or('\0')
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('\0')
        };
    }
    table
}

/// Byte-level BPE encoding without fancy-regex (see the module docs). `Clone` gives the regex its own
/// scratch-space pool (see `Worker`).
#[derive(Clone)]
pub struct FastByteLevel {
    re: regex::Regex,
    /// The tokenizer's BPE model with its internal cache off: each `Worker` clones it (with the cache)
    /// and `Worker::cache` replaces the cache. Unused by `plain` (an empty model).
    model: BPE,
    add_prefix_space: bool,
    added: Vec<String>,
    chars: [char; 256],
}

/// The byte-level split pattern minus its `\s+(?!\S)` alternative.
const SPLIT_NO_LOOKAHEAD: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+";

impl FastByteLevel {
    /// Some(fast path) when the tokenizer is plain byte-level BPE, else None.
    pub fn for_tokenizer(tk: &Tokenizer) -> Option<FastByteLevel> {
        if tk.get_normalizer().is_some() {
            return None;
        }
        let add_prefix_space = match tk.get_pre_tokenizer() {
            Some(PreTokenizerWrapper::ByteLevel(bl)) if bl.use_regex => bl.add_prefix_space,
            _ => return None,
        };
        let mut model = match tk.get_model() {
            ModelWrapper::BPE(bpe) if bpe.dropout.is_none_or(|d| d == 0.0) => bpe.clone(),
            _ => return None,
        };
        model.resize_cache(0);
        let added: Vec<String> = tk
            .get_added_tokens_decoder()
            .into_values()
            .map(|t| t.content)
            .collect();
        if added.len() > 64 || added.iter().any(|a| a.is_empty()) {
            return None;
        }
        Some(FastByteLevel {
            re: regex::Regex::new(SPLIT_NO_LOOKAHEAD).ok()?,
            model,
            add_prefix_space,
            added,
            chars: bytes_to_chars(),
        })
    }

    /// The splitter alone (no prefix space, no added tokens): what BPE training needs.
    fn plain() -> Option<FastByteLevel> {
        Some(FastByteLevel {
            re: regex::Regex::new(SPLIT_NO_LOOKAHEAD).ok()?,
            model: BPE::builder().cache_capacity(0).build().ok()?,
            add_prefix_space: false,
            added: Vec::new(),
            chars: bytes_to_chars(),
        })
    }

    /// Call `f` on each pre-tokenized piece of `text`, in order (the pieces cover the text).
    fn for_each_piece<'a>(
        &self,
        text: &'a str,
        mut f: impl FnMut(&'a str) -> tokenizers::Result<()>,
    ) -> tokenizers::Result<()> {
        let mut pos = 0;
        while pos < text.len() {
            let (start, mut end) = match self.re.find_at(text, pos) {
                Some(m) => (m.start(), m.end()),
                None => (text.len(), text.len()),
            };
            if start > pos {
                // Unmatched text (cannot happen with this pattern, which covers every character) would be
                // its own piece, as in the crate's `Isolated` split.
                end = start;
            } else {
                let piece = &text[start..end];
                let mut it = piece.chars();
                let first_ws = it.next().is_some_and(char::is_whitespace);
                let run = first_ws && it.next().is_none_or(char::is_whitespace);
                // `\s+(?!\S)`: a run of >= 2 whitespace chars followed by a non-space keeps its last one
                if run && end < text.len() && piece.chars().nth(1).is_some() {
                    end = start + piece.char_indices().last().map_or(0, |(i, _)| i);
                }
            }
            f(&text[pos..end])?;
            pos = end;
        }
        Ok(())
    }

    /// A piece in the byte-level alphabet (each UTF-8 byte -> one printable char).
    fn map_bytes(&self, piece: &str, out: &mut String) {
        out.clear();
        out.extend(piece.bytes().map(|b| self.chars[b as usize]));
    }

    /// Whether `text` can take the fast path: it contains no added token's text.
    fn handles(&self, text: &str) -> bool {
        !self.added.iter().any(|a| text.contains(a.as_str()))
    }

    /// Append the ids of `text` (one segment of a document that `handles`, see `segments`) to `out`.
    /// `first`: the segment starts the document (where the prefix space goes).
    fn encode_into(
        &self,
        text: &str,
        first: bool,
        cache: &mut HashMap<String, Vec<u32>>,
        out: &mut Vec<u32>,
    ) -> tokenizers::Result<()> {
        let prefixed;
        let text = if first && self.add_prefix_space && !text.is_empty() && !text.starts_with(' ') {
            prefixed = format!(" {text}");
            prefixed.as_str()
        } else {
            text
        };
        let mut mapped = String::new();
        self.for_each_piece(text, |piece| {
            if let Some(ids) = cache.get(piece) {
                out.extend_from_slice(ids);
                return Ok(());
            }
            self.map_bytes(piece, &mut mapped);
            let ids: Vec<u32> = self
                .model
                .tokenize(&mapped)?
                .into_iter()
                .map(|t| t.id)
                .collect();
            out.extend_from_slice(&ids);
            if cache.len() > 1 << 18 {
                cache.clear();
            }
            cache.insert(piece.to_string(), ids);
            Ok(())
        })
    }
}

/// Target size of one fast-path task (bytes of text): small next to a core's share of a 4 MiB call, large
/// next to the cost of a task (a thread-local lookup and a vector).
const SEGMENT_BYTES: usize = 1 << 16;

/// Cut `text` into consecutive segments of about `target` bytes (or more, up to the next cut point) whose
/// pre-tokenized pieces are exactly those of the whole text: each cut is just before an ASCII whitespace
/// byte that follows a non-whitespace ASCII byte (see the module docs).
fn segments(text: &str, target: usize) -> Vec<&str> {
    let b = text.as_bytes();
    let is_ws = |c: u8| matches!(c, b'\t' | b'\n' | b'\x0B' | b'\x0C' | b'\r' | b' ');
    let mut out = Vec::with_capacity(text.len() / target.max(1) + 1);
    let mut start = 0;
    let mut i = start + target;
    while i < b.len() {
        if is_ws(b[i]) && b[i - 1] < 0x80 && !is_ws(b[i - 1]) {
            out.push(&text[start..i]);
            start = i;
            i = start + target;
        } else {
            i += 1;
        }
    }
    out.push(&text[start..]);
    out
}

/// One worker thread's state for one tokenizer (see the module docs): nothing in it is shared.
struct Worker {
    /// The `Tok::id` this state belongs to.
    tok_id: u64,
    /// A clone of the tokenizer's: its own regex pool and BPE model.
    fast: FastByteLevel,
    /// Piece -> ids; emptied when it grows past 2^18 pieces.
    cache: HashMap<String, Vec<u32>>,
}

type ByteLevelBpe = TokenizerImpl<
    BPE,
    NormalizerWrapper,
    PreTokenizerWrapper,
    PostProcessorWrapper,
    DecoderWrapper,
>;

/// GPT-2 style: byte-level pre-tokenizer (no prefix space, with its regex), post-processor and decoder.
fn byte_level_builder(model: BPE) -> Result<ByteLevelBpe> {
    let bl = ByteLevel::new(false, true, true);
    TokenizerBuilder::default()
        .with_model(model)
        .with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(bl)))
        .with_post_processor(Some(PostProcessorWrapper::ByteLevel(bl)))
        .with_decoder(Some(DecoderWrapper::ByteLevel(bl)))
        .build()
        .map_err(|e| tok_err(Path::new("<trained tokenizer>"), e))
}

/// Largest vocabulary `train_bpe` accepts. The crate's trainer reserves ~66 bytes per requested id up
/// front, so an absurd request (2^31 ids: 141 GB) would abort the process on the failed allocation instead
/// of raising; 2^22 ids (~280 MB) is far above any byte-level BPE vocabulary in use (~256k).
pub const MAX_TRAINED_VOCAB: u32 = 1 << 22;

/// BPE trainer: all 256 bytes in the alphabet (no unknown tokens), pairs seen at least twice, EOS special.
fn bpe_trainer(vocab_size: u32) -> Result<tokenizers::models::bpe::BpeTrainer> {
    if vocab_size < 257 + 1 {
        return Err(Error::Invalid(format!(
            "--vocab-size {vocab_size} is too small for byte-level BPE (at least 258: 256 bytes + EOS + 1)"
        )));
    }
    if vocab_size > MAX_TRAINED_VOCAB {
        return Err(Error::Invalid(format!(
            "--vocab-size {vocab_size} is too large to train a byte-level BPE (at most {MAX_TRAINED_VOCAB})"
        )));
    }
    Ok(BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size as usize)
        .min_frequency(2)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(vec![AddedToken::from(TRAINED_EOS.to_string(), true)])
        .build())
}

thread_local! {
    /// The fast path's per-thread state; it survives across calls, tied to one tokenizer (by its unique
    /// id) and rebuilt when another one uses the thread.
    static WORKER: std::cell::RefCell<Option<Worker>> = const { std::cell::RefCell::new(None) };
}

/// Unique ids for `Tok` instances (0 is never used, so a fresh thread cache matches no tokenizer).
static NEXT_TOK_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

pub struct Tok {
    /// Unique per instance: keys the thread-local `Worker`.
    id: u64,
    pub inner: Tokenizer,
    /// Some for plain byte-level BPE tokenizers (see the module docs); None uses the crate's `encode`.
    pub fast: Option<FastByteLevel>,
    pub path: PathBuf,
    /// Number of ids, added tokens included (`get_vocab_size(true)`); the MDM mask id is this value.
    pub vocab_size: u32,
    pub eos_id: u32,
    pub bos_id: Option<u32>,
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

/// Run `f`, turning a panic into an error naming the file: the `tokenizers` crate panics on some malformed
/// tokenizer.json files (a BPE `continuing_subword_prefix` longer than a merge's token, a bad
/// `precompiled_charsmap`), at load or at encode, and a panic must not reach Python. Rayon carries a
/// worker's panic back to the caller, so one guard covers the parallel sections too.
pub fn guard<T>(path: &Path, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    use std::sync::atomic::Ordering::SeqCst;
    use std::sync::Mutex;
    // While a guard runs, a panic located in the tokenizers crate is not printed by the default hook (the
    // error says it, with the location); any other panic is printed as usual. The count is process-wide
    // because rayon's workers panic on other threads.
    static GUARDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    static LAST: Mutex<Option<String>> = Mutex::new(None);
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let loc = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()));
            let in_crate = loc
                .as_deref()
                .is_some_and(|f| f.contains("tokenizers-") || f.contains("/tokenizers/"));
            if GUARDS.load(SeqCst) > 0 && in_crate {
                if let Ok(mut last) = LAST.lock() {
                    *last = loc;
                }
            } else {
                default(info)
            }
        }));
    });
    GUARDS.fetch_add(1, SeqCst);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    GUARDS.fetch_sub(1, SeqCst);
    result.unwrap_or_else(|payload| {
        let why = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_string());
        let at = LAST.lock().ok().and_then(|mut l| l.take());
        let msg = match at {
            Some(loc) => format!(
                "{what} failed inside the tokenizers library ({why}, at {loc}); is the tokenizer.json valid?"
            ),
            None => format!("{what} failed: a panic ({why})"),
        };
        Err(tok_err(path, msg))
    })
}

impl Tok {
    fn wrap(mut inner: Tokenizer, path: &Path, eos: Option<&str>) -> Result<Tok> {
        // Documents are text. A tokenizer.json's truncation and padding (settings for batches of model
        // inputs) would cut or pad the documents that take the crate's path and not the others, and a
        // special token written in the text (`</s>`, `<|endoftext|>` in web pages) would become that token:
        // an EOS inside a document. The only special token in the output is the EOS smdm appends.
        inner
            .with_truncation(None)
            .map_err(|e| tok_err(path, format!("cannot turn truncation off: {e}")))?;
        inner.with_padding(None);
        inner.set_encode_special_tokens(true);
        let vocab_size = inner.get_vocab_size(true) as u32;
        let find = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let eos_id = match eos {
            Some(name) => inner.token_to_id(name).ok_or_else(|| {
                tok_err(path, format!("EOS token {name:?} is not in the vocabulary"))
            })?,
            None => find(EOS_NAMES).ok_or_else(|| {
                tok_err(
                    path,
                    format!("no EOS token found (tried {EOS_NAMES:?}); name one with --eos-token"),
                )
            })?,
        };
        let bos_id = find(BOS_NAMES).filter(|&b| b != eos_id);
        // Added tokens can have ids past the model's vocabulary; everything must stay below the mask id.
        let max_id = inner.get_vocab(true).values().copied().max().unwrap_or(0);
        if max_id >= vocab_size {
            return Err(tok_err(
                path,
                format!(
                    "token id {max_id} >= vocabulary size {vocab_size} (holes in the id space)"
                ),
            ));
        }
        Ok(Tok {
            id: NEXT_TOK_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            fast: FastByteLevel::for_tokenizer(&inner),
            inner,
            path: path.to_path_buf(),
            vocab_size,
            eos_id,
            bos_id,
        })
    }

    /// Load a tokenizer.json. `eos` overrides the EOS token name.
    pub fn from_file(path: &Path, eos: Option<&str>) -> Result<Tok> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        guard(path, "loading", || {
            let inner = Tokenizer::from_bytes(&bytes)
                .map_err(|e| tok_err(path, format!("does not parse as a tokenizer.json: {e}")))?;
            Tok::wrap(inner, path, eos)
        })
    }

    /// Train a byte-level BPE tokenizer with `vocab_size` ids (special token `<|endoftext|>` = 0).
    /// Word counting uses the fast splitter (same pieces as the crate's pre-tokenizer, see the module
    /// docs); `train_bpe_reference` is the crate's own `Tokenizer::train` and gives the same JSON.
    pub fn train_bpe(texts: &[&str], vocab_size: u32) -> Result<Tok> {
        guard(Path::new("<trained tokenizer>"), "training", || {
            pool::install(|| Self::train_bpe_here(texts, vocab_size))?
        })
    }

    fn train_bpe_here(texts: &[&str], vocab_size: u32) -> Result<Tok> {
        let here = Path::new("<trained tokenizer>");
        let mut trainer = bpe_trainer(vocab_size)?;
        let split = FastByteLevel::plain()
            .ok_or_else(|| tok_err(here, "internal: split pattern does not compile"))?;
        trainer
            .feed(texts.iter(), |seq: &str| {
                let mut words = Vec::new();
                split.for_each_piece(seq, |piece| {
                    let mut w = String::with_capacity(piece.len());
                    split.map_bytes(piece, &mut w);
                    words.push(w);
                    Ok(())
                })?;
                Ok(words)
            })
            .map_err(|e| tok_err(here, e))?;
        let mut model = BPE::default();
        let special = trainer.train(&mut model).map_err(|e| tok_err(here, e))?;
        let mut tk = byte_level_builder(model)?;
        tk.add_special_tokens(&special);
        let json = tk.to_string(false).map_err(|e| tok_err(here, e))?;
        let inner: Tokenizer = json.parse().map_err(|e| tok_err(here, e))?;
        Tok::wrap(inner, here, Some(TRAINED_EOS))
    }

    /// `train_bpe` through the crate's `Tokenizer::train` (its fancy-regex pre-tokenizer): the reference.
    pub fn train_bpe_reference(texts: &[&str], vocab_size: u32) -> Result<Tok> {
        guard(Path::new("<trained tokenizer>"), "training", || {
            pool::install(|| Self::train_bpe_reference_here(texts, vocab_size))?
        })
    }

    fn train_bpe_reference_here(texts: &[&str], vocab_size: u32) -> Result<Tok> {
        let here = Path::new("<trained tokenizer>");
        let mut trainer = bpe_trainer(vocab_size)?;
        let mut tk = byte_level_builder(BPE::default())?;
        tk.train(&mut trainer, texts.iter().copied())
            .map_err(|e| tok_err(here, e))?;
        let json = tk.to_string(false).map_err(|e| tok_err(here, e))?;
        let inner: Tokenizer = json.parse().map_err(|e| tok_err(here, e))?;
        Tok::wrap(inner, here, Some(TRAINED_EOS))
    }

    /// The tokenizer.json text.
    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(false)
            .map_err(|e| tok_err(&self.path, e))
    }

    /// Ids of each document (no special tokens added), in parallel.
    pub fn encode_docs(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        guard(&self.path, "encoding", || {
            pool::install(|| self.encode_docs_here(texts))?
        })
    }

    fn encode_docs_here(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        let (doc_of, ids) = self.encode_tasks(texts, SEGMENT_BYTES)?;
        let mut docs: Vec<Vec<u32>> = Vec::with_capacity(texts.len());
        for (d, v) in doc_of.into_iter().zip(ids) {
            match docs.get_mut(d) {
                Some(doc) => doc.extend_from_slice(&v),
                None => docs.push(v),
            }
        }
        Ok(docs)
    }

    /// Encode in parallel, one task per fast-path segment (see `segments`) or per document on the crate's
    /// path: (document of each task, ids of each task), tasks in document order, every document at least
    /// one task. SMDM_REFERENCE=1 turns the fast path off (the benchmark's crate-encode row).
    fn encode_tasks(
        &self,
        texts: &[&str],
        segment_bytes: usize,
    ) -> Result<(Vec<usize>, Vec<Vec<u32>>)> {
        let fast = self
            .fast
            .as_ref()
            .filter(|_| std::env::var_os("SMDM_REFERENCE").is_none_or(|v| v == "0"));
        // Looking for added tokens reads all the text: in parallel too.
        let on_fast: Vec<bool> = texts
            .par_iter()
            .map(|t| fast.is_some_and(|f| f.handles(t)))
            .collect();
        // (document, text, first segment of its document, fast path)
        let mut tasks: Vec<(usize, &str, bool, bool)> = Vec::with_capacity(texts.len());
        for (d, (&t, &f)) in texts.iter().zip(&on_fast).enumerate() {
            if f {
                let segs = segments(t, segment_bytes);
                tasks.extend(
                    segs.into_iter()
                        .enumerate()
                        .map(|(k, seg)| (d, seg, k == 0, true)),
                );
            } else {
                tasks.push((d, t, true, false));
            }
        }
        let ids = tasks
            .par_iter()
            .map(|&(_, text, first, on_fast)| {
                let err = |e: tokenizers::Error| tok_err(&self.path, format!("encode failed: {e}"));
                match fast {
                    Some(f) if on_fast => {
                        let mut ids = Vec::with_capacity(text.len() / 3);
                        WORKER
                            .with(|w| {
                                let mut w = w.borrow_mut();
                                let w = match &mut *w {
                                    Some(w) if w.tok_id == self.id => w,
                                    slot => slot.insert(Worker {
                                        tok_id: self.id,
                                        fast: f.clone(),
                                        cache: HashMap::new(),
                                    }),
                                };
                                w.fast.encode_into(text, first, &mut w.cache, &mut ids)
                            })
                            .map_err(err)?;
                        Ok(ids)
                    }
                    _ => self
                        .inner
                        .encode_fast(text, false)
                        .map(|e| e.get_ids().to_vec())
                        .map_err(err),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((tasks.into_iter().map(|t| t.0).collect(), ids))
    }

    /// The crate's own encoding (the reference for the fast path).
    pub fn encode_docs_reference(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        guard(&self.path, "encoding", || {
            pool::install(|| self.encode_docs_reference_here(texts))?
        })
    }

    fn encode_docs_reference_here(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        texts
            .par_iter()
            .map(|t| {
                self.inner
                    .encode_fast(*t, false)
                    .map(|e| e.get_ids().to_vec())
                    .map_err(|e| tok_err(&self.path, format!("encode failed: {e}")))
            })
            .collect()
    }

    /// Encode and pack: stream = doc0 + [EOS] + doc1 + [EOS] + ..., and the document starts.
    pub fn encode_pack<T: pack::Item + Default>(
        &self,
        texts: &[&str],
    ) -> Result<(Vec<T>, Vec<u64>)> {
        guard(&self.path, "encoding", || {
            pool::install(|| self.encode_pack_here(texts))?
        })
    }

    fn encode_pack_here<T: pack::Item + Default>(
        &self,
        texts: &[&str],
    ) -> Result<(Vec<T>, Vec<u64>)> {
        let (doc_of, ids) = self.encode_tasks(texts, SEGMENT_BYTES)?;
        let mut lengths = vec![0u64; texts.len()];
        for (&d, v) in doc_of.iter().zip(&ids) {
            lengths[d] += v.len() as u64;
        }
        let (starts, n) = pack::doc_starts(&lengths, lengths.iter().sum::<u64>() as usize)?;
        let (eos, vocab) = (self.eos_id, self.vocab_size);
        let mut out = vec![T::default(); n];
        // Split the output into one slot per task, writing the EOS after each document's last task, and
        // copy the tasks in parallel.
        let mut slots: Vec<&mut [T]> = Vec::with_capacity(ids.len());
        let mut rest = out.as_mut_slice();
        for (k, v) in ids.iter().enumerate() {
            let (a, b) = rest.split_at_mut(v.len());
            slots.push(a);
            rest = b;
            if doc_of.get(k + 1) != Some(&doc_of[k]) {
                let (e, b) = rest.split_at_mut(1);
                e[0] = T::from_id(eos);
                rest = b;
            }
        }
        let bad = slots
            .into_par_iter()
            .zip(ids.par_iter())
            .map(|(slot, v)| {
                let mut bad = false;
                for (y, &x) in slot.iter_mut().zip(v) {
                    *y = T::from_id(x);
                    bad |= x >= vocab;
                }
                bad
            })
            .reduce(|| false, |a, b| a || b);
        if bad {
            return Err(tok_err(
                &self.path,
                format!("the tokenizer produced an id >= vocab_size {vocab}"),
            ));
        }
        Ok((out, starts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn train_encode_roundtrip() {
        let texts: Vec<String> = (0..200)
            .map(|i| format!("def f{i}(x):\n    return x * {i} + 1\n"))
            .collect();
        let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
        let tok = Tok::train_bpe(&refs, 300).unwrap();
        assert_eq!(tok.eos_id, 0);
        assert_eq!(tok.vocab_size, 300);
        let (stream, starts) = tok.encode_pack::<u16>(&refs[..3]).unwrap();
        assert_eq!(starts.len(), 3);
        assert_eq!(stream[starts[1] as usize - 1], 0);
        let dec = tok
            .inner
            .decode(&[stream[0] as u32, stream[1] as u32], false)
            .unwrap();
        assert!(texts[0].starts_with(&dec), "{dec:?}");
        // the JSON reloads to the same ids
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokenizer.json");
        std::fs::write(&p, tok.to_json().unwrap()).unwrap();
        let again = Tok::from_file(&p, None).unwrap();
        assert_eq!(again.encode_pack::<u16>(&refs[..3]).unwrap().0, stream);
    }

    #[test]
    fn fast_path_matches_the_crate() {
        let texts: Vec<String> = (0..300)
            .map(|i| format!("def f{i}(x):\n    return x * {i} + 1  \n\n\t# naïve café {i}\r\n"))
            .collect();
        let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
        let tok = Tok::train_bpe(&refs, 400).unwrap();
        assert!(tok.fast.is_some());
        let tricky = [
            "",
            " ",
            "  ",
            "a  b",
            "a \n b",
            "x\n\n\ny",
            " \u{3000}z",
            "it's 'll ' s",
            "1 2  3",
            "tab\t\tend  ",
            "<|endoftext|> inside",
            "émoji 🙂🙂 ok",
            "\u{a0}\u{a0}x",
            "Ǆ ǅ ǆ ʰ",
        ];
        let mut all: Vec<&str> = refs.clone();
        all.extend_from_slice(&tricky);
        let want = tok.encode_docs_reference(&all).unwrap();
        assert_eq!(tok.encode_docs(&all).unwrap(), want);
        // Cut into many segments (down to one cut per whitespace run), the ids stay those of the whole
        // documents; long documents mixing every case, too.
        let mut long: Vec<String> = tricky.iter().map(|t| t.repeat(40)).collect();
        long.push(refs.concat());
        long.push(all.join(" \u{3000}\n  "));
        let long_refs: Vec<&str> = long.iter().map(|s| s.as_str()).collect();
        let want_long = tok.encode_docs_reference(&long_refs).unwrap();
        for target in [1, 2, 5, 64, 1 << 20] {
            for (texts, want) in [(&all, &want), (&long_refs, &want_long)] {
                let (doc_of, ids) = tok.encode_tasks(texts, target).unwrap();
                let mut docs: Vec<Vec<u32>> = vec![Vec::new(); texts.len()];
                for (d, v) in doc_of.iter().zip(&ids) {
                    docs[*d].extend_from_slice(v);
                }
                assert_eq!(&docs, want, "segments of {target} bytes");
            }
        }
        let (doc_of, _) = tok.encode_tasks(&long_refs, 5).unwrap();
        assert!(doc_of.len() > 1000, "{} tasks", doc_of.len());
        // with a prefix space (added to the first segment only)
        let json = tok.to_json().unwrap();
        assert!(json.contains("\"add_prefix_space\":false"));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokenizer.json");
        std::fs::write(
            &p,
            json.replace("\"add_prefix_space\":false", "\"add_prefix_space\":true"),
        )
        .unwrap();
        let spaced = Tok::from_file(&p, None).unwrap();
        assert!(spaced.fast.as_ref().is_some_and(|f| f.add_prefix_space));
        let want = spaced.encode_docs_reference(&long_refs).unwrap();
        assert_ne!(want, want_long);
        for target in [1, 5, 1 << 20] {
            let (doc_of, ids) = spaced.encode_tasks(&long_refs, target).unwrap();
            let mut docs: Vec<Vec<u32>> = vec![Vec::new(); long_refs.len()];
            for (d, v) in doc_of.iter().zip(&ids) {
                docs[*d].extend_from_slice(v);
            }
            assert_eq!(docs, want, "prefix space, segments of {target} bytes");
        }
    }

    #[test]
    fn segments_cut_before_whitespace_after_non_space() {
        let text = "ab  c\nd \u{a0}e\u{a0} f\t\tg é h";
        for target in [1, 3, 100] {
            let segs = segments(text, target);
            assert_eq!(segs.concat(), text);
            for w in segs.windows(2) {
                let (prev, next) = (w[0].chars().last().unwrap(), w[1].chars().next().unwrap());
                assert!(
                    prev.is_ascii() && !prev.is_whitespace() && next.is_ascii_whitespace(),
                    "{segs:?}"
                );
            }
        }
        // no cut after a non-ASCII character (`\u{a0}` is whitespace, `é` is not: both are left alone)
        assert_eq!(
            segments(text, 1),
            ["ab", "  c", "\nd", " \u{a0}e\u{a0} f", "\t\tg", " é h"]
        );
        assert_eq!(segments("", 4), [""]);
    }

    #[test]
    fn fast_training_equals_crate_training() {
        let texts: Vec<String> = (0..150)
            .map(|i| format!("class K{i}:\n    def m(self):  \n        return 'x{i}' * {i}\n\n\n# ünï {i}\r\n"))
            .collect();
        let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
        let a = Tok::train_bpe(&refs, 420).unwrap();
        let b = Tok::train_bpe_reference(&refs, 420).unwrap();
        assert_eq!(a.to_json().unwrap(), b.to_json().unwrap());
    }

    #[test]
    fn vocab_size_out_of_range_is_an_error_not_an_abort() {
        for v in [0, 257, MAX_TRAINED_VOCAB + 1, u32::MAX] {
            let e = Tok::train_bpe(&["ab ab"], v).err().unwrap();
            assert!(matches!(e, Error::Invalid(_)), "{e}");
        }
        assert_eq!(Tok::train_bpe(&["ab ab"], 300).unwrap().vocab_size, 258);
    }

    #[test]
    fn bad_json_is_a_tokenizer_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokenizer.json");
        std::fs::write(&p, "{not json").unwrap();
        let e = Tok::from_file(&p, None).err().unwrap();
        assert!(matches!(e, Error::Tokenizer { .. }), "{e}");
    }
}
