//! Watches the plugin folder and reloads a plugin once its files are complete: at once when a
//! file is closed after writing or renamed into place, else after a quiet moment. Editors write
//! a temporary file and rename it, and copies arrive in several writes, so reacting to every
//! event would compile half-written files.
//!
//! A folder that is removed takes its watch with it (inotify drops it). The loop learns of it
//! from the folder's own removal event, or from its periodic check ([`FOLDER_CHECK`]: the folder
//! missing, or a different one under the name). Its plugins unload as their files go, and once a
//! folder of that name exists again it is watched anew and every plugin file in it is loaded.

use super::registry::PluginRegistry;
use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind, RenameMode};
use notify::{RecursiveMode, Watcher};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the loop checks that the folder still exists (and is watched).
pub const FOLDER_CHECK: Duration = Duration::from_millis(250);

/// Keeps the watcher running; dropping it stops watching.
pub struct FolderWatcher {
    stop: Arc<AtomicBool>,
}

impl Drop for FolderWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
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
    let (tx, rx) = mpsc::channel::<Change>();
    let folder = registry.dir.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reading a file changes nothing: without this, the loader's own reads (inotify
        // reports every open) would schedule another reload of the plugin, forever.
        if let Ok(event) = event.as_ref() {
            if is_read_only(&event.kind) {
                return;
            }
            // The folder itself removed (or moved away): its watch is gone.
            if matches!(
                event.kind,
                EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))
            ) && event.paths.contains(&folder)
            {
                let _ = tx.send(Change::FolderGone);
            }
            let complete = is_complete(&event.kind);
            // A rename reports both names; only the one that now exists is complete.
            for path in &event.paths {
                if let Some(stem) = plugin_stem(path) {
                    let _ = tx.send(Change::File(stem, complete && path.exists()));
                }
            }
        }
    })?;
    watcher.watch(&registry.dir, RecursiveMode::NonRecursive)?;
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    std::thread::Builder::new()
        .name("cllm-plugin-watch".into())
        .spawn(move || debounce_loop(&registry, watcher, &rx, &stopped))?;
    Ok(FolderWatcher { stop })
}

/// What the watcher callback reports to the loop.
enum Change {
    /// A plugin file changed: its stem, and whether the file is complete.
    File(String, bool),
    /// The watched folder itself was removed (its watch is gone with it).
    FolderGone,
}

/// Which folder `dir` is now (device and inode on Unix), `None` when there is none.
fn folder_identity(dir: &Path) -> Option<(u64, u64)> {
    let meta = std::fs::metadata(dir).ok().filter(|m| m.is_dir())?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Some((meta.dev(), meta.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        Some((0, 0))
    }
}

/// Whether an event is a read: an open, a read, or a close after reading.
fn is_read_only(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Access(
            AccessKind::Open(_) | AccessKind::Read | AccessKind::Close(AccessMode::Read)
        )
    )
}

/// Whether an event says a file is complete: closed after writing, or renamed into place.
fn is_complete(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both))
    )
}

fn debounce_loop(
    registry: &PluginRegistry,
    mut watcher: notify::RecommendedWatcher,
    rx: &mpsc::Receiver<Change>,
    stop: &AtomicBool,
) {
    let mut pending: HashMap<String, Instant> = HashMap::new();
    // The folder being watched; `None` while there is none.
    let mut watched = folder_identity(&registry.dir);
    let mut checked = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if checked.elapsed() >= FOLDER_CHECK {
            checked = Instant::now();
            let now_there = folder_identity(&registry.dir);
            if now_there != watched {
                if now_there.is_none() {
                    tracing::warn!(dir = %registry.dir.display(), "plugin folder removed; watching for it to come back");
                    watched = None;
                    // Whatever was loaded from it unloads (its files' removals may have
                    // been missed along with the folder).
                    for stem in registry.known_stems() {
                        pending.insert(stem, Instant::now());
                    }
                } else {
                    // A new folder: the old watch went with the old one.
                    let _ = watcher.unwatch(&registry.dir);
                    match watcher.watch(&registry.dir, RecursiveMode::NonRecursive) {
                        Ok(()) => {
                            watched = now_there;
                            tracing::info!(dir = %registry.dir.display(), "plugin folder is back; watching it again");
                            let now = Instant::now();
                            for stem in registry
                                .wasm_stems()
                                .into_iter()
                                .chain(registry.known_stems())
                            {
                                pending.insert(stem, now);
                            }
                        }
                        Err(e) => tracing::warn!("cannot watch the plugin folder again yet: {e}"),
                    }
                }
            }
        }
        let wait = if pending.is_empty() {
            FOLDER_CHECK
        } else {
            Duration::from_millis(5)
        };
        match rx.recv_timeout(wait) {
            Ok(Change::FolderGone) => watched = None,
            Ok(Change::File(stem, complete)) => {
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
