//! The element types the CPU's KV cache stores ([`crate::model::kv_cache::KvDtype`]), and how
//! attention writes and reads them.

/// A key/value element: `f32`, or `u16` holding an IEEE f16.
pub(crate) trait KvElement: bytemuck::Pod + Send + Sync {
    /// How the AVX-512 attention kernel widens 16 of them to f32.
    #[cfg(target_arch = "x86_64")]
    type Wide: super::matmul::avx512::Widen<Elem = Self>;

    /// Stores `src` into `dst` (same length), rounding to the element type.
    fn store(dst: &mut [Self], src: &[f32]);

    /// `src` as f32: itself, or converted into `buf` (at least as long).
    fn row_f32<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32];
}

impl KvElement for f32 {
    #[cfg(target_arch = "x86_64")]
    type Wide = super::matmul::avx512::F32;

    fn store(dst: &mut [f32], src: &[f32]) {
        dst.copy_from_slice(src);
    }

    fn row_f32<'a>(src: &'a [f32], _buf: &'a mut [f32]) -> &'a [f32] {
        src
    }
}

impl KvElement for u16 {
    #[cfg(target_arch = "x86_64")]
    type Wide = super::matmul::avx512::F16;

    fn store(dst: &mut [u16], src: &[f32]) {
        super::matmul::round_to_f16(src, dst);
    }

    fn row_f32<'a>(src: &'a [u16], buf: &'a mut [f32]) -> &'a [f32] {
        let buf = &mut buf[..src.len()];
        for (d, &s) in buf.iter_mut().zip(src) {
            *d = half::f16::from_bits(s).to_f32();
        }
        buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f16 storage rounds to nearest, clamps beyond f16's range, and reads back what it stored.
    #[test]
    fn f16_round_trip() {
        let src = [1.0f32, -2.5, 1.0 + 1.0 / 4096.0, 70000.0, -1e9, 3.0e-5];
        let mut stored = [0u16; 6];
        u16::store(&mut stored, &src);
        let mut buf = [0.0f32; 6];
        let back = u16::row_f32(&stored, &mut buf);
        // 1 + 2^-12 is a quarter of f16's step at 1: rounds down to 1.
        assert_eq!(&back[..3], &[1.0, -2.5, 1.0]);
        assert_eq!(&back[3..5], &[65504.0, -65504.0]);
        // Below f16's normal range the step is 2^-24: within half a step.
        assert!((back[5] - 3.0e-5).abs() <= 2f32.powi(-25), "{}", back[5]);
    }
}
