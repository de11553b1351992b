//! A paged key/value cache: fixed-size blocks of token slots, a free list, and a block table
//! per sequence. The scheduler reserves blocks before a forward pass and releases them when a
//! sequence ends; the executor only reads and writes slots.

use super::huge_buffer::HugeBuffer;

/// Tokens per block.
pub const BLOCK_SIZE: usize = 16;

/// The cache has no free block left for a reservation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("KV cache full: need {needed} more blocks, {free} free")]
pub struct KvCacheFull {
    pub needed: usize,
    pub free: usize,
}

/// One sequence's view of the cache: its blocks in order and how many tokens they hold.
#[derive(Debug, Default)]
pub struct SequenceKv {
    blocks: Vec<u32>,
    len: usize,
}

impl SequenceKv {
    pub fn new() -> Self {
        Self::default()
    }

    /// Tokens whose keys and values are stored.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Token slots available without reserving more blocks.
    pub fn capacity(&self) -> usize {
        self.blocks.len() * BLOCK_SIZE
    }

    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }

    /// The global slot index of token position `pos`.
    #[inline]
    pub fn slot(&self, pos: usize) -> usize {
        self.blocks[pos / BLOCK_SIZE] as usize * BLOCK_SIZE + pos % BLOCK_SIZE
    }

    /// Records that `n` more tokens were written (the executor calls this after a pass).
    pub(crate) fn advance(&mut self, n: usize) {
        debug_assert!(self.len + n <= self.capacity());
        self.len += n;
    }
}

/// How the cache stores each key and value element (`scheduler.kv_cache_dtype`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    #[default]
    F32,
    /// IEEE half precision (11 significant bits; values beyond +-65504 are clamped): half
    /// the memory, and half the bytes attention reads per token. CPU only.
    F16,
}

impl KvDtype {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "f32" => Some(KvDtype::F32),
            "f16" => Some(KvDtype::F16),
            _ => None,
        }
    }

    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
        }
    }
}

/// Shape of the stored keys and values.
#[derive(Clone, Copy, Debug)]
pub struct KvLayout {
    pub num_layers: usize,
    /// `num_key_value_heads * head_dim`: elements per token per layer, for K and for V.
    pub kv_dim: usize,
    pub dtype: KvDtype,
}

/// One layer's keys or values: in huge pages when the system can map them (attention
/// streams through them every step), else a plain vector.
enum LayerBuffer<T> {
    Huge(HugeBuffer<T>),
    Plain(Vec<T>),
}

impl<T: bytemuck::Pod> LayerBuffer<T> {
    fn new(len: usize) -> Self {
        match HugeBuffer::zeroed(len) {
            Ok(b) => LayerBuffer::Huge(b),
            Err(_) => LayerBuffer::Plain(vec![T::zeroed(); len]),
        }
    }

    fn as_mut_slice(&mut self) -> &mut [T] {
        match self {
            LayerBuffer::Huge(b) => b,
            LayerBuffer::Plain(v) => v,
        }
    }
}

/// Every layer's keys and values, in one element type.
struct Layers<T> {
    keys: Vec<LayerBuffer<T>>,
    values: Vec<LayerBuffer<T>>,
}

impl<T: bytemuck::Pod> Layers<T> {
    fn new(num_layers: usize, len: usize) -> Self {
        Layers {
            keys: (0..num_layers).map(|_| LayerBuffer::new(len)).collect(),
            values: (0..num_layers).map(|_| LayerBuffer::new(len)).collect(),
        }
    }

    fn layer_mut(&mut self, layer: usize) -> (&mut [T], &mut [T]) {
        (
            self.keys[layer].as_mut_slice(),
            self.values[layer].as_mut_slice(),
        )
    }
}

/// Which blocks are free and which sequence holds which: the bookkeeping half of the cache,
/// the same whichever device stores the keys and values.
#[derive(Debug)]
pub struct BlockPool {
    num_blocks: usize,
    free: Vec<u32>,
}

impl BlockPool {
    pub fn new(num_blocks: usize) -> Self {
        BlockPool {
            num_blocks,
            // Popped from the end: hand out low block numbers first.
            free: (0..num_blocks as u32).rev().collect(),
        }
    }

    pub fn total_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    pub fn used_blocks(&self) -> usize {
        self.num_blocks - self.free.len()
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(tokens: usize) -> usize {
        tokens.div_ceil(BLOCK_SIZE)
    }

    /// Makes room in `seq` for `additional` more tokens; takes nothing if it cannot take all.
    pub fn reserve(&mut self, seq: &mut SequenceKv, additional: usize) -> Result<(), KvCacheFull> {
        let needed = Self::blocks_for(seq.len + additional).saturating_sub(seq.blocks.len());
        if needed > self.free.len() {
            return Err(KvCacheFull {
                needed,
                free: self.free.len(),
            });
        }
        let start = self.free.len() - needed;
        seq.blocks.extend(self.free.drain(start..).rev());
        Ok(())
    }

    /// Returns all of `seq`'s blocks to the free list and empties it.
    pub fn release(&mut self, seq: &mut SequenceKv) {
        self.free.extend(seq.blocks.drain(..).rev());
        seq.len = 0;
    }
}

/// Bytes one block takes across all layers (keys and values, on any device).
pub fn block_bytes(layout: KvLayout) -> usize {
    2 * layout.num_layers * BLOCK_SIZE * layout.kv_dim * layout.dtype.bytes()
}

/// Bytes a cache of `blocks` blocks takes (what `/info` and `/metrics` report).
pub fn cache_bytes(layout: KvLayout, blocks: usize) -> u64 {
    (blocks * block_bytes(layout)) as u64
}

/// One layer's keys and values as the cache stores them (f16 as its IEEE bits).
pub(crate) enum LayerKv<'a> {
    F32 {
        keys: &'a mut [f32],
        values: &'a mut [f32],
    },
    F16 {
        keys: &'a mut [u16],
        values: &'a mut [u16],
    },
}

/// The CPU's cache: keys and values for every layer, in `[slot][kv_head][head_dim]` order, in
/// the layout's dtype, and the pool of its blocks.
pub struct KvCache {
    layout: KvLayout,
    pool: BlockPool,
    store: Store,
}

enum Store {
    F32(Layers<f32>),
    F16(Layers<u16>),
}

impl KvCache {
    /// A cache of `num_blocks` blocks, all allocated up front.
    pub fn new(layout: KvLayout, num_blocks: usize) -> Self {
        let len = num_blocks * BLOCK_SIZE * layout.kv_dim;
        let store = match layout.dtype {
            KvDtype::F32 => Store::F32(Layers::new(layout.num_layers, len)),
            KvDtype::F16 => Store::F16(Layers::new(layout.num_layers, len)),
        };
        KvCache {
            layout,
            pool: BlockPool::new(num_blocks),
            store,
        }
    }

    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    pub fn pool_mut(&mut self) -> &mut BlockPool {
        &mut self.pool
    }

    /// Layer `layer`'s key and value storage.
    pub(crate) fn layer_mut(&mut self, layer: usize) -> LayerKv<'_> {
        match &mut self.store {
            Store::F32(l) => {
                let (keys, values) = l.layer_mut(layer);
                LayerKv::F32 { keys, values }
            }
            Store::F16(l) => {
                let (keys, values) = l.layer_mut(layer);
                LayerKv::F16 { keys, values }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(blocks: usize) -> BlockPool {
        BlockPool::new(blocks)
    }

    #[test]
    fn reserve_and_release_round_trip() {
        let mut kv = cache(4);
        let mut a = SequenceKv::new();
        kv.reserve(&mut a, 17).unwrap();
        assert_eq!(a.blocks().len(), 2);
        assert_eq!(kv.free_blocks(), 2);
        a.advance(17);
        kv.reserve(&mut a, 15).unwrap();
        assert_eq!(a.blocks().len(), 2, "32 tokens fit in two blocks");
        let err = kv.reserve(&mut a, 60).unwrap_err();
        assert_eq!(err, KvCacheFull { needed: 3, free: 2 });
        assert_eq!(a.blocks().len(), 2, "a failed reservation takes nothing");
        kv.release(&mut a);
        assert_eq!(kv.free_blocks(), 4);
        assert!(a.is_empty());
    }

    #[test]
    fn slots_follow_the_block_table() {
        let mut kv = cache(3);
        let mut a = SequenceKv::new();
        let mut b = SequenceKv::new();
        kv.reserve(&mut a, 1).unwrap();
        kv.reserve(&mut b, 1).unwrap();
        kv.reserve(&mut a, 20).unwrap();
        assert_eq!(a.slot(0), a.blocks()[0] as usize * BLOCK_SIZE);
        assert_eq!(a.slot(17), a.blocks()[1] as usize * BLOCK_SIZE + 1);
        assert_ne!(a.blocks()[1], b.blocks()[0]);
    }
}
