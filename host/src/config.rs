//! Server configuration: [`ServerConfig`], loaded from a YAML file (`cllm.yaml`), overridden
//! key by key from the command line ([`ServerConfig::set`]) and checked by
//! [`ServerConfig::validate`].
//!
//! Every section has defaults, so an empty file is a valid configuration. Unknown keys are
//! refused, with a message naming them.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Why a configuration could not be loaded, overridden or accepted.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file (config or API keys) could not be read.
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The YAML text is malformed, has an unknown key or a value of the wrong type.
    #[error("invalid configuration{}: {message}", source_suffix(.path.as_deref()))]
    Parse {
        /// The file the text came from, if any.
        path: Option<PathBuf>,
        /// The parser's message (it names the offending key and its position).
        message: String,
    },
    /// A `section.key` override names no known key.
    #[error("unknown configuration key `{0}`")]
    UnknownKey(String),
    /// A `section.key=value` override has a value of the wrong type.
    #[error("invalid value for `{key}`: {message}")]
    BadValue {
        /// The full dotted key.
        key: String,
        /// What is wrong with the value.
        message: String,
    },
    /// One or more values are out of range; each message names its key.
    #[error("invalid configuration: {}", .0.join("; "))]
    Invalid(Vec<String>),
    /// A line of an API keys file is malformed.
    #[error("{}:{line}: {message}", .path.display())]
    KeyFile {
        /// The keys file.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
        /// What is wrong with the line.
        message: String,
    },
}

fn source_suffix(path: Option<&Path>) -> String {
    path.map(|p| format!(" in {}", p.display()))
        .unwrap_or_default()
}

/// The whole server configuration, one field per section of `cllm.yaml`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// HTTP listener.
    pub http: HttpConfig,
    /// Queue of admitted requests waiting for the scheduler.
    pub request_queue: RequestQueueConfig,
    /// Built-in token-bucket rate limiter.
    pub rate_limiter: RateLimiterConfig,
    /// Health reporting.
    pub health: HealthConfig,
    /// Prometheus metrics.
    pub metrics: MetricsConfig,
    /// Model to serve.
    pub model: ModelConfig,
    /// Continuous-batching scheduler.
    pub scheduler: SchedulerConfig,
    /// API key authentication.
    pub auth: AuthConfig,
    /// Request lifecycle tracking (`/requests/{id}`).
    pub tracker: TrackerConfig,
    pub plugins: PluginsConfig,
    /// OpenAI-compatible API limits.
    pub openai: OpenAiConfig,
}

/// `http` section: the listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address to bind.
    pub host: String,
    /// Port to bind (0 = any free port).
    pub port: u16,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// How long a client has to send a request's headers, in milliseconds, counted from when
    /// the connection opens or its previous response ends; the connection is closed after it
    /// (so it is also how long an idle keep-alive connection stays open).
    pub header_read_timeout_ms: u64,
    /// How long a client has to send a request's whole body, in milliseconds, counted from
    /// the end of its headers; after it the request is answered 408 `request_timeout`.
    pub body_read_timeout_ms: u64,
    /// How long shutdown waits for in-flight requests, in milliseconds.
    pub drain_timeout_ms: u64,
    /// On shutdown, how long to keep accepting requests while `/health/ready` already answers
    /// 503, so a load balancer stops sending before the listener closes, in milliseconds.
    pub shutdown_delay_ms: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".to_string(),
            port: 8080,
            max_body_bytes: 1024 * 1024,
            header_read_timeout_ms: 30_000,
            body_read_timeout_ms: 30_000,
            drain_timeout_ms: 30_000,
            shutdown_delay_ms: 0,
        }
    }
}

/// `request_queue` section: requests waiting for the scheduler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RequestQueueConfig {
    /// Whether the queue's limits apply; when false the queue has no size limit and requests
    /// wait as long as it takes (`max_queue_size` and `max_wait_time_ms` are ignored).
    pub enabled: bool,
    /// Most requests waiting at once; more are refused.
    pub max_queue_size: usize,
    /// Longest a request may wait before it is refused, in milliseconds.
    pub max_wait_time_ms: u64,
}

impl Default for RequestQueueConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_queue_size: 256,
            max_wait_time_ms: 30_000,
        }
    }
}

/// `rate_limiter` section: per-client (and optionally global) token buckets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimiterConfig {
    /// Whether requests are rate limited at all.
    pub enabled: bool,
    /// Requests each client may make per window (the refill rate).
    pub max_requests: u32,
    /// Length of the window, in milliseconds.
    pub time_window_ms: u64,
    /// Capacity of each client's bucket; `None` = `max_requests`.
    pub burst: Option<u32>,
    /// Requests all clients together may make per window; `None` = no global limit.
    pub global_max_requests: Option<u32>,
    /// Capacity of the global bucket; `None` = `global_max_requests`.
    pub global_burst: Option<u32>,
    /// Most generation requests (streamed or not) one client may have open at once; more
    /// are refused with 429 and `Retry-After: 1`. 0 = no limit. Applies whether or not
    /// `enabled` is set and whether or not plugin limiters are loaded.
    pub max_concurrent_per_client: u32,
}

impl Default for RateLimiterConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_requests: 100,
            time_window_ms: 1000,
            burst: None,
            global_max_requests: None,
            global_burst: None,
            max_concurrent_per_client: 0,
        }
    }
}

impl RateLimiterConfig {
    /// Capacity of a client's bucket: `burst`, or `max_requests` when unset.
    pub fn client_capacity(&self) -> u32 {
        self.burst.unwrap_or(self.max_requests)
    }

    /// Capacity of the global bucket, or `None` when there is no global limit.
    pub fn global_capacity(&self) -> Option<u32> {
        self.global_max_requests
            .map(|max| self.global_burst.unwrap_or(max))
    }
}

/// `health` section: when the server reports itself degraded or unhealthy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// How often health is re-evaluated, in milliseconds.
    pub check_interval_ms: u64,
    /// Scheduler loop stalled this long while it has work → unhealthy, in milliseconds.
    pub stall_timeout_ms: u64,
    /// Queue at least this full (fraction of `max_queue_size`) → degraded.
    pub degraded_queue_fraction: f64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            check_interval_ms: 1000,
            stall_timeout_ms: 10_000,
            degraded_queue_fraction: 0.9,
        }
    }
}

/// `metrics` section: the Prometheus endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Whether metrics are recorded and `/metrics` is served (false: it answers 404).
    pub enabled: bool,
    /// Also export queue length, running requests, KV-cache usage and cache config under
    /// vLLM's names (`vllm:num_requests_waiting`, ...), which gateway endpoint pickers
    /// (Gateway API Inference Extension, llm-d) scrape by default.
    pub vllm_compatible: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            vllm_compatible: false,
        }
    }
}

/// `openai` section: limits of `/v1/completions` and `/v1/chat/completions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenAiConfig {
    /// Most choices one request may ask for (`n`, times the prompts of a prompt list).
    pub max_n: usize,
    /// Most alternatives per token a request may ask for (`logprobs`, `top_logprobs`, and
    /// TGI's `top_n_tokens`).
    pub max_logprobs: usize,
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        Self {
            max_n: 8,
            max_logprobs: 20,
        }
    }
}

/// `model` section: what to serve.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// The model: a Hugging Face folder (`config.json`, `*.safetensors`, `tokenizer.json`),
    /// a GGUF file, or a folder holding exactly one GGUF file (and no `config.json`).
    pub path: Option<PathBuf>,
    /// A folder with `tokenizer.json` (and optionally `tokenizer_config.json`) used instead
    /// of the model's own tokenizer; a GGUF file's chat template still applies when that
    /// folder has none.
    pub tokenizer: Option<PathBuf>,
    /// Where the model runs: `auto` (the GPU when the CUDA driver loads and a device is
    /// present, else the CPU), `cpu`, `cuda` or `cuda:N` (a start-up error without that GPU).
    pub device: crate::model::executor::DeviceChoice,
    /// CPU compute threads (0 = all cores).
    pub threads: usize,
    /// How matrix products compute on AVX-512 CPUs. `fast`: with bf16 weights and
    /// AVX512-BF16, the q/k/v, o, gate and up projections round their inputs to bf16, and the
    /// down projection splits its input into two bf16 parts (several tokens) or rounds it to
    /// f16 (one token); with f16 weights, one-token products round their inputs to f16; with
    /// quantized weights and AVX512-VNNI, products of up to 16 tokens hold their inputs as two
    /// bytes per element (longer ones as i16) and multiply the stored quants as integers. `exact` computes in f32 and reproduces Hugging Face
    /// transformers. f32 weights, and CPUs without AVX-512, always compute exactly.
    pub numerics: crate::model::cpu::matmul::Numerics,
    /// The model's name in the OpenAI API (`model`, `/v1/models`); null = the folder's name.
    pub served_model_name: Option<String>,
    /// A Jinja chat template file used instead of the model folder's own template.
    pub chat_template: Option<PathBuf>,
}

/// `scheduler` section: continuous batching and the KV cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// Most sequences in the running batch.
    pub max_running_sequences: usize,
    /// Most tokens (prefill + decode) in one forward pass.
    pub max_batch_tokens: usize,
    /// Longest slice of a prompt prefilled in one step.
    pub prefill_chunk: usize,
    /// KV cache size in blocks; `None` = sized from `kv_cache_mb`.
    pub kv_cache_blocks: Option<usize>,
    /// KV cache size in MiB on the CPU, used when `kv_cache_blocks` is unset.
    pub kv_cache_mb: usize,
    /// On a GPU, when `kv_cache_blocks` is unset: the fraction of the device memory left free
    /// after the weights that the KV cache takes.
    pub kv_cache_memory_fraction: f64,
    /// What the KV cache stores: `f32`, or `f16` (CPU only; half the memory per block, so
    /// `kv_cache_mb` holds twice the blocks, and half the bytes attention reads per token).
    pub kv_cache_dtype: crate::model::kv_cache::KvDtype,
    /// `max_new_tokens` of a request that does not say.
    pub default_max_new_tokens: usize,
    /// Largest `max_new_tokens` a request may ask for.
    pub max_new_tokens_limit: usize,
    /// Most prompt tokens one sequence may have; longer prompts are refused (422, or 400 on
    /// `/v1`). Unset: the model's context less one. A value above that is lowered to it.
    pub max_input_tokens: Option<usize>,
    /// Pause after every forward pass, in ms: slows generation down for tests and queueing
    /// demos. Keep 0 in production.
    pub debug_step_delay_ms: u64,
    /// Fault injection for tests: any forward pass in which a sequence feeds this token id
    /// fails for that sequence (its request ends with a 500 `generation` error; the others
    /// run on). Leave unset in production.
    pub debug_fail_on_token: Option<u32>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_running_sequences: 32,
            max_batch_tokens: 512,
            prefill_chunk: 256,
            kv_cache_blocks: None,
            kv_cache_mb: 512,
            kv_cache_memory_fraction: 0.9,
            kv_cache_dtype: Default::default(),
            default_max_new_tokens: 100,
            max_new_tokens_limit: 4096,
            max_input_tokens: None,
            debug_step_delay_ms: 0,
            debug_fail_on_token: None,
        }
    }
}

/// `auth` section: API keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Whether requests need an API key.
    pub enabled: bool,
    /// Keys given inline.
    pub api_keys: Vec<ApiKeyEntry>,
    /// File with more keys: `name:key` or a bare key per line, `#` comments.
    pub api_keys_file: Option<PathBuf>,
    /// Paths served without a key.
    pub open_paths: Vec<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            api_keys: Vec::new(),
            api_keys_file: None,
            open_paths: vec![
                "/health/live".to_string(),
                "/health/ready".to_string(),
                "/metrics".to_string(),
            ],
        }
    }
}

/// One named API key. Its `Debug` output hides the key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyEntry {
    /// Name reported in logs and metrics.
    pub name: String,
    /// The secret the client sends as `Authorization: Bearer <key>`.
    pub key: String,
}

impl fmt::Debug for ApiKeyEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeyEntry")
            .field("name", &self.name)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// What a policy plugin's failure (trap, deadline, out of memory) means for the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Act as if the plugin were absent (the built-in policy applies).
    FailOpen,
    /// Refuse the request with 503 `policy_unavailable`.
    FailClosed,
}

/// `plugins` section: WebAssembly policy plugins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    /// Folder watched for `*.wasm` plugins (created if missing); null = no plugins.
    pub dir: Option<PathBuf>,
    /// Deadline of one rate-limiter or prioritizer call, in ms.
    pub call_deadline_ms: u64,
    /// Deadline of one health-check call, in ms.
    pub health_deadline_ms: u64,
    /// Deadline of building a fresh plugin instance (at load, and after a fault or a config
    /// change), in ms, before the call's own deadline starts; also the deadline of the
    /// load-time trial call (a fresh instance's first call).
    pub instantiate_deadline_ms: u64,
    /// Most linear memory one plugin instance may use, in MiB.
    pub memory_limit_mb: usize,
    /// What a faulting rate limiter means for the request.
    pub limiter_failure_mode: FailureMode,
    /// What a faulting prioritizer means for the request.
    pub priority_failure_mode: FailureMode,
    /// Consecutive faults after which a plugin is disabled until its file changes.
    pub max_consecutive_faults: u32,
    /// Request headers passed to plugins (lower-case names).
    pub headers: Vec<String>,
    /// Quiet time after the last file event before a plugin is (re)loaded, in ms.
    pub reload_quiet_ms: u64,
    /// Plugins in shadow mode, by file name (`NAME` or `NAME.wasm`): they are called as usual
    /// and their verdicts counted (`cllm_plugin_decisions_total{mode="shadow"}`) and logged,
    /// but never enforced: a shadow limiter's rejection lets the request through, a shadow
    /// prioritizer's priority is not used, a shadow health check does not change `/health`'s
    /// status, and a shadow plugin's faults never fail a request.
    pub shadow: Vec<String>,
    /// Keep compiled plugins on disk, keyed by the file's sha256 and the engine's
    /// configuration, so a restart does not compile them again (storing an entry removes old
    /// ones: kept are those this server loaded or stored, and 16 more recently used).
    pub compile_cache: bool,
    /// Where the compiled plugins are kept; null = `.cache` inside the plugin folder.
    pub compile_cache_dir: Option<PathBuf>,
    /// The store behind the `cllm:policy/counters` interface (0.2.0 plugins).
    pub shared_state: SharedStateConfig,
    /// Import name prefixes refused at load, on top of everything cllm does not offer: e.g.
    /// `wasi:filesystem` and `wasi:sockets`, which plugins may import but which reach nothing
    /// (no preopens, every address denied). Python components import both, always.
    pub refused_imports: Vec<String>,
}

/// `plugins.shared_state`: where plugin counters live.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SharedStateConfig {
    /// Redis to keep counters in, shared by every replica that names it
    /// (`redis://[user:password@]host:port[/db]`); null = in this process only.
    pub redis_url: Option<String>,
    /// Most time one Redis call may take (connect, write, read), in ms; keep it below
    /// `call_deadline_ms`, since the call runs inside a plugin call.
    pub timeout_ms: u64,
    /// What a counter call returns when Redis cannot be reached in time.
    pub failure_mode: StoreFailureMode,
}

impl Default for SharedStateConfig {
    fn default() -> Self {
        Self {
            redis_url: None,
            timeout_ms: 2,
            failure_mode: StoreFailureMode::FailOpen,
        }
    }
}

/// What `counters.incr` returns to a plugin when the shared store fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreFailureMode {
    /// `ok(delta)`, as if the window were empty: limits let requests through.
    FailOpen,
    /// The error, for the plugin to act on.
    FailClosed,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        Self {
            dir: None,
            call_deadline_ms: 5,
            health_deadline_ms: 50,
            instantiate_deadline_ms: 1000,
            memory_limit_mb: 32,
            limiter_failure_mode: FailureMode::FailOpen,
            priority_failure_mode: FailureMode::FailOpen,
            max_consecutive_faults: 3,
            headers: vec!["x-tier".to_string()],
            reload_quiet_ms: 50,
            shadow: Vec::new(),
            compile_cache: true,
            compile_cache_dir: None,
            shared_state: SharedStateConfig::default(),
            refused_imports: Vec::new(),
        }
    }
}

/// `tracker` section: request lifecycle history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrackerConfig {
    /// Whether request lifecycles are recorded.
    pub enabled: bool,
    /// How many recent requests `/requests/{id}` remembers.
    pub capacity: usize,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            capacity: 1000,
        }
    }
}

impl ServerConfig {
    /// Parses YAML text; empty text (or only comments) gives the defaults.
    pub fn from_yaml_str(text: &str) -> Result<ServerConfig, ConfigError> {
        parse_yaml(text, None)
    }

    /// Reads and parses a YAML file; errors name the file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<ServerConfig, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        parse_yaml(&text, Some(path))
    }

    /// Applies one `section.key=value` override; `value` is read as YAML (`10`, `true`,
    /// `null`, `[a, b]`, `"x"`). Does not validate: call [`ServerConfig::validate`] after.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        let mut root = serde_json::to_value(&*self).map_err(|e| ConfigError::BadValue {
            key: key.to_string(),
            message: e.to_string(),
        })?;
        let slot = lookup_mut(&mut root, key)?;
        let parsed = parse_override_value(key, value)?;
        *slot = parsed.clone();
        match serde_json::from_value::<ServerConfig>(root.clone()) {
            Ok(config) => {
                *self = config;
                Ok(())
            }
            Err(first) => self.retry_as_string(root, key, value, &parsed, first),
        }
    }

    /// A value that YAML read as a number or boolean may be meant as a string (`http.host=10`).
    fn retry_as_string(
        &mut self,
        mut root: serde_json::Value,
        key: &str,
        value: &str,
        parsed: &serde_json::Value,
        first: serde_json::Error,
    ) -> Result<(), ConfigError> {
        let bad_value = || ConfigError::BadValue {
            key: key.to_string(),
            message: first.to_string(),
        };
        if parsed.is_string() || parsed.is_array() || parsed.is_object() {
            return Err(bad_value());
        }
        *lookup_mut(&mut root, key)? = serde_json::Value::String(value.trim().to_string());
        let config = serde_json::from_value::<ServerConfig>(root).map_err(|_| bad_value())?;
        *self = config;
        Ok(())
    }

    /// Checks every value's range; the error lists each bad key with what is expected.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        self.validate_http(&mut errors);
        self.validate_request_queue(&mut errors);
        self.validate_rate_limiter(&mut errors);
        self.validate_health(&mut errors);
        self.validate_scheduler(&mut errors);
        self.validate_auth(&mut errors);
        at_least(&mut errors, "openai.max_n", self.openai.max_n, 1);
        if self
            .model
            .served_model_name
            .as_deref()
            .is_some_and(|n| n.trim().is_empty())
        {
            errors.push("model.served_model_name must not be empty".to_string());
        }
        let p = &self.plugins;
        at_least(
            &mut errors,
            "plugins.call_deadline_ms",
            p.call_deadline_ms as usize,
            1,
        );
        at_least(
            &mut errors,
            "plugins.health_deadline_ms",
            p.health_deadline_ms as usize,
            1,
        );
        at_least(
            &mut errors,
            "plugins.instantiate_deadline_ms",
            p.instantiate_deadline_ms as usize,
            1,
        );
        at_least(&mut errors, "plugins.memory_limit_mb", p.memory_limit_mb, 1);
        at_least(
            &mut errors,
            "plugins.max_consecutive_faults",
            p.max_consecutive_faults as usize,
            1,
        );
        at_least(
            &mut errors,
            "plugins.shared_state.timeout_ms",
            p.shared_state.timeout_ms as usize,
            1,
        );
        if p.shared_state.redis_url.is_some() && p.shared_state.timeout_ms >= p.call_deadline_ms {
            errors.push(format!(
                "plugins.shared_state.timeout_ms ({}) must be below plugins.call_deadline_ms ({}): a Redis call runs inside a plugin call",
                p.shared_state.timeout_ms, p.call_deadline_ms
            ));
        }
        if p.headers
            .iter()
            .any(|h| h.is_empty() || h.to_ascii_lowercase() != *h)
        {
            errors.push("plugins.headers must be non-empty lower-case header names".to_string());
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }

    fn validate_http(&self, errors: &mut Vec<String>) {
        if self.http.host.trim().is_empty() {
            errors.push("http.host must not be empty".to_string());
        }
        at_least(errors, "http.max_body_bytes", self.http.max_body_bytes, 1);
        let h = &self.http;
        at_least_u64(
            errors,
            "http.header_read_timeout_ms",
            h.header_read_timeout_ms,
            1,
        );
        at_least_u64(
            errors,
            "http.body_read_timeout_ms",
            h.body_read_timeout_ms,
            1,
        );
    }

    fn validate_request_queue(&self, errors: &mut Vec<String>) {
        let q = &self.request_queue;
        at_least(errors, "request_queue.max_queue_size", q.max_queue_size, 1);
        at_least_u64(
            errors,
            "request_queue.max_wait_time_ms",
            q.max_wait_time_ms,
            1,
        );
    }

    fn validate_rate_limiter(&self, errors: &mut Vec<String>) {
        let r = &self.rate_limiter;
        at_least(
            errors,
            "rate_limiter.max_requests",
            r.max_requests as usize,
            1,
        );
        at_least_u64(errors, "rate_limiter.time_window_ms", r.time_window_ms, 1);
        let optional = [
            ("rate_limiter.burst", r.burst),
            ("rate_limiter.global_max_requests", r.global_max_requests),
            ("rate_limiter.global_burst", r.global_burst),
        ];
        for (key, value) in optional {
            if let Some(v) = value {
                at_least(errors, key, v as usize, 1);
            }
        }
        if r.global_burst.is_some() && r.global_max_requests.is_none() {
            errors.push(
                "rate_limiter.global_burst is set but rate_limiter.global_max_requests is not"
                    .to_string(),
            );
        }
    }

    fn validate_health(&self, errors: &mut Vec<String>) {
        let h = &self.health;
        at_least_u64(errors, "health.check_interval_ms", h.check_interval_ms, 1);
        at_least_u64(errors, "health.stall_timeout_ms", h.stall_timeout_ms, 1);
        let f = h.degraded_queue_fraction;
        if !(f > 0.0 && f <= 1.0) {
            errors.push(format!(
                "health.degraded_queue_fraction must be in (0, 1], got {f}"
            ));
        }
    }

    fn validate_scheduler(&self, errors: &mut Vec<String>) {
        let s = &self.scheduler;
        at_least(
            errors,
            "scheduler.max_running_sequences",
            s.max_running_sequences,
            1,
        );
        at_least(errors, "scheduler.max_batch_tokens", s.max_batch_tokens, 1);
        at_least(errors, "scheduler.prefill_chunk", s.prefill_chunk, 1);
        match s.kv_cache_blocks {
            Some(blocks) => at_least(errors, "scheduler.kv_cache_blocks", blocks, 1),
            None => at_least(errors, "scheduler.kv_cache_mb", s.kv_cache_mb, 1),
        }
        let f = s.kv_cache_memory_fraction;
        if !(f > 0.0 && f <= 1.0) {
            errors.push(format!(
                "scheduler.kv_cache_memory_fraction must be in (0, 1], got {f}"
            ));
        }
        at_least(
            errors,
            "scheduler.default_max_new_tokens",
            s.default_max_new_tokens,
            1,
        );
        at_least(
            errors,
            "scheduler.max_new_tokens_limit",
            s.max_new_tokens_limit,
            1,
        );
        if s.default_max_new_tokens > s.max_new_tokens_limit {
            errors.push(format!(
                "scheduler.default_max_new_tokens ({}) must not exceed \
                 scheduler.max_new_tokens_limit ({})",
                s.default_max_new_tokens, s.max_new_tokens_limit
            ));
        }
        if let Some(n) = s.max_input_tokens {
            at_least(errors, "scheduler.max_input_tokens", n, 1);
        }
    }

    fn validate_auth(&self, errors: &mut Vec<String>) {
        let a = &self.auth;
        if a.enabled && a.api_keys.is_empty() && a.api_keys_file.is_none() {
            errors.push("auth.enabled is true but no API key is configured".to_string());
        }
        for (i, entry) in a.api_keys.iter().enumerate() {
            if entry.name.trim().is_empty() {
                errors.push(format!("auth.api_keys[{i}].name must not be empty"));
            }
            if entry.key.trim().is_empty() {
                errors.push(format!("auth.api_keys[{i}].key must not be empty"));
            }
        }
        for (i, path) in a.open_paths.iter().enumerate() {
            if !path.starts_with('/') {
                errors.push(format!(
                    "auth.open_paths[{i}] must start with `/`, got `{path}`"
                ));
            }
        }
    }
}

fn at_least(errors: &mut Vec<String>, key: &str, value: usize, min: usize) {
    if value < min {
        errors.push(format!("{key} must be at least {min}, got {value}"));
    }
}

fn at_least_u64(errors: &mut Vec<String>, key: &str, value: u64, min: u64) {
    if value < min {
        errors.push(format!("{key} must be at least {min}, got {value}"));
    }
}

fn parse_yaml(text: &str, path: Option<&Path>) -> Result<ServerConfig, ConfigError> {
    let parse_error = |e: serde_yaml_ng::Error| ConfigError::Parse {
        path: path.map(Path::to_path_buf),
        message: e.to_string(),
    };
    let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).map_err(parse_error)?;
    if value.is_null() {
        return Ok(ServerConfig::default());
    }
    // Parse the text itself (not `value`) so that errors carry a line and column.
    serde_yaml_ng::from_str(text).map_err(parse_error)
}

/// Finds the value at a dotted key such as `request_queue.max_queue_size`.
fn lookup_mut<'a>(
    root: &'a mut serde_json::Value,
    key: &str,
) -> Result<&'a mut serde_json::Value, ConfigError> {
    let unknown = || ConfigError::UnknownKey(key.to_string());
    if key.is_empty() {
        return Err(unknown());
    }
    let mut node = root;
    for part in key.split('.') {
        node = node
            .as_object_mut()
            .and_then(|map| map.get_mut(part))
            .ok_or_else(unknown)?;
    }
    Ok(node)
}

fn parse_override_value(key: &str, value: &str) -> Result<serde_json::Value, ConfigError> {
    serde_yaml_ng::from_str(value).map_err(|e| ConfigError::BadValue {
        key: key.to_string(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../cllm.example.yaml");

    fn parse_err(text: &str) -> String {
        match ServerConfig::from_yaml_str(text) {
            Ok(config) => panic!("expected an error, parsed {config:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn invalid(config: &ServerConfig) -> String {
        match config.validate() {
            Ok(()) => panic!("expected validation to fail"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn empty_text_gives_defaults() {
        assert_eq!(
            ServerConfig::from_yaml_str("").ok(),
            Some(ServerConfig::default())
        );
        let comments = "# nothing here\n\n";
        assert_eq!(
            ServerConfig::from_yaml_str(comments).ok(),
            Some(ServerConfig::default())
        );
    }

    #[test]
    fn defaults_are_valid() {
        assert!(ServerConfig::default().validate().is_ok());
    }

    #[test]
    fn default_values_match_the_documentation() {
        let c = ServerConfig::default();
        assert_eq!(c.http.host, "127.0.0.1");
        assert_eq!(c.http.port, 8080);
        assert_eq!(c.http.max_body_bytes, 1 << 20);
        assert_eq!(c.request_queue.max_queue_size, 256);
        assert_eq!(c.rate_limiter.max_requests, 100);
        assert_eq!(c.rate_limiter.client_capacity(), 100);
        assert_eq!(c.rate_limiter.global_capacity(), None);
        assert_eq!(c.health.stall_timeout_ms, 10_000);
        assert_eq!(c.scheduler.max_batch_tokens, 512);
        assert!(!c.auth.enabled);
        assert_eq!(
            c.auth.open_paths,
            vec!["/health/live", "/health/ready", "/metrics"]
        );
        assert_eq!(c.tracker.capacity, 1000);
    }

    #[test]
    fn example_file_equals_defaults() {
        let parsed = match ServerConfig::from_yaml_str(EXAMPLE) {
            Ok(c) => c,
            Err(e) => panic!("cllm.example.yaml does not parse: {e}"),
        };
        let d = ServerConfig::default();
        assert_eq!(parsed.http, d.http);
        assert_eq!(parsed.request_queue, d.request_queue);
        assert_eq!(parsed.rate_limiter, d.rate_limiter);
        assert_eq!(parsed.health, d.health);
        assert_eq!(parsed.metrics, d.metrics);
        assert_eq!(parsed.model, d.model);
        assert_eq!(parsed.scheduler, d.scheduler);
        assert_eq!(parsed.auth, d.auth);
        assert_eq!(parsed.tracker, d.tracker);
        assert_eq!(parsed, d);
    }

    #[test]
    fn example_file_mentions_every_key() {
        let value = match serde_json::to_value(ServerConfig::default()) {
            Ok(v) => v,
            Err(e) => panic!("serialize: {e}"),
        };
        let Some(sections) = value.as_object() else {
            panic!("config is not an object");
        };
        for (section, fields) in sections {
            assert!(
                EXAMPLE.contains(&format!("{section}:")),
                "missing {section}"
            );
            for key in fields.as_object().into_iter().flat_map(|m| m.keys()) {
                assert!(
                    EXAMPLE.contains(&format!("  {key}:")),
                    "missing {section}.{key}"
                );
            }
        }
    }

    #[test]
    fn partial_sections_keep_other_defaults() {
        let text =
            "request_queue:\n  max_queue_size: 3\nrate_limiter:\n  global_max_requests: 50\n";
        let c = ServerConfig::from_yaml_str(text).ok();
        let Some(c) = c else { panic!("parse failed") };
        assert_eq!(c.request_queue.max_queue_size, 3);
        assert!(c.request_queue.enabled);
        assert_eq!(c.request_queue.max_wait_time_ms, 30_000);
        assert_eq!(c.rate_limiter.global_capacity(), Some(50));
        assert_eq!(c.http, HttpConfig::default());
    }

    #[test]
    fn unknown_key_in_section_is_named() {
        let msg = parse_err("request_queue: {max_size: 3}");
        assert!(msg.contains("max_size"), "{msg}");
        assert!(msg.contains("request_queue"), "{msg}");
    }

    #[test]
    fn unknown_top_level_section_is_named() {
        let msg = parse_err("queue:\n  max_queue_size: 3\n");
        assert!(msg.contains("queue"), "{msg}");
        assert!(msg.contains("unknown field"), "{msg}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let msg = parse_err("http:\n  port: lots\n");
        assert!(msg.contains("port"), "{msg}");
    }

    #[test]
    fn api_keys_parse_and_hide_in_debug() {
        let text = "auth:\n  enabled: true\n  api_keys:\n    - {name: alice, key: s3cret}\n";
        let Ok(c) = ServerConfig::from_yaml_str(text) else {
            panic!("parse failed")
        };
        assert_eq!(c.auth.api_keys.len(), 1);
        assert_eq!(c.auth.api_keys[0].name, "alice");
        assert_eq!(c.auth.api_keys[0].key, "s3cret");
        assert!(c.validate().is_ok());
        let debug = format!("{c:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
    }

    #[test]
    fn from_file_names_the_file() {
        let dir = std::env::temp_dir().join(format!("cllm-config-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("bad.yaml");
        assert!(std::fs::write(&path, "http: {prot: 1}\n").is_ok());
        let msg = match ServerConfig::from_file(&path) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        };
        assert!(msg.contains("bad.yaml"), "{msg}");
        assert!(msg.contains("prot"), "{msg}");

        let missing = dir.join("missing.yaml");
        let msg = match ServerConfig::from_file(&missing) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        };
        assert!(msg.contains("missing.yaml"), "{msg}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn from_file_reads_a_good_file() {
        let dir = std::env::temp_dir().join(format!("cllm-config-ok-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("cllm.yaml");
        assert!(std::fs::write(&path, "http:\n  port: 9000\n").is_ok());
        let port = ServerConfig::from_file(&path).map(|c| c.http.port).ok();
        assert_eq!(port, Some(9000));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn set_overrides_scalars() {
        let mut c = ServerConfig::default();
        assert!(c.set("request_queue.max_queue_size", "10").is_ok());
        assert_eq!(c.request_queue.max_queue_size, 10);
        assert!(c.set("rate_limiter.enabled", "false").is_ok());
        assert!(!c.rate_limiter.enabled);
        assert!(c.set("rate_limiter.global_max_requests", "7").is_ok());
        assert_eq!(c.rate_limiter.global_max_requests, Some(7));
        assert!(c.set("rate_limiter.global_max_requests", "null").is_ok());
        assert_eq!(c.rate_limiter.global_max_requests, None);
        assert!(c.set("health.degraded_queue_fraction", "0.5").is_ok());
        assert_eq!(c.health.degraded_queue_fraction, 0.5);
        assert!(c.set("model.path", "/tmp/model").is_ok());
        assert_eq!(c.model.path, Some(PathBuf::from("/tmp/model")));
    }

    #[test]
    fn set_overrides_lists_and_quoted_strings() {
        let mut c = ServerConfig::default();
        assert!(c.set("auth.open_paths", "[/a, /b]").is_ok());
        assert_eq!(c.auth.open_paths, vec!["/a", "/b"]);
        assert!(c.set("auth.api_keys", "[{name: n, key: k}]").is_ok());
        assert_eq!(c.auth.api_keys.len(), 1);
        assert_eq!(c.auth.api_keys[0].key, "k");
        assert!(c.set("http.host", "\"0.0.0.0\"").is_ok());
        assert_eq!(c.http.host, "0.0.0.0");
    }

    #[test]
    fn set_reads_numbers_as_strings_where_a_string_is_expected() {
        let mut c = ServerConfig::default();
        assert!(c.set("http.host", "10").is_ok());
        assert_eq!(c.http.host, "10");
    }

    #[test]
    fn set_unknown_key_is_named() {
        let mut c = ServerConfig::default();
        for key in [
            "request_queue.max_size",
            "nope.port",
            "http",
            "",
            "http.port.x",
        ] {
            match c.set(key, "1") {
                Err(ConfigError::UnknownKey(k)) => assert_eq!(k, key),
                Err(other) if key == "http" => {
                    // `http` exists but is a section: a scalar does not fit.
                    assert!(other.to_string().contains("`http`"), "{other}");
                }
                other => panic!("{key}: unexpected {other:?}"),
            }
        }
        assert_eq!(c, ServerConfig::default());
    }

    #[test]
    fn set_wrong_type_names_the_key_and_changes_nothing() {
        let mut c = ServerConfig::default();
        let msg = match c.set("http.port", "many") {
            Ok(()) => panic!("expected an error"),
            Err(e) => e.to_string(),
        };
        assert!(msg.contains("http.port"), "{msg}");
        let msg = match c.set("request_queue.enabled", "[1]") {
            Ok(()) => panic!("expected an error"),
            Err(e) => e.to_string(),
        };
        assert!(msg.contains("request_queue.enabled"), "{msg}");
        assert!(c.set("http.port", "70000").is_err());
        assert_eq!(c, ServerConfig::default());
    }

    #[test]
    fn validate_names_bad_keys() {
        type Mutation = fn(&mut ServerConfig);
        let cases: [(&str, Mutation); 10] = [
            ("request_queue.max_queue_size must be at least 1", |c| {
                c.request_queue.max_queue_size = 0
            }),
            ("rate_limiter.time_window_ms must be at least 1", |c| {
                c.rate_limiter.time_window_ms = 0
            }),
            ("rate_limiter.max_requests must be at least 1", |c| {
                c.rate_limiter.max_requests = 0
            }),
            ("rate_limiter.burst must be at least 1", |c| {
                c.rate_limiter.burst = Some(0)
            }),
            ("scheduler.max_batch_tokens must be at least 1", |c| {
                c.scheduler.max_batch_tokens = 0
            }),
            ("scheduler.prefill_chunk must be at least 1", |c| {
                c.scheduler.prefill_chunk = 0
            }),
            ("scheduler.max_running_sequences must be at least 1", |c| {
                c.scheduler.max_running_sequences = 0
            }),
            ("health.degraded_queue_fraction must be in (0, 1]", |c| {
                c.health.degraded_queue_fraction = 1.5
            }),
            ("auth.enabled is true but no API key is configured", |c| {
                c.auth.enabled = true
            }),
            (
                "scheduler.default_max_new_tokens (100) must not exceed",
                |c| c.scheduler.max_new_tokens_limit = 10,
            ),
        ];
        for (expected, mutate) in cases {
            let mut c = ServerConfig::default();
            mutate(&mut c);
            let msg = invalid(&c);
            assert!(msg.contains(expected), "expected `{expected}` in `{msg}`");
        }
    }

    #[test]
    fn validate_refuses_nan_and_zero_fraction() {
        for f in [0.0, -0.1, f64::NAN] {
            let mut c = ServerConfig::default();
            c.health.degraded_queue_fraction = f;
            assert!(invalid(&c).contains("health.degraded_queue_fraction"));
        }
        let mut c = ServerConfig::default();
        c.health.degraded_queue_fraction = 1.0;
        assert!(c.validate().is_ok());
    }

    #[test]
    fn validate_lists_every_problem() {
        let mut c = ServerConfig::default();
        c.request_queue.max_queue_size = 0;
        c.scheduler.prefill_chunk = 0;
        let msg = invalid(&c);
        assert!(msg.contains("request_queue.max_queue_size"), "{msg}");
        assert!(msg.contains("scheduler.prefill_chunk"), "{msg}");
    }

    #[test]
    fn validate_auth_details() {
        let mut c = ServerConfig::default();
        c.auth.enabled = true;
        c.auth.api_keys_file = Some(PathBuf::from("keys.txt"));
        assert!(c.validate().is_ok());
        c.auth.api_keys.push(ApiKeyEntry {
            name: String::new(),
            key: "k".to_string(),
        });
        assert!(invalid(&c).contains("auth.api_keys[0].name"));
        c.auth.api_keys.clear();
        c.auth.open_paths.push("metrics".to_string());
        assert!(invalid(&c).contains("auth.open_paths[3]"));
    }

    #[test]
    fn validate_global_burst_needs_global_max() {
        let mut c = ServerConfig::default();
        c.rate_limiter.global_burst = Some(5);
        assert!(invalid(&c).contains("rate_limiter.global_burst"));
        c.rate_limiter.global_max_requests = Some(2);
        assert!(c.validate().is_ok());
        assert_eq!(c.rate_limiter.global_capacity(), Some(5));
    }

    #[test]
    fn kv_cache_mb_only_matters_without_blocks() {
        let mut c = ServerConfig::default();
        c.scheduler.kv_cache_mb = 0;
        assert!(invalid(&c).contains("scheduler.kv_cache_mb"));
        c.scheduler.kv_cache_blocks = Some(64);
        assert!(c.validate().is_ok());
        c.scheduler.kv_cache_blocks = Some(0);
        assert!(invalid(&c).contains("scheduler.kv_cache_blocks"));
    }
}
