//! Putting the server together: load the model, start the scheduler, serve HTTP until the
//! shutdown future resolves, then drain running streams (bounded by `http.drain_timeout_ms`).

use crate::admission::auth::ApiKeys;
use crate::admission::queue::RequestQueue;
use crate::admission::rate_limiter::RateLimiter;
use crate::config::ServerConfig;
use crate::health::RecentRequests;
use crate::http::params::Limits;
use crate::http::{router, AppState, HealthSettings};
use crate::metrics::Metrics;
use crate::model::kv_cache::KvCache;
use crate::model::Model;
use crate::scheduler::{Scheduler, SchedulerSettings};
use crate::tracker::RequestTracker;
use anyhow::Context;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
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
    let model = tokio::task::spawn_blocking(move || Model::load(&model_dir))
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
    let state = build_state(Arc::new(model), &config, metrics, plugins)?;
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
    let mut stop_wait = stop_rx.clone();
    let server = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        let _ = stop_wait.wait_for(|stopped| *stopped).await;
    });
    tokio::spawn(async move {
        shutdown.await;
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
        result = server => result?,
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

fn build_state(
    model: Arc<Model>,
    config: &ServerConfig,
    metrics: Arc<Metrics>,
    plugins: Option<Arc<crate::plugins::PluginRegistry>>,
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
    let s = &config.scheduler;
    let block_bytes = KvCache::block_bytes(model.kv_layout());
    let kv_cache_blocks = s
        .kv_cache_blocks
        .unwrap_or((s.kv_cache_mb << 20) / block_bytes.max(1));
    let settings = SchedulerSettings {
        max_running_sequences: s.max_running_sequences,
        max_batch_tokens: s.max_batch_tokens,
        prefill_chunk: s.prefill_chunk,
        kv_cache_blocks,
        threads: config.model.threads,
        step_delay: Duration::from_millis(s.debug_step_delay_ms),
    };
    let info = serde_json::json!({
        "model_id": model.dir.display().to_string(),
        "model_type": model.config.model_type,
        "model_dtype": model.weights.dtype().name(),
        "max_total_tokens": model.config.max_position_embeddings,
        "max_input_tokens": model.config.max_position_embeddings - 1,
        "max_new_tokens_limit": s.max_new_tokens_limit,
        "max_batch_total_tokens": s.max_batch_tokens,
        "max_concurrent_requests": s.max_running_sequences,
        "max_queue_size": q.max_queue_size,
        "kv_cache_blocks": kv_cache_blocks,
        "backend": "cpu",
        "version": env!("CARGO_PKG_VERSION"),
    });
    let scheduler = Scheduler::start(
        model.clone(),
        settings,
        queue,
        tracker.clone(),
        metrics.clone(),
    )?;
    Ok(Arc::new(AppState {
        tokenizer: model.tokenizer.clone(),
        vocab_size: model.config.vocab_size,
        limits: Limits {
            context: model.config.max_position_embeddings,
            default_max_new_tokens: s.default_max_new_tokens,
            max_new_tokens_limit: s.max_new_tokens_limit,
        },
        info,
        scheduler,
        limiter: RateLimiter::new(&config.rate_limiter),
        keys: ApiKeys::from_config(&config.auth)?,
        tracker,
        metrics,
        recent: RecentRequests::new(Duration::from_secs(60)),
        health: HealthSettings {
            stall_timeout: Duration::from_millis(config.health.stall_timeout_ms),
            degraded_queue_fraction: config.health.degraded_queue_fraction,
        },
        max_queue_wait: max_wait,
        max_body_bytes: config.http.max_body_bytes,
        next_queue_id: AtomicU64::new(1),
        plugins,
    }))
}
