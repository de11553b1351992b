//! The example and test plugins as real `.wasm` components, built once per test run with
//! `plugins/build.sh` (cargo serializes concurrent builds, so parallel test binaries are safe).

use super::repo_root;
use std::path::PathBuf;
use std::sync::OnceLock;

/// Where the built components land.
fn out_dir() -> PathBuf {
    repo_root().join("target/wasm-plugins")
}

/// Path of the built plugin `name` (e.g. "token-bucket"), building all plugins on first use.
pub fn plugin_wasm(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let out = std::process::Command::new("bash")
            .arg(repo_root().join("plugins/build.sh"))
            .arg(out_dir())
            .output()
            .map_err(|e| format!("cannot run plugins/build.sh: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "plugins/build.sh failed (is the wasm32-wasip2 target installed? `rustup target add wasm32-wasip2`):\n{}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    });
    if let Err(message) = built {
        panic!("{message}");
    }
    let path = out_dir().join(format!("{}.wasm", name.replace('-', "_")));
    let alt = out_dir().join(format!("{name}.wasm"));
    if path.is_file() {
        path
    } else if alt.is_file() {
        alt
    } else {
        panic!("plugin {name} was not built into {}", out_dir().display())
    }
}

/// The Python example plugin `name` (e.g. "python-allowlist"), built by `plugins/build.sh` when
/// componentize-py is installed; `None` (a visible skip, or a failure under CI) when it is not.
pub fn python_plugin_wasm(name: &str) -> Option<PathBuf> {
    // Builds everything (the Rust plugins too) on first use.
    let _ = plugin_wasm("allow-all");
    let path = out_dir().join(format!("{}.wasm", name.replace('-', "_")));
    super::require(
        path.is_file(),
        "componentize-py to build the Python plugins (pip install componentize-py==0.25.1)",
    )
    .then_some(path)
}
