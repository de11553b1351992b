//! Command-line entry points. `main` only calls [`run`].

mod bench;
mod bench_plugins;
mod generate;
mod plugin_check;
mod serve;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "cllm",
    version,
    about = "LLM inference server with WebAssembly admission policies"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate text from a prompt and stream it to the terminal.
    Generate(generate::GenerateArgs),
    /// Measure policy plugin call and reload latency.
    BenchPlugins(bench_plugins::BenchPluginsArgs),
    /// Tools for plugin authors (`cllm plugin check FILE.wasm`).
    Plugin(plugin_check::PluginArgs),
    /// Serve the model over HTTP.
    Serve(serve::ServeArgs),
    /// Measure prefill and decode speed on a model folder or a synthetic model.
    Bench(bench::BenchArgs),
}

/// `--numerics`: `fast` or `exact`.
fn parse_numerics(s: &str) -> Result<crate::model::cpu::matmul::Numerics, String> {
    crate::model::cpu::matmul::Numerics::parse(s)
        .ok_or_else(|| format!("unknown numerics {s:?} (fast, exact)"))
}

/// `--kv-cache-dtype`: `f32` or `f16`.
fn parse_kv_dtype(s: &str) -> Result<crate::model::kv_cache::KvDtype, String> {
    crate::model::kv_cache::KvDtype::parse(s)
        .ok_or_else(|| format!("unknown KV cache dtype {s:?} (f32, f16)"))
}

/// `--device`: `auto`, `cpu`, `cuda` or `cuda:N`.
fn parse_device(s: &str) -> Result<crate::model::executor::DeviceChoice, String> {
    crate::model::executor::DeviceChoice::parse(s)
        .ok_or_else(|| format!("unknown device {s:?} (auto, cpu, cuda, cuda:N)"))
}

/// Parses the command line and runs the command; the process exit code.
pub fn run() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Serve(args) => serve::run(args),
        Command::BenchPlugins(args) => bench_plugins::run(args),
        Command::Plugin(args) => plugin_check::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
