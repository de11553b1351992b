//! The CUDA emulator (`tests/cuda_emulator/`): a `libcuda.so.1` that runs the kernels of
//! `kernels/` on the CPU. The GPU tests of a test binary, which run on a real GPU when
//! `CLLM_TEST_DEVICE=cuda`, are run again by the same binary in a child process whose driver
//! library is the emulator, so that CI (no GPU) runs the CUDA backend's host code and every
//! kernel's logic end to end. It says nothing about GPU speed or code generation.

use super::{repo_root, require, say};
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// The folder holding the emulator's `libcuda.so.1`, built once per test process; None (said,
/// or a failure under CI) when there is no C++ compiler or no NVRTC, which the backend needs
/// to compile the kernels before it loads them.
pub fn emulator_dir() -> Option<PathBuf> {
    static BUILT: OnceLock<Option<PathBuf>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let compiler = Command::new("c++").arg("--version").output();
            if !require(
                compiler.is_ok_and(|o| o.status.success()),
                "a C++ compiler (c++) to build the CUDA emulator",
            ) {
                return None;
            }
            if !require(
                cllm::model::cuda::compile::nvrtc_present(),
                "NVRTC (libnvrtc.so.13 on LD_LIBRARY_PATH: the nvidia-cuda-nvrtc wheel)",
            ) {
                return None;
            }
            let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cuda-emulator");
            let built = Command::new("bash")
                .arg(repo_root().join("tests/cuda_emulator/build.sh"))
                .arg(&out)
                .output()
                .expect("runs bash");
            assert!(
                built.status.success(),
                "building the CUDA emulator failed:\n{}",
                String::from_utf8_lossy(&built.stderr)
            );
            Some(out)
        })
        .clone()
}

/// `LD_LIBRARY_PATH` with the emulator first, so that it is the driver library cudarc opens.
fn library_path(emulator: &std::path::Path) -> std::ffi::OsString {
    let mut paths = vec![emulator.to_path_buf()];
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
        paths.extend(std::env::split_paths(&old));
    }
    std::env::join_paths(paths).expect("library paths join")
}

/// A command that runs with the emulator as its CUDA driver.
pub fn on_emulator(mut cmd: Command, emulator: &std::path::Path) -> Command {
    cmd.env("LD_LIBRARY_PATH", library_path(emulator));
    cmd
}

/// Runs this test binary's tests whose names contain one of `filters` again, in a child
/// process with the emulator as the CUDA driver and `CLLM_TEST_DEVICE=cuda`, and fails if any
/// of them fails or if fewer than `at_least` passed (a renamed test would otherwise drop
/// out). `block_order` is passed on as `CLLM_EMU_BLOCK_ORDER` (`forward` or `reverse`). Does
/// nothing inside such a child, or on a machine whose tests already run on a device.
pub fn rerun_on_emulated_gpu(filters: &[&str], at_least: usize, block_order: &str) {
    if std::env::var_os("CLLM_TEST_DEVICE").is_some() {
        say("not rerun on the CUDA emulator: CLLM_TEST_DEVICE already names the device");
        return;
    }
    let Some(emulator) = emulator_dir() else {
        return;
    };
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut cmd = on_emulator(Command::new(exe), &emulator);
    let out = cmd
        .args(filters)
        .args(["--test-threads", "2"])
        .env("CLLM_TEST_DEVICE", "cuda")
        .env("CLLM_EMU_BLOCK_ORDER", block_order)
        .output()
        .expect("runs the test binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ran = stdout
        .lines()
        .filter(|l| l.starts_with("test ") && l.ends_with(" ok"))
        .count();
    assert!(
        out.status.success() && ran >= at_least,
        "tests matching {filters:?} on the CUDA emulator: {ran} passed (want {at_least})\n\
         {stdout}\n{stderr}"
    );
    say(&format!(
        "{ran} tests matching {filters:?} passed on the CUDA emulator (blocks {block_order})"
    ));
}
