//! Quantized blocks to f32, with the fastest kernel this CPU has.

use super::WeightData;
use crate::model::quant::{dequantize_scalar, QuantType};

/// Dequantizes whole blocks (`out.len()` elements).
pub(super) fn dequantize(qt: QuantType, blocks: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::Isa::detect() == super::Isa::Avx512 {
        if let Some(cpu) = super::avx512::Avx512::new() {
            return super::dequant_avx512::dequantize(cpu, qt, blocks, out);
        }
    }
    dequantize_scalar(qt, blocks, out);
}

/// `dst[r * len + k]` = element `r * stride + k` of quantized `src`, for `r < n_rows`,
/// `k < len` (`stride` and `len` multiples of the block).
pub(super) fn widen_quant(
    src: WeightData,
    stride: usize,
    n_rows: usize,
    len: usize,
    dst: &mut [f32],
) {
    let WeightData::Quant(qt, bytes) = src else {
        unreachable!("widen_quant takes quantized weights");
    };
    let (row_stride, row_bytes) = (qt.bytes_for(stride), qt.bytes_for(len));
    for r in 0..n_rows {
        let blocks = &bytes[r * row_stride..][..row_bytes];
        dequantize(qt, blocks, &mut dst[r * len..][..len]);
    }
}
