//! A real cllm server on 127.0.0.1:0, started in-process through the library's `serve`.

use cllm::config::ServerConfig;
use std::path::Path;
use std::time::Duration;

pub struct TestServer {
    pub base: String,
    pub http: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    /// Starts a server on `model_dir`; `tweak` adjusts the config first.
    pub async fn start(model_dir: &Path, tweak: impl FnOnce(&mut ServerConfig)) -> TestServer {
        let mut config = ServerConfig::default();
        config.model.path = Some(model_dir.to_path_buf());
        config.model.threads = 1;
        config.scheduler.kv_cache_mb = 32;
        // The CPU unless the GPU check asks for a device (CLLM_TEST_DEVICE=cuda); on a GPU, a
        // small cache, since tests start servers side by side.
        config.model.device = super::test_device();
        config.scheduler.kv_cache_memory_fraction = 0.02;
        tweak(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(cllm::server::serve(listener, config, async move {
            let _ = stopped.await;
        }));
        let server = TestServer {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
            stop: Some(stop),
            task: Some(task),
        };
        for _ in 0..200 {
            if let Ok(r) = server.http.get(server.url("/health/live")).send().await {
                if r.status().is_success() {
                    return server;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("server did not come up");
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .send()
            .await
            .expect("GET sent")
    }

    /// GET `path` and parse the JSON body (whatever the status).
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        self.get(path).await.json().await.expect("JSON body")
    }

    /// The token ids `/encode` gives `text`.
    pub async fn encode(&self, text: &str) -> Vec<u64> {
        let body: serde_json::Value = self
            .post("/encode", serde_json::json!({ "inputs": text }))
            .await
            .json()
            .await
            .expect("JSON body");
        let ids = body["ids"].as_array().expect("ids");
        ids.iter().map(|id| id.as_u64().expect("id")).collect()
    }

    pub async fn health(&self) -> serde_json::Value {
        self.get_json("/health").await
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        let r = self
            .http
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("metrics");
        r.text().await.expect("metrics text")
    }

    /// Stops the server and waits for it to finish.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let result = task.await.expect("server task");
            result.expect("server exits cleanly");
        }
    }
}

/// The value of one series (`name{labels}`) in Prometheus text, 0 when absent.
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Parses an SSE body into the JSON of each `data:` event.
pub fn sse_events(body: &str) -> Vec<serde_json::Value> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| serde_json::from_str(d.trim()).expect("event json"))
        .collect()
}

/// Checks Prometheus text with `promtool check metrics` (installed by `.ci/run`): lint notes
/// are fine, parse errors are not. Without promtool: a visible skip, or a failure under CI.
pub fn promtool_check(text: &str) {
    use std::io::Write;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let Ok(mut child) = child else {
        super::require(false, "promtool (Debian's prometheus package)");
        return;
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("promtool");
    let report =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        !report.contains("error while linting") && !report.contains("text format parsing error"),
        "{report}"
    );
}
