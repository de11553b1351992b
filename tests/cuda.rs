//! The CUDA backend. Everywhere: every kernel in `kernels/` compiles with NVRTC for sm_80 and
//! sm_90 (CI installs NVRTC), and without a GPU `--device auto` runs on the CPU while
//! `--device cuda` is a clean start-up error. On a GPU (`CLLM_TEST_DEVICE=cuda`, which
//! `scripts/gpu-check.sh` sets): each kernel against the CPU's code on random inputs of
//! realistic sizes. The golden tests (`golden.rs`, `gguf.rs`) run on the GPU the same way.

mod common;

use cllm::model::cpu::ops;
use cllm::model::cuda::compile::{compile_cubin, nvrtc_present, KERNEL_FILES};
use cllm::model::cuda::{driver_present, AttentionCase, KernelCheck, ProductInput};
use cllm::model::executor::DeviceChoice;
use cllm::model::logprobs::logprob_of;
use cllm::model::rng::Rng;
use cllm::model::sampling::argmax;
use cllm::model::weights::DType;
use common::{cllm, fixture, require, say};

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    if !require(
        nvrtc_present(),
        "NVRTC (libnvrtc.so.13 on LD_LIBRARY_PATH; .ci/run installs the nvidia-cuda-nvrtc wheel)",
    ) {
        return;
    }
    for arch in ["sm_80", "sm_90"] {
        for (file, source) in KERNEL_FILES {
            let cubin = compile_cubin(file, source, arch)
                .unwrap_or_else(|e| panic!("{file} does not compile for {arch}:\n{e}"));
            assert_eq!(
                &cubin[..4],
                b"\x7fELF",
                "{file} ({arch}): not a CUBIN (ELF) image"
            );
        }
    }
}

#[test]
fn a_kernel_error_is_reported_with_the_file_and_line() {
    if !require(nvrtc_present(), "NVRTC (libnvrtc.so.13)") {
        return;
    }
    let broken = "extern \"C\" __global__ void k(float* x) {\n  x[0] = undefined_name;\n}\n";
    let err = compile_cubin("broken.cu", broken, "sm_90").expect_err("must not compile");
    assert!(err.contains("broken.cu"), "{err}");
    assert!(
        err.contains("undefined_name"),
        "the NVRTC log is in the error: {err}"
    );
}

/// Runs `cllm generate` on the in-repo stories260K model with `device`.
fn generate_on(device: &str) -> std::process::Output {
    let Some(fx) = fixture("stories260K") else {
        panic!("stories260K ships with the repository");
    };
    cllm()
        .args([
            "generate",
            "--json",
            "--max-new-tokens",
            "8",
            "--device",
            device,
        ])
        .arg("--model")
        .arg(&fx.model_dir)
        .arg("Once upon a time")
        .output()
        .expect("runs cllm")
}

#[test]
fn device_auto_runs_on_the_cpu_without_a_gpu() {
    if driver_present() {
        say("SKIPPED: a CUDA driver is installed here; the no-GPU fallback is checked where there is none");
        return;
    }
    let auto = generate_on("auto");
    let cpu = generate_on("cpu");
    let stderr = String::from_utf8_lossy(&auto.stderr);
    assert!(auto.status.success(), "--device auto failed:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(auto.stdout, cpu.stdout, "auto must run the CPU path");
}

#[test]
fn device_cuda_without_a_gpu_is_a_clean_start_up_error() {
    if driver_present() {
        say("SKIPPED: a CUDA driver is installed here");
        return;
    }
    let out = generate_on("cuda");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "--device cuda succeeded without a GPU"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains("libcuda"),
        "the error says what is missing: {stderr}"
    );

    let fx = fixture("stories260K").expect("in the repository");
    let serve = cllm()
        .args(["serve", "--port", "0", "--device", "cuda:0", "--model"])
        .arg(&fx.model_dir)
        .output()
        .expect("runs cllm");
    let stderr = String::from_utf8_lossy(&serve.stderr);
    assert!(
        !serve.status.success(),
        "serve --device cuda started without a GPU"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("CUDA"), "{stderr}");

    let bad = cllm()
        .args(["generate", "--device", "tpu", "--model"])
        .arg(&fx.model_dir)
        .arg("x")
        .output()
        .expect("runs cllm");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("auto, cpu, cuda, cuda:N"));
}

// ---- On a GPU: the profile of `cllm bench --profile` ----

/// On the GPU, `--profile` times every phase with CUDA events: both sections list every
/// phase, say the times are the GPU's, and their shares add up to the step.
#[test]
fn gpu_bench_profile_times_every_phase() {
    let DeviceChoice::Cuda(ordinal) = common::test_device() else {
        say("SKIPPED: GPU profile test (set CLLM_TEST_DEVICE=cuda on a machine with a GPU)");
        return;
    };
    // Every phase but the first holds at least one kernel of a microsecond or more between
    // its events; the embedding's one small kernel may round to 0.000 ms, and the SwiGLU is
    // the gate/up product's (the element-wise phase holds nothing).
    let timed: Vec<&str> = common::PROFILE_PHASES[1..]
        .iter()
        .copied()
        .filter(|p| *p != "silu*up + residuals")
        .collect();
    common::check_bench_profile(
        &format!("cuda:{ordinal}"),
        "GPU time between CUDA events",
        &timed,
    );
}

// ---- On a GPU: each kernel against the CPU on random inputs ----

/// The kernels on the GPU the check runs on, or None (said) elsewhere.
fn gpu() -> Option<KernelCheck> {
    match common::test_device() {
        DeviceChoice::Cuda(ordinal) => {
            Some(KernelCheck::open(ordinal).expect("CLLM_TEST_DEVICE names a usable GPU"))
        }
        _ => {
            say("SKIPPED: GPU kernel test (set CLLM_TEST_DEVICE=cuda on a machine with a GPU)");
            None
        }
    }
}

fn random(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale)
        .collect()
}

/// ‖got − want‖ / ‖want‖, failing on NaN.
fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        assert!(
            g.is_finite(),
            "non-finite output {g} (an element not written?)"
        );
        num += (g as f64 - w) * (g as f64 - w);
        den += w * w;
    }
    (num / den.max(1e-30)).sqrt()
}

/// Weights of `dtype` as bytes, and the values they hold widened to f64.
fn weights_of(dtype: DType, values: &[f32]) -> (Vec<u8>, Vec<f64>) {
    match dtype {
        DType::F32 => (
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            values.iter().map(|&v| v as f64).collect(),
        ),
        DType::F16 => {
            let h: Vec<half::f16> = values.iter().map(|&v| half::f16::from_f32(v)).collect();
            (
                h.iter().flat_map(|v| v.to_le_bytes()).collect(),
                h.iter().map(|v| v.to_f64()).collect(),
            )
        }
        _ => {
            let h: Vec<half::bf16> = values.iter().map(|&v| half::bf16::from_f32(v)).collect();
            (
                h.iter().flat_map(|v| v.to_le_bytes()).collect(),
                h.iter().map(|v| v.to_f64()).collect(),
            )
        }
    }
}

/// `y0 + inputs · Wᵀ` in f64 for W `rows × cols` and the input rows `inputs`.
fn reference_product(
    wf: &[f64],
    rows: usize,
    cols: usize,
    inputs: &[f64],
    y0: Option<&[f32]>,
) -> Vec<f64> {
    let tokens = inputs.len() / cols;
    (0..tokens * rows)
        .map(|i| {
            let (t, r) = (i / rows, i % rows);
            let start = y0.map_or(0.0, |y| y[i] as f64);
            let row = &wf[r * cols..(r + 1) * cols];
            let input = &inputs[t * cols..(t + 1) * cols];
            start + row.iter().zip(input).map(|(w, x)| w * x).sum::<f64>()
        })
        .collect()
}

/// The paths a product of `dtype` weights is checked on (`use_tensor_cores`): bf16 on the
/// tensor cores, when the device has them, and then on the CUDA cores; other types on the
/// CUDA cores.
fn product_paths(dtype: DType, tensor_cores: bool) -> &'static [bool] {
    if dtype == DType::Bf16 && tensor_cores {
        &[true, false]
    } else {
        &[false]
    }
}

/// The largest relative error a product may have: the CUDA cores' f32 sums, or the tensor
/// cores' (bf16 weights, several tokens), whose input is split into two bf16 parts (2^-18 of
/// each value lost) and whose f32 sums may truncate.
fn product_tolerance(dtype: DType, tokens: usize, tensor_cores: bool) -> f64 {
    if tensor_cores && dtype == DType::Bf16 && tokens >= 2 {
        3e-5
    } else {
        1e-5
    }
}

/// The kernel check on the GPU or its emulator, with the tensor cores on: a device that
/// has them (sm_80 and later, the emulator's sm_90) must have passed their start-up check,
/// and one of sm_90 or later that of programmatic dependent launch (unless turned off), so
/// that every kernel check runs launched as the forward pass launches.
fn gpu_with_tensor_cores() -> Option<KernelCheck> {
    let gpu = gpu()?;
    let major: u32 = gpu.arch()[3..].parse::<u32>().expect("sm_XY") / 10;
    if major >= 8 {
        assert_eq!(
            gpu.tensor_cores_off(),
            None,
            "tensor cores on {}",
            gpu.arch()
        );
    }
    if major >= 9 && std::env::var("CLLM_CUDA_PDL").as_deref() != Ok("0") {
        assert_eq!(
            gpu.dependent_launch_off(),
            None,
            "dependent launch on {}",
            gpu.arch()
        );
    }
    Some(gpu)
}

#[test]
fn gpu_matmul_matches_f64_reference() {
    let Some(mut gpu) = gpu_with_tensor_cores() else {
        return;
    };
    let tensor_cores = gpu.tensor_cores_off().is_none();
    let mut rng = Rng::new(7);
    // Every type on a square 2048 and an odd width (the scalar path); bf16 also on an odd row
    // count (a warp's second row past the end) and on the MLP's 5632 × 2048 and back. Token
    // counts cover one GEMV pass, several, and the tiled GEMM; for bf16, also the tensor
    // cores' token tiles (64), a partial tile and a width not a multiple of their 32-column
    // chunks (2056). bf16 runs twice: on the tensor cores, then on the CUDA cores.
    let shapes = [
        (2048, 2048, DType::F32),
        (2048, 2048, DType::F16),
        (2048, 2048, DType::Bf16),
        (300, 129, DType::F32),
        (300, 129, DType::F16),
        (300, 129, DType::Bf16),
        (301, 2048, DType::Bf16),
        (5632, 2048, DType::Bf16),
        (2048, 5632, DType::Bf16),
        (72, 2056, DType::Bf16),
    ];
    for (rows, cols, dtype) in shapes {
        let (w, wf) = weights_of(dtype, &random(&mut rng, rows * cols, 0.05));
        let paths = product_paths(dtype, tensor_cores);
        for tokens in [1, 3, 8, 13, 64, 100] {
            let x = random(&mut rng, tokens * cols, 1.0);
            // Odd token counts add the product onto y0 (the residual add).
            let y0 = (tokens % 2 == 1).then(|| random(&mut rng, tokens * rows, 1.0));
            let inputs: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            let want = reference_product(&wf, rows, cols, &inputs, y0.as_deref());
            for &on in paths {
                gpu.use_tensor_cores(on);
                let got = gpu
                    .matmul(dtype, &w, rows, cols, &x, tokens, y0.as_deref())
                    .expect("matmul runs");
                let err = rel_err(&got, &want);
                assert!(
                    err < product_tolerance(dtype, tokens, on),
                    "{} {rows}x{cols}, {tokens} tokens, tensor cores {on}: relative error {err}",
                    dtype.name()
                );
            }
        }
    }
    gpu.use_tensor_cores(true);
}

/// A NaN in a token's input makes that token's outputs NaN on every path (the tensor cores'
/// bf16 split must not round it into a zero), and leaves the other tokens alone.
#[test]
fn gpu_products_propagate_nan() {
    let Some(mut gpu) = gpu_with_tensor_cores() else {
        return;
    };
    let mut rng = Rng::new(17);
    let (rows, cols, tokens) = (64, 256, 3);
    let (w, _) = weights_of(DType::Bf16, &random(&mut rng, rows * cols, 0.05));
    let mut x = random(&mut rng, tokens * cols, 1.0);
    // The NaN GPU arithmetic produces (all mantissa bits set), which rounding to bf16 by
    // adding half an ulp would carry into the sign bit.
    x[cols + 5] = f32::from_bits(0x7fff_ffff);
    for on in [true, false] {
        gpu.use_tensor_cores(on);
        let got = gpu
            .matmul(DType::Bf16, &w, rows, cols, &x, tokens, None)
            .expect("matmul runs");
        for (t, row) in got.chunks(rows).enumerate() {
            let nan = row.iter().filter(|v| v.is_nan()).count();
            let want = if t == 1 { rows } else { 0 };
            assert_eq!(nan, want, "token {t}, tensor cores {on}: {nan} NaN outputs");
        }
    }
    gpu.use_tensor_cores(true);
}

/// The RMSNorm of the rows of `x` with `weight` (one value a column), in f64.
fn normed_reference(x: &[f32], weight: &[f32], eps: f32) -> Vec<f64> {
    let cols = weight.len();
    x.chunks(cols)
        .flat_map(|row| {
            let ss: f64 = row.iter().map(|&v| v as f64 * v as f64).sum();
            let inv = 1.0 / (ss / cols as f64 + eps as f64).sqrt();
            row.iter()
                .zip(weight)
                .map(move |(&v, &w)| w as f64 * (v as f64 * inv))
        })
        .collect()
}

/// The products whose input is the RMSNorm of the rows (q/k/v, gate/up): the GEMVs apply it
/// as they read the rows, the tiled GEMMs take it from the norm kernel first. Against an f64
/// reference of the same computation.
#[test]
fn gpu_normed_products_match_f64_reference() {
    let Some(gpu) = gpu_with_tensor_cores() else {
        return;
    };
    let tensor_cores = gpu.tensor_cores_off().is_none();
    let mut rng = Rng::new(11);
    // The 1.1B model's q/k/v and up shapes, an odd width (the scalar path), and f16.
    let shapes = [
        (2560, 2048, DType::Bf16),
        (5632, 2048, DType::Bf16),
        (300, 129, DType::F32),
        (300, 136, DType::F16),
    ];
    let eps = 1e-5f32;
    for (rows, cols, dtype) in shapes {
        let (w, wf) = weights_of(dtype, &random(&mut rng, rows * cols, 0.05));
        let norm_w = random(&mut rng, cols, 1.0);
        for tokens in [1, 3, 8, 13, 100] {
            let x = random(&mut rng, tokens * cols, 2.0);
            let normed = normed_reference(&x, &norm_w, eps);
            let input = ProductInput::Normed {
                x: &x,
                weight: &norm_w,
                eps,
            };
            // Odd token counts add the product onto y0 (the residual add).
            let y0 = (tokens % 2 == 1).then(|| random(&mut rng, tokens * rows, 1.0));
            let got = gpu
                .product(dtype, &w, rows, cols, input, tokens, y0.as_deref())
                .expect("product runs");
            let want = reference_product(&wf, rows, cols, &normed, y0.as_deref());
            let err = rel_err(&got, &want);
            assert!(
                err < product_tolerance(dtype, tokens, tensor_cores),
                "normed input, {} {rows}x{cols}, {tokens} tokens: relative error {err}",
                dtype.name()
            );
        }
    }
}

/// The gate/up product with its SwiGLU, as the pass runs it (gate and up interleaved in runs of
/// 8 rows; the GEMV and tensor-core kernels write the SwiGLU, a tiled GEMM is followed by
/// `silu_mul`), against f64: the 1.1B model's MLP (bf16, on the tensor cores and on the CUDA
/// cores), and intermediate sizes that are not a multiple of 8 (padded) with biases.
#[test]
fn gpu_swiglu_products_match_f64_reference() {
    let Some(mut gpu) = gpu_with_tensor_cores() else {
        return;
    };
    let tensor_cores = gpu.tensor_cores_off().is_none();
    let mut rng = Rng::new(13);
    let eps = 1e-5f32;
    let shapes: [(usize, usize, DType, bool, &[usize]); 4] = [
        (5632, 2048, DType::Bf16, false, &[1, 8, 100]),
        (44, 256, DType::Bf16, true, &[2, 70]),
        (172, 64, DType::F32, true, &[1, 5, 70]),
        (300, 136, DType::F16, true, &[3, 70]),
    ];
    for (inter, cols, dtype, biased, token_counts) in shapes {
        let (gate, gate_f) = weights_of(dtype, &random(&mut rng, inter * cols, 0.05));
        let (up, up_f) = weights_of(dtype, &random(&mut rng, inter * cols, 0.05));
        let biases = biased.then(|| (random(&mut rng, inter, 0.5), random(&mut rng, inter, 0.5)));
        let norm_w = random(&mut rng, cols, 1.0);
        for &tokens in token_counts {
            let x = random(&mut rng, tokens * cols, 2.0);
            let normed = normed_reference(&x, &norm_w, eps);
            let g = reference_product(&gate_f, inter, cols, &normed, None);
            let u = reference_product(&up_f, inter, cols, &normed, None);
            let want: Vec<f64> = (0..tokens * inter)
                .map(|i| {
                    let (bg, bu) = biases.as_ref().map_or((0.0, 0.0), |(bg, bu)| {
                        (bg[i % inter] as f64, bu[i % inter] as f64)
                    });
                    let (gv, uv) = (g[i] + bg, u[i] + bu);
                    gv / (1.0 + (-gv).exp()) * uv
                })
                .collect();
            let paths = product_paths(dtype, tensor_cores);
            for &on in paths {
                gpu.use_tensor_cores(on);
                let input = ProductInput::Normed {
                    x: &x,
                    weight: &norm_w,
                    eps,
                };
                let bias = biases.as_ref().map(|(g, u)| (&g[..], &u[..]));
                let got = gpu
                    .swiglu_product(dtype, &gate, &up, (inter, cols), bias, input, tokens)
                    .expect("gate/up product runs");
                let err = rel_err(&got, &want);
                assert!(
                    err < product_tolerance(dtype, tokens, on),
                    "SwiGLU, {} {inter}x{cols}, {tokens} tokens, tensor cores {on}: relative error {err}",
                    dtype.name()
                );
            }
        }
    }
    gpu.use_tensor_cores(true);
}

#[test]
fn gpu_norm_silu_rope_embed_and_argmax_match_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(11);
    let (h, rows) = (2048, 37);
    let x = random(&mut rng, rows * h, 3.0);
    let w = random(&mut rng, h, 1.0);
    let normed = gpu.rms_norm(&x, &w, 1e-5).expect("norm runs");
    let mut want = vec![0.0f32; rows * h];
    for (row, out) in x.chunks_exact(h).zip(want.chunks_exact_mut(h)) {
        ops::rms_norm(row, &w, 1e-5, out);
    }
    let want64: Vec<f64> = want.iter().map(|&v| v as f64).collect();
    assert!(rel_err(&normed, &want64) < 1e-6, "rms norm");

    let inter = 5632;
    let gate_up = random(&mut rng, 9 * 2 * inter, 6.0);
    let got = gpu.silu_mul(&gate_up, inter).expect("silu runs");
    let mut want = Vec::new();
    for row in gate_up.chunks_exact(2 * inter) {
        let (mut g, u) = (row[..inter].to_vec(), &row[inter..]);
        ops::silu_mul(&mut g, u);
        want.extend(g.iter().map(|&v| v as f64));
    }
    assert!(rel_err(&got, &want) < 1e-6, "silu·up");

    // RoPE on fused q/k/v rows, with the KV append: 32 q heads rotate in place, 4 k heads
    // rotate into the cache, the 4 v heads are copied there.
    let (heads, kv_heads, d) = (32, 4, 64);
    let (kv_dim, stride) = (kv_heads * d, (heads + 2 * kv_heads) * d);
    let tokens = 19;
    let qkv = random(&mut rng, tokens * stride, 2.0);
    let rope = cllm::model::rope::Rope::new(&synthetic_config());
    let (mut cos, mut sin) = (vec![0.0; tokens * d / 2], vec![0.0; tokens * d / 2]);
    for t in 0..tokens {
        let pos = 100 * t + 3;
        rope.angles(
            pos,
            &mut cos[t * d / 2..][..d / 2],
            &mut sin[t * d / 2..][..d / 2],
        );
    }
    let slots: Vec<i32> = (0..tokens as i32).map(|t| (t * 7 + 5) % 40).collect();
    // Values that test the f16 cache's rounding: clamped beyond f16's range, ties to even
    // (1 + 2^-11 down to 1, 1 + 3 * 2^-11 up to 1 + 2^-9), subnormals.
    let mut qkv = qkv;
    let special = [
        70000.0f32,
        -1e9,
        1.0 + 2f32.powi(-11),
        1.0 + 3.0 * 2f32.powi(-11),
        3.0e-5,
        -6.0e-8,
        2f32.powi(-25),
        65519.0,
    ];
    qkv[(heads + kv_heads) * d..][..special.len()].copy_from_slice(&special);
    for f16_cache in [false, true] {
        let (rows_after, keys, values) = gpu
            .rope_kv_append(
                &qkv,
                stride,
                (heads, kv_heads, d),
                &cos,
                &sin,
                &slots,
                40,
                f16_cache,
            )
            .expect("rope runs");
        for t in 0..tokens {
            let mut want = qkv[t * stride..(t + 1) * stride].to_vec();
            for head in want[..(heads + kv_heads) * d].chunks_exact_mut(d) {
                ops::apply_rope(head, &cos[t * d / 2..][..d / 2], &sin[t * d / 2..][..d / 2]);
            }
            let slot = slots[t] as usize * kv_dim;
            // A rotated key stored as f16 may round the other way from the CPU's rotation:
            // one f16 step (2^-10 of its value) apart.
            let step = if f16_cache { 2f32.powi(-10) } else { 0.0 };
            let close = |got: &[f32], want: &[f32], what: &str| {
                for (g, w) in got.iter().zip(want) {
                    assert!(
                        (g - w).abs() <= (1e-5 + step) * w.abs().max(1.0),
                        "{what} of token {t} (f16 cache {f16_cache}): {g} vs {w}"
                    );
                }
            };
            close(
                &rows_after[t * stride..t * stride + heads * d],
                &want[..heads * d],
                "rotated q",
            );
            close(
                &keys[slot..slot + kv_dim],
                &want[heads * d..(heads + kv_heads) * d],
                "cached k",
            );
            // Values are stored as they are: bit for bit what the CPU's cache stores.
            let want_v = &want[(heads + kv_heads) * d..];
            let want_v = if f16_cache {
                through_f16(want_v)
            } else {
                want_v.to_vec()
            };
            let got_v = &values[slot..slot + kv_dim];
            assert!(
                got_v
                    .iter()
                    .zip(&want_v)
                    .all(|(g, w)| g.to_bits() == w.to_bits()),
                "cached v of token {t} (f16 cache {f16_cache}): {:?} vs {:?}",
                &got_v[..8],
                &want_v[..8]
            );
        }
    }

    // Embedding rows in each stored type.
    let vocab = 1000;
    let table = random(&mut rng, vocab * h, 1.0);
    let ids: Vec<u32> = (0..17).map(|i| (i * 97 % vocab) as u32).collect();
    for dtype in [DType::F32, DType::F16, DType::Bf16] {
        let (bytes, values) = weights_of(dtype, &table);
        let got = gpu.embed(dtype, &bytes, &ids, h).expect("embed runs");
        let want: Vec<f64> = ids
            .iter()
            .flat_map(|&id| values[id as usize * h..][..h].to_vec())
            .collect();
        assert!(rel_err(&got, &want) == 0.0, "embedding {}", dtype.name());
    }

    // Argmax over a 32000 vocabulary, ties going to the lowest index as on the CPU.
    let vocab = 32000;
    let mut logits = random(&mut rng, 5 * vocab, 10.0);
    logits[2 * vocab + 17] = 50.0;
    logits[2 * vocab + 31000] = 50.0;
    logits[3 * vocab + 5] = f32::NAN;
    logits[3 * vocab + 6] = 60.0;
    let (got, logprobs) = gpu.argmax(&logits, vocab).expect("argmax runs");
    let want: Vec<u32> = logits.chunks_exact(vocab).map(argmax).collect();
    assert_eq!(got, want);
    assert_eq!(got[2], 17);
    assert_eq!(got[3], 6, "NaN never chosen");
    // The choice's log-probability, as the host computes it for a streamed token.
    for ((row, &id), &lp) in logits.chunks_exact(vocab).zip(&got).zip(&logprobs) {
        let want = logprob_of(row, id);
        assert!(
            (lp - want).abs() < 1e-5,
            "log-probability {lp}, host {want}"
        );
    }
}

fn synthetic_config() -> cllm::model::config::ModelConfig {
    cllm::model::synthetic::config(cllm::model::synthetic::SyntheticSize::B1)
}

/// Attention of `positions` (one sequence per distinct table) against an f64 reference.
#[test]
fn gpu_attention_matches_f64_reference() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(3);
    // Sequences of these lengths; each query token attends to its own sequence's cache.
    let cases = [
        (vec![4096], 0, 1),                // one long decode
        (vec![17, 300, 1024, 2500], 0, 1), // a decode batch of mixed depths
        (vec![130], 0, 130),               // a whole prompt (causal prefill)
        (vec![700], 256, 40),              // sliding window, last 40 tokens
        (vec![33; 64], 0, 1),              // batch of 64 short decodes
    ];
    // The 1.1B model's heads (GQA 32/4: a block per 8 heads), then every case of a block's
    // head group on a smaller set: 7 heads per KV head (7 warps), 3 (two warps a head),
    // multi-head (8 warps a head), 16 (two blocks per KV head); head dims 64, 96, 128, 32, 256
    // (each kernel variant: d up to 32, 64, 128, 256).
    let shapes = [
        (32, 4, 64, &cases[..]),
        (14, 2, 64, &cases[1..3]),
        (12, 4, 96, &cases[1..3]),
        (8, 8, 32, &cases[1..3]),
        (16, 1, 128, &cases[2..4]),
        (8, 2, 256, &cases[1..3]),
    ];
    for (heads, kv_heads, d, cases) in shapes {
        let kv_dim = kv_heads * d;
        for (lengths, window, queries_per_seq) in cases.iter().cloned() {
            let blocks: usize = lengths.iter().map(|l: &usize| l.div_ceil(16)).sum();
            let slots = (blocks + 3) * 16;
            let keys = random(&mut rng, slots * kv_dim, 1.0);
            let values = random(&mut rng, slots * kv_dim, 1.0);
            // Blocks handed out in a scrambled order, as a real cache does after churn.
            let mut order: Vec<i32> = (0..(blocks + 3) as i32).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
            }
            let (mut tables, mut offsets, mut positions) = (Vec::new(), Vec::new(), Vec::new());
            let mut next = 0;
            for &len in &lengths {
                let start = tables.len() as i32;
                tables.extend_from_slice(&order[next..next + len.div_ceil(16)]);
                next += len.div_ceil(16);
                for pos in len - queries_per_seq..len {
                    offsets.push(start);
                    positions.push(pos as i32);
                }
            }
            let n = positions.len();
            let q = random(&mut rng, n * heads * d, 1.0);
            // The f64 attention over the cache's keys and values as stored.
            let reference = |keys: &[f32], values: &[f32]| {
                let mut want = vec![0.0f64; n * heads * d];
                for t in 0..n {
                    let pos = positions[t] as usize;
                    let table = &tables[offsets[t] as usize..];
                    let first = if window > 0 {
                        (pos + 1).saturating_sub(window)
                    } else {
                        0
                    };
                    for h in 0..heads {
                        let kvh = h / (heads / kv_heads);
                        let qh = &q[(t * heads + h) * d..][..d];
                        let slot = |j: usize| table[j / 16] as usize * 16 + j % 16;
                        let scores: Vec<f64> = (first..=pos)
                            .map(|j| {
                                let k = &keys[slot(j) * kv_dim + kvh * d..][..d];
                                qh.iter()
                                    .zip(k)
                                    .map(|(&a, &b)| a as f64 * b as f64)
                                    .sum::<f64>()
                                    / (d as f64).sqrt()
                            })
                            .collect();
                        let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                        let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                        for (j, s) in (first..=pos).zip(&scores) {
                            let p = (s - max).exp() / total;
                            let v = &values[slot(j) * kv_dim + kvh * d..][..d];
                            for i in 0..d {
                                want[(t * heads + h) * d + i] += p * v[i] as f64;
                            }
                        }
                    }
                }
                want
            };
            let want = reference(&keys, &values);
            // An f16 cache (the 1.1B model's heads and head dim 128): against the attention
            // of the keys and values rounded to f16.
            let f16_want = [64, 128].contains(&d).then(|| {
                let (k16, v16) = (through_f16(&keys), through_f16(&values));
                reference(&k16, &v16)
            });
            let runs = [(false, 1), (false, 7), (false, 32), (true, 7)];
            for (f16_cache, splits) in runs {
                let want = match (f16_cache, &f16_want) {
                    (false, _) => &want,
                    (true, Some(want)) => want,
                    (true, None) => continue,
                };
                let got = gpu
                    .attention(&AttentionCase {
                        q: &q,
                        keys: &keys,
                        values: &values,
                        tables: &tables,
                        offsets: &offsets,
                        positions: &positions,
                        heads,
                        kv_heads,
                        d,
                        window,
                        splits,
                        f16_cache,
                    })
                    .expect("attention runs");
                let err = rel_err(&got, want);
                assert!(
                err < 1e-5,
                "heads {heads}/{kv_heads}, d {d}, lengths {:?} (window {window}, {queries_per_seq} queries each), {splits} splits, f16 cache {f16_cache}: relative error {err}",
                &lengths[..lengths.len().min(4)]
            );
            }
        }
    }
}

/// The values as an f16 KV cache stores them (rounded to nearest, clamped to f16's range).
fn through_f16(values: &[f32]) -> Vec<f32> {
    values
        .iter()
        .map(|&v| half::f16::from_f32(v.clamp(-65504.0, 65504.0)).to_f32())
        .collect()
}

// ---- Without a GPU: the CUDA backend on the CPU emulator (tests/cuda_emulator) ----

/// The kernel checks above, run again with the emulator as the driver, blocks and the threads
/// of each block in reverse order (a result that depends on the order blocks run in shows).
#[test]
fn kernel_checks_pass_on_the_cuda_emulator() {
    let checks = [
        "gpu_matmul_matches_f64_reference",
        "gpu_normed_products_match_f64_reference",
        "gpu_swiglu_products_match_f64_reference",
        "gpu_products_propagate_nan",
        "gpu_norm_silu_rope_embed_and_argmax_match_the_cpu",
        "gpu_attention_matches_f64_reference",
        "gpu_bench_profile_times_every_phase",
    ];
    common::emulated_gpu::rerun_on_emulated_gpu(&checks, checks.len(), "reverse");
}

/// A stories260K prompt of more than 64 tokens.
const LONG_PROMPT: &str = "Once upon a time, there was a little dog named Max. Max liked to \
     run in the park with his friend, a big red ball. One day, the sun was hot and the grass was \
     green. Max saw a bird in a tree. The bird sang a happy song. Max wanted to play with the \
     bird, so he ran to the tree and jumped up high. The bird";

/// With a driver library that has a device, `--device auto` takes it and says why, and its
/// greedy tokens are the CPU's: a prompt of more than 64 tokens (the prefill's products are
/// tiled GEMMs, not GEMVs), then 90 decode steps replayed from captured graphs over several KV
/// blocks, with the attention split in two; and with an f16 KV cache, the CPU's f16-cache tokens.
#[test]
fn device_auto_takes_an_emulated_device_and_keeps_the_cpu_tokens() {
    use common::emulated_gpu::{emulator_dir, on_emulator};
    if std::env::var_os("CLLM_TEST_DEVICE").is_some() {
        say("not run on the CUDA emulator: CLLM_TEST_DEVICE already names the device");
        return;
    }
    let Some(emulator) = emulator_dir() else {
        return;
    };
    let fx = fixture("stories260K").expect("in the repository");
    let run_with = |device: &str, emulated: bool, kv_cache: &str| {
        let mut cmd = cllm();
        cmd.args([
            "generate",
            "--json",
            "--ignore-eos",
            "--max-new-tokens",
            "90",
            "--kv-cache-dtype",
            kv_cache,
        ])
        .args(["--device", device, "--model"])
        .arg(&fx.model_dir)
        .arg(LONG_PROMPT);
        if emulated {
            cmd = on_emulator(cmd, &emulator);
        }
        let out = cmd.output().expect("runs cllm");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "--device {device}: {stderr}");
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
        (json["output_ids"].clone(), stderr)
    };
    let run = |device: &str, emulated: bool| run_with(device, emulated, "f32");
    let (cpu, cpu_log) = run("cpu", false);
    let prompt_tokens: usize = cpu_log
        .lines()
        .find(|l| l.contains(" prompt tokens, "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("cllm generate reports its prompt tokens");
    assert!(prompt_tokens > 64, "{prompt_tokens} prompt tokens");
    let (auto, stderr) = run("auto", true);
    assert_eq!(cpu.as_array().map(Vec::len), Some(90), "90 tokens: {cpu}");
    assert_eq!(auto, cpu, "the emulated device's tokens are the CPU's");
    assert!(
        stderr.contains(
            "generated on cllm CUDA emulator (CPU) (sm_90) [device auto: CUDA device 0 found]"
        ),
        "auto says it runs on CUDA and why: {stderr}"
    );
    // An f16 cache: stored and read back as the CPU's f16 cache does.
    let (cpu16, _) = run_with("cpu", false, "f16");
    let (gpu16, _) = run_with("cuda", true, "f16");
    assert_eq!(
        cpu16.as_array().map(Vec::len),
        Some(90),
        "90 tokens: {cpu16}"
    );
    assert_eq!(
        gpu16, cpu16,
        "the emulated device's f16-cache tokens are the CPU's"
    );
}
