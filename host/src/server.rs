//! Putting the server together: load the model, start the scheduler, serve HTTP until the
//! shutdown future resolves, then drain running streams (bounded by `http.drain_timeout_ms`).

use crate::admission::auth::ApiKeys;
use crate::admission::client_slots::ClientSlots;
use crate::admission::queue::RequestQueue;
use crate::admission::rate_limiter::RateLimiter;
use crate::admission::{Admission, Policy};
use crate::config::ServerConfig;
use crate::health::RecentRequests;
use crate::http::params::Limits;
use crate::http::{router, AppState, HealthSettings};
use crate::metrics::Metrics;
use crate::model::chat_template::ChatTemplate;
use crate::model::executor::{open_executor, ExecutorSettings};
use crate::model::kv_cache::{block_bytes, BlockPool};
use crate::model::Model;
use crate::scheduler::{Scheduler, SchedulerSettings};
use crate::tracker::RequestTracker;
use anyhow::Context;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Serves on `listener` until `shutdown` resolves; returns after running streams end or the
/// drain timeout passes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate()?;
    let model_dir = config
        .model
        .path
        .clone()
        .context("no model: give --model DIR or model.path in the config")?;
    let tokenizer_dir = config.model.tokenizer.clone();
    let model = tokio::task::spawn_blocking(move || {
        Model::load_with_tokenizer(&model_dir, tokenizer_dir.as_deref())
    })
    .await
    .context("model loader panicked")??;
    // One recorder for the whole server: plugins count into it too.
    let metrics = Arc::new(Metrics::new(config.metrics.enabled));
    let plugins = match &config.plugins.dir {
        Some(dir) => Some(crate::plugins::PluginRegistry::start(
            dir,
            &config.plugins,
            metrics.clone(),
        )?),
        None => None,
    };
    let chat_template = load_chat_template(&model, &config)?;
    let state = build_state(Arc::new(model), &config, metrics, plugins, chat_template)?;
    let _watcher = match &state.plugins {
        Some(registry) => Some(crate::plugins::watcher::watch(registry.clone())?),
        None => None,
    };
    spawn_health_timer(
        state.clone(),
        Duration::from_millis(config.health.check_interval_ms),
    );
    let app = router(state.clone());
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "listening on {addr}");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let drain = Duration::from_millis(config.http.drain_timeout_ms);
    let delay = Duration::from_millis(config.http.shutdown_delay_ms);
    let mut stop_wait = stop_rx.clone();
    let header_read_timeout = Duration::from_millis(config.http.header_read_timeout_ms);
    let server = crate::http::connections::serve(listener, app, header_read_timeout, async move {
        let _ = stop_wait.wait_for(|stopped| *stopped).await;
    });
    // Shutdown: not ready at once; the listener closes after `delay`; streams then get `drain`.
    let draining = state.clone();
    tokio::spawn(async move {
        shutdown.await;
        draining.draining.store(true, Ordering::SeqCst);
        tracing::info!(
            delay_ms = delay.as_millis() as u64,
            "shutting down: not ready; closing the listener after the shutdown delay"
        );
        tokio::time::sleep(delay).await;
        let _ = stop_tx.send(true);
    });
    let mut drain_wait = stop_rx;
    let drain_deadline = async move {
        let _ = drain_wait.wait_for(|stopped| *stopped).await;
        tracing::info!(
            drain_ms = drain.as_millis() as u64,
            "shutting down: draining"
        );
        tokio::time::sleep(drain).await;
    };
    tokio::select! {
        () = server => {}
        () = drain_deadline => tracing::warn!("drain timeout passed; closing open streams"),
    }
    state.scheduler.request_stop();
    tracing::info!("stopped");
    Ok(())
}

/// Runs the health-check plugins on a timer, so a failing check shows in the logs and metrics
/// even when nobody polls `/health`.
fn spawn_health_timer(state: Arc<AppState>, every: Duration) {
    if state.plugins.is_none() {
        return;
    }
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(every.max(Duration::from_millis(10)));
        loop {
            interval.tick().await;
            if Arc::strong_count(&state) == 1 {
                return; // the server is gone
            }
            let app = state.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if let Some(registry) = &app.plugins {
                    for (plugin, status, message) in crate::health::plugin_verdicts(
                        registry,
                        &crate::http::admin::health_snapshot(&app),
                    ) {
                        if status != crate::health::Status::Ok {
                            tracing::warn!(plugin, ?status, message, "health check");
                        }
                    }
                }
            })
            .await;
        }
    });
}

/// The chat template: `model.chat_template` (a file; an unreadable or broken one stops the
/// start), else the model's own. A broken model template does not stop the start: chat
/// requests are answered with its error.
fn load_chat_template(
    model: &Model,
    config: &ServerConfig,
) -> anyhow::Result<Result<ChatTemplate, String>> {
    let tokenizer = &model.tokenizer;
    let bos = tokenizer.bos_token().map(str::to_string).or_else(|| {
        model
            .config
            .bos_token_id
            .and_then(|id| tokenizer.token_text(id))
    });
    let eos = tokenizer.eos_token().map(str::to_string).or_else(|| {
        let id = model.eos_token_ids.first()?;
        tokenizer.token_text(*id)
    });
    let compile = |source: &str| ChatTemplate::new(source, bos.as_deref(), eos.as_deref());
    if let Some(path) = &config.model.chat_template {
        let source = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the chat template {}", path.display()))?;
        let template = compile(&source)
            .map_err(|e| anyhow::anyhow!("chat template {}: {e}", path.display()))?;
        return Ok(Ok(template));
    }
    Ok(match tokenizer.chat_template() {
        Some(source) => compile(source).map_err(|e| {
            tracing::warn!(error = %e, "the model's chat template does not compile");
            format!("the model's chat template does not compile: {e}")
        }),
        None => Err("this model has no chat template: start cllm with \
                     --chat-template FILE to use the chat API"
            .to_string()),
    })
}

fn build_state(
    model: Arc<Model>,
    config: &ServerConfig,
    metrics: Arc<Metrics>,
    plugins: Option<Arc<crate::plugins::PluginRegistry>>,
    chat_template: Result<ChatTemplate, String>,
) -> anyhow::Result<Arc<AppState>> {
    let tracker = Arc::new(RequestTracker::new(if config.tracker.enabled {
        config.tracker.capacity
    } else {
        0
    }));
    let q = &config.request_queue;
    let (max_queue, max_wait) = if q.enabled {
        (q.max_queue_size, Duration::from_millis(q.max_wait_time_ms))
    } else {
        (usize::MAX, Duration::from_secs(365 * 24 * 3600))
    };
    let queue = Arc::new(RequestQueue::new(max_queue));
    let served_model_name = config.model.served_model_name.clone().unwrap_or_else(|| {
        model
            .dir
            .file_name()
            .map_or_else(|| "model".to_string(), |n| n.to_string_lossy().into_owned())
    });
    let s = &config.scheduler;
    // Any one request that fits the context must fit the cache, or it could never run.
    let min_blocks = BlockPool::blocks_for(model.config.max_position_embeddings + 1);
    let kv_blocks = s
        .kv_cache_blocks
        .unwrap_or((s.kv_cache_mb << 20) / block_bytes(model.kv_layout(s.kv_cache_dtype)).max(1))
        .max(min_blocks);
    let executor = open_executor(
        &model.config,
        &model.weights,
        &ExecutorSettings {
            device: config.model.device,
            threads: config.model.threads,
            numerics: config.model.numerics,
            kv_dtype: s.kv_cache_dtype,
            kv_blocks,
            kv_memory_fraction: s.kv_cache_memory_fraction,
            kv_blocks_explicit: s.kv_cache_blocks.is_some(),
        },
    )?;
    let executor = match s.debug_fail_on_token {
        Some(token) => crate::model::fault_injection::FailOnToken::wrap(executor, token),
        None => executor,
    };
    let device = executor.device().clone();
    publish_device(&metrics, &device);
    let settings = SchedulerSettings {
        max_running_sequences: s.max_running_sequences,
        max_batch_tokens: s.max_batch_tokens,
        prefill_chunk: s.prefill_chunk,
        step_delay: Duration::from_millis(s.debug_step_delay_ms),
        vllm_model_name: config
            .metrics
            .vllm_compatible
            .then(|| served_model_name.clone()),
    };
    // At least one new token must fit beside the longest prompt.
    let max_input_tokens = s
        .max_input_tokens
        .unwrap_or(model.config.max_position_embeddings - 1)
        .min(model.config.max_position_embeddings - 1);
    let info = serde_json::json!({
        "model_id": model.dir.display().to_string(),
        "model_type": model.config.model_type,
        "model_dtype": model.weights.dtype().name(),
        "max_total_tokens": model.config.max_position_embeddings,
        "max_input_tokens": max_input_tokens,
        "max_new_tokens_limit": s.max_new_tokens_limit,
        "max_batch_total_tokens": s.max_batch_tokens,
        "max_concurrent_requests": s.max_running_sequences,
        "max_queue_size": q.max_queue_size,
        "kv_cache_blocks": device.kv_cache_blocks,
        "backend": device.kind,
        "device": device,
        "version": env!("CARGO_PKG_VERSION"),
        // The rest of TGI's `/info` fields (its OpenAPI marks them required).
        "model_sha": null,
        "model_device_type": device.kind,
        "model_pipeline_tag": "text-generation",
        "max_best_of": 1,
        "max_stop_sequences": crate::http::params::MAX_STOP_SEQUENCES,
        "max_input_length": max_input_tokens,
        "max_client_batch_size": config.openai.max_n,
        // Requests are validated on the HTTP runtime's workers, one per core.
        "validation_workers": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "router": "cllm",
        "sha": null,
        "docker_label": null,
    });
    let scheduler = Scheduler::start(
        model.clone(),
        executor,
        settings,
        queue.clone(),
        tracker.clone(),
        metrics.clone(),
    )?;
    let policy = Policy::new(
        RateLimiter::new(&config.rate_limiter),
        plugins.clone(),
        tracker.clone(),
        &metrics,
        served_model_name.clone(),
    );
    Ok(Arc::new(AppState {
        tokenizer: model.tokenizer.clone(),
        vocab_size: model.config.vocab_size,
        limits: Limits {
            context: model.config.max_position_embeddings,
            max_input_tokens,
            default_max_new_tokens: s.default_max_new_tokens,
            max_new_tokens_limit: s.max_new_tokens_limit,
            max_logprobs: config.openai.max_logprobs,
            max_choices: config.openai.max_n,
        },
        info,
        served_model_name,
        started_unix: crate::http::unix_now(),
        chat_template,
        scheduler,
        admission: Admission::new(
            policy,
            ClientSlots::new(config.rate_limiter.max_concurrent_per_client),
            queue,
            max_wait,
        ),
        draining: AtomicBool::new(false),
        keys: ApiKeys::from_config(&config.auth)?,
        tracker,
        metrics,
        recent: RecentRequests::new(Duration::from_secs(60)),
        health: HealthSettings {
            stall_timeout: Duration::from_millis(config.health.stall_timeout_ms),
            degraded_queue_fraction: config.health.degraded_queue_fraction,
        },
        max_body_bytes: config.http.max_body_bytes,
        body_read_timeout: Duration::from_millis(config.http.body_read_timeout_ms),
        plugins,
        device,
    }))
}

/// `cllm_device_info{kind, name}` and the device's memory and KV cache sizes as gauges.
fn publish_device(metrics: &Metrics, device: &crate::model::executor::DeviceInfo) {
    let labels = [
        ("kind", device.kind.to_string()),
        ("name", device.name.clone()),
    ];
    metrics.gauge_with("cllm_device_info", &labels).set(1.0);
    metrics
        .gauge("cllm_kv_cache_blocks")
        .set(device.kv_cache_blocks as f64);
    metrics
        .gauge("cllm_kv_cache_bytes")
        .set(device.kv_cache_bytes as f64);
    if let Some(total) = device.memory_total_bytes {
        metrics
            .gauge("cllm_device_memory_total_bytes")
            .set(total as f64);
    }
    if let Some(free) = device.memory_free_bytes {
        metrics
            .gauge("cllm_device_memory_free_bytes")
            .set(free as f64);
    }
}
