//! Compiled plugins kept on disk, so a restart (or a file put back) loads machine code instead
//! of compiling again. An entry is named by the `.wasm` file's sha256 and a hash of the engine's
//! configuration and wasmtime's version (`Engine::precompile_compatibility_hash`), so a changed
//! file, engine setting or cllm build never reuses stale code. The cache is an optimisation
//! only: an unreadable, corrupt or incompatible entry is compiled afresh and rewritten, and a
//! folder that cannot be written is logged and otherwise ignored.
//!
//! Trust: loading an entry runs its machine code; whoever can write the cache folder can run
//! code in cllm, exactly as whoever can write the plugin folder can run (sandboxed) plugins.
//! Keep both folders writable only by cllm's operator.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
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
}

impl CompileCache {
    pub fn new(dir: PathBuf, engine: &Engine) -> Self {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        CompileCache {
            dir,
            engine_key: hasher.finish(),
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
        if let Ok(code) = std::fs::read(&entry) {
            // Read into memory rather than mapped: a mapped entry that someone truncates or
            // rewrites in place would crash the process (SIGBUS) when its code runs.
            // SAFETY: entries are written only by `store` below from `Component::serialize`
            // of this engine's configuration (the name carries its compatibility hash, and
            // wasmtime checks the header again); the folder is trusted as the module
            // documentation says.
            match unsafe { Component::deserialize(engine, &code) } {
                Ok(component) => return Ok((component, CacheResult::Hit)),
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
        }
        Ok((component, result))
    }
}

/// Writes `code` to `path` through a temporary file and a rename, so a reader never sees half.
/// A failed write (a full disk) removes what it wrote, so failures do not pile up partial files.
fn store(path: &Path, code: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("partial-{}", std::process::id()));
    let written = std::fs::write(&tmp, code).and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}
