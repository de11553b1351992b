//! `cllm serve`: the HTTP server.

use crate::config::ServerConfig;
use anyhow::Context;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Hugging Face model folder, GGUF file, or folder holding one GGUF file (overrides
    /// model.path).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Folder with tokenizer.json used instead of the model's own tokenizer (overrides
    /// model.tokenizer).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N: where the model runs (overrides model.device).
    #[arg(long, value_parser = super::parse_device)]
    device: Option<crate::model::executor::DeviceChoice>,
    /// YAML config file (see cllm.example.yaml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on (overrides http.host).
    #[arg(long)]
    host: Option<String>,
    /// Port; 0 picks a free one (overrides http.port).
    #[arg(long)]
    port: Option<u16>,
    /// Folder of WebAssembly policy plugins, watched for changes (overrides plugins.dir).
    #[arg(long)]
    plugins_dir: Option<PathBuf>,
    /// The model's name in the OpenAI API; default: the model folder's name (overrides
    /// model.served_model_name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Jinja chat template file, used instead of the model's own (overrides
    /// model.chat_template).
    #[arg(long)]
    chat_template: Option<PathBuf>,
    /// Override any config key: --set request_queue.max_queue_size=64 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    init_logging(args.log_json);
    let mut config = match &args.config {
        Some(path) => ServerConfig::from_file(path)?,
        None => ServerConfig::default(),
    };
    for item in &args.overrides {
        let (key, value) = item
            .split_once('=')
            .with_context(|| format!("--set {item:?}: expected KEY=VALUE"))?;
        config.set(key.trim(), value.trim())?;
    }
    if let Some(model) = args.model {
        config.model.path = Some(model);
    }
    if let Some(device) = args.device {
        config.model.device = device;
    }
    if let Some(dir) = args.tokenizer {
        config.model.tokenizer = Some(dir);
    }
    if let Some(dir) = args.plugins_dir {
        config.plugins.dir = Some(dir);
    }
    if let Some(name) = args.served_model_name {
        config.model.served_model_name = Some(name);
    }
    if let Some(file) = args.chat_template {
        config.model.chat_template = Some(file);
    }
    if let Some(host) = args.host {
        config.http.host = host;
    }
    if let Some(port) = args.port {
        config.http.port = port;
    }
    config.validate()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let addr = format!("{}:{}", config.http.host, config.http.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        crate::server::serve(listener, config, shutdown_signal()).await
    })
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CLLM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
