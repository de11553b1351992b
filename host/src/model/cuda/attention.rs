//! The attention launch over the paged KV cache (kernels/attention.cu): head groups, block
//! shape and the kernel variant for the head dim.

use super::kernels::{Arg, Kernels};
use cudarc::driver::{CudaStream, DriverError};

/// Splits an attention launch may have (`MAX_SPLITS` in attention.cu).
pub const MAX_ATTENTION_SPLITS: usize = 64;

/// One attention launch over the paged KV cache (attention.cu), as device addresses and shape.
pub struct Attention {
    /// Query rows, `q_stride` floats apart, head h at `h * d`.
    pub q: u64,
    pub q_stride: usize,
    /// The cache's keys and values, f32 or f16 (`f16_cache`).
    pub keys: u64,
    pub values: u64,
    pub f16_cache: bool,
    /// Block tables, each token's table offset in them, and each token's position.
    pub tables: u64,
    pub offsets: u64,
    pub positions: u64,
    pub tokens: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub d: usize,
    /// Sliding window (0: none).
    pub window: usize,
    pub scale: f32,
    /// At most [`MAX_ATTENTION_SPLITS`].
    pub splits: usize,
    pub split_keys: usize,
    /// Per (token, head, split): (m, l) and the `d` weighted values.
    pub part_ml: u64,
    pub part_acc: u64,
    /// `tokens × heads` ints (at least one per block of a split), zero before the launch; the
    /// launch leaves them zero.
    pub counters: u64,
    /// `[token][heads * d]`.
    pub out: u64,
}

/// How attention blocks take the query heads: `heads` heads a block (of one KV head), `warps`
/// warps a block, `blocks` blocks a token and split.
pub struct AttentionGroups {
    pub heads: usize,
    pub warps: usize,
    pub blocks: usize,
}

/// At most 8 heads of a KV head a block and up to 8 warps (the kernel's shared memory holds 8
/// warps' partials, `MAX_WARPS` in attention.cu): a group of fewer heads gets several warps
/// per head.
pub fn attention_groups(heads: usize, kv_heads: usize) -> AttentionGroups {
    let per_kv = (heads / kv_heads.max(1)).max(1);
    let group = per_kv.min(8);
    AttentionGroups {
        heads: group,
        warps: group * (8 / group),
        blocks: kv_heads * per_kv.div_ceil(group),
    }
}

/// Attention of every token and head, split along the keys, the splits merged by the last
/// block of each (token, head group) to finish.
pub fn attention(stream: &CudaStream, k: &Kernels, a: &Attention) -> Result<(), DriverError> {
    debug_assert!(a.splits <= MAX_ATTENTION_SPLITS);
    let groups = attention_groups(a.heads, a.kv_heads);
    let args = [
        Arg::Ptr(a.q),
        Arg::I32(a.q_stride as i32),
        Arg::Ptr(a.keys),
        Arg::Ptr(a.values),
        Arg::Ptr(a.tables),
        Arg::Ptr(a.offsets),
        Arg::Ptr(a.positions),
        Arg::I32(a.heads as i32),
        Arg::I32(a.kv_heads as i32),
        Arg::I32(a.d as i32),
        Arg::I32(a.window as i32),
        Arg::F32(a.scale),
        Arg::I32(a.split_keys as i32),
        Arg::I32(groups.heads as i32),
        Arg::Ptr(a.part_ml),
        Arg::Ptr(a.part_acc),
        Arg::Ptr(a.counters),
        Arg::Ptr(a.out),
    ];
    let grid = (a.tokens as u32, groups.blocks as u32, a.splits as u32);
    // The kernel for the smallest bound that holds d (the backend refuses d > 256).
    let variant = match a.d {
        0..=32 => 0,
        33..=64 => 1,
        65..=128 => 2,
        _ => 3,
    };
    let func = &k.attention_split[a.f16_cache as usize][variant];
    k.launch(stream, func, grid, 32 * groups.warps as u32, &args)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Heads per block, warps and blocks per token for the head layouts models have.
    #[test]
    fn attention_groups_cover_every_head_once() {
        for (heads, kv_heads, want) in [
            (32, 4, (8, 8, 4)), // GQA 8: one block per KV head
            (14, 2, (7, 7, 2)), // 7 heads a KV head: 7 warps
            (12, 4, (3, 6, 4)), // 3: two warps a head
            (8, 8, (1, 8, 8)),  // multi-head: 8 warps on one head
            (16, 1, (8, 8, 2)), // 16: two blocks a KV head
            (9, 3, (3, 6, 3)),  // odd
        ] {
            let g = attention_groups(heads, kv_heads);
            assert_eq!((g.heads, g.warps, g.blocks), want, "{heads}/{kv_heads}");
            assert!(g.warps <= 8 && g.warps.is_multiple_of(g.heads));
            // The blocks' groups hold every head: blocks per KV head × heads a block.
            assert!(g.blocks / kv_heads * g.heads >= heads / kv_heads);
        }
    }
}
