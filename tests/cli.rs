//! The `cllm` binary as users and outside scripts call it.

mod common;

use common::{cllm, fixture, stdout_of, ALL_MODELS};
use std::process::Command;

/// Runs `cmd`, which must succeed and print a table with each of `rows`.
fn assert_table_rows(mut cmd: Command, rows: &[&str]) {
    let stdout = stdout_of(&mut cmd);
    let table = String::from_utf8_lossy(&stdout);
    for row in rows {
        assert!(table.contains(row), "missing {row:?} in\n{table}");
    }
}

#[test]
fn generate_json_matches_golden_for_every_model() {
    for name in ALL_MODELS {
        let Some(fx) = fixture(name) else { continue };
        let case = &fx.golden.cases[0];
        let stdout = stdout_of(
            cllm()
                .args(["generate", "--json", "--ignore-eos", "--model"])
                .arg(&fx.model_dir)
                .args(["--max-new-tokens", &fx.golden.max_new_tokens.to_string()])
                .arg(&case.prompt),
        );
        let json: serde_json::Value = serde_json::from_slice(&stdout).expect("one JSON object");
        let ids = |key: &str| -> Vec<u32> {
            serde_json::from_value(json[key].clone()).unwrap_or_else(|e| panic!("{key}: {e}"))
        };
        assert_eq!(ids("input_ids"), case.input_ids, "{name}");
        assert_eq!(ids("output_ids"), case.output_ids, "{name}");
        assert!(json["text"].is_string(), "{name}: text");
    }
}

#[test]
fn generate_streams_text_and_reports_speed() {
    let Some(fx) = fixture("stories260K") else {
        return;
    };
    let out = cllm()
        .args(["generate", "--max-new-tokens", "20", "--model"])
        .arg(&fx.model_dir)
        .arg("Once upon a time")
        .output()
        .expect("runs cllm");
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("Once upon a time, there was a little girl"),
        "{stdout}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("tokens/s"), "{stderr}");
    assert!(
        stderr.contains("generated on "),
        "says where it ran: {stderr}"
    );
}

#[test]
fn same_seed_same_text_and_eos_stops() {
    let Some(fx) = fixture("stories260K") else {
        return;
    };
    let sample = |seed: &str| {
        let out = cllm()
            .args([
                "generate",
                "--json",
                "--temperature",
                "0.9",
                "--top-k",
                "40",
                "--seed",
                seed,
            ])
            .args(["--max-new-tokens", "200", "--model"])
            .arg(&fx.model_dir)
            .arg("Once upon a time")
            .output()
            .expect("runs cllm");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json")
    };
    let (a, b, c) = (sample("7"), sample("7"), sample("8"));
    assert_eq!(a, b, "same seed, same output");
    assert_ne!(
        a["output_ids"], c["output_ids"],
        "another seed, another output"
    );
    // Without --ignore-eos, a story ends at eos (id 2) or runs to the limit; eos is never mid-way.
    let ids: Vec<u32> = serde_json::from_value(a["output_ids"].clone()).expect("ids");
    let (_, before_last) = ids.split_last().expect("some output");
    assert!(
        !before_last.contains(&2),
        "generation continued past eos: {ids:?}"
    );
}

#[test]
fn stop_sequence_ends_generation() {
    let Some(fx) = fixture("stories260K") else {
        return;
    };
    let out = cllm()
        .args([
            "generate",
            "--json",
            "--stop",
            "Lily",
            "--max-new-tokens",
            "64",
            "--model",
        ])
        .arg(&fx.model_dir)
        .arg("Once upon a time")
        .output()
        .expect("runs cllm");
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let text = json["text"].as_str().expect("text");
    assert!(text.ends_with("Lily"), "{text:?}");
    assert!(json["output_ids"].as_array().expect("ids").len() < 64);
}

#[test]
fn bad_model_folder_is_a_clear_error_not_a_panic() {
    let out = cllm()
        .args(["generate", "--model", "/nonexistent/model", "hi"])
        .output()
        .expect("runs cllm");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/model"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bench_runs_on_a_model_folder() {
    let Some(fx) = fixture("stories260K") else {
        return;
    };
    let mut cmd = cllm();
    cmd.args([
        "bench",
        "--prompt-tokens",
        "64",
        "--decode-tokens",
        "16",
        "--model",
    ])
    .arg(&fx.model_dir);
    assert_table_rows(
        cmd,
        &[
            "prefill",
            "decode, batch 1",
            "GB/s",
            "decode, batch 8",
            "baseline",
        ],
    );
}

/// The phases a CPU profile of stories260K times measurably: products and attention take
/// measurable time on any CPU; the element-wise phases of this tiny model can round to
/// 0.000 ms.
const PROFILE_TIMED_ON_CPU: [&str; 6] = [
    "matmul q/k/v",
    "attention",
    "matmul o",
    "matmul gate/up",
    "matmul down",
    "matmul lm_head",
];

#[test]
fn bench_profile_breaks_a_step_into_phases_that_add_up() {
    common::check_bench_profile("cpu", "| thread pool", &PROFILE_TIMED_ON_CPU);
}

/// `--profile-batch 3` profiles one decode step of three sequences, in a section titled so
/// with every phase's row and the shares adding up; `--profile-batch 0` is refused.
#[test]
fn bench_profile_batch_profiles_a_step_of_several_sequences() {
    common::check_bench_profile_of("cpu", 3, "| thread pool", &PROFILE_TIMED_ON_CPU);
    let fx = fixture("stories260K").expect("in the repository");
    let zero = cllm()
        .args(["bench", "--profile", "--profile-batch", "0", "--model"])
        .arg(&fx.model_dir)
        .output()
        .expect("runs cllm");
    assert!(!zero.status.success(), "--profile-batch 0 is refused");
}

#[test]
fn bench_json_reports_an_empty_context_decode() {
    let Some(fx) = fixture("stories260K") else {
        return;
    };
    let stdout = stdout_of(
        cllm()
            .args(["bench", "--json", "--device", "cpu", "--batch", "2"])
            .args(["--prompt-tokens", "0", "--decode-tokens", "8"])
            .args(["--numerics", "exact", "--model"])
            .arg(&fx.model_dir),
    );
    let report: serde_json::Value = serde_json::from_slice(&stdout).expect("one JSON object");
    assert_eq!(report["prompt_tokens"], 0);
    assert_eq!(report["decode_tokens"], 8);
    assert!(report["prefill_tokens_per_s"].is_null(), "{report}");
    assert_eq!(report["dtype"], "f32");
    assert_eq!(report["numerics"], "exact (f32)");
    assert_eq!(report["device"]["kind"], "cpu", "{report}");
    assert_eq!(report["batches"][0]["batch"], 2, "{report}");
    for key in [
        "decode_tokens_per_s",
        "decode_batch_tokens_per_s",
        "baseline_read_gbs",
        "baseline_gbs",
    ] {
        assert!(
            report[key].as_f64().is_some_and(|v| v > 0.0),
            "{key} in {report}"
        );
    }
}

/// The report names the arithmetic the products of these weights really use: f16 weights in
/// `fast` numerics take f16 activations for one token on AVX-512 CPUs (and compute exactly
/// elsewhere), and `exact` always says so.
#[test]
fn bench_names_the_numerics_of_f16_weights() {
    let model = common::repo_root().join("models/gguf/tiny256-f16.gguf");
    let numerics_of = |asked: &str| {
        let stdout = stdout_of(
            cllm()
                .args(["bench", "--json", "--device", "cpu", "--batch", "0"])
                .args(["--prompt-tokens", "4"])
                .args(["--decode-tokens", "2", "--numerics", asked, "--model"])
                .arg(&model),
        );
        let report: serde_json::Value = serde_json::from_slice(&stdout).expect("one JSON object");
        assert_eq!(report["dtype"], "f16", "{report}");
        report["numerics"].as_str().map(str::to_owned)
    };
    #[cfg(target_arch = "x86_64")]
    let avx512 = std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl");
    #[cfg(not(target_arch = "x86_64"))]
    let avx512 = false;
    let fast = if avx512 {
        "fast (f16 activations for one token)"
    } else {
        "exact (f32)"
    };
    assert_eq!(numerics_of("fast").as_deref(), Some(fast));
    assert_eq!(numerics_of("exact").as_deref(), Some("exact (f32)"));
}

#[test]
fn serve_refuses_a_bad_config_naming_the_key() {
    let dir = tempfile::tempdir().expect("tmp");
    let cases = [
        ("request_queue:\n  max_size: 3\n", "max_size"),
        ("http:\n  port: lots\n", "http.port"),
        (
            "request_queue:\n  max_queue_size: 0\n",
            "request_queue.max_queue_size",
        ),
        ("surprise: 1\n", "surprise"),
    ];
    for (i, (yaml, key)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.yaml"));
        std::fs::write(&path, yaml).expect("write");
        let out = cllm()
            .args([
                "serve",
                "--model",
                "models/stories260K",
                "--port",
                "0",
                "--config",
            ])
            .arg(&path)
            .current_dir(common::repo_root())
            .output()
            .expect("runs cllm");
        assert!(!out.status.success(), "{yaml} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(key),
            "{yaml}: error {stderr:?} does not name {key}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let out = cllm()
        .args([
            "serve",
            "--model",
            "models/stories260K",
            "--set",
            "scheduler.nope=1",
        ])
        .current_dir(common::repo_root())
        .output()
        .expect("runs cllm");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("scheduler.nope"));
}

#[test]
fn bench_plugins_prints_call_and_reload_latency() {
    let wasm_dir = common::wasm::plugin_wasm("token-bucket")
        .parent()
        .expect("folder")
        .to_path_buf();
    let mut cmd = cllm();
    cmd.args([
        "bench-plugins",
        "--calls",
        "2000",
        "--reloads",
        "2",
        "--wasm-dir",
    ])
    .arg(&wasm_dir);
    assert_table_rows(
        cmd,
        &[
            "built-in limiter check",
            "token-bucket plugin check",
            "tiered-priority plugin priority",
            "reload, file write to active",
        ],
    );
}

/// `cllm plugin check`: each example passes, printing its world and version, its imports, the
/// first call's verdict, the timing of 1000 calls, its peak memory and "ok"; each misbehaving
/// test plugin and a corrupt file fail (exit code 1) with the reason.
#[test]
fn plugin_check_passes_the_examples_and_fails_misbehaving_plugins() {
    use common::wasm::plugin_wasm;
    for (name, world, version, first) in [
        ("token-bucket", "rate-limiter", "0.2.0", "first call: allow"),
        ("shared-limit", "rate-limiter", "0.2.0", "first call: allow"),
        ("deny-all", "rate-limiter", "0.2.0", "first call: reject ("),
        ("allow-all", "rate-limiter", "0.1.0", "first call: allow"),
        (
            "tiered-priority",
            "prioritizer",
            "0.2.0",
            "first call: priority ",
        ),
        (
            "queue-health",
            "health-checker",
            "0.2.0",
            "first call: healthy: ",
        ),
    ] {
        let stdout = stdout_of(cllm().args(["plugin", "check"]).arg(plugin_wasm(name)));
        let text = String::from_utf8_lossy(&stdout);
        for want in [
            &format!("world: {world}, cllm:policy@{version}"),
            "imports: ",
            &format!("cllm:policy/types@{version}"),
            first,
            "1000 calls: p50 ",
            "MiB of linear memory at peak",
        ] {
            assert!(text.contains(want), "{name}: missing {want:?} in\n{text}");
        }
        assert!(text.ends_with("ok\n"), "{name}:\n{text}");
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let corrupt = tmp.path().join("corrupt.wasm");
    std::fs::write(&corrupt, b"\0asm not a component").expect("write");
    // grow-memory with a small limit and a long deadline, so the limit is what stops it.
    let small = ["--memory-limit-mb", "2", "--deadline-ms", "2000"];
    // A server that refuses filesystem imports refuses wasi-probe (it uses std::fs): the
    // check reads that from the server's own config file.
    let strict = tmp.path().join("cllm.yaml");
    std::fs::write(
        &strict,
        "plugins:\n  refused_imports: [\"wasi:filesystem\"]\n",
    )
    .expect("write");
    let strict_path = strict.display().to_string();
    let strict_arg = ["--server-config", strict_path.as_str()];
    for (file, extra, reason) in [
        (plugin_wasm("trap"), &[][..], "faulted: trap"),
        (plugin_wasm("loop-forever"), &[], "faulted: deadline"),
        (plugin_wasm("grow-memory"), &small, "faulted: out_of_memory"),
        (plugin_wasm("wrong-world"), &[], "none of cllm's worlds"),
        (plugin_wasm("future-major"), &[], "unsupported version"),
        (
            plugin_wasm("foreign-import"),
            &[],
            "imports cllm-test:foreign/vault, which cllm does not offer",
        ),
        (corrupt, &[], "not a valid WebAssembly component"),
        (
            plugin_wasm("wasi-probe"),
            &strict_arg,
            "plugins.refused_imports",
        ),
    ] {
        let out = cllm()
            .args(["plugin", "check"])
            .arg(&file)
            .args(extra)
            .output()
            .expect("runs cllm");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{}: {stderr}", file.display());
        assert!(stderr.contains(reason), "{}: {stderr}", file.display());
    }
}

/// A plugin that prints on every call: `plugin check` reports its output, which went to the
/// log under the rate limit (2006 lines printed: about a burst's worth logged, the rest dropped).
#[test]
fn plugin_check_reports_a_printing_plugins_output_under_the_rate_limit() {
    use common::wasm::plugin_wasm;
    let stdout = stdout_of(
        cllm()
            .args(["plugin", "check"])
            .arg(plugin_wasm("wasi-probe")),
    );
    let text = String::from_utf8_lossy(&stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("output: "))
        .unwrap_or_else(|| panic!("no output line in\n{text}"));
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let (logged, dropped) = (numbers[0], numbers[1]);
    // Two lines per call (stdout and stderr): the trial call, the first call, 1000 timed calls
    // and a fresh instance's first call.
    assert_eq!(logged + dropped, 2 * 1003, "{line}");
    assert!((50..200).contains(&logged), "{line}");
    assert!(text.ends_with("ok\n"), "{text}");
}

/// A running `cllm serve` process: what a plugin prints goes to the server's log, tagged with
/// the plugin's file name, both at load (the trial call) and on the request path.
#[test]
fn a_plugins_printed_lines_appear_in_the_server_log_tagged_with_its_name() {
    use common::wasm::plugin_wasm;
    use std::io::{Read, Write};
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("plugins");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::copy(plugin_wasm("wasi-probe"), dir.join("probe.wasm")).expect("copy");
    let dir_arg = dir.display().to_string();
    let server =
        common::process::ServeProcess::start(tmp.path(), "server", &["--plugins-dir", &dir_arg]);
    let addr = server.addr.clone();
    let body = r#"{"inputs": "Hi", "parameters": {"max_new_tokens": 2}}"#;
    let mut stream = std::net::TcpStream::connect(&addr).expect("connect");
    write!(
        stream,
        "POST /generate HTTP/1.1\r\nHost: x\r\nX-Request-Id: req-42\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let text = server.log();
    for line in [
        "probe check cllm-trial",
        "probe check req-42",
        "probe stderr req-42",
    ] {
        let found = text
            .lines()
            .find(|l| l.contains(line))
            .unwrap_or_else(|| panic!("{line:?} not in the log:\n{text}"));
        assert!(found.contains("plugin=probe.wasm"), "{found}");
    }
    assert!(!text.contains("panicked"), "{text}");
}

/// `cllm bench-plugins` with nothing to time is a usage error naming the flag (exit code 2),
/// not a panic (it indexed the empty list of timings).
#[test]
fn bench_plugins_refuses_zero_calls_and_reloads() {
    for flag in ["--calls", "--reloads"] {
        let out = cllm()
            .args(["bench-plugins", flag, "0"])
            .output()
            .expect("runs cllm");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag}: {stderr}");
        assert!(stderr.contains(flag), "{flag}: {stderr}");
    }
}
