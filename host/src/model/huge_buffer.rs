//! Large zero-initialised buffers backed by transparent huge pages where the kernel allows.
//!
//! Weights and the KV cache are streamed through on every token. With 4 KiB pages a stream
//! takes a TLB miss every 4 KiB (expensive under virtualisation, where a miss walks two page
//! tables) and the hardware prefetcher stops at every page boundary; 2 MiB pages avoid both.
//! Linux hands anonymous memory huge pages only when asked (`transparent_hugepage=madvise`
//! is a common default), so these buffers ask. Where huge pages are unavailable the request
//! is ignored and the buffer is ordinary memory.

use memmap2::{Advice, MmapMut};

/// A zeroed buffer of `len` plain values (`f32`, `u16`), page-aligned.
pub struct HugeBuffer<T> {
    map: MmapMut,
    len: usize,
    _elem: std::marker::PhantomData<T>,
}

impl<T: bytemuck::Pod> HugeBuffer<T> {
    /// Fails only when the system cannot map `len` values of memory.
    pub fn zeroed(len: usize) -> std::io::Result<Self> {
        // A mapping cannot be empty: an empty buffer maps one page it never shows.
        let bytes = (len * std::mem::size_of::<T>()).max(1);
        let map = MmapMut::map_anon(bytes)?;
        // Advice only: a kernel without transparent huge pages refuses it, and the buffer
        // works the same with small pages.
        #[cfg(target_os = "linux")]
        let _ = map.advise(Advice::HugePage);
        #[cfg(not(target_os = "linux"))]
        let _ = Advice::Normal;
        Ok(HugeBuffer {
            map,
            len,
            _elem: std::marker::PhantomData,
        })
    }
}

impl<T: bytemuck::Pod> std::ops::Deref for HugeBuffer<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        bytemuck::cast_slice(&self.map[..self.len * std::mem::size_of::<T>()])
    }
}

impl<T: bytemuck::Pod> std::ops::DerefMut for HugeBuffer<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        bytemuck::cast_slice_mut(&mut self.map[..self.len * std::mem::size_of::<T>()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_and_writable() {
        let mut b = HugeBuffer::<f32>::zeroed(3 << 20).expect("map");
        assert_eq!(b.len(), 3 << 20);
        assert!(b.iter().all(|&v| v == 0.0));
        b[12345] = 2.5;
        assert_eq!(b[12345], 2.5);
        let empty = HugeBuffer::<u16>::zeroed(0).expect("map");
        assert!(empty.is_empty());
    }
}
