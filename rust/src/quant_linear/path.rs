//! The ways `QuantWeight::linear` can run, and which one this CPU and element type take.

use crate::attention_item::Elem;

/// The ways `linear` can run, slowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Path {
    /// Plain Rust.
    Portable,
    /// AVX2 + FMA + F16C (every x86 server CPU since 2013): rows dequantized to fp32, fp32 FMAs.
    Avx2,
    /// AVX-512 BF16, for bf16 x: codes decoded to bf16, VDPBF16PS (avx512.rs).
    Bf16Dot,
}

impl Path {
    /// Whether this CPU (and element type) can take the path.
    pub(super) fn usable<T: Elem>(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma") && has!("f16c");
            match self {
                Path::Portable => true,
                Path::Avx2 => avx2,
                Path::Bf16Dot => {
                    T::IS_BF16
                        && avx2
                        && has!("avx512f")
                        && has!("avx512bw")
                        && has!("avx512vl")
                        && has!("avx512bf16")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Path::Portable
        }
    }

    pub(super) fn best<T: Elem>() -> Path {
        [Path::Bf16Dot, Path::Avx2]
            .into_iter()
            .find(|p| p.usable::<T>())
            .unwrap_or(Path::Portable)
    }
}
