//! The forward process of a masked diffusion model (DESIGN §4, docs/CONTRACTS.md "Forward process"):
//! a batch of clean windows (B, L) -> noisy ids, the loss mask, t, p and the ELBO weights.
//!
//!   t_s = uniform(key(seed, step, s, TIME, 0)), or stratified over the global batch:
//!         u = uniform(key(seed, step, 0, STRATIFIED, 0)), x = u + s / global_batch, t_s = x - floor(x);
//!   effective time t'_s = (1 - eps) * t_s + eps (t floored at eps);
//!   p_s = 1 - alpha(t'_s), the masking probability of the noise schedule (`Schedule`; linear: p = t');
//!   token j of sample s is masked iff uniform(splitmix64(key(seed, step, s, TOKEN) ^ j)) < p_s
//!         and j >= prompt_len_s (SFT prompts are never masked);
//!   weight = f32(w(t'_s)) at masked tokens, 0 elsewhere, w = -alpha'/(1 - alpha) the ELBO weight
//!         (linear: 1/t', the paper's Eq. 3 with t floored at eps).
//! Random length: if uniform(key(seed, step, 0, CROP, 0)) < crop_prob every row is cut to
//!   1 + floor(uniform(key(seed, step, 0, CROP, 1)) * L) tokens (the same for every rank).
//! CFG prompt drop (SFT): sample s is unconditional iff uniform(key(seed, step, s, UNCOND, 0)) < p_uncond;
//!   its prompt positions then hold the mask id in the noisy ids. They stay out of the loss mask (the
//!   model is not asked to recover the prompt), so `mask`/`weight` do not change.
//!
//! `s` is the *global* sample index (`sample_offset + row`), so a sample draws the same mask whatever the
//! batch split, rank count or resume point. The numpy reference `smdm.diffusion.forward_process_reference`
//! defines the same arrays; the tests check exact equality (the schedules' sin/tan/pow are the C library's,
//! the same functions Python's `math` calls).
//!
//! Speed: per row one key and one threshold, then one splitmix64 per token compared as an integer
//! (`(h >> 11) < ceil(p * 2^53)` is exactly `uniform(h) < p`, see `mask_threshold`); rows run in parallel
//! with rayon when the batch is large enough to pay for it.
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::rng::{key, splitmix64, stream, uniform};

/// Below this many output tokens the rows run on the calling thread (rayon's fork/join costs more).
const PAR_MIN_TOKENS: usize = 1 << 15;

/// Integer token ids the forward process reads and writes (numpy uint16, uint32, int64).
pub trait TokenId: Copy + Send + Sync + 'static {
    /// numpy name, for error messages.
    const NAME: &'static str;
    /// Largest id the type holds.
    const MAX_ID: u64;
    /// Converts an id already checked against `MAX_ID`.
    fn from_id(id: u64) -> Self;
    /// `if hit { a } else { b }` without a branch (the hit pattern is random: a branch mispredicts half
    /// the time, and the select lets the compiler vectorise the token loop).
    fn select(hit: bool, a: Self, b: Self) -> Self;
}

macro_rules! token_id {
    ($t:ty, $name:literal) => {
        impl TokenId for $t {
            const NAME: &'static str = $name;
            const MAX_ID: u64 = <$t>::MAX as u64;
            #[inline(always)]
            fn from_id(id: u64) -> Self {
                id as $t
            }
            #[inline(always)]
            fn select(hit: bool, a: Self, b: Self) -> Self {
                let all = (hit as $t).wrapping_neg(); // all ones when hit
                (a & all) | (b & !all)
            }
        }
    };
}
token_id!(u16, "uint16");
token_id!(u32, "uint32");
token_id!(i64, "int64");

/// A noise schedule alpha_t (the probability that a token is still clean at time t), named in Python as
/// "linear", "cosine" or "polynomial:P". Each is defined by two float64 function chains of the effective
/// time t (docs/CONTRACTS.md), evaluated with the C library's sin/tan/pow so that the numpy reference
/// (Python's `math`, the same libm) gives the same bits:
///
/// | schedule        | p = 1 - alpha_t                | w = -alpha'_t / (1 - alpha_t) |
/// |-----------------|--------------------------------|-------------------------------|
/// | linear          | t                              | 1 / t                         |
/// | cosine          | 1 - sin((1 - t) * (pi/2))      | (pi/2) / tan(t * (pi/4))      |
/// | polynomial:P    | pow(t, P)                      | P / t                         |
///
/// Cosine is alpha_t = cos(pi t / 2), written as sin((1 - t) pi/2) so that p(0) = 0 and p(1) = 1 exactly,
/// and its weight (pi/2) sin(pi t/2) / (1 - cos(pi t/2)) = (pi/2) / tan(pi t / 4) without cancellation.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum Schedule {
    /// alpha_t = 1 - t (the paper's schedule, Eq. 2).
    #[default]
    Linear,
    /// alpha_t = cos(pi t / 2).
    Cosine,
    /// alpha_t = 1 - t^P, P > 0 finite.
    Polynomial(f64),
}

impl Schedule {
    /// Parses "linear", "cosine", "polynomial" (power 2) or "polynomial:P" (P a positive finite float).
    pub fn parse(name: &str) -> Result<Schedule> {
        let bad = |why: &str| {
            Err(Error::Invalid(format!(
                "unknown schedule '{name}'; expected 'linear', 'cosine' or 'polynomial:P' with P a \
                 positive number{why}"
            )))
        };
        match name {
            "linear" => Ok(Schedule::Linear),
            "cosine" => Ok(Schedule::Cosine),
            "polynomial" => Ok(Schedule::Polynomial(2.0)),
            _ => match name.strip_prefix("polynomial:") {
                Some(p) => match p.parse::<f64>() {
                    Ok(v) if v.is_finite() && v > 0.0 => Ok(Schedule::Polynomial(v)),
                    Ok(v) => bad(&format!(" (the power {v} is not)")),
                    Err(_) => bad(&format!(" (cannot read the power '{p}')")),
                },
                None => bad(""),
            },
        }
    }

    /// Masking probability p = 1 - alpha_t at (effective) time t in [0, 1].
    #[inline]
    pub fn mask_prob(self, t: f64) -> f64 {
        match self {
            Schedule::Linear => t,
            Schedule::Cosine => 1.0 - ((1.0 - t) * std::f64::consts::FRAC_PI_2).sin(),
            Schedule::Polynomial(power) => t.powf(power),
        }
    }

    /// ELBO weight w = -alpha'_t / (1 - alpha_t) at (effective) time t in (0, 1].
    #[inline]
    pub fn weight(self, t: f64) -> f64 {
        match self {
            Schedule::Linear => 1.0 / t,
            Schedule::Cosine => {
                std::f64::consts::FRAC_PI_2 / (t * std::f64::consts::FRAC_PI_4).tan()
            }
            Schedule::Polynomial(power) => power / t,
        }
    }
}

/// The settings of one call: the key (seed, step, sample_offset) and the schedule options.
#[derive(Clone, Debug, PartialEq)]
pub struct ForwardConfig {
    pub seed: u64,
    pub step: u64,
    /// Global index of row 0 in the step's global batch (rank * local_batch for a rank-major split).
    pub sample_offset: u64,
    /// Size of the step's global batch, the denominator of stratified t (None: the local batch size,
    /// allowed only when `sample_offset == 0`).
    pub global_batch: Option<u64>,
    pub mask_id: u64,
    /// Floor of the time: the effective time is t' = (1 - eps) * t + eps, eps in (0, 1].
    pub eps: f64,
    /// Stratified t over the global batch instead of i.i.d. uniform t.
    pub stratified: bool,
    /// Probability that the whole batch is cropped to a random length.
    pub crop_prob: f64,
    /// Probability that a sample's prompt is replaced by masks (CFG training); needs prompt lengths.
    pub p_uncond: f64,
    /// Noise schedule: masking probability and ELBO weight as functions of the effective time.
    pub schedule: Schedule,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        ForwardConfig {
            seed: 0,
            step: 0,
            sample_offset: 0,
            global_batch: None,
            mask_id: 0,
            eps: 1e-3,
            stratified: false,
            crop_prob: 0.01,
            p_uncond: 0.0,
            schedule: Schedule::Linear,
        }
    }
}

/// Output buffers of `forward_process_into`, allocated by the caller with `len = crop_length(..)`:
/// `noisy`, `mask`, `weight` hold `batch * len` elements (row-major), `t`, `p`, `uncond` hold `batch`.
pub struct ForwardOut<'a, T> {
    pub noisy: &'a mut [T],
    pub mask: &'a mut [bool],
    pub t: &'a mut [f64],
    pub p: &'a mut [f64],
    pub weight: &'a mut [f32],
    pub uncond: &'a mut [bool],
}

/// The forward process with its own output vectors (for Rust callers and tests).
#[derive(Clone, Debug, PartialEq)]
pub struct Noisy<T> {
    pub noisy: Vec<T>,
    pub mask: Vec<bool>,
    pub t: Vec<f64>,
    pub p: Vec<f64>,
    pub weight: Vec<f32>,
    pub uncond: Vec<bool>,
    /// Row length after the random-length crop.
    pub length: usize,
}

/// Row length after the random-length crop: `seq_len`, or with probability `crop_prob`
/// 1 + floor(uniform(key(seed, step, 0, CROP, 1)) * seq_len). Keyed by (seed, step) only, so every rank
/// crops its part of the global batch to the same length.
pub fn crop_length(seed: u64, step: u64, seq_len: usize, crop_prob: f64) -> usize {
    // `u < crop_prob` decides, so a NaN probability never crops (as in the numpy reference).
    let crop = uniform(key(&[seed, step, 0, stream::CROP, 0])) < crop_prob;
    if seq_len == 0 || !crop {
        return seq_len;
    }
    let u = uniform(key(&[seed, step, 0, stream::CROP, 1]));
    // u < 1 so the product is < seq_len; min() only guards the cast.
    1 + ((u * seq_len as f64).floor() as usize).min(seq_len - 1)
}

/// Diffusion time of global sample `s` (see the module docs). `global_batch` matters only when stratified.
#[inline]
pub fn sample_time(seed: u64, step: u64, s: u64, stratified: bool, global_batch: u64) -> f64 {
    if stratified {
        let u = uniform(key(&[seed, step, 0, stream::STRATIFIED, 0]));
        let x = u + s as f64 / global_batch as f64;
        x - x.floor()
    } else {
        uniform(key(&[seed, step, s, stream::TIME, 0]))
    }
}

/// Effective time t' = (1 - eps) * t + eps (two roundings, no fused multiply-add, like numpy); the
/// masking probability of the linear schedule.
#[inline]
pub fn effective_time(t: f64, eps: f64) -> f64 {
    (1.0 - eps) * t + eps
}

/// The integer threshold T with `(h >> 11) < T  <=>  uniform(h) < p` for every u64 h: uniform(h) is
/// k * 2^-53 with k = h >> 11 an integer below 2^53, exact in f64, and k * 2^-53 < p <=> k < p * 2^53
/// <=> k < ceil(p * 2^53) (scaling by a power of two is exact). T <= 2^53, so k and T fit an i64 and
/// the compare can be signed (one instruction in AVX2).
#[inline]
pub fn mask_threshold(p: f64) -> i64 {
    const TWO53: f64 = (1u64 << 53) as f64;
    if p <= 0.0 {
        0
    } else if p >= 1.0 {
        1 << 53 // every k < 2^53 passes
    } else {
        (p * TWO53).ceil() as i64
    }
}

/// Whether global sample `s` drops its prompt (CFG training).
#[inline]
pub fn drops_prompt(seed: u64, step: u64, s: u64, p_uncond: f64) -> bool {
    p_uncond > 0.0 && uniform(key(&[seed, step, s, stream::UNCOND, 0])) < p_uncond
}

/// Checks the arguments; returns the stratification denominator.
pub fn validate(
    cfg: &ForwardConfig,
    batch: usize,
    seq_len: usize,
    tokens_len: usize,
    prompt_lens: Option<&[i64]>,
    max_id: u64,
    dtype: &str,
) -> Result<u64> {
    let bad = |m: String| Err(Error::Invalid(m));
    if seq_len == 0 {
        return bad("forward_process: sequence length must be >= 1, got 0".into());
    }
    if batch.checked_mul(seq_len) != Some(tokens_len) {
        return bad(format!(
            "forward_process: tokens hold {tokens_len} ids, expected batch {batch} x length {seq_len}"
        ));
    }
    // `!(x > 0)` also rejects NaN.
    if !(cfg.eps > 0.0 && cfg.eps <= 1.0) {
        return bad(format!(
            "forward_process: eps must be in (0, 1], got {}",
            cfg.eps
        ));
    }
    if let Schedule::Polynomial(power) = cfg.schedule {
        if !(power.is_finite() && power > 0.0) {
            return bad(format!(
                "forward_process: the polynomial schedule needs a positive finite power, got {power}"
            ));
        }
    }
    if !(0.0..=1.0).contains(&cfg.crop_prob) {
        return bad(format!(
            "forward_process: crop_prob must be in [0, 1], got {}",
            cfg.crop_prob
        ));
    }
    if !(0.0..=1.0).contains(&cfg.p_uncond) {
        return bad(format!(
            "forward_process: p_uncond must be in [0, 1], got {}",
            cfg.p_uncond
        ));
    }
    if cfg.mask_id > max_id {
        return bad(format!(
            "forward_process: mask_id {} does not fit the token dtype {dtype} (max {max_id})",
            cfg.mask_id
        ));
    }
    if cfg.p_uncond > 0.0 && prompt_lens.is_none() {
        return bad("forward_process: p_uncond > 0 needs prompt_lens (the prompt to drop)".into());
    }
    if let Some(pl) = prompt_lens {
        if pl.len() != batch {
            return bad(format!(
                "forward_process: prompt_lens has {} entries, expected one per row ({batch})",
                pl.len()
            ));
        }
        if let Some((i, &v)) = pl
            .iter()
            .enumerate()
            .find(|(_, &v)| v < 0 || v as u64 > seq_len as u64)
        {
            return bad(format!(
                "forward_process: prompt_lens[{i}] = {v} is outside [0, {seq_len}] (the sequence length)"
            ));
        }
    }
    // One past the last sample index, in u128: sample indices go up to u64::MAX inclusive.
    let end = cfg.sample_offset as u128 + batch as u128;
    if end > u64::MAX as u128 + 1 {
        return bad("forward_process: sample_offset + batch overflows u64".into());
    }
    let gb = match cfg.global_batch {
        Some(g) => g,
        None if cfg.sample_offset == 0 => (batch as u64).max(1),
        None if cfg.stratified => return bad(
            "forward_process: stratified t with sample_offset > 0 needs global_batch (the step's \
                 global batch size)"
                .into(),
        ),
        // Used only by stratified t (not this case): the reference's sample_offset + batch, capped.
        None => end.min(u64::MAX as u128) as u64,
    };
    if cfg.global_batch.is_some() && (gb == 0 || end > gb as u128) {
        return bad(format!(
            "forward_process: global_batch {gb} must be >= 1 and cover sample_offset {} + batch {batch}",
            cfg.sample_offset
        ));
    }
    Ok(gb)
}

/// The token loop: position `first + k` is masked iff its hash is below the threshold. Branch-free so
/// that it vectorises (the splitmix64 multiplies become pmuludq sequences).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn mask_span<T: TokenId>(
    src: &[T],
    noisy: &mut [T],
    mask: &mut [bool],
    weight: &mut [f32],
    token_key: u64,
    first: u64,
    threshold: i64,
    w: f32,
    mask_tok: T,
) {
    let wbits = w.to_bits();
    for (k, (((&x, y), m), wt)) in src
        .iter()
        .zip(noisy.iter_mut())
        .zip(mask.iter_mut())
        .zip(weight.iter_mut())
        .enumerate()
    {
        let hit = ((splitmix64(token_key ^ (first + k as u64)) >> 11) as i64) < threshold;
        *y = T::select(hit, mask_tok, x);
        *m = hit;
        *wt = f32::from_bits(wbits & (hit as u32).wrapping_neg());
    }
}

/// `mask_span` compiled for AVX2 (4 lanes instead of SSE2's 2), chosen at run time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn mask_span_avx2<T: TokenId>(
    src: &[T],
    noisy: &mut [T],
    mask: &mut [bool],
    weight: &mut [f32],
    token_key: u64,
    first: u64,
    threshold: i64,
    w: f32,
    mask_tok: T,
) {
    mask_span(
        src, noisy, mask, weight, token_key, first, threshold, w, mask_tok,
    )
}

/// One row: copy (or drop) the protected prefix, then mask each later token with probability p.
#[inline]
#[allow(clippy::too_many_arguments)]
fn mask_row<T: TokenId>(
    src: &[T],
    noisy: &mut [T],
    mask: &mut [bool],
    weight: &mut [f32],
    token_key: u64,
    threshold: i64,
    w: f32,
    protect: usize,
    drop_prompt: bool,
    mask_tok: T,
) {
    let n = noisy.len();
    let src = &src[..n];
    let protect = protect.min(n);
    if drop_prompt {
        noisy[..protect].fill(mask_tok);
    } else {
        noisy[..protect].copy_from_slice(&src[..protect]);
    }
    mask[..protect].fill(false);
    weight[..protect].fill(0.0);
    let (src, noisy, mask, weight) = (
        &src[protect..],
        &mut noisy[protect..],
        &mut mask[protect..],
        &mut weight[protect..],
    );
    let first = protect as u64;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        unsafe {
            mask_span_avx2(
                src, noisy, mask, weight, token_key, first, threshold, w, mask_tok,
            )
        };
        return;
    }
    mask_span(
        src, noisy, mask, weight, token_key, first, threshold, w, mask_tok,
    );
}

/// The forward process into caller-owned buffers (see `ForwardOut`). `tokens` is (batch, seq_len)
/// row-major; the outputs have `len = crop_length(seed, step, seq_len, crop_prob)` columns. Returns `len`.
pub fn forward_process_into<T: TokenId>(
    cfg: &ForwardConfig,
    tokens: &[T],
    batch: usize,
    seq_len: usize,
    prompt_lens: Option<&[i64]>,
    out: ForwardOut<'_, T>,
) -> Result<usize> {
    let gb = validate(
        cfg,
        batch,
        seq_len,
        tokens.len(),
        prompt_lens,
        T::MAX_ID,
        T::NAME,
    )?;
    let len = crop_length(cfg.seed, cfg.step, seq_len, cfg.crop_prob);
    let n = batch * len;
    if out.noisy.len() != n || out.mask.len() != n || out.weight.len() != n {
        return Err(Error::Invalid(format!(
            "forward_process: output buffers must hold batch {batch} x cropped length {len} = {n} elements"
        )));
    }
    if out.t.len() != batch || out.p.len() != batch || out.uncond.len() != batch {
        return Err(Error::Invalid(format!(
            "forward_process: t, p and uncond buffers must hold batch = {batch} elements"
        )));
    }
    let ForwardOut {
        noisy,
        mask,
        t,
        p,
        weight,
        uncond,
    } = out;
    let (seed, step) = (cfg.seed, cfg.step);
    let mask_tok = T::from_id(cfg.mask_id);
    // Per-sample scalars (B of them): cheap, sequential.
    for i in 0..batch {
        let s = cfg.sample_offset + i as u64;
        t[i] = sample_time(seed, step, s, cfg.stratified, gb);
        p[i] = cfg.schedule.mask_prob(effective_time(t[i], cfg.eps));
        uncond[i] = drops_prompt(seed, step, s, cfg.p_uncond);
    }
    let (t, p, uncond) = (&*t, &*p, &*uncond);
    let row = |i: usize, noisy: &mut [T], mask: &mut [bool], weight: &mut [f32]| {
        let s = cfg.sample_offset + i as u64;
        let protect = prompt_lens.map_or(0, |pl| pl[i] as usize);
        mask_row(
            &tokens[i * seq_len..(i + 1) * seq_len],
            noisy,
            mask,
            weight,
            key(&[seed, step, s, stream::TOKEN]),
            mask_threshold(p[i]),
            cfg.schedule.weight(effective_time(t[i], cfg.eps)) as f32,
            protect,
            uncond[i],
            mask_tok,
        );
    };
    if len == 0 || batch == 0 {
        return Ok(len);
    }
    if n >= PAR_MIN_TOKENS && batch > 1 {
        crate::pool::install(|| {
            noisy
                .par_chunks_mut(len)
                .zip(mask.par_chunks_mut(len))
                .zip(weight.par_chunks_mut(len))
                .enumerate()
                .for_each(|(i, ((nz, m), w))| row(i, nz, m, w))
        })?;
    } else {
        for (i, ((nz, m), w)) in noisy
            .chunks_mut(len)
            .zip(mask.chunks_mut(len))
            .zip(weight.chunks_mut(len))
            .enumerate()
        {
            row(i, nz, m, w);
        }
    }
    Ok(len)
}

/// The forward process with freshly allocated outputs.
pub fn forward_process<T: TokenId + Default>(
    cfg: &ForwardConfig,
    tokens: &[T],
    batch: usize,
    seq_len: usize,
    prompt_lens: Option<&[i64]>,
) -> Result<Noisy<T>> {
    // Validate before allocating so a bad shape never sizes an allocation.
    validate(
        cfg,
        batch,
        seq_len,
        tokens.len(),
        prompt_lens,
        T::MAX_ID,
        T::NAME,
    )?;
    let len = crop_length(cfg.seed, cfg.step, seq_len, cfg.crop_prob);
    let mut r = Noisy {
        noisy: vec![T::default(); batch * len],
        mask: vec![false; batch * len],
        t: vec![0.0; batch],
        p: vec![0.0; batch],
        weight: vec![0.0; batch * len],
        uncond: vec![false; batch],
        length: len,
    };
    let out = ForwardOut {
        noisy: &mut r.noisy,
        mask: &mut r.mask,
        t: &mut r.t,
        p: &mut r.p,
        weight: &mut r.weight,
        uncond: &mut r.uncond,
    };
    forward_process_into(cfg, tokens, batch, seq_len, prompt_lens, out)?;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(batch: usize, len: usize) -> Vec<i64> {
        (0..batch * len).map(|i| (i % 1000) as i64).collect()
    }

    fn cfg(seed: u64) -> ForwardConfig {
        ForwardConfig {
            seed,
            step: 7,
            mask_id: 32000,
            crop_prob: 0.0,
            ..Default::default()
        }
    }

    #[test]
    fn threshold_matches_float_compare() {
        let ps = [
            1e-3,
            0.1,
            0.5,
            0.999_999,
            1.0 - 1e-16,
            0.3333333333333333,
            1.0,
        ];
        let mut h = 12345u64;
        for _ in 0..20_000 {
            h = splitmix64(h);
            for &p in &ps {
                assert_eq!(
                    ((h >> 11) as i64) < mask_threshold(p),
                    uniform(h) < p,
                    "h={h} p={p}"
                );
            }
        }
        // the boundary itself: k = T - 1 passes, k = T does not
        for &p in &ps[..6] {
            let t = mask_threshold(p) as u64;
            assert!(uniform((t - 1) << 11) < p && uniform(t << 11) >= p);
        }
    }

    /// Sample indices go up to u64::MAX inclusive: the last batch that fits is accepted (as by the numpy
    /// reference), one past it is an error; global_batch must cover the batch.
    #[test]
    fn sample_offset_up_to_the_last_index() {
        let x = tokens(2, 4);
        let at = |offset: u64, gb: Option<u64>| {
            let c = ForwardConfig {
                sample_offset: offset,
                global_batch: gb,
                ..cfg(0)
            };
            forward_process(&c, &x, 2, 4, None)
        };
        assert!(at(u64::MAX - 1, None).is_ok());
        assert!(at(u64::MAX, None).is_err());
        assert!(at(u64::MAX - 1, Some(u64::MAX)).is_err());
        assert!(at(3, Some(5)).is_ok() && at(4, Some(5)).is_err() && at(0, Some(0)).is_err());
    }

    #[test]
    fn row_semantics() {
        let (b, l) = (4, 300);
        let x = tokens(b, l);
        let r = forward_process(&cfg(1), &x, b, l, None).unwrap();
        assert_eq!(r.length, l);
        for i in 0..b {
            let w = (1.0 / r.p[i]) as f32;
            assert!(r.t[i] >= 0.0 && r.t[i] < 1.0);
            assert_eq!(r.p[i], 0.999 * r.t[i] + 1e-3);
            let tk = key(&[1, 7, i as u64, stream::TOKEN]);
            for j in 0..l {
                let k = i * l + j;
                let m = uniform(splitmix64(tk ^ j as u64)) < r.p[i];
                assert_eq!(r.mask[k], m);
                assert_eq!(r.noisy[k], if m { 32000 } else { x[k] });
                assert_eq!(r.weight[k], if m { w } else { 0.0 });
            }
        }
    }

    const SCHEDULES: [Schedule; 5] = [
        Schedule::Linear,
        Schedule::Cosine,
        Schedule::Polynomial(2.0),
        Schedule::Polynomial(0.5),
        Schedule::Polynomial(3.7),
    ];

    #[test]
    fn schedule_names_parse_or_fail_with_the_name() {
        assert_eq!(Schedule::parse("linear").unwrap(), Schedule::Linear);
        assert_eq!(Schedule::parse("cosine").unwrap(), Schedule::Cosine);
        assert_eq!(
            Schedule::parse("polynomial").unwrap(),
            Schedule::Polynomial(2.0)
        );
        assert_eq!(
            Schedule::parse("polynomial:0.5").unwrap(),
            Schedule::Polynomial(0.5)
        );
        assert_eq!(
            Schedule::parse("polynomial:1e+16").unwrap(),
            Schedule::Polynomial(1e16)
        );
        for bad in [
            "",
            "Linear",
            "cos",
            "polynomial:",
            "polynomial:0",
            "polynomial:-2",
            "polynomial:inf",
            "polynomial:NaN",
            "polynomial:two",
            "polynomial: 2",
            "linear:2",
        ] {
            let e = Schedule::parse(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("unknown schedule '{bad}'")), "{e}");
        }
    }

    #[test]
    fn schedule_endpoints_and_weights() {
        use std::f64::consts::PI;
        assert_eq!(std::f64::consts::FRAC_PI_2, PI / 2.0);
        assert_eq!(std::f64::consts::FRAC_PI_4, PI / 4.0);
        for sch in SCHEDULES {
            assert_eq!(sch.mask_prob(0.0), 0.0, "{sch:?}");
            assert_eq!(sch.mask_prob(1.0), 1.0, "{sch:?}");
            // w = -alpha' / (1 - alpha) = p' / p, checked by central differences
            for k in 1..100 {
                let t = k as f64 / 100.0;
                let h = 1e-6;
                let dp = (sch.mask_prob(t + h) - sch.mask_prob(t - h)) / (2.0 * h);
                let w = dp / sch.mask_prob(t);
                assert!((sch.weight(t) - w).abs() <= 1e-6 * w, "{sch:?} t={t}");
                assert!(
                    sch.mask_prob(t) > sch.mask_prob(t - 0.005),
                    "{sch:?} increasing"
                );
            }
        }
        // the linear weight is 1/t and power 1 is the linear schedule, bit for bit
        let mut h = 7u64;
        for _ in 0..10_000 {
            h = splitmix64(h);
            let t = uniform(h);
            assert_eq!(Schedule::Linear.mask_prob(t), t);
            assert_eq!(Schedule::Polynomial(1.0).mask_prob(t), t);
            assert_eq!(Schedule::Polynomial(1.0).weight(t), 1.0 / t);
        }
    }

    #[test]
    fn schedules_set_p_weight_and_mask_rate() {
        let (b, l) = (16, 4096);
        let x = tokens(b, l);
        for sch in SCHEDULES {
            let mut c = cfg(11);
            c.schedule = sch;
            c.stratified = true;
            let r = forward_process(&c, &x, b, l, None).unwrap();
            let (mut hits, mut expect, mut var) = (0.0, 0.0, 0.0);
            for i in 0..b {
                let te = 0.999 * r.t[i] + 1e-3;
                assert_eq!(r.p[i], sch.mask_prob(te));
                let w = sch.weight(te) as f32;
                let tk = key(&[11, 7, i as u64, stream::TOKEN]);
                for j in 0..l {
                    let k = i * l + j;
                    assert_eq!(r.mask[k], uniform(splitmix64(tk ^ j as u64)) < r.p[i]);
                    assert_eq!(r.weight[k], if r.mask[k] { w } else { 0.0 });
                    hits += r.mask[k] as u32 as f64;
                }
                expect += r.p[i] * l as f64;
                var += r.p[i] * (1.0 - r.p[i]) * l as f64;
            }
            // masked tokens: a sum of independent Bernoulli(p_i); 5 sigma
            assert!((hits - expect).abs() <= 5.0 * var.sqrt(), "{sch:?}");
        }
        // eps = 1: t' = 1, so every schedule masks everything
        for sch in SCHEDULES {
            let mut c = cfg(1);
            c.schedule = sch;
            c.eps = 1.0;
            let r = forward_process(&c, &x[..2 * l], 2, l, None).unwrap();
            assert!(r.mask.iter().all(|&m| m), "{sch:?}");
        }
    }

    #[test]
    fn bad_polynomial_power_is_an_error() {
        let x = tokens(2, 10);
        for power in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let mut c = cfg(0);
            c.schedule = Schedule::Polynomial(power);
            let e = forward_process(&c, &x, 2, 10, None)
                .unwrap_err()
                .to_string();
            assert!(e.contains("positive finite power"), "{e}");
        }
    }

    #[test]
    fn portable_and_avx2_loops_agree() {
        let n = 1000;
        let src: Vec<u32> = (0..n as u32).collect();
        let run = |avx2: bool| {
            let (mut y, mut m, mut w) = (vec![0u32; n], vec![false; n], vec![0f32; n]);
            let thr = mask_threshold(0.37);
            if avx2 {
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: AVX2 is present.
                    unsafe { mask_span_avx2(&src, &mut y, &mut m, &mut w, 99, 5, thr, 2.5, 7) };
                    return Some((y, m, w));
                }
                return None;
            }
            mask_span(&src, &mut y, &mut m, &mut w, 99, 5, thr, 2.5, 7);
            Some((y, m, w))
        };
        let (y, m, w) = run(false).unwrap();
        for k in 0..n {
            let hit = uniform(splitmix64(99 ^ (5 + k as u64))) < 0.37;
            assert_eq!(
                (m[k], y[k], w[k]),
                (
                    hit,
                    if hit { 7 } else { k as u32 },
                    if hit { 2.5 } else { 0.0 }
                )
            );
        }
        if let Some(v) = run(true) {
            assert_eq!(v, (y, m, w));
        }
    }

    #[test]
    fn split_invariance_and_parallel_path() {
        // 64 x 1024 takes the rayon path; its halves with sample_offset must give the same rows.
        let (b, l) = (64, 1024);
        let x = tokens(b, l);
        let mut c = cfg(3);
        c.stratified = true;
        c.global_batch = Some(b as u64);
        let full = forward_process(&c, &x, b, l, None).unwrap();
        let h = b / 2;
        let lo = forward_process(&c, &x[..h * l], h, l, None).unwrap();
        c.sample_offset = h as u64;
        let hi = forward_process(&c, &x[h * l..], h, l, None).unwrap();
        assert_eq!([lo.noisy, hi.noisy].concat(), full.noisy);
        assert_eq!([lo.mask, hi.mask].concat(), full.mask);
        assert_eq!([lo.weight, hi.weight].concat(), full.weight);
        assert_eq!([lo.t, hi.t].concat(), full.t);
    }

    #[test]
    fn stratified_covers_each_bin_once() {
        let b = 16;
        let mut c = cfg(5);
        c.stratified = true;
        let r = forward_process(&c, &tokens(b, 8), b, 8, None).unwrap();
        let mut bins: Vec<usize> = r.t.iter().map(|t| (t * b as f64) as usize).collect();
        bins.sort_unstable();
        assert_eq!(bins, (0..b).collect::<Vec<_>>());
    }

    #[test]
    fn prompts_protected_and_dropped() {
        let (b, l) = (8, 64);
        let x = tokens(b, l);
        let pl: Vec<i64> = (0..b as i64).map(|i| i * 8).collect();
        let mut c = cfg(9);
        c.eps = 1.0; // p = 1: every non-prompt token masked
        c.p_uncond = 0.5;
        let r = forward_process(&c, &x, b, l, Some(&pl)).unwrap();
        assert!(r.uncond.iter().any(|&u| u) && r.uncond.iter().any(|&u| !u));
        for (i, &prompt) in pl.iter().enumerate() {
            for j in 0..l {
                let k = i * l + j;
                let in_prompt = (j as i64) < prompt;
                assert_eq!(r.mask[k], !in_prompt);
                let want = if !in_prompt || r.uncond[i] {
                    32000
                } else {
                    x[k]
                };
                assert_eq!(r.noisy[k], want);
            }
        }
    }

    #[test]
    fn crop_is_shared_and_in_range() {
        let mut c = cfg(2);
        c.crop_prob = 1.0;
        for step in 0..200 {
            c.step = step;
            let len = crop_length(c.seed, step, 50, 1.0);
            assert!((1..=50).contains(&len));
            let r = forward_process(&c, &tokens(2, 50), 2, 50, None).unwrap();
            assert_eq!(r.length, len);
            assert_eq!(r.noisy.len(), 2 * len);
        }
        assert_eq!(crop_length(2, 0, 50, 0.0), 50);
    }

    #[test]
    fn dtypes_agree() {
        let (b, l) = (3, 100);
        let x64 = tokens(b, l);
        let x16: Vec<u16> = x64.iter().map(|&v| v as u16).collect();
        let x32: Vec<u32> = x64.iter().map(|&v| v as u32).collect();
        let a = forward_process(&cfg(4), &x64, b, l, None).unwrap();
        let b16 = forward_process(&cfg(4), &x16, b, l, None).unwrap();
        let b32 = forward_process(&cfg(4), &x32, b, l, None).unwrap();
        assert_eq!(a.mask, b16.mask);
        assert_eq!(a.mask, b32.mask);
        assert!(b16.noisy.iter().zip(&a.noisy).all(|(&u, &v)| u as i64 == v));
    }

    #[test]
    fn bad_arguments_are_errors() {
        let x = tokens(2, 10);
        let err = |c: &ForwardConfig, pl: Option<&[i64]>| {
            forward_process(c, &x, 2, 10, pl).unwrap_err().to_string()
        };
        let mut c = cfg(0);
        c.eps = 0.0;
        assert!(err(&c, None).contains("eps must be in (0, 1]"));
        c.eps = f64::NAN;
        assert!(err(&c, None).contains("eps"));
        let mut c = cfg(0);
        c.p_uncond = 0.1;
        assert!(err(&c, None).contains("needs prompt_lens"));
        assert!(err(&cfg(0), Some(&[0, 11])).contains("prompt_lens[1] = 11"));
        assert!(err(&cfg(0), Some(&[0])).contains("one per row"));
        let mut c = cfg(0);
        c.crop_prob = 1.5;
        assert!(err(&c, None).contains("crop_prob"));
        let mut c = cfg(0);
        c.stratified = true;
        c.sample_offset = 4;
        assert!(err(&c, None).contains("needs global_batch"));
        c.global_batch = Some(5);
        assert!(err(&c, None).contains("global_batch 5"));
        let x16 = vec![0u16; 20];
        let mut c = cfg(0);
        c.mask_id = 70000;
        let e = forward_process(&c, &x16, 2, 10, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not fit the token dtype uint16"), "{e}");
        assert!(forward_process(&cfg(0), &x, 3, 10, None).is_err());
        assert!(forward_process(&cfg(0), &x[..0], 0, 0, None).is_err());
    }
}
