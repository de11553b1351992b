//! Device memory the backend owns: plain `cuMemAlloc` buffers addressed by raw pointers, since
//! kernels take pointers and every launch and copy goes through the backend's one stream.

use cudarc::driver::{result, sys, DriverError};

/// `bytes` of device memory, freed on drop.
pub struct DeviceBuffer {
    ptr: sys::CUdeviceptr,
    bytes: usize,
}

impl DeviceBuffer {
    /// Allocates `bytes` (at least 1) of uninitialised device memory. The backend's context
    /// must be current on this thread.
    pub fn alloc(bytes: usize) -> Result<Self, DriverError> {
        // SAFETY: a plain allocation; freed once, in drop.
        let ptr = unsafe { result::malloc_sync(bytes.max(1)) }?;
        Ok(DeviceBuffer { ptr, bytes })
    }

    /// A buffer holding a copy of `data`.
    pub fn upload<T: Copy>(data: &[T], stream: sys::CUstream) -> Result<Self, DriverError> {
        let buf = Self::alloc(std::mem::size_of_val(data))?;
        buf.write(data, stream)?;
        Ok(buf)
    }

    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Copies `data` to the start of the buffer; returns once the copy is done with `data`.
    pub fn write<T: Copy>(&self, data: &[T], stream: sys::CUstream) -> Result<(), DriverError> {
        assert!(
            std::mem::size_of_val(data) <= self.bytes,
            "write past a device buffer"
        );
        if data.is_empty() {
            return Ok(());
        }
        // SAFETY: the destination holds at least as many bytes as `data`; the copy from
        // pageable host memory has finished reading `data` when the call returns.
        unsafe { result::memcpy_htod_async(self.ptr, data, stream) }
    }

    /// Copies the start of the buffer into `out` and waits for the stream (and so for every
    /// kernel before the copy).
    pub fn read<T: Copy>(&self, out: &mut [T], stream: sys::CUstream) -> Result<(), DriverError> {
        assert!(
            std::mem::size_of_val(out) <= self.bytes,
            "read past a device buffer"
        );
        if out.is_empty() {
            return Ok(());
        }
        // SAFETY: the source holds at least as many bytes as `out`, and the stream is
        // synchronised before `out` is used.
        unsafe {
            result::memcpy_dtoh_async(out, self.ptr, stream)?;
            result::stream::synchronize(stream)
        }
    }

    /// The first `len` elements, read as [`DeviceBuffer::read`] does.
    pub fn read_vec<T: Copy + Default>(
        &self,
        len: usize,
        stream: sys::CUstream,
    ) -> Result<Vec<T>, DriverError> {
        let mut out = vec![T::default(); len];
        self.read(&mut out, stream)?;
        Ok(out)
    }

    /// Sets every byte to zero.
    pub fn zero(&self, stream: sys::CUstream) -> Result<(), DriverError> {
        // SAFETY: within the allocation.
        unsafe { result::memset_d8_async(self.ptr, 0, self.bytes, stream) }
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `alloc`, freed once. A failure (context gone) leaks nothing
        // the driver has not already reclaimed.
        let _ = unsafe { result::free_sync(self.ptr) };
    }
}

/// A buffer that grows to the largest size asked for (never shrinks).
#[derive(Default)]
pub struct Growable {
    buf: Option<DeviceBuffer>,
}

impl Growable {
    /// The buffer, with room for at least `bytes`.
    pub fn at_least(&mut self, bytes: usize) -> Result<&DeviceBuffer, DriverError> {
        self.sized(bytes)?;
        Ok(self.buf.as_ref().expect("sized just above"))
    }

    /// Makes room for at least `bytes`: the buffer's address, and whether it moved.
    pub fn sized(&mut self, bytes: usize) -> Result<(u64, bool), DriverError> {
        let moved = self.buf.as_ref().is_none_or(|b| b.bytes() < bytes);
        if moved {
            self.buf = None; // free first: the old and new buffers need not fit together
            self.buf = Some(DeviceBuffer::alloc(bytes)?);
        }
        Ok((
            self.buf.as_ref().expect("allocated just above").ptr(),
            moved,
        ))
    }
}
