//! The kernel against a straightforward f64 attention, on random batches.

use super::*;
use crate::attention_item::Bf16;
use proptest::prelude::*;

/// A batch with shuffled cache blocks, as the block pool hands them out.
struct Batch {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    tables: Vec<i32>,
    qsl: Vec<i32>,
    lens: Vec<i32>,
    nh: usize,
    nkv: usize,
    d: usize,
    bs: usize,
}

fn values(seed: &mut u64, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((*seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
        })
        .collect()
}

fn batch(
    q_lens: &[usize],
    ctx_extra: &[usize],
    nkv: usize,
    group: usize,
    d: usize,
    bs: usize,
    seed: u64,
) -> Batch {
    let mut seed = seed;
    let nh = nkv * group;
    let lens: Vec<usize> = q_lens.iter().zip(ctx_extra).map(|(q, c)| q + c).collect();
    let mb = lens.iter().map(|l| l.div_ceil(bs)).max().unwrap_or(0);
    let num_blocks = lens.iter().map(|l| l.div_ceil(bs)).sum::<usize>() + 1;
    // Blocks in reverse order, so a kernel reading the wrong block cannot pass.
    let mut next = num_blocks;
    let mut tables = vec![-1i32; q_lens.len() * mb];
    for (r, l) in lens.iter().enumerate() {
        for c in 0..l.div_ceil(bs) {
            next -= 1;
            tables[r * mb + c] = next as i32;
        }
    }
    let t: usize = q_lens.iter().sum();
    let mut qsl = vec![0i32];
    for q in q_lens {
        qsl.push(qsl.last().unwrap() + *q as i32);
    }
    Batch {
        q: values(&mut seed, t * nh * d),
        k: values(&mut seed, num_blocks * bs * nkv * d),
        v: values(&mut seed, num_blocks * bs * nkv * d),
        tables,
        qsl,
        lens: lens.iter().map(|&l| l as i32).collect(),
        nh,
        nkv,
        d,
        bs,
    }
}

fn call<'a, T: Elem>(
    b: &'a Batch,
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    window: Option<usize>,
) -> PagedAttention<'a, T> {
    PagedAttention {
        q,
        k_cache: k,
        v_cache: v,
        block_tables: &b.tables,
        query_start_loc: &b.qsl,
        seq_lens: &b.lens,
        num_heads: b.nh,
        num_kv_heads: b.nkv,
        head_dim: b.d,
        block_size: b.bs,
        scale: 1.0 / (b.d as f32).sqrt(),
        sliding_window: window,
    }
}

/// Straightforward f64 attention, token by token.
fn reference(b: &Batch, window: Option<usize>) -> (Vec<f64>, Vec<f64>) {
    let (nh, nkv, d, bs) = (b.nh, b.nkv, b.d, b.bs);
    let mb = b.tables.len() / b.lens.len();
    let t = *b.qsl.last().unwrap() as usize;
    let (mut out, mut lse) = (vec![0.0; t * nh * d], vec![0.0; t * nh]);
    let scale = 1.0 / (d as f64).sqrt();
    for r in 0..b.lens.len() {
        let (lo, hi, ctx) = (b.qsl[r] as usize, b.qsl[r + 1] as usize, b.lens[r] as usize);
        for tok in lo..hi {
            let pos = ctx - (hi - lo) + (tok - lo);
            for h in 0..nh {
                let kvh = h / (nh / nkv);
                let keys: Vec<usize> = (0..=pos)
                    .filter(|&j| window.is_none_or(|w| pos - j < w))
                    .collect();
                let at =
                    |j: usize| ((b.tables[r * mb + j / bs] as usize * bs + j % bs) * nkv + kvh) * d;
                let scores: Vec<f64> = keys
                    .iter()
                    .map(|&j| {
                        (0..d)
                            .map(|x| b.q[(tok * nh + h) * d + x] as f64 * b.k[at(j) + x] as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for (s, &j) in scores.iter().zip(&keys) {
                    for x in 0..d {
                        out[(tok * nh + h) * d + x] +=
                            (s - max).exp() / total * b.v[at(j) + x] as f64;
                    }
                }
                lse[tok * nh + h] = max + total.ln();
            }
        }
    }
    (out, lse)
}

fn run_f32(b: &Batch, window: Option<usize>, threads: usize) -> (Vec<f32>, Vec<f32>) {
    let t = *b.qsl.last().unwrap() as usize;
    let (mut out, mut lse) = (vec![0.0f32; t * b.nh * b.d], vec![0.0f32; t * b.nh]);
    call(b, &b.q, &b.k, &b.v, window)
        .run(&mut out, Some(&mut lse), threads)
        .unwrap();
    (out, lse)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn equals_reference(
        reqs in prop::collection::vec((1usize..40, 0usize..1200), 1..4),
        nkv in 1usize..3, group in 1usize..4, d in prop::sample::select(vec![4usize, 16, 20, 32, 64]),
        bs in prop::sample::select(vec![1usize, 3, 16]), window in prop::option::of(1usize..700),
        seed in any::<u64>(),
    ) {
        let (q_lens, extra): (Vec<usize>, Vec<usize>) = reqs.into_iter().unzip();
        let b = batch(&q_lens, &extra, nkv, group, d, bs, seed);
        let (want, want_lse) = reference(&b, window);
        let (got, got_lse) = run_f32(&b, window, 1);
        for (g, w) in got.iter().zip(&want) {
            prop_assert!((*g as f64 - w).abs() < 2e-5, "out {g} vs {w}");
        }
        for (g, w) in got_lse.iter().zip(&want_lse) {
            prop_assert!((*g as f64 - w).abs() < 2e-5 * w.abs().max(1.0), "lse {g} vs {w}");
        }
        // The split of work depends on the batch only: any thread count, same bits.
        let (par, par_lse) = run_f32(&b, window, 3);
        prop_assert_eq!(par, got);
        prop_assert_eq!(par_lse, got_lse);
    }
}

#[test]
fn bf16_cache_and_queries() {
    let b = batch(&[1, 37, 1], &[700, 5, 0], 2, 3, 16, 16, 7);
    let to_bf16 = |x: &[f32]| x.iter().map(|&v| Bf16::from_f32(v)).collect::<Vec<_>>();
    let (q, k, v) = (to_bf16(&b.q), to_bf16(&b.k), to_bf16(&b.v));
    // The reference on the same bf16-rounded values; the output is then rounded once.
    let rounded = Batch {
        q: q.iter().map(|x| x.to_f32()).collect(),
        k: k.iter().map(|x| x.to_f32()).collect(),
        v: v.iter().map(|x| x.to_f32()).collect(),
        tables: b.tables.clone(),
        qsl: b.qsl.clone(),
        lens: b.lens.clone(),
        ..b
    };
    let (want, _) = reference(&rounded, None);
    let mut out = vec![Bf16(0); want.len()];
    call(&rounded, &q, &k, &v, None)
        .run(&mut out, None, 2)
        .unwrap();
    for (g, w) in out.iter().zip(&want) {
        assert!(
            (g.to_f32() as f64 - w).abs() <= w.abs() / 128.0 + 1e-6,
            "{} vs {w}",
            g.to_f32()
        );
    }
}

#[test]
fn bad_batches_are_errors_naming_the_value() {
    let b = batch(&[3, 1], &[4, 20], 1, 2, 4, 4, 1);
    let mut out = vec![0.0f32; 4 * 2 * 4];
    let mut tables = b.tables.clone();
    tables[1] = 999;
    let bad_block = PagedAttention {
        block_tables: &tables,
        ..call(&b, &b.q, &b.k, &b.v, None)
    };
    let err = bad_block.run(&mut out, None, 1).unwrap_err().to_string();
    assert!(
        err.contains("block_tables[0, 1]") && err.contains("999"),
        "{err}"
    );
    let lens = [2, 21];
    let short = PagedAttention {
        seq_lens: &lens,
        ..call(&b, &b.q, &b.k, &b.v, None)
    };
    let err = short.run(&mut out, None, 1).unwrap_err().to_string();
    assert!(
        err.contains("seq_lens[0]") && err.contains("got 2"),
        "{err}"
    );
    let err = call(&b, &b.q, &b.k, &b.v, None)
        .run(&mut out[1..], None, 1)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("out must be T * NH * D = 32 elements, got 31"),
        "{err}"
    );
}
