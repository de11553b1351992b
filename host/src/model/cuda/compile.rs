//! Run-time compilation of `kernels/*.cu` with NVRTC, to CUBIN for one GPU architecture.
//! The sources are embedded in the binary; the shared prelude (`common.cuh`) is prepended to
//! each file, since NVRTC here finds no headers.

use std::collections::HashMap;
use std::ffi::{c_char, CStr, CString};
use std::sync::{Arc, Mutex, OnceLock};

/// Definitions every kernel file uses.
pub const PRELUDE: &str = include_str!("../../../../kernels/common.cuh");

/// Every kernel file: (name, source).
pub const KERNEL_FILES: &[(&str, &str)] = &[
    ("embed.cu", include_str!("../../../../kernels/embed.cu")),
    ("norm.cu", include_str!("../../../../kernels/norm.cu")),
    (
        "elementwise.cu",
        include_str!("../../../../kernels/elementwise.cu"),
    ),
    ("matmul.cu", include_str!("../../../../kernels/matmul.cu")),
    (
        "attention.cu",
        include_str!("../../../../kernels/attention.cu"),
    ),
    (
        "sampling.cu",
        include_str!("../../../../kernels/sampling.cu"),
    ),
    ("probe.cu", include_str!("../../../../kernels/probe.cu")),
];

/// Whether the NVRTC library can be loaded (`libnvrtc.so.13` on the library path).
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to open the library; nothing is called through it.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// NVRTC's version, as (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32), String> {
    if !nvrtc_present() {
        return Err(missing_nvrtc());
    }
    use cudarc::nvrtc::sys;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present; the call writes two ints.
    let status = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
    if status != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(format!("nvrtcVersion: {status:?}"));
    }
    Ok((major, minor))
}

fn missing_nvrtc() -> String {
    "NVRTC (libnvrtc.so.13) could not be loaded: install CUDA 13's NVRTC (e.g. the \
     nvidia-cuda-nvrtc wheel) and put its lib folder on LD_LIBRARY_PATH"
        .to_string()
}

/// Compiles one kernel file (with the prelude) for `arch` (`sm_90`) to CUBIN.
pub fn compile_cubin(file: &str, source: &str, arch: &str) -> Result<Vec<u8>, String> {
    use cudarc::nvrtc::{result, sys};
    if !nvrtc_present() {
        return Err(missing_nvrtc());
    }
    let text = format!("{PRELUDE}\n#line 1 \"{file}\"\n{source}");
    let src = CString::new(text).map_err(|_| format!("{file}: NUL byte in the source"))?;
    let name = CString::new(file).map_err(|_| format!("{file}: NUL byte in the name"))?;
    let prog = result::create_program(&src, Some(&name)).map_err(|e| format!("{file}: {e:?}"))?;
    // No --use_fast_math: expf, division and sqrt stay IEEE-accurate, as on the CPU.
    let options = [
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
    ];
    // SAFETY: `prog` is a live program; it is destroyed below on every path.
    let out = unsafe {
        match result::compile_program(prog, &options) {
            Ok(()) => {
                let mut size = 0usize;
                let status = sys::nvrtcGetCUBINSize(prog, &mut size);
                if status != sys::nvrtcResult::NVRTC_SUCCESS {
                    Err(format!("{file}: nvrtcGetCUBINSize: {status:?}"))
                } else {
                    let mut cubin = vec![0u8; size];
                    let status = sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut c_char);
                    if status != sys::nvrtcResult::NVRTC_SUCCESS {
                        Err(format!("{file}: nvrtcGetCUBIN: {status:?}"))
                    } else {
                        Ok(cubin)
                    }
                }
            }
            Err(e) => {
                let log = result::get_program_log(prog)
                    .map(|raw| CStr::from_ptr(raw.as_ptr()).to_string_lossy().into_owned())
                    .unwrap_or_default();
                Err(format!("{file} ({arch}): {e:?}\n{log}"))
            }
        }
    };
    // SAFETY: created above, not used after this.
    let _ = unsafe { result::destroy_program(prog) };
    out
}

/// Every kernel file compiled for `arch`: (name, CUBIN).
pub type Cubins = Arc<Vec<(&'static str, Vec<u8>)>>;

/// [`compile_cubin`] for every file, once per architecture per process.
pub fn compile_all(arch: &str) -> Result<Cubins, String> {
    static CACHE: OnceLock<Mutex<HashMap<String, Cubins>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(done) = cache.get(arch) {
        return Ok(done.clone());
    }
    let mut out = Vec::with_capacity(KERNEL_FILES.len());
    for (file, source) in KERNEL_FILES {
        out.push((*file, compile_cubin(file, source, arch)?));
    }
    let out = Arc::new(out);
    cache.insert(arch.to_string(), out.clone());
    Ok(out)
}
