//! The unmasking sampler's token choice on the CPU: per row of (already guided) logits one token and its
//! confidence, bit for bit as `smdm.kernels._reference.choose_tokens_reference` (the PyTorch reference of the
//! contract in docs/CONTRACTS.md; `smdm.sampling._choose_unfiltered` without top-k / top-p) and the CUDA
//! kernel (csrc/unmask_sampler.cuh):
//!
//!   filter (top-k, top-p): order the ids by (NaN first, value descending, id ascending); keep the first k;
//!          top-p keeps the sorted prefix up to the first index whose running sum of
//!          q_j = fixed31(exp_neg_f32(l_j - m)) (kept ids only) reaches need = max(1, ceil(sum q * p));
//!          the other ids become -inf. The top id is always kept, so top and m below do not change.
//!   top = argmax_v l_v (lowest id on ties; a NaN counts as the largest value, as torch.argmax does)
//!   m = l_top, z_v = l_v - m, e_v = exp_neg_f32(z_v)
//!   S = f32(sum_v fixed31(e_v) * 2^-31)                  softmax normaliser, an exact integer sum
//!   T > 0: token = argmax over drawable v (l_v != -inf, not NaN) of l_v / T + g_v,
//!          g_v = -log_f32(-log_f32(u_v)), u_v = ((h >> 41) + 0.5) 2^-23, h = splitmix64(key ^ v),
//!          key = key(seed, step, position, GUMBEL); no drawable score: top
//!   T = 0: token = top
//!   confidence  prob:    exp_neg_f32(l_token - m) / S
//!               margin:  (1 - exp_neg_f32(l_2nd - m)) / S   (0 for the exp when there is no 2nd)
//!               entropy: f32(-sum_valid fixed31(-(e_v z_v)) 2^-31) / S - log_f32(S)   (= sum p log p)
//!
//! Every float32 operation is one IEEE operation in the reference's order (Rust never contracts a * b + c
//! into an fma), and log / exp are the same short op sequences as `smdm.kernels._reference.log_f32` /
//! `exp_neg_f32`, so the results are identical, not merely close. Rows run in parallel (rayon).
use rayon::prelude::*;

use crate::rng::{key, splitmix64, stream};

const LN2_HI: f32 = f32::from_bits(0x3F31_7200);
const LN2_LO: f32 = f32::from_bits(0x35BF_BE8E);
const LOG2E: f32 = f32::from_bits(0x3FB8_AA3B);
const LOG_C: [f32; 4] = [
    f32::from_bits(0x3E63_8E39), // 2/9
    f32::from_bits(0x3E92_4925), // 2/7
    f32::from_bits(0x3ECC_CCCD), // 2/5
    f32::from_bits(0x3F2A_AAAB), // 2/3
];
const EXP_C: [f32; 6] = [
    f32::from_bits(0x37D0_0D01), // 1/8!
    f32::from_bits(0x3950_0D01), // 1/7!
    f32::from_bits(0x3AB6_0B61), // 1/6!
    f32::from_bits(0x3C08_8889), // 1/5!
    f32::from_bits(0x3D2A_AAAB), // 1/4!
    f32::from_bits(0x3E2A_AAAB), // 1/3!
];
const TWO_M23: f32 = f32::from_bits(0x3400_0000); // 2^-23
const TWO31: f32 = 2_147_483_648.0;
const ROUND_MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23

/// Below this many logits the rows run on the calling thread (rayon's fork/join costs more).
const PAR_MIN_LOGITS: usize = 1 << 16;

/// Which confidence the sampler reports (`smdm.sampling.CONFIDENCES`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Confidence {
    Prob,
    Margin,
    Entropy,
}

impl Confidence {
    pub fn parse(name: &str) -> Option<Confidence> {
        match name {
            "prob" => Some(Confidence::Prob),
            "margin" => Some(Confidence::Margin),
            "entropy" | "neg_entropy" => Some(Confidence::Entropy),
            _ => None,
        }
    }
}

/// Natural log of a non-negative float32, op for op as `smdm::log_f32` (log 0 = -inf).
#[inline(always)]
pub fn log_f32(x: f32) -> f32 {
    let bits = x.to_bits() as i32;
    let mant = bits & 0x7F_FFFF;
    let big = (mant | 0x3F80_0000) > 0x3FB5_04F3; // m > sqrt(2): use m / 2 and e + 1
    let e = (bits >> 23) - 127 + big as i32;
    let m = f32::from_bits(
        (if big {
            mant | 0x3F00_0000
        } else {
            mant | 0x3F80_0000
        }) as u32,
    );
    let f = m - 1.0;
    let s = f / (f + 2.0);
    let s2 = s * s;
    let mut p = s2 * LOG_C[0] + LOG_C[1];
    p = p * s2 + LOG_C[2];
    p = p * s2 + LOG_C[3];
    p *= s2;
    let lm = s * 2.0 + s * p;
    let ef = e as f32;
    let out = ef * LN2_HI + (ef * LN2_LO + lm);
    if x == 0.0 {
        f32::NEG_INFINITY
    } else {
        out
    }
}

/// exp of a float32 <= 0 (or -inf), op for op as `smdm::exp_neg_f32` (0 below -80, and for NaN).
#[inline(always)]
pub fn exp_neg_f32(z: f32) -> f32 {
    let ok = z >= -80.0;
    let zc = if ok { z } else { 0.0 };
    // rintf (round half to even) for |x| < 2^22 without a libm call (x86-64's baseline has no roundss):
    // adding 1.5 * 2^23 leaves no fraction bits, so the addition rounds x to an integer, half to even
    let n = (zc * LOG2E + ROUND_MAGIC) - ROUND_MAGIC;
    let r = (zc - n * LN2_HI) - n * LN2_LO;
    let mut p = r * EXP_C[0] + EXP_C[1];
    for c in &EXP_C[2..] {
        p = p * r + c;
    }
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) << 23) as u32);
    if ok {
        p * scale
    } else {
        0.0
    }
}

/// floor(v * 2^31) for v in [0, 1]; NaN and negative values give 0 (`smdm::fixed31`). Every v here is in
/// that range (e = exp(z <= 0) <= 1, -(e z) <= 1/e), so x = v 2^31 <= 2^31: below 2^31 the largest float32
/// is 2^31 - 128, which an i32 holds, and 2^31 itself is the one value added back. i32 conversions keep the
/// loop vectorisable (there is no packed float32 -> int64 conversion before AVX-512).
#[inline(always)]
fn fixed31(v: f32) -> i64 {
    let x = v * TWO31;
    let below = (x.min(2_147_483_520.0) as i32) as i64 + if x == TWO31 { 128 } else { 0 };
    if x >= 0.0 {
        below
    } else {
        0
    }
}

/// An exact fixed-point sum as float32: f32(f64(sum) * 2^-31) (the int64 -> f64 conversion is exact here).
#[inline(always)]
fn unfix(sum: i64) -> f32 {
    (sum as f64 * (1.0 / 2_147_483_648.0)) as f32
}

/// The Gumbel noise of vocabulary id `v` for a row with Gumbel key `k`.
#[inline(always)]
pub fn gumbel(k: u64, v: u64) -> f32 {
    let h = splitmix64(k ^ v);
    let k23 = (h >> 41) as i32; // < 2^23: exact as i32 and as f32 (i32 -> f32 vectorises, u64 -> f32 does not)
    let u = (k23 as f32 + 0.5) * TWO_M23; // strictly inside (0, 1): g is finite
    -log_f32(-log_f32(u))
}

/// key(seed, step, position, GUMBEL): the Gumbel key of one row (the reference's `gumbel_keys`).
#[inline]
pub fn gumbel_key(seed: u64, step: u64, position: u64) -> u64 {
    key(&[seed, step, position, stream::GUMBEL])
}

/// torch.argmax over a row: the first NaN if there is one, else the first maximum.
fn argmax_torch(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x.is_nan() {
            return i;
        }
        if x > row[best] {
            best = i;
        }
    }
    best
}

/// Logits per chunk of the Gumbel pass: the noise and scores of a chunk are computed in a loop the compiler
/// vectorises, then scanned for the first maximum.
const CHUNK: usize = 64;

/// What the sampler was asked for (`smdm.sampling.choose_tokens`' keyword arguments).
#[derive(Clone, Copy, Debug)]
pub struct Choice {
    /// float32 temperature (0 = argmax)
    pub temperature: f32,
    pub confidence: Confidence,
    /// keep the k most likely ids (0 or >= V: off)
    pub top_k: usize,
    /// keep the smallest most-likely prefix whose mass reaches p (>= 1 or NaN: off)
    pub top_p: f64,
}

/// Token and confidence of one row; `key` its Gumbel key. Runs the AVX2 build of the same code where the
/// CPU has it (runtime check; no fma is enabled, so every operation stays one IEEE operation and the results
/// are the same bits).
pub fn choose_row(row: &[f32], key: u64, choice: &Choice) -> (i64, f32) {
    let v = row.len();
    let filtered;
    let row = if (choice.top_k > 0 && choice.top_k < v) || choice.top_p < 1.0 {
        filtered = filter_row(row, choice.top_k, choice.top_p);
        &filtered[..]
    } else {
        row
    };
    let (t, conf) = (choice.temperature, choice.confidence);
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { choose_row_avx2(row, key, t, conf) };
        }
    }
    choose_row_impl(row, key, t, conf)
}

/// A u64 whose ascending order is torch.sort(descending=True, stable=True)'s order of (value, id): NaN first,
/// then larger values, ties (-0 == +0 included) by lower id. High half: the value's bits mapped so that
/// unsigned order is descending float order; low half: the id (sorting plain integers is much faster than
/// sorting ids with a comparator that reads the row).
#[inline(always)]
fn sort_key(x: f32, id: u32) -> u64 {
    let b = if x == 0.0 { 0 } else { x.to_bits() }; // -0 == +0
    let ascending = if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }; // float order as u32 order
    let desc = if x.is_nan() { 0 } else { !ascending };
    ((desc as u64) << 32) | id as u64
}

/// The row with the ids that top-k / top-p exclude set to -inf (the reference's `_rows_reference` filter).
fn filter_row(row: &[f32], top_k: usize, top_p: f64) -> Vec<f32> {
    let v = row.len();
    let k = if top_k > 0 && top_k < v { top_k } else { v };
    let mut order: Vec<u64> = row
        .iter()
        .enumerate()
        .map(|(i, &x)| sort_key(x, i as u32))
        .collect();
    if k < v {
        order.select_nth_unstable(k - 1); // the k first of the total order as a set, then in order
        order.truncate(k);
    }
    order.sort_unstable(); // keys are unique (ids): a total order
    let id = |key: u64| (key & 0xFFFF_FFFF) as usize;
    let mut keep = k;
    if top_p < 1.0 {
        let m = row[id(order[0])]; // = row[top]
        let q: Vec<i64> = order
            .iter()
            .map(|&key| fixed31(exp_neg_f32(row[id(key)] - m)))
            .collect();
        let total: i64 = q.iter().sum();
        let need = if top_p <= 0.0 {
            1
        } else {
            ((total as f64 * top_p).ceil() as i64).max(1)
        };
        let mut run = 0i64;
        let mut cut = k; // the number of sorted ids whose running mass is still below `need`
        for (j, &qj) in q.iter().enumerate() {
            run += qj;
            if run >= need {
                cut = j;
                break;
            }
        }
        keep = k.min(cut + 1);
    }
    let mut out = vec![f32::NEG_INFINITY; v];
    for &key in &order[..keep] {
        out[id(key)] = row[id(key)];
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn choose_row_avx2(row: &[f32], key: u64, t: f32, conf: Confidence) -> (i64, f32) {
    choose_row_impl(row, key, t, conf)
}

#[inline(always)]
fn choose_row_impl(row: &[f32], key: u64, t: f32, conf: Confidence) -> (i64, f32) {
    let top = argmax_torch(row);
    let m = row[top];
    let (mut s_fix, mut a_fix) = (0i64, 0i64);
    if conf == Confidence::Entropy {
        for &l in row {
            let z = l - m;
            let e = exp_neg_f32(z);
            s_fix += fixed31(e);
            a_fix += if l != f32::NEG_INFINITY {
                fixed31(-(e * z))
            } else {
                0
            };
        }
    } else {
        for &l in row {
            s_fix += fixed31(exp_neg_f32(l - m));
        }
    }
    let s_f = unfix(s_fix);
    let mut tok = top;
    if t > 0.0 {
        let mut best = f32::NEG_INFINITY;
        let mut arg = usize::MAX;
        let mut score = [0f32; CHUNK];
        for (c, chunk) in row.chunks(CHUNK).enumerate() {
            let base = c * CHUNK;
            for (i, (&l, s)) in chunk.iter().zip(score.iter_mut()).enumerate() {
                let g = gumbel(key, (base + i) as u64);
                let drawable = l != f32::NEG_INFINITY && !l.is_nan();
                *s = if drawable {
                    l / t + g
                } else {
                    f32::NEG_INFINITY
                };
            }
            // the reference's argmax over scores that are never NaN: the first strict maximum; a score of
            // -inf (not drawable, or l / T overflowing) only "wins" when every score is -inf, where the
            // reference falls back to `top`
            for (i, &s) in score[..chunk.len()].iter().enumerate() {
                if s > best {
                    best = s;
                    arg = base + i;
                }
            }
        }
        if arg != usize::MAX {
            tok = arg;
        }
    }
    let c = match conf {
        Confidence::Prob => exp_neg_f32(row[tok] - m) / s_f,
        Confidence::Margin => {
            // torch max over the row with `top` set to -inf: NaN propagates
            let mut l2 = f32::NEG_INFINITY;
            for (v, &l) in row.iter().enumerate() {
                if v == top {
                    continue;
                }
                if l.is_nan() || l2.is_nan() {
                    l2 = f32::NAN;
                } else if l > l2 {
                    l2 = l;
                }
            }
            let e2 = if l2 == f32::NEG_INFINITY {
                0.0
            } else {
                exp_neg_f32(l2 - m)
            };
            (1.0 - e2) / s_f
        }
        Confidence::Entropy => -unfix(a_fix) / s_f - log_f32(s_f),
    };
    (tok as i64, c)
}

/// Every row of `logits` (rows x vocab, row-major): tokens[n], confs[n] for row n with the Gumbel key of
/// (seeds[n], steps[n], positions[n]). Slices must hold rows * vocab logits and rows entries each. Errs
/// only when the worker threads cannot start.
#[allow(clippy::too_many_arguments)]
pub fn choose_rows(
    logits: &[f32],
    vocab: usize,
    seeds: &[i64],
    steps: &[i64],
    positions: &[i64],
    choice: &Choice,
    tokens: &mut [i64],
    confs: &mut [f32],
) -> crate::error::Result<()> {
    let rows = tokens.len();
    assert!(
        vocab > 0 && logits.len() == rows * vocab,
        "caller checks the shapes"
    );
    let one = |(n, (tok, c)): (usize, (&mut i64, &mut f32))| {
        let k = gumbel_key(seeds[n] as u64, steps[n] as u64, positions[n] as u64);
        (*tok, *c) = choose_row(&logits[n * vocab..(n + 1) * vocab], k, choice);
    };
    if logits.len() >= PAR_MIN_LOGITS {
        crate::pool::install(|| {
            tokens
                .par_iter_mut()
                .zip(confs.par_iter_mut())
                .enumerate()
                .for_each(one)
        })?;
    } else {
        tokens
            .iter_mut()
            .zip(confs.iter_mut())
            .enumerate()
            .for_each(one);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(temperature: f32, confidence: Confidence) -> Choice {
        Choice {
            temperature,
            confidence,
            top_k: 0,
            top_p: 1.0,
        }
    }

    #[test]
    fn magic_rounding_is_round_half_to_even() {
        for i in -2000..=2000 {
            let x = i as f32 * 0.0625; // halves and quarters included
            assert_eq!((x + ROUND_MAGIC) - ROUND_MAGIC, x.round_ties_even(), "{x}");
        }
    }

    #[test]
    fn fixed31_equals_the_int64_conversion_on_its_domain() {
        let wide = |v: f32| {
            let x = v * TWO31;
            if x >= 0.0 {
                x as i64
            } else {
                0
            }
        };
        let mut vals = vec![
            0.0f32,
            1.0,
            f32::NAN,
            -0.5,
            f32::NEG_INFINITY,
            0.99999994,
            1e-30,
        ];
        vals.extend((0..100_000u64).map(|i| (splitmix64(i) >> 40) as f32 / (1u64 << 24) as f32));
        vals.extend((0..1000).map(|i| exp_neg_f32(-(i as f32) * 1e-7)));
        for v in vals {
            assert_eq!(fixed31(v), wide(v), "{v}");
        }
    }

    #[test]
    fn log_and_exp_are_close_to_libm() {
        for &x in &[1e-30f32, 1e-7, 0.1, 0.5, 1.0, 1.5, 2.0, 10.0, 1e20] {
            let got = log_f32(x) as f64;
            assert!(
                (got - (x as f64).ln()).abs() <= 2e-7 * (x as f64).ln().abs().max(1.0),
                "{x}"
            );
        }
        assert_eq!(log_f32(0.0), f32::NEG_INFINITY);
        for &z in &[0.0f32, -1e-5, -0.5, -1.0, -10.0, -79.0] {
            let got = exp_neg_f32(z) as f64;
            assert!(
                (got - (z as f64).exp()).abs() <= 4e-7 * (z as f64).exp(),
                "{z}"
            );
        }
        assert_eq!(exp_neg_f32(-81.0), 0.0);
        assert_eq!(exp_neg_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_neg_f32(f32::NAN), 0.0);
    }

    #[test]
    fn greedy_takes_the_first_maximum_and_reports_its_probability() {
        let row = [0.0f32, 2.0, 2.0, f32::NEG_INFINITY];
        let (tok, p) = choose_row(&row, 0, &plain(0.0, Confidence::Prob));
        assert_eq!(tok, 1);
        let want = 2.0f64.exp() / (1.0 + 2.0 * 2.0f64.exp());
        assert!((p as f64 - want).abs() < 1e-6);
        let (_, margin) = choose_row(&row, 0, &plain(0.0, Confidence::Margin));
        assert!(margin.abs() < 1e-6); // two equal maxima
    }

    #[test]
    fn excluded_ids_are_never_drawn() {
        let row = [f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY, 0.0];
        for k in 0..2000u64 {
            let (tok, _) = choose_row(&row, splitmix64(k), &plain(1.0, Confidence::Prob));
            assert!(tok == 1 || tok == 3);
        }
    }

    #[test]
    fn the_avx2_build_gives_the_same_bits_as_the_plain_build() {
        let vocab = 1000usize;
        let mut row: Vec<f32> = (0..vocab)
            .map(|i| ((splitmix64(i as u64) >> 40) as f32) * 1e-6 - 8.0)
            .collect();
        row[3] = f32::NEG_INFINITY;
        for (t, conf) in [
            (0.0, Confidence::Prob),
            (1.0, Confidence::Margin),
            (0.3, Confidence::Entropy),
        ] {
            for k in 0..50u64 {
                let (a, ca) = choose_row(&row, splitmix64(k), &plain(t, conf));
                let (b, cb) = choose_row_impl(&row, splitmix64(k), t, conf);
                assert_eq!((a, ca.to_bits()), (b, cb.to_bits()));
            }
        }
    }

    #[test]
    fn parallel_rows_equal_serial_rows() {
        let (rows, vocab) = (40usize, 4096usize);
        let logits: Vec<f32> = (0..rows * vocab)
            .map(|i| ((splitmix64(i as u64) >> 40) as f32) * 1e-6 - 8.0)
            .collect();
        let seeds: Vec<i64> = (0..rows as i64).collect();
        let steps = vec![3i64; rows];
        let pos: Vec<i64> = (0..rows as i64).map(|p| p * 7).collect();
        let choice = Choice {
            temperature: 0.7,
            confidence: Confidence::Entropy,
            top_k: 100,
            top_p: 0.9,
        };
        let (mut tok, mut conf) = (vec![0i64; rows], vec![0f32; rows]);
        choose_rows(
            &logits, vocab, &seeds, &steps, &pos, &choice, &mut tok, &mut conf,
        )
        .unwrap();
        for n in 0..rows {
            let k = gumbel_key(seeds[n] as u64, 3, pos[n] as u64);
            let (t1, c1) = choose_row(&logits[n * vocab..(n + 1) * vocab], k, &choice);
            assert_eq!((t1, c1.to_bits()), (tok[n], conf[n].to_bits()));
        }
    }

    #[test]
    fn top_k_keeps_the_k_largest_and_top_p_a_prefix_reaching_p() {
        let row = [0.0f32, 3.0, 1.0, 3.0, f32::NEG_INFINITY, 2.0];
        let kept = |r: Vec<f32>| -> Vec<usize> {
            (0..r.len())
                .filter(|&i| r[i] != f32::NEG_INFINITY)
                .collect()
        };
        assert_eq!(kept(filter_row(&row, 2, 1.0)), vec![1, 3]); // ties by lower id
        assert_eq!(kept(filter_row(&row, 3, 1.0)), vec![1, 3, 5]);
        assert_eq!(kept(filter_row(&row, 0, 1e-9)), vec![1]); // the top id is always kept
                                                              // softmax masses 0.41, 0.41, 0.15, ...: 0.5 needs the two 3.0s, 0.9 the 2.0 as well
        assert_eq!(kept(filter_row(&row, 0, 0.5)), vec![1, 3]);
        assert_eq!(kept(filter_row(&row, 0, 0.9)), vec![1, 3, 5]);
        assert_eq!(kept(filter_row(&row, 2, 0.9)), vec![1, 3]);
        let nan = [1.0f32, f32::NAN, 5.0];
        assert_eq!(kept(filter_row(&nan, 1, 1.0)), vec![1]); // NaN sorts first, as in torch.sort
    }
}
