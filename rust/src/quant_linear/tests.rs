use super::*;
use crate::attention_item::Bf16;

/// Every finite e4m3fn code against its definition: (-1)^s 2^(e-7) (1 + m/8), subnormals 2^-6 m/8.
#[test]
fn e4m3_codes_decode_exactly() {
    for code in 0u8..=255 {
        if code & 0x7f == 0x7f {
            continue; // NaN
        }
        let (s, e, m) = (code >> 7, i32::from((code >> 3) & 0xf), f32::from(code & 7));
        let mag = if e == 0 {
            2f32.powi(-6) * m / 8.0
        } else {
            2f32.powi(e - 7) * (1.0 + m / 8.0)
        };
        assert_eq!(
            e4m3_to_f32(code),
            if s == 1 { -mag } else { mag },
            "code {code:#x}"
        );
    }
}

fn reference(w: &QuantWeight<'_>, x: &[f64], m: usize) -> Vec<f64> {
    let mut out = vec![0f64; m * w.n];
    for i in 0..m {
        for n in 0..w.n {
            out[i * w.n + n] = (0..w.k)
                .map(|c| {
                    let s = w.scale[n * w.num_blocks() + (c + w.col_offset) / w.block_k];
                    x[i * w.k + c] * f64::from(decode(w.code, w.q[n * w.k + c])) * f64::from(s)
                })
                .sum();
        }
    }
    out
}

/// Deterministic pseudo-random values (an LCG), so the test needs no crate.
fn values(len: usize, seed: u64) -> Vec<u64> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            state >> 33
        })
        .collect()
}

#[test]
fn int8_codes_decode_as_signed_bytes() {
    assert_eq!(decode(Code::Int8, 0x81), -127.0);
    assert_eq!(decode(Code::Int8, 0x7f), 127.0);
}

#[test]
fn linear_matches_the_f64_reference_for_odd_shapes_offsets_and_threads() {
    // int8 is the same layout with one block per row (block_k = K, scale [N, 1]).
    for &(code, m, n, k, block_k, col_offset) in &[
        (Code::E4m3, 1, 1, 1, 1, 0),
        (Code::E4m3, 3, 5, 17, 4, 3),
        (Code::E4m3, 7, 37, 100, 48, 32),
        (Code::E4m3, 13, 64, 256, 128, 0),
        (Code::E4m3, 6, 9, 33, 16, 15),
        (Code::Int8, 5, 11, 70, 70, 0),
        (Code::Int8, 4, 8, 256, 256, 0),
    ] {
        let q: Vec<u8> = values(n * k, 1)
            .iter()
            .map(|v| (v % 256) as u8 & !0x7f | (v % 0x7e) as u8)
            .collect();
        let kb = (col_offset + k).div_ceil(block_k);
        let scale: Vec<f32> = values(n * kb, 2)
            .iter()
            .map(|v| 0.01 + (v % 100) as f32 / 1000.0)
            .collect();
        let w = QuantWeight {
            code,
            q: &q,
            scale: &scale,
            n,
            k,
            block_k,
            col_offset,
        };
        let x: Vec<f32> = values(m * k, 3)
            .iter()
            .map(|v| (v % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        let want = reference(&w, &x.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(), m);
        let mut first = vec![0f32; m * n];
        w.linear(&x, m, &mut first, 1).unwrap();
        for (got, want) in first.iter().zip(&want) {
            assert!(
                (f64::from(*got) - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "{got} vs {want}"
            );
        }
        let mut threaded = vec![0f32; m * n];
        w.linear(&x, m, &mut threaded, 3).unwrap();
        assert_eq!(first, threaded, "the thread count changes no bit");
        let xb: Vec<Bf16> = x.iter().map(|&v| Bf16::from_f32(v)).collect();
        let want_b = reference(
            &w,
            &xb.iter().map(|v| f64::from(v.to_f32())).collect::<Vec<_>>(),
            m,
        );
        let mut paths = 0;
        for path in [Path::Portable, Path::Avx2, Path::Bf16Dot] {
            if !path.usable::<Bf16>() {
                continue;
            }
            paths += 1;
            let mut out_b = vec![Bf16(0); m * n];
            w.linear_on(path, &xb, m, &mut out_b, 2).unwrap();
            for (got, want) in out_b.iter().zip(&want_b) {
                // fp32 sums of exact products, then one bf16 rounding (2^-9 relative) of the output.
                assert!(
                    (f64::from(got.to_f32()) - want).abs() <= 2f64.powi(-8) * want.abs() + 1e-6,
                    "{path:?}: {got:?} vs {want}"
                );
            }
        }
        assert!(paths >= 1);
    }
}

/// Every path on this CPU gives the same values within fp32 summation order, for both element
/// types, and a dropped or misplaced block scale is far outside that.
#[test]
fn every_usable_path_agrees_and_uses_the_block_scales() {
    let (m, n, k, block_k, col_offset) = (5, 9, 300, 128, 40);
    let q: Vec<u8> = values(n * k, 7)
        .iter()
        .map(|v| (v % 0x7e) as u8 | ((v % 2) as u8) << 7)
        .collect();
    let kb = (col_offset + k).div_ceil(block_k);
    let scale: Vec<f32> = values(n * kb, 8)
        .iter()
        .map(|v| 0.001 + (v % 97) as f32 / 100.0)
        .collect();
    let w = QuantWeight {
        code: Code::E4m3,
        q: &q,
        scale: &scale,
        n,
        k,
        block_k,
        col_offset,
    };
    let x: Vec<Bf16> = values(m * k, 9)
        .iter()
        .map(|v| Bf16::from_f32((v % 2001) as f32 / 1000.0 - 1.0))
        .collect();
    let run = |w: &QuantWeight, path: Path| {
        let mut out = vec![Bf16(0); m * n];
        w.linear_on(path, &x, m, &mut out, 1).unwrap();
        out.iter().map(|v| v.to_f32()).collect::<Vec<_>>()
    };
    let portable = run(&w, Path::Portable);
    let reversed: Vec<f32> = scale
        .chunks(kb)
        .flat_map(|r| r.iter().rev().copied())
        .collect();
    let swapped = QuantWeight {
        scale: &reversed,
        ..w
    };
    for path in [Path::Avx2, Path::Bf16Dot] {
        if !path.usable::<Bf16>() {
            continue;
        }
        let (got, wrong) = (run(&w, path), run(&swapped, path));
        let err = got
            .iter()
            .zip(&portable)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let off = wrong
            .iter()
            .zip(&portable)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let size = portable.iter().map(|v| v.abs()).fold(0f32, f32::max);
        assert!(err <= 2f32.powi(-7) * size, "{path:?}: {err} of {size}");
        assert!(
            off > 20.0 * err.max(2f32.powi(-9) * size),
            "{path:?}: misplaced scales moved it only {off}"
        );
    }
}

#[test]
fn bad_shapes_are_errors_naming_the_sizes() {
    let (q, scale) = (vec![0u8; 12], vec![1f32; 3]);
    let w = QuantWeight {
        code: Code::E4m3,
        q: &q,
        scale: &scale,
        n: 3,
        k: 4,
        block_k: 4,
        col_offset: 0,
    };
    let err = w.linear(&[0f32; 7], 2, &mut [0f32; 6], 1).unwrap_err();
    assert_eq!(err.to_string(), "x (M x K) must have 8 elements, got 7");
    let bad = QuantWeight { col_offset: 4, ..w };
    assert!(bad
        .linear(&[0f32; 8], 2, &mut [0f32; 6], 1)
        .unwrap_err()
        .to_string()
        .contains("col_offset"));
    let short = QuantWeight {
        scale: &scale[..2],
        ..w
    };
    assert_eq!(
        short
            .linear(&[0f32; 8], 2, &mut [0f32; 6], 1)
            .unwrap_err()
            .to_string(),
        "scale (N x KB) must have 3 elements, got 2"
    );
}

/// The bf16 decoding of the AVX-512 path is exact for every code (NaN codes as ±480, like decode).
#[cfg(target_arch = "x86_64")]
#[test]
fn bf16_decoding_is_exact_for_every_code() {
    if !Path::Bf16Dot.usable::<Bf16>() {
        return; // nothing to check on this CPU; the other paths are tested above
    }
    let codes: Vec<u8> = (0..=255u8).chain(0..=255u8).chain(0..7).collect(); // SIMD steps and a tail
    for code in [Code::E4m3, Code::Int8] {
        let mut got = vec![0u16; codes.len()];
        // SAFETY: Path::usable checked the features.
        unsafe { avx512::decode_bf16(code, &codes, &mut got) };
        for (&c, &bits) in codes.iter().zip(&got) {
            let want = decode(code, c);
            assert_eq!(
                f32::from_bits(u32::from(bits) << 16),
                want,
                "{code:?} code {c:#x}"
            );
        }
    }
}
