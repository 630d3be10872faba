//! Packing: documents' token ids -> one token stream in which every document is followed by EOS, plus
//! the start offset of each document in the stream.
//!
//! Input: the documents' ids concatenated (`tokens`, u32) and each document's length (`lengths`).
//! Output: `stream[starts[d] .. starts[d] + lengths[d]] = document d`, `stream[starts[d] + lengths[d]] = eos`,
//! `starts[0] = 0`, `starts[d + 1] = starts[d] + lengths[d] + 1`; the stream is written in the shard dtype
//! (u16 or u32), every id checked to be < vocab_size (the mask id = vocab_size never enters a stream).
//! Fixed windows over the stream need no copy (the reader slices the memory map), so this is all of packing.
//!
//! Work is split into contiguous runs of documents of about equal token count, copied in parallel (rayon).
use std::mem::MaybeUninit;

use crate::pool;
use rayon::prelude::*;

use crate::error::{Error, Result};

/// Input id type: u16 or u32.
pub trait Id: Copy + Send + Sync + Into<u32> {}
impl Id for u16 {}
impl Id for u32 {}

/// Output element: u16 or u32.
pub trait Item: Copy + Send + Sync {
    fn from_id(x: u32) -> Self;
}
impl Item for u16 {
    #[inline(always)]
    fn from_id(x: u32) -> Self {
        x as u16
    }
}
impl Item for u32 {
    #[inline(always)]
    fn from_id(x: u32) -> Self {
        x
    }
}

/// dst = src converted to the output type; returns the largest id. One pass, written so that it
/// vectorises (16 independent lanes for the running maximum).
#[inline(always)]
fn copy_max<I: Id, T: Item>(src: &[I], dst: &mut [MaybeUninit<T>]) -> u32 {
    const W: usize = 16;
    let mut lanes = [0u32; W];
    let mut s = src.chunks_exact(W);
    let mut d = dst.chunks_exact_mut(W);
    for (a, b) in (&mut s).zip(&mut d) {
        for k in 0..W {
            let x: u32 = a[k].into();
            lanes[k] = lanes[k].max(x);
            b[k].write(T::from_id(x));
        }
    }
    let mut max = lanes.into_iter().max().unwrap_or(0);
    for (a, b) in s.remainder().iter().zip(d.into_remainder()) {
        let x: u32 = (*a).into();
        max = max.max(x);
        b.write(T::from_id(x));
    }
    max
}

/// One run of whole documents: each copied (converted) and followed by EOS; returns the largest id.
#[inline(always)]
fn pack_run<I: Id, T: Item>(src: &[I], lens: &[u64], dst: &mut [MaybeUninit<T>], eos: u32) -> u32 {
    let (mut i, mut o) = (0usize, 0usize);
    let mut max = 0u32;
    for &l in lens {
        let l = l as usize;
        max = max.max(copy_max(&src[i..i + l], &mut dst[o..o + l]));
        dst[o + l].write(T::from_id(eos));
        i += l;
        o += l + 1;
    }
    max
}

/// `pack_run` compiled for AVX2, chosen at run time: the baseline x86-64 target (SSE2) has no unsigned
/// 32-bit max or narrowing pack (16M uint32 ids into uint16 on the 2-core dev machine: 2.66 ms with the
/// SSE2 loop, 1.68 ms with this one; a numpy copy of the output bytes took 1.1-1.4 ms).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn pack_run_avx2<I: Id, T: Item>(
    src: &[I],
    lens: &[u64],
    dst: &mut [MaybeUninit<T>],
    eos: u32,
) -> u32 {
    pack_run(src, lens, dst, eos)
}

/// The packed stream's length (the tokens + one EOS per document), checking that the lengths add up to
/// `n_tokens` without overflow. No allocation: `pack_into` checks its arguments with it.
pub fn stream_len(lengths: &[u64], n_tokens: usize) -> Result<usize> {
    let overflow = || Error::Invalid("document lengths overflow".into());
    let total = lengths
        .iter()
        .try_fold(0u64, |acc, &l| acc.checked_add(l))
        .ok_or_else(overflow)?;
    if total != n_tokens as u64 {
        return Err(Error::Invalid(format!(
            "document lengths sum to {total} but {n_tokens} tokens were given"
        )));
    }
    let n = total
        .checked_add(lengths.len() as u64)
        .ok_or_else(overflow)?;
    usize::try_from(n).map_err(|_| overflow())
}

/// Document starts in the packed stream (each document + 1 EOS), and the stream length.
/// Errors if the lengths do not add up to `n_tokens`.
pub fn doc_starts(lengths: &[u64], n_tokens: usize) -> Result<(Vec<u64>, usize)> {
    let n = stream_len(lengths, n_tokens)?;
    let mut starts = Vec::with_capacity(lengths.len());
    let mut pos: u64 = 0;
    for &l in lengths {
        starts.push(pos);
        pos += l + 1; // no overflow: the sum of l + 1 over the documents is n (checked above)
    }
    Ok((starts, n))
}

/// Pack into `out` (length = n_tokens + n_docs), writing every element. `out` may be uninitialised memory
/// (a fresh numpy array): it is only written, never read; the lengths are checked here (they must sum to
/// the number of tokens), so every slot of `out` is written whatever the caller passed.
pub fn pack_into<I: Id, T: Item>(
    tokens: &[I],
    lengths: &[u64],
    eos: u32,
    vocab_size: u32,
    out: &mut [MaybeUninit<T>],
) -> Result<()> {
    if eos >= vocab_size {
        return Err(Error::Invalid(format!(
            "eos_id {eos} >= vocab_size {vocab_size}"
        )));
    }
    let n = stream_len(lengths, tokens.len())?;
    if out.len() != n {
        return Err(Error::Invalid(format!(
            "output has {} slots, expected {} tokens + {} EOS",
            out.len(),
            tokens.len(),
            lengths.len()
        )));
    }
    // Runs of whole documents of ~`target` tokens: enough pieces to balance threads, big enough to stream.
    let target = (tokens.len() / (pool::threads()? * 8)).max(1 << 16);
    // (input ids, document lengths, output slots) of each run
    type Job<'a, I, T> = (&'a [I], &'a [u64], &'a mut [MaybeUninit<T>]);
    let mut jobs: Vec<Job<I, T>> = Vec::new();
    let (mut src, mut dst) = (tokens, out);
    let mut d0 = 0;
    while d0 < lengths.len() {
        let mut d1 = d0;
        let mut n = 0u64;
        while d1 < lengths.len() && (n as usize) < target {
            n += lengths[d1];
            d1 += 1;
        }
        let (s, srest) = src.split_at(n as usize);
        let (o, orest) = dst.split_at_mut(n as usize + (d1 - d0));
        jobs.push((s, &lengths[d0..d1], o));
        src = srest;
        dst = orest;
        d0 = d1;
    }
    #[cfg(target_arch = "x86_64")]
    let avx2 = std::arch::is_x86_feature_detected!("avx2");
    #[cfg(not(target_arch = "x86_64"))]
    let avx2 = false;
    let bad = pool::install(|| {
        jobs.into_par_iter()
            .map(|(src, lens, dst)| {
                #[cfg(target_arch = "x86_64")]
                if avx2 {
                    // SAFETY: the CPU supports AVX2 (detected above).
                    return unsafe { pack_run_avx2(src, lens, dst, eos) } >= vocab_size;
                }
                let _ = avx2;
                pack_run(src, lens, dst, eos) >= vocab_size
            })
            .reduce(|| false, |a, b| a || b)
    })?;
    if bad {
        // Rare path: find the first offender (and its document) for the message.
        let i = tokens
            .iter()
            .position(|&x| x.into() >= vocab_size)
            .unwrap_or(0);
        let mut d = 0usize;
        let mut acc = 0u64;
        while d < lengths.len() && acc + lengths[d] <= i as u64 {
            acc += lengths[d];
            d += 1;
        }
        let id: u32 = tokens.get(i).map_or(0, |&x| x.into());
        let what = if id == vocab_size {
            "equals the mask id (vocab_size)".to_string()
        } else {
            format!(">= vocab_size {vocab_size}")
        };
        return Err(Error::Invalid(format!(
            "token id {id} at input position {i} (document {d}) {what}"
        )));
    }
    Ok(())
}

/// Pack into a new vector. Returns (stream, starts).
pub fn pack<I: Id, T: Item>(
    tokens: &[I],
    lengths: &[u64],
    eos: u32,
    vocab_size: u32,
) -> Result<(Vec<T>, Vec<u64>)> {
    let (starts, n) = doc_starts(lengths, tokens.len())?;
    let mut out: Vec<T> = Vec::with_capacity(n);
    pack_into(
        tokens,
        lengths,
        eos,
        vocab_size,
        &mut out.spare_capacity_mut()[..n],
    )?;
    // SAFETY: pack_into wrote all n elements (it returned Ok).
    unsafe { out.set_len(n) };
    Ok((out, starts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_with_eos_and_starts() {
        let (s, st) = pack::<u32, u16>(&[5u32, 6, 7, 8], &[2, 0, 2], 0, 10).unwrap();
        assert_eq!(s, vec![5, 6, 0, 0, 7, 8, 0]);
        assert_eq!(st, vec![0, 3, 4]);
    }

    /// A length of u64::MAX is an error, not an overflow panic (debug builds check `l + 1`).
    #[test]
    fn doc_starts_refuses_overflowing_lengths() {
        assert!(doc_starts(&[u64::MAX], 0).is_err());
        assert!(doc_starts(&[u64::MAX - 1, 0], 0).is_err());
        assert!(doc_starts(&[1, 2], 3).unwrap() == (vec![0, 2], 5));
    }

    /// pack_into checks the lengths itself: lengths that do not cover the tokens (or the output) are an
    /// error before anything is written, never a panic or an unwritten slot.
    #[test]
    fn pack_into_refuses_lengths_that_do_not_cover_the_tokens() {
        let tokens = [1u32, 2, 3, 4];
        let mut out = vec![std::mem::MaybeUninit::<u32>::uninit(); 6];
        assert!(pack_into(&tokens, &[2, 1], 0, 10, &mut out[..5]).is_err()); // sums to 3, not 4
        assert!(pack_into(&tokens, &[2, 3], 0, 10, &mut out[..5]).is_err()); // sums to 5
        assert!(pack_into(&tokens, &[2, 2], 0, 10, &mut out[..5]).is_err()); // output 5 slots, needs 6
        assert!(pack_into(&tokens, &[2, 2], 0, 10, &mut out).is_ok());
    }

    #[test]
    fn many_docs_parallel_matches_serial() {
        let lengths: Vec<u64> = (0..5000).map(|i| (i * 37 % 301) as u64).collect();
        let total: u64 = lengths.iter().sum();
        let tokens: Vec<u32> = (0..total as u32).map(|i| i % 999 + 1).collect();
        let (s, st) = pack::<u32, u32>(&tokens, &lengths, 0, 1000).unwrap();
        let mut want = Vec::new();
        let mut i = 0usize;
        for &l in &lengths {
            want.extend_from_slice(&tokens[i..i + l as usize]);
            want.push(0);
            i += l as usize;
        }
        assert_eq!(s, want);
        assert_eq!(st.len(), lengths.len());
    }

    /// The portable loop and its AVX2 build write the same elements and find the same maximum, for every
    /// input/output type pair and lengths around the 16-lane blocks (each tested path, whatever the CPU).
    #[test]
    fn portable_and_avx2_runs_agree() {
        fn check<I: Id + Copy, T: Item + Copy + PartialEq + std::fmt::Debug>(conv: fn(u32) -> I) {
            let lens: Vec<u64> = vec![0, 1, 15, 16, 17, 31, 33, 100, 3];
            let total: u64 = lens.iter().sum();
            let src: Vec<I> = (0..total as u32)
                .map(|i| conv((i * 7919) % 60000))
                .collect();
            let n = total as usize + lens.len();
            let run = |avx2: bool| {
                let mut out: Vec<MaybeUninit<T>> = (0..n).map(|_| MaybeUninit::uninit()).collect();
                let max = if avx2 {
                    #[cfg(target_arch = "x86_64")]
                    {
                        if !std::arch::is_x86_feature_detected!("avx2") {
                            return None;
                        }
                        // SAFETY: the CPU supports AVX2 (checked just above).
                        unsafe { pack_run_avx2(&src, &lens, &mut out, 5) }
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    return None;
                } else {
                    pack_run(&src, &lens, &mut out, 5)
                };
                // SAFETY: pack_run writes every element of `out`.
                let v: Vec<T> = out
                    .into_iter()
                    .map(|x| unsafe { x.assume_init() })
                    .collect();
                Some((v, max))
            };
            let plain = run(false).unwrap();
            assert_eq!(
                plain.1,
                (0..total as u32).map(|i| (i * 7919) % 60000).max().unwrap()
            );
            if let Some(fast) = run(true) {
                assert_eq!(fast, plain);
            }
        }
        check::<u32, u16>(|x| x);
        check::<u32, u32>(|x| x);
        check::<u16, u16>(|x| x as u16);
        check::<u16, u32>(|x| x as u16);
    }

    #[test]
    fn rejects_bad_input() {
        assert!(pack::<u32, u16>(&[5u32, 10], &[2], 0, 10)
            .unwrap_err()
            .to_string()
            .contains("mask id"));
        assert!(pack::<u32, u16>(&[5u32, 6], &[3], 0, 10).is_err());
        assert!(pack::<u16, u16>(&[5u16], &[1], 10, 10).is_err());
        assert_eq!(
            pack::<u16, u32>(&[5u16], &[1], 0, 10).unwrap().0,
            vec![5u32, 0]
        );
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    use std::hint::black_box;

    fn naive(src: &[u16], dst: &mut [MaybeUninit<u16>]) -> u32 {
        let mut max = 0u32;
        for (y, &x) in dst.iter_mut().zip(src) {
            y.write(x);
            max = max.max(x as u32);
        }
        max
    }

    fn maxpass_memcpy(src: &[u16], dst: &mut [MaybeUninit<u16>]) -> u32 {
        let m = src.iter().fold(0u32, |m, &x| m.max(x as u32));
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr() as *mut u16, src.len())
        };
        m
    }

    #[test]
    #[ignore]
    fn time_pack() {
        let n = 16_000_000usize;
        let toks: Vec<u16> = (0..n).map(|i| (i % 30000) as u16 + 1).collect();
        let mut out: Vec<u16> = Vec::with_capacity(n + n / 500);
        type F = fn(&[u16], &mut [MaybeUninit<u16>]) -> u32;
        let fns: [(&str, F); 3] = [
            ("naive", naive),
            ("maxpass+memcpy", maxpass_memcpy),
            ("lanes", copy_max::<u16, u16>),
        ];
        let mut best = [f64::MAX; 4];
        for _ in 0..15 {
            for (k, (_, f)) in fns.iter().enumerate() {
                let t = std::time::Instant::now();
                let dst = out.spare_capacity_mut();
                let mut m = 0;
                for (a, b) in toks.chunks(500).zip(dst.chunks_mut(501)) {
                    m = m.max(f(a, &mut b[..a.len()]));
                }
                black_box(m);
                best[k] = best[k].min(t.elapsed().as_secs_f64());
            }
            let t = std::time::Instant::now();
            let c = black_box(toks.clone());
            best[3] = best[3].min(t.elapsed().as_secs_f64());
            drop(c);
        }
        for (k, (name, _)) in fns.iter().enumerate() {
            eprintln!("{name}: {:.2} ms", best[k] * 1e3);
        }
        eprintln!("vec clone (alloc + copy): {:.2} ms", best[3] * 1e3);
    }
}
