//! GGML's block-quantized tensor types (as GGUF files store them): block layouts, and a
//! portable dequantization to f32 that is the reference for the vectorised kernels.
//!
//! A quantized row is a run of blocks; each block holds `block_elems` consecutive elements in
//! `block_bytes` bytes, little-endian, scales as IEEE f16. Layouts, per block:
//! - `Q8_0` (32): f16 `d`, 32 × i8 `q`; `x = d·q`.
//! - `Q4_0` (32): f16 `d`, 16 bytes of nibbles: element `j` is the low nibble of byte `j`,
//!   element `j + 16` its high nibble; `x = d·(q − 8)`.
//! - `Q4_1` (32): f16 `d`, f16 `m`, nibbles as `Q4_0`; `x = d·q + m`.
//! - `Q5_0` (32): f16 `d`, u32 `qh` (bit `j` is element `j`'s fifth bit), nibbles as `Q4_0`;
//!   `x = d·(q − 16)`.
//! - `Q5_1` (32): f16 `d`, f16 `m`, u32 `qh`, nibbles; `x = d·q + m`.
//! - `Q4_K` (256): f16 `d`, f16 `dmin`, 12 bytes packing eight 6-bit scales and eight 6-bit
//!   mins, 128 bytes of nibbles. Sub-block `s` (32 elements) is `x = d·sc[s]·q − dmin·m[s]`;
//!   each 64 elements take 32 bytes, low nibbles first.
//! - `Q6_K` (256): 128 bytes of low nibbles, 64 bytes of 2-bit high parts, 16 × i8 scales (one
//!   per 16 elements), f16 `d`; `x = d·sc·(q − 32)`.
//! - `Q2_K` (256): 16 bytes of scales (one per 16 elements: scale in the low nibble, min in the
//!   high), 64 bytes of 2-bit quants, f16 `d`, f16 `dmin`; `x = d·sc·q − dmin·m`. Element `e`
//!   (`n = e / 128`, `j = e % 128 / 32`, `l = e % 32`) is bits `2j..2j+2` of quant byte
//!   `32n + l`.
//! - `Q3_K` (256): 32 bytes of high-bit masks, 64 bytes of 2-bit quants (as `Q2_K`), 12 bytes
//!   packing sixteen 6-bit scales, f16 `d`; `x = d·(sc − 32)·(q − 4·[high bit clear])`, the high
//!   bit of element `e` being bit `e / 32` of mask byte `e % 32`.
//! - `Q5_K` (256): f16 `d`, f16 `dmin`, 12 scale/min bytes as `Q4_K`, 32 bytes of fifth bits
//!   (element `e`'s is bit `e / 32` of byte `e % 32`), 128 bytes of nibbles as `Q4_K`;
//!   `x = d·sc·q − dmin·m`.
//! - `IQ4_NL` (32): f16 `d`, nibbles as `Q4_0`; `x = d·T[q]` with `T` the fixed non-linear
//!   table [`IQ4_VALUES`].
//! - `IQ4_XS` (256): f16 `d`, u16 of high scale bits, 4 bytes of low scale nibbles, 128 bytes of
//!   nibbles; sub-block `s` (32 elements, nibbles as `IQ4_NL`) has the 6-bit scale `ls` (low
//!   nibble `s % 2` of byte `s / 2`, high bits `2s..2s+2` of the u16) and `x = d·(ls − 32)·T[q]`.

/// A block-quantized tensor type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantType {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q6K,
    Q2K,
    Q3K,
    Q5K,
    Iq4Nl,
    Iq4Xs,
}

impl QuantType {
    pub const ALL: [QuantType; 12] = [
        QuantType::Q4_0,
        QuantType::Q4_1,
        QuantType::Q5_0,
        QuantType::Q5_1,
        QuantType::Q8_0,
        QuantType::Q4K,
        QuantType::Q6K,
        QuantType::Q2K,
        QuantType::Q3K,
        QuantType::Q5K,
        QuantType::Iq4Nl,
        QuantType::Iq4Xs,
    ];

    /// Elements per block.
    pub const fn block_elems(self) -> usize {
        match self {
            QuantType::Q4K
            | QuantType::Q6K
            | QuantType::Q2K
            | QuantType::Q3K
            | QuantType::Q5K
            | QuantType::Iq4Xs => 256,
            QuantType::Q4_0
            | QuantType::Q4_1
            | QuantType::Q5_0
            | QuantType::Q5_1
            | QuantType::Q8_0
            | QuantType::Iq4Nl => 32,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            QuantType::Q4_0 => 18,
            QuantType::Q4_1 => 20,
            QuantType::Q5_0 => 22,
            QuantType::Q5_1 => 24,
            QuantType::Q8_0 => 34,
            QuantType::Q4K => 144,
            QuantType::Q6K => 210,
            QuantType::Q2K => 84,
            QuantType::Q3K => 110,
            QuantType::Q5K => 176,
            QuantType::Iq4Nl => 18,
            QuantType::Iq4Xs => 136,
        }
    }

    /// The name GGUF tools use (`Q4_K`, ...).
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Q4_0 => "Q4_0",
            QuantType::Q4_1 => "Q4_1",
            QuantType::Q5_0 => "Q5_0",
            QuantType::Q5_1 => "Q5_1",
            QuantType::Q8_0 => "Q8_0",
            QuantType::Q4K => "Q4_K",
            QuantType::Q6K => "Q6_K",
            QuantType::Q2K => "Q2_K",
            QuantType::Q3K => "Q3_K",
            QuantType::Q5K => "Q5_K",
            QuantType::Iq4Nl => "IQ4_NL",
            QuantType::Iq4Xs => "IQ4_XS",
        }
    }

    /// Bytes of `elems` elements (`elems` a multiple of the block).
    pub fn bytes_for(self, elems: usize) -> usize {
        elems / self.block_elems() * self.block_bytes()
    }

    /// Where a block keeps its f16 fields (the scale, and the min where the type has one),
    /// as byte offsets.
    pub fn f16_fields(self) -> &'static [usize] {
        match self {
            QuantType::Q8_0
            | QuantType::Q4_0
            | QuantType::Q5_0
            | QuantType::Iq4Nl
            | QuantType::Iq4Xs => &[0],
            QuantType::Q4_1 | QuantType::Q5_1 | QuantType::Q4K | QuantType::Q5K => &[0, 2],
            QuantType::Q6K => &[208],
            QuantType::Q2K => &[80, 82],
            QuantType::Q3K => &[108],
        }
    }
}

/// `n` blocks of random quants, for tests and synthetic benchmark weights: every byte from
/// a draw of `random` (values in [-1, 1) mapped onto 0..=255), then every f16 field (the
/// scale, and the min where the type has one) set to `scale` times a further draw, so the
/// blocks decode to finite values of a chosen size.
pub fn random_blocks(
    qt: QuantType,
    n: usize,
    scale: f32,
    mut random: impl FnMut() -> f32,
) -> Vec<u8> {
    let mut bytes: Vec<u8> = (0..n * qt.block_bytes())
        .map(|_| ((random() + 1.0) * 128.0) as u8)
        .collect();
    for block in bytes.chunks_exact_mut(qt.block_bytes()) {
        for &at in qt.f16_fields() {
            let v = half::f16::from_f32(random() * scale)
                .to_bits()
                .to_le_bytes();
            block[at..at + 2].copy_from_slice(&v);
        }
    }
    bytes
}

/// An f16 stored little-endian at `b[0..2]`, as f32.
#[inline]
pub(crate) fn f16_at(b: &[u8]) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

/// Scale and min of `Q4_K` sub-block `j` (0..8) from the 12 packed bytes `s`: sub-blocks
/// 0-3 keep theirs in the low 6 bits of bytes `j` and `j + 4`; 4-7 put their low 4 bits in
/// byte `j + 4`'s nibbles and their top 2 bits in the spare top bits of bytes `j - 4` and `j`.
#[inline]
pub(crate) fn q4k_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Scale `j` (0..16) of a `Q3_K` block from the 12 packed bytes `s`, before the −32: its low
/// nibble is nibble `j / 8` of byte `j % 8`, its top 2 bits are bits `2·(j / 4)..` of byte
/// `8 + j % 4`.
#[inline]
pub(crate) fn q3k_scale(j: usize, s: &[u8]) -> u8 {
    let low = (s[j % 8] >> (4 * (j / 8))) & 0x0f;
    let high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
    low | (high << 4)
}

/// The 16 values an `IQ4_NL` / `IQ4_XS` nibble selects (GGML's fixed non-linear grid).
pub const IQ4_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// The 6-bit scale of `IQ4_XS` sub-block `s` (0..8), before the −32: low nibble `s % 2` of
/// `low[s / 2]`, top bits `2s..2s+2` of `high`.
#[inline]
pub(crate) fn iq4xs_scale(s: usize, high: u16, low: &[u8]) -> u8 {
    ((low[s / 2] >> (4 * (s % 2))) & 0x0f) | ((((high >> (2 * s)) & 3) as u8) << 4)
}

/// The 2-bit quant of element `e` (0..256) of a `Q2_K` / `Q3_K` block from its 64 quant
/// bytes: bits `2j..2j+2` of byte `32n + l`, for `n = e / 128`, `j = e % 128 / 32`,
/// `l = e % 32`.
#[inline]
fn two_bit_quant(qs: &[u8], e: usize) -> u8 {
    (qs[32 * (e / 128) + e % 32] >> (2 * (e % 128 / 32))) & 3
}

/// 32 elements of an `IQ4_NL` block or `IQ4_XS` sub-block: scale `d`, 16 nibble bytes `qs`
/// (element `j` the low nibble of byte `j`, element `j + 16` its high nibble).
fn iq4_sub_block(d: f32, qs: &[u8], y: &mut [f32]) {
    for (j, &q) in qs.iter().enumerate() {
        y[j] = d * f32::from(IQ4_VALUES[usize::from(q & 0x0f)]);
        y[j + 16] = d * f32::from(IQ4_VALUES[usize::from(q >> 4)]);
    }
}

/// Dequantizes whole blocks: `out.len()` must be `blocks.len() / block_bytes * block_elems`.
pub fn dequantize_scalar(qt: QuantType, blocks: &[u8], out: &mut [f32]) {
    let (be, bb) = (qt.block_elems(), qt.block_bytes());
    assert_eq!(blocks.len() % bb, 0, "{}: partial block", qt.name());
    assert_eq!(
        out.len(),
        blocks.len() / bb * be,
        "{}: output length",
        qt.name()
    );
    for (b, y) in blocks.chunks_exact(bb).zip(out.chunks_exact_mut(be)) {
        match qt {
            QuantType::Q8_0 => {
                let d = f16_at(b);
                for (y, &q) in y.iter_mut().zip(&b[2..34]) {
                    *y = d * f32::from(q as i8);
                }
            }
            QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q5_0 | QuantType::Q5_1 => {
                let d = f16_at(b);
                // `_1` types add a min; `_0` types centre q on zero (as the format defines:
                // the subtraction happens on integers, before the scale).
                let (m, rest) = match qt {
                    QuantType::Q4_1 | QuantType::Q5_1 => (Some(f16_at(&b[2..])), &b[4..]),
                    _ => (None, &b[2..]),
                };
                let five = matches!(qt, QuantType::Q5_0 | QuantType::Q5_1);
                let (qh, qs) = if five {
                    (
                        u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]),
                        &rest[4..20],
                    )
                } else {
                    (0, &rest[..16])
                };
                let centre = if five { 16 } else { 8 };
                let value = |q: u8| match m {
                    Some(m) => f32::from(q) * d + m,
                    None => (i32::from(q) - centre) as f32 * d,
                };
                for (j, &q) in qs.iter().enumerate() {
                    let h0 = (((qh >> j) & 1) << 4) as u8;
                    let h1 = (((qh >> (j + 16)) & 1) << 4) as u8;
                    y[j] = value((q & 0x0f) | h0);
                    y[j + 16] = value((q >> 4) | h1);
                }
            }
            QuantType::Q4K => {
                let (d, dmin) = (f16_at(b), f16_at(&b[2..]));
                let scales = &b[4..16];
                for (c, (qs, y)) in b[16..144]
                    .chunks_exact(32)
                    .zip(y.chunks_exact_mut(64))
                    .enumerate()
                {
                    let (s1, m1) = q4k_scale_min(2 * c, scales);
                    let (s2, m2) = q4k_scale_min(2 * c + 1, scales);
                    let (d1, m1) = (d * f32::from(s1), dmin * f32::from(m1));
                    let (d2, m2) = (d * f32::from(s2), dmin * f32::from(m2));
                    for (l, &q) in qs.iter().enumerate() {
                        y[l] = d1 * f32::from(q & 0x0f) - m1;
                        y[l + 32] = d2 * f32::from(q >> 4) - m2;
                    }
                }
            }
            QuantType::Q6K => {
                let d = f16_at(&b[208..]);
                for half in 0..2 {
                    let ql = &b[64 * half..64 * half + 64];
                    let qh = &b[128 + 32 * half..128 + 32 * half + 32];
                    let sc = &b[192 + 8 * half..192 + 8 * half + 8];
                    let y = &mut y[128 * half..128 * half + 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let h = qh[l];
                        let q1 = i32::from((ql[l] & 0x0f) | ((h & 3) << 4)) - 32;
                        let q2 = i32::from((ql[l + 32] & 0x0f) | (((h >> 2) & 3) << 4)) - 32;
                        let q3 = i32::from((ql[l] >> 4) | (((h >> 4) & 3) << 4)) - 32;
                        let q4 = i32::from((ql[l + 32] >> 4) | (((h >> 6) & 3) << 4)) - 32;
                        let s = |i: usize| d * f32::from(sc[is + i] as i8);
                        y[l] = s(0) * q1 as f32;
                        y[l + 32] = s(2) * q2 as f32;
                        y[l + 64] = s(4) * q3 as f32;
                        y[l + 96] = s(6) * q4 as f32;
                    }
                }
            }
            QuantType::Q2K => {
                let (d, dmin) = (f16_at(&b[80..]), f16_at(&b[82..]));
                // One scale byte per 16 elements.
                for (g, (&sc, y)) in b[..16].iter().zip(y.chunks_exact_mut(16)).enumerate() {
                    let (dl, ml) = (d * f32::from(sc & 0x0f), dmin * f32::from(sc >> 4));
                    for (i, y) in y.iter_mut().enumerate() {
                        *y = dl * f32::from(two_bit_quant(&b[16..80], 16 * g + i)) - ml;
                    }
                }
            }
            QuantType::Q3K => {
                let d = f16_at(&b[108..]);
                let (hmask, qs, scales) = (&b[..32], &b[32..96], &b[96..108]);
                for (g, y) in y.chunks_exact_mut(16).enumerate() {
                    let dl = d * (i32::from(q3k_scale(g, scales)) - 32) as f32;
                    for (i, y) in y.iter_mut().enumerate() {
                        let e = 16 * g + i;
                        let low = i32::from(two_bit_quant(qs, e));
                        let high = (hmask[e % 32] >> (e / 32)) & 1 == 1;
                        let q = if high { low } else { low - 4 };
                        *y = dl * q as f32;
                    }
                }
            }
            QuantType::Q5K => {
                let (d, dmin) = (f16_at(b), f16_at(&b[2..]));
                let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
                // Sub-block `s` (32 elements): nibbles of bytes 32·(s / 2).., low for even
                // `s`, high for odd; its fifth bits are bit `s` of the 32 `qh` bytes.
                for (s, y) in y.chunks_exact_mut(32).enumerate() {
                    let (sc, m) = q4k_scale_min(s, scales);
                    let (dl, ml) = (d * f32::from(sc), dmin * f32::from(m));
                    let nibbles = &qs[32 * (s / 2)..][..32];
                    for (l, y) in y.iter_mut().enumerate() {
                        let byte = nibbles[l];
                        let nibble = if s % 2 == 1 { byte >> 4 } else { byte & 0x0f };
                        let q = nibble | (((qh[l] >> s) & 1) << 4);
                        *y = dl * f32::from(q) - ml;
                    }
                }
            }
            QuantType::Iq4Nl => iq4_sub_block(f16_at(b), &b[2..18], y),
            QuantType::Iq4Xs => {
                let d = f16_at(b);
                let high = u16::from_le_bytes([b[2], b[3]]);
                for (s, (qs, y)) in b[8..136]
                    .chunks_exact(16)
                    .zip(y.chunks_exact_mut(32))
                    .enumerate()
                {
                    let dl = d * (i32::from(iq4xs_scale(s, high, &b[4..8])) - 32) as f32;
                    iq4_sub_block(dl, qs, y);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16_bytes(v: f32) -> [u8; 2] {
        half::f16::from_f32(v).to_bits().to_le_bytes()
    }

    fn dequant(qt: QuantType, block: &[u8]) -> Vec<f32> {
        let mut out = vec![0.0; qt.block_elems()];
        dequantize_scalar(qt, block, &mut out);
        out
    }

    #[test]
    fn small_blocks_decode_by_hand() {
        // Q8_0: d = 0.5, q = -3 at 0, 7 at 31.
        let mut b = vec![0u8; 34];
        b[..2].copy_from_slice(&f16_bytes(0.5));
        b[2] = (-3i8) as u8;
        b[33] = 7;
        let y = dequant(QuantType::Q8_0, &b);
        assert_eq!((y[0], y[1], y[31]), (-1.5, 0.0, 3.5));

        // Q4_0: byte 0 = 0x3A: element 0 = 0xA - 8 = 2, element 16 = 3 - 8 = -5.
        let mut b = vec![0x88u8; 18];
        b[..2].copy_from_slice(&f16_bytes(0.25));
        b[2] = 0x3a;
        let y = dequant(QuantType::Q4_0, &b);
        assert_eq!((y[0], y[16], y[1]), (0.5, -1.25, 0.0));

        // Q4_1: x = d·q + m.
        let mut b = vec![0u8; 20];
        b[..2].copy_from_slice(&f16_bytes(2.0));
        b[2..4].copy_from_slice(&f16_bytes(-1.0));
        b[4] = 0xf1;
        let y = dequant(QuantType::Q4_1, &b);
        assert_eq!((y[0], y[16], y[1]), (1.0, 29.0, -1.0));

        // Q5_0: bit 0 of qh adds 16 to element 0, bit 16 to element 16; centred on 16.
        let mut b = vec![0u8; 22];
        b[..2].copy_from_slice(&f16_bytes(1.0));
        b[2..6].copy_from_slice(&(1u32 | (1 << 16)).to_le_bytes());
        b[6] = 0x21;
        let y = dequant(QuantType::Q5_0, &b);
        assert_eq!((y[0], y[16], y[1], y[17]), (1.0, 2.0, -16.0, -16.0));

        // Q5_1: element 31's fifth bit is qh bit 31.
        let mut b = vec![0u8; 24];
        b[..2].copy_from_slice(&f16_bytes(1.0));
        b[2..4].copy_from_slice(&f16_bytes(0.5));
        b[4..8].copy_from_slice(&(1u32 << 31).to_le_bytes());
        b[8 + 15] = 0x30;
        let y = dequant(QuantType::Q5_1, &b);
        assert_eq!((y[31], y[15], y[0]), (19.5, 0.5, 0.5));
    }

    #[test]
    fn k_quant_scales_and_mins_unpack() {
        // Q4_K: sub-block 0 scale 3 / min 2; sub-block 5 scale 0b110001 / min 0b100010
        // (low nibbles in byte 9, top bits in bytes 1 and 5).
        let mut b = vec![0u8; 144];
        b[..2].copy_from_slice(&f16_bytes(1.0));
        b[2..4].copy_from_slice(&f16_bytes(0.5));
        let s = &mut b[4..16];
        s[0] = 3;
        s[4] = 2;
        s[9] = 0x21; // sub-block 5: scale low nibble 1, min low nibble 2
        s[1] = 0b11 << 6; // scale top bits 11
        s[5] = 0b10 << 6; // min top bits 10
        assert_eq!(q4k_scale_min(5, s), (0b110001, 0b100010));
        b[16] = 0x74; // element 0: low nibble 4; element 32: high nibble 7
        b[16 + 64] = 0x05; // element 128 (sub-block 4, low) and 160 (sub-block 5, high)
        let y = dequant(QuantType::Q4K, &b);
        assert_eq!(y[0], 3.0 * 4.0 - 0.5 * 2.0);
        assert_eq!(y[32], 0.0); // sub-block 1: scale 0, min 0
        assert_eq!(y[160], 49.0 * 0.0 - 0.5 * 34.0);

        // Q6_K: element 0 = ql low nibble + qh bits 0-1; element 96 = ql[32] high nibble +
        // qh bits 6-7; scales one per 16 elements.
        let mut b = vec![0u8; 210];
        b[208..210].copy_from_slice(&f16_bytes(0.5));
        b[0] = 0x0f;
        b[32] = 0xa0;
        b[128] = 0b1100_0001;
        for (i, sc) in b[192..208].iter_mut().enumerate() {
            *sc = (i as i8 - 4) as u8;
        }
        let y = dequant(QuantType::Q6K, &b);
        assert_eq!(y[0], 0.5 * -4.0 * ((0x0f | (1 << 4)) - 32) as f32);
        assert_eq!(y[96], 0.5 * 2.0 * ((0x0a | (3 << 4)) - 32) as f32);
        assert_eq!(y[1], 0.5 * -4.0 * -32.0);
    }
}
