//! Prometheus metrics (`cllm_` prefix), one recorder per server so that several servers in one
//! process (as in the tests) keep separate counts.

use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Request latency buckets: from a cached 5 ms reply to multi-minute generations.
const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
/// Time to first token and queue wait: mostly sub-second, with a long tail under load.
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Inter-token latency: a few ms per token on a GPU to ~100 ms for a big model on a CPU.
const ITL_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
const PLUGIN_BUCKETS: &[f64] = &[
    0.000_001, 0.000_002, 0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.001, 0.005, 0.05,
];

pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    enabled: bool,
    /// Tells the upkeep thread to stop (set when the metrics are dropped).
    upkeep_stop: Arc<AtomicBool>,
}

/// How often histogram samples are folded into their buckets. The exporter keeps every
/// recorded sample until a scrape or an upkeep drains it: without upkeep, a server nobody
/// scrapes grows by every sample it records (about a kilobyte per generated request).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

impl Metrics {
    pub fn new(enabled: bool) -> Self {
        let builder = PrometheusBuilder::new();
        let buckets = [
            ("cllm_request_duration_seconds", DURATION_BUCKETS),
            ("cllm_time_to_first_token_seconds", TTFT_BUCKETS),
            ("cllm_queue_wait_seconds", TTFT_BUCKETS),
            ("cllm_inter_token_latency_seconds", ITL_BUCKETS),
            ("cllm_batch_size", BATCH_BUCKETS),
            ("cllm_plugin_call_duration_seconds", PLUGIN_BUCKETS),
            ("cllm_shared_state_call_duration_seconds", PLUGIN_BUCKETS),
        ];
        let builder = buckets.iter().fold(builder, |b, (name, values)| {
            // Only fails for an empty bucket list, which the constants above are not.
            b.set_buckets_for_metric(Matcher::Full((*name).to_string()), values)
                .unwrap_or_else(|_| PrometheusBuilder::new())
        });
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        let upkeep_stop = Arc::new(AtomicBool::new(false));
        if enabled {
            let (handle, stop) = (handle.clone(), upkeep_stop.clone());
            // A thread that cannot start only means samples wait for the next scrape.
            let _ = std::thread::Builder::new()
                .name("cllm-metrics-upkeep".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(UPKEEP_EVERY);
                        handle.run_upkeep();
                    }
                });
        }
        let metrics = Metrics {
            recorder,
            handle,
            enabled,
            upkeep_stop,
        };
        metrics.describe();
        metrics
    }

    fn describe(&self) {
        let help = [
            (
                "cllm_requests_total",
                "Requests answered, by endpoint and HTTP status.",
            ),
            (
                "cllm_request_duration_seconds",
                "Time from request to last byte, by endpoint.",
            ),
            (
                "cllm_errors_total",
                "Error responses, by endpoint and error_type.",
            ),
            ("cllm_queue_size", "Requests waiting in the queue."),
            (
                "cllm_queue_wait_seconds",
                "Time requests spent queued before scheduling.",
            ),
            (
                "cllm_time_to_first_token_seconds",
                "Time from request to its first token.",
            ),
            (
                "cllm_inter_token_latency_seconds",
                "Time between consecutive tokens of a request.",
            ),
            ("cllm_running_sequences", "Sequences in the running batch."),
            (
                "cllm_kv_cache_usage_ratio",
                "Fraction of KV cache blocks in use.",
            ),
            ("cllm_batch_size", "Sequences per forward pass."),
            ("cllm_prompt_tokens_total", "Prompt tokens admitted."),
            ("cllm_generated_tokens_total", "Tokens generated."),
            (
                "cllm_sequence_failures_total",
                "Sequences the executor failed (forward pass or decoding errors).",
            ),
            (
                "cllm_rate_limited_total",
                "Requests refused by the rate limiter.",
            ),
            (
                "cllm_plugin_calls_total",
                "Calls into policy plugins, by plugin and kind.",
            ),
            (
                "cllm_plugin_call_duration_seconds",
                "Duration of policy plugin calls.",
            ),
            (
                "cllm_plugin_faults_total",
                "Plugin traps, deadline hits and out-of-memory, by plugin, kind and fault.",
            ),
            (
                "cllm_plugin_reloads_total",
                "Plugin file (re)loads, by plugin and result: loaded, refused, removed.",
            ),
        ];
        for (name, text) in help {
            self.recorder
                .describe_counter(name.into(), None, text.into());
        }
        let vllm = [
            (
                "vllm:num_requests_waiting",
                "Requests waiting in the queue (vLLM's name).",
            ),
            (
                "vllm:num_requests_running",
                "Requests in the running batch (vLLM's name).",
            ),
            (
                "vllm:kv_cache_usage_perc",
                "KV cache usage, 0 to 1 (vLLM's name).",
            ),
            (
                "vllm:cache_config_info",
                "KV cache configuration as labels (vLLM's name).",
            ),
        ];
        for (name, text) in vllm {
            self.recorder.describe_gauge(name.into(), None, text.into());
        }
    }

    fn key(name: &'static str, labels: &[(&'static str, String)]) -> Key {
        let labels: Vec<Label> = labels
            .iter()
            .map(|(k, v)| Label::new(*k, v.clone()))
            .collect();
        Key::from_parts(name, labels)
    }

    pub fn counter(&self, name: &'static str, labels: &[(&'static str, String)]) -> Counter {
        if !self.enabled {
            return Counter::noop();
        }
        self.recorder
            .register_counter(&Self::key(name, labels), &METADATA)
    }

    pub fn gauge(&self, name: &'static str) -> Gauge {
        self.gauge_with(name, &[])
    }

    pub fn gauge_with(&self, name: &'static str, labels: &[(&'static str, String)]) -> Gauge {
        if !self.enabled {
            return Gauge::noop();
        }
        self.recorder
            .register_gauge(&Self::key(name, labels), &METADATA)
    }

    pub fn histogram(&self, name: &'static str, labels: &[(&'static str, String)]) -> Histogram {
        if !self.enabled {
            return Histogram::noop();
        }
        self.recorder
            .register_histogram(&Self::key(name, labels), &METADATA)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }
}

impl Drop for Metrics {
    fn drop(&mut self) {
        self.upkeep_stop.store(true, Ordering::Relaxed);
    }
}
