//! `cllm bench-plugins`: the cost of policy plugins. Call latency of a limiter and a
//! prioritizer (with the built-in limiter measured in the same run as the baseline), and reload
//! latency from the file write until the new plugin is the one in force.

use crate::admission::rate_limiter::RateLimiter;
use crate::config::{PluginsConfig, RateLimiterConfig};
use crate::metrics::Metrics;
use crate::plugins::bindings::RequestInfo;
use crate::plugins::{watcher, PluginRegistry};
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct BenchPluginsArgs {
    /// Folder with the built plugins (token_bucket.wasm, tiered_priority.wasm, allow_all.wasm),
    /// e.g. from `bash plugins/build.sh target/wasm-plugins`.
    #[arg(long, default_value = "target/wasm-plugins")]
    wasm_dir: PathBuf,
    /// Calls timed per measurement (at least 1).
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    calls: u64,
    /// Reloads timed (at least 1).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    reloads: u64,
}

fn percentiles(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    (at(0.50), at(0.99))
}

fn time_calls(n: usize, mut call: impl FnMut(usize)) -> (Duration, Duration) {
    for i in 0..n / 10 {
        call(i); // warm-up
    }
    let samples = (0..n)
        .map(|i| {
            let start = Instant::now();
            call(i);
            start.elapsed()
        })
        .collect();
    percentiles(samples)
}

/// A request as a server would pass a plugin; `i` varies the client and request id.
pub(super) fn request(i: usize) -> RequestInfo {
    RequestInfo {
        request_id: format!("bench-{i}"),
        client_id: format!("client-{}", i % 64),
        endpoint: "/generate".into(),
        api: crate::plugins::bindings::Api::Tgi,
        model: "bench".into(),
        prompt_tokens: 16,
        max_new_tokens: 16,
        requested_priority: None,
        headers: vec![("x-tier".into(), "gold".into())],
    }
}

fn copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    let tmp = to.with_extension("partial");
    std::fs::copy(from, &tmp).with_context(|| format!("copying {}", from.display()))?;
    std::fs::rename(&tmp, to)?;
    Ok(())
}

pub fn run(args: BenchPluginsArgs) -> anyhow::Result<()> {
    let (calls, swaps) = (args.calls as usize, args.reloads as usize);
    let wasm = |name: &str| args.wasm_dir.join(format!("{name}.wasm"));
    let dir = std::env::temp_dir().join(format!("cllm-bench-plugins-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("limiter.json"),
        r#"{"rate_per_sec": 1000000, "burst": 1000000}"#,
    )?;
    copy(&wasm("token_bucket"), &dir.join("limiter.wasm"))?;
    copy(&wasm("tiered_priority"), &dir.join("priority.wasm"))?;
    let config = PluginsConfig {
        dir: Some(dir.clone()),
        ..PluginsConfig::default()
    };
    let registry = PluginRegistry::start(&dir, &config, Arc::new(Metrics::new(false)))?;
    let set = registry.current();
    let limiter = set
        .limiters
        .first()
        .context("token_bucket did not load")?
        .clone();
    let prioritizer = set
        .prioritizer
        .clone()
        .context("tiered_priority did not load")?;
    let requests: Vec<RequestInfo> = (0..1024).map(request).collect();

    let builtin = RateLimiter::new(&RateLimiterConfig {
        max_requests: 1_000_000,
        ..RateLimiterConfig::default()
    });
    let clients: Vec<String> = (0..64).map(|i| format!("client-{i}")).collect();
    let (b50, b99) = time_calls(calls, |i| {
        let _ = builtin.check(&clients[i % 64], Instant::now());
    });
    let (l50, l99) = time_calls(calls, |i| {
        let _ = limiter.check(&requests[i % 1024]);
    });
    let (p50, p99) = time_calls(calls, |i| {
        let _ = prioritizer.priority(&requests[i % 1024]);
    });

    // Reload latency: alternate two different files and wait for the swap.
    let _watch = watcher::watch(registry.clone())?;
    let mut reloads = Vec::new();
    for i in 0..swaps {
        let source = if i % 2 == 0 {
            wasm("allow_all")
        } else {
            wasm("token_bucket")
        };
        let want = crate::plugins::registry::sha256_file(&source)?;
        let start = Instant::now();
        copy(&source, &dir.join("limiter.wasm"))?;
        loop {
            if registry
                .current()
                .limiters
                .first()
                .is_some_and(|p| p.sha256 == want)
            {
                break;
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(10),
                "reload {i} never happened"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        reloads.push(start.elapsed());
    }
    let (r50, r99) = percentiles(reloads.clone());
    let rmax = reloads.iter().max().copied().unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);

    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("| measurement | p50 | p99 |");
    println!("|---|---|---|");
    println!(
        "| built-in limiter check (baseline) | {:.2} µs | {:.2} µs |",
        us(b50),
        us(b99)
    );
    println!(
        "| token-bucket plugin check | {:.2} µs | {:.2} µs |",
        us(l50),
        us(l99)
    );
    println!(
        "| tiered-priority plugin priority | {:.2} µs | {:.2} µs |",
        us(p50),
        us(p99)
    );
    println!("| reload, file write to active ({} swaps, max {:.1} ms, quiet period {} ms) | {:.1} ms | {:.1} ms |", args.reloads, ms(rmax), config.reload_quiet_ms, ms(r50), ms(r99));
    println!(
        "plugin check p99 / built-in p99: {:.1}x",
        us(l99) / us(b99).max(1e-3)
    );
    Ok(())
}
