//! Watches the plugin folder and reloads a plugin once its files are complete: at once when a
//! file is closed after writing or renamed into place, else after a quiet moment. Editors write
//! a temporary file and rename it, and copies arrive in several writes, so reacting to every
//! event would compile half-written files.

use super::registry::PluginRegistry;
use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind, RenameMode};
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
    let (tx, rx) = mpsc::channel::<(String, bool)>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            let complete = is_complete(&event.kind);
            // A rename reports both names; only the one that now exists is complete.
            for path in &event.paths {
                if let Some(stem) = plugin_stem(path) {
                    let _ = tx.send((stem, complete && path.exists()));
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

/// Whether an event says a file is complete: closed after writing, or renamed into place.
fn is_complete(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both))
    )
}

fn debounce_loop(registry: &PluginRegistry, rx: &mpsc::Receiver<(String, bool)>) {
    let mut pending: HashMap<String, Instant> = HashMap::new();
    loop {
        let wait = if pending.is_empty() {
            Duration::from_secs(3600)
        } else {
            Duration::from_millis(5)
        };
        match rx.recv_timeout(wait) {
            Ok((stem, complete)) => {
                // A complete file is due now; anything else waits for the quiet period.
                let due = if complete {
                    Instant::now()
                        .checked_sub(registry.quiet)
                        .unwrap_or_else(Instant::now)
                } else {
                    Instant::now()
                };
                pending.insert(stem, due);
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
