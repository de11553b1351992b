//! Compiled plugins kept on disk, so a restart (or a file put back) loads machine code instead
//! of compiling again. An entry is named by the `.wasm` file's sha256 and a hash of the engine's
//! configuration and wasmtime's version (`Engine::precompile_compatibility_hash`), so a changed
//! file, engine setting or cllm build never reuses stale code. The cache is an optimisation
//! only: an unreadable, corrupt or incompatible entry is compiled afresh and rewritten, and a
//! folder that cannot be written is logged and otherwise ignored.
//!
//! An entry starts with the sha256 of the compiled code that follows it, checked before the
//! code is handed to wasmtime: wasmtime checks an entry's header but runs its machine code as
//! it finds it, so a torn write (a crash or power loss between the write and the disk), a
//! truncated copy or a flipped bit would otherwise run as code. Entries are also flushed to
//! disk before they are renamed into place.
//!
//! When it stores an entry, the cache removes old ones: it keeps every entry this process has
//! loaded or stored, and of the others the [`MAX_ENTRIES`] most recently written or loaded (a
//! hit marks its entry used). A plugin author rebuilding a component again and again (a Python
//! one compiles to tens of MB) would otherwise fill the disk with code no file has any more.
//! Only files named as entries are touched.
//!
//! Trust: loading an entry runs its machine code; whoever can write the cache folder can run
//! code in cllm, exactly as whoever can write the plugin folder can run (sandboxed) plugins.
//! Keep both folders writable only by cllm's operator.

use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use wasmtime::component::Component;
use wasmtime::Engine;

/// How a component was obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheResult {
    /// Loaded from the cache.
    Hit,
    /// Compiled, and stored for next time.
    Miss,
    /// Compiled; the cache could not be read or written (logged).
    Error,
}

impl CacheResult {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::Miss => "miss",
            CacheResult::Error => "error",
        }
    }
}

pub struct CompileCache {
    dir: PathBuf,
    /// The engine's compatibility hash, part of every entry's name.
    engine_key: u64,
    /// Entries this process loaded or stored: never pruned while it runs.
    used: Mutex<HashSet<PathBuf>>,
}

impl CompileCache {
    pub fn new(dir: PathBuf, engine: &Engine) -> Self {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        // The entry layout is part of the name, so entries of another layout are never read.
        ENTRY_LAYOUT.hash(&mut hasher);
        CompileCache {
            dir,
            engine_key: hasher.finish(),
            used: Mutex::new(HashSet::new()),
        }
    }

    /// Where the compiled form of a file with this sha256 lives.
    fn entry(&self, sha256: &str) -> PathBuf {
        self.dir
            .join(format!("{sha256}-{:016x}.cwasm", self.engine_key))
    }

    /// The component of `bytes` (whose sha256 is `sha256`): from the cache when it holds it,
    /// else compiled and stored.
    pub fn compile(
        &self,
        engine: &Engine,
        bytes: &[u8],
        sha256: &str,
    ) -> wasmtime::Result<(Component, CacheResult)> {
        let entry = self.entry(sha256);
        let mut result = CacheResult::Miss;
        if let Ok(sealed) = std::fs::read(&entry) {
            // Read into memory rather than mapped: a mapped entry that someone truncates or
            // rewrites in place would crash the process (SIGBUS) when its code runs.
            let loaded = match unseal(&sealed) {
                // SAFETY: the code is byte for byte what `store` below wrote from
                // `Component::serialize` of this engine's configuration (its sha256 matches;
                // the name carries the compatibility hash, and wasmtime checks the header
                // again); the folder is trusted as the module documentation says.
                Some(code) => unsafe { Component::deserialize(engine, code) },
                None => Err(wasmtime::Error::msg(
                    "its checksum does not match its contents (a torn or damaged write)",
                )),
            };
            match loaded {
                Ok(component) => {
                    // Used now: the last entry to be pruned.
                    let now = std::time::SystemTime::now();
                    if let Ok(file) = std::fs::File::options().append(true).open(&entry) {
                        let _ = file.set_modified(now);
                    }
                    self.mark_used(entry);
                    return Ok((component, CacheResult::Hit));
                }
                Err(e) => {
                    tracing::warn!(entry = %entry.display(), "compiled plugin cache entry unusable, compiling again: {e:#}");
                    result = CacheResult::Error;
                }
            }
        }
        let component = Component::new(engine, bytes)?;
        if let Err(e) = component
            .serialize()
            .map_err(|e| std::io::Error::other(format!("{e:#}")))
            .and_then(|code| store(&entry, &code))
        {
            tracing::warn!(dir = %self.dir.display(), "cannot write the compiled plugin cache: {e}");
            result = CacheResult::Error;
        } else {
            let mut used = self.used.lock().unwrap_or_else(PoisonError::into_inner);
            used.insert(entry);
            prune(&self.dir, MAX_ENTRIES, &used);
        }
        Ok((component, result))
    }

    fn mark_used(&self, entry: PathBuf) {
        let mut used = self.used.lock().unwrap_or_else(PoisonError::into_inner);
        used.insert(entry);
    }
}

/// Entries the cache folder keeps besides those this process uses (the most recently written
/// or loaded).
pub const MAX_ENTRIES: usize = 16;

/// Whether `name` is an entry's: `{sha256}-{engine key}.cwasm`, hex.
fn is_entry_name(name: &str) -> bool {
    let Some((sha, key)) = name
        .strip_suffix(".cwasm")
        .and_then(|stem| stem.split_once('-'))
    else {
        return false;
    };
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    hex(sha, 64) && hex(key, 16)
}

/// Removes the entries of `dir` other than those in `used` and the `keep` most recently used
/// (modified) of the rest. Failures are ignored: pruning only saves space.
fn prune(dir: &Path, keep: usize, used: &HashSet<PathBuf>) {
    let Ok(listing) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<(std::time::SystemTime, PathBuf)> = listing
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_str().is_some_and(is_entry_name))
        .map(|e| e.path())
        .filter(|p| !used.contains(p))
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .collect();
    if entries.len() <= keep {
        return;
    }
    entries.sort_by_key(|e| std::cmp::Reverse(e.0));
    for (_, old) in entries.drain(keep..) {
        tracing::info!(entry = %old.display(), "compiled plugin cache: removing an entry not used lately");
        let _ = std::fs::remove_file(old);
    }
}

/// The layout of an entry: the sha256 of the code, then the code.
const ENTRY_LAYOUT: &str = "sha256+code v1";
const DIGEST_LEN: usize = 32;

/// The code of an entry whose checksum matches, else `None`.
fn unseal(entry: &[u8]) -> Option<&[u8]> {
    let (digest, code) = entry.split_at_checked(DIGEST_LEN)?;
    (Sha256::digest(code).as_slice() == digest).then_some(code)
}

/// Writes the entry for `code` to `path` through a temporary file, flushed to disk, and a
/// rename, so a reader never sees half. A failed write (a full disk) removes what it wrote,
/// so failures do not pile up partial files.
fn store(path: &Path, code: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension(format!("partial-{}", std::process::id()));
    let written = write_synced(&tmp, &[&Sha256::digest(code), code])
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return written;
    }
    // The rename itself reaches the disk with the folder; where a folder cannot be opened
    // or flushed (some file systems), the checksum still catches what a crash leaves.
    if let Ok(folder) = std::fs::File::open(dir) {
        let _ = folder.sync_all();
    }
    Ok(())
}

/// Creates `path` with `parts` one after another, flushed to disk.
fn write_synced(path: &Path, parts: &[&[u8]]) -> std::io::Result<()> {
    let mut file = std::fs::File::create(path)?;
    for part in parts {
        file.write_all(part)?;
    }
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_unseals_only_unchanged() {
        let code = b"machine code".to_vec();
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("x.cwasm");
        store(&path, &code).expect("store");
        let mut entry = std::fs::read(&path).expect("read");
        assert_eq!(unseal(&entry), Some(&code[..]));
        let last = entry.len() - 1;
        entry[last] ^= 1;
        assert_eq!(unseal(&entry), None, "a flipped bit");
        assert_eq!(unseal(&entry[..entry.len() - 3]), None, "truncated");
        assert_eq!(unseal(&entry[..5]), None, "shorter than a digest");
        assert_eq!(unseal(&[]), None, "empty");
    }

    #[test]
    fn pruning_keeps_used_and_the_most_recently_used_entries() {
        let dir = tempfile::tempdir().expect("tmp");
        let base = std::time::SystemTime::now() - std::time::Duration::from_secs(100);
        let name = |i: u64| format!("{:064x}-{:016x}.cwasm", i, 7);
        for i in 0..5u64 {
            let path = dir.path().join(name(i));
            store(&path, b"code").expect("store");
            let file = std::fs::File::options()
                .append(true)
                .open(&path)
                .expect("open");
            file.set_modified(base + std::time::Duration::from_secs(i))
                .expect("mtime");
        }
        // Not entries: never touched.
        std::fs::write(dir.path().join("notes.txt"), "kept").expect("write");
        std::fs::write(dir.path().join("mine.cwasm"), "kept").expect("write");
        let used = HashSet::from([dir.path().join(name(0))]);
        prune(dir.path(), 2, &used);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let mut want = vec![
            name(0),
            name(3),
            name(4),
            "mine.cwasm".into(),
            "notes.txt".into(),
        ];
        want.sort();
        assert_eq!(left, want);
    }
}
