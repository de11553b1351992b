//! Watches the plugin folder and reloads a plugin once its files have been quiet for a moment:
//! editors write a temporary file and rename it, and copies arrive in several writes, so
//! reacting to every event would compile half-written files.

use super::registry::PluginRegistry;
use notify::{RecursiveMode, Watcher};
use std::collections::HashMap;
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Keeps the watcher alive; dropping it stops watching.
pub struct FolderWatcher {
    _watcher: notify::RecommendedWatcher,
}

fn plugin_stem(path: &Path) -> Option<String> {
    let ext = path.extension()?.to_str()?;
    if ext != "wasm" && ext != "json" {
        return None;
    }
    path.file_stem()?.to_str().map(str::to_string)
}

/// Starts watching `registry.dir`.
pub fn watch(registry: Arc<PluginRegistry>) -> anyhow::Result<FolderWatcher> {
    let (tx, rx) = mpsc::channel::<String>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            for path in &event.paths {
                if let Some(stem) = plugin_stem(path) {
                    let _ = tx.send(stem);
                }
            }
        }
    })?;
    watcher.watch(&registry.dir, RecursiveMode::NonRecursive)?;
    std::thread::Builder::new()
        .name("cllm-plugin-watch".into())
        .spawn(move || debounce_loop(&registry, &rx))?;
    Ok(FolderWatcher { _watcher: watcher })
}

fn debounce_loop(registry: &PluginRegistry, rx: &mpsc::Receiver<String>) {
    let mut pending: HashMap<String, Instant> = HashMap::new();
    loop {
        let wait = if pending.is_empty() {
            Duration::from_secs(3600)
        } else {
            Duration::from_millis(5)
        };
        match rx.recv_timeout(wait) {
            Ok(stem) => {
                pending.insert(stem, Instant::now());
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        let quiet = registry.quiet;
        let ready: Vec<String> = pending
            .iter()
            .filter(|(_, at)| at.elapsed() >= quiet)
            .map(|(stem, _)| stem.clone())
            .collect();
        for stem in ready {
            pending.remove(&stem);
            registry.reload(&stem);
        }
    }
}
