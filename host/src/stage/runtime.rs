//! The WebAssembly runtime shared by every stage: one wasmtime `Engine`
//! (epoch interruption on, ticked by a background thread), one `Linker`
//! with WASI p2 and the `log` import, and the on-disk cache of compiled
//! components.
//!
//! Lifecycle: one `Runtime` per process. `load` is called once per
//! component file version (off the hot path: compiling a Python or JS
//! component takes seconds); it returns a type-checked `LoadedComponent`
//! from which instances are made cheaply.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, ResourceLimiter};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::{ecommerce, Plugin, PluginImports, PluginPre};
use super::StageError;

/// How often the epoch advances: the granularity of time limits.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// The WIT package version this host implements; plugins built for any
/// `0.1.x` load.
pub const WIT_PACKAGE: &str = "ecommerce:pipeline@0.1.0";

/// Per-instance data owned by a wasmtime `Store`.
pub struct StoreData {
    pub(crate) stage: Arc<str>,
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) memory: MemoryLimiter,
}

impl WasiView for StoreData {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl ecommerce::pipeline::types::Host for StoreData {}

impl PluginImports for StoreData {
    fn log(&mut self, level: u8, message: String) {
        let stage = &*self.stage;
        match level {
            0 => tracing::trace!(target: "plugin", stage, "{message}"),
            1 => tracing::debug!(target: "plugin", stage, "{message}"),
            2 => tracing::info!(target: "plugin", stage, "{message}"),
            3 => tracing::warn!(target: "plugin", stage, "{message}"),
            _ => tracing::error!(target: "plugin", stage, "{message}"),
        }
    }
}

/// Caps linear memory and remembers whether the cap was hit, so that the
/// trap that follows a refused allocation is reported as what it is.
pub struct MemoryLimiter {
    pub(crate) max_bytes: usize,
    pub(crate) hit: bool,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.hit = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

/// A component read from disk, compiled (or taken from the cache) and
/// checked against the `plugin` world.
pub struct LoadedComponent {
    pub path: PathBuf,
    /// Hex SHA-256 of the component file: the identity recorded per batch.
    pub hash: String,
    pub pre: PluginPre<StoreData>,
    /// True when the compiled code came from the cache.
    pub cached: bool,
    pub load_time: Duration,
}

impl LoadedComponent {
    /// The first 12 hex digits of the hash, for logs and default versions.
    pub fn short_hash(&self) -> &str {
        &self.hash[..12]
    }
}

pub struct Runtime {
    engine: Engine,
    linker: Linker<StoreData>,
    cache_dir: Option<PathBuf>,
    compat: u64,
    stop_ticker: Arc<AtomicBool>,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}

impl Runtime {
    /// Creates the engine and starts the epoch ticker. `cache_dir` holds
    /// compiled components; `None` disables the cache.
    pub fn new(cache_dir: Option<PathBuf>) -> Result<Runtime, StageError> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.wasm_component_model(true);
        config.cranelift_opt_level(wasmtime::OptLevel::Speed);
        let engine = Engine::new(&config).map_err(StageError::engine)?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(StageError::engine)?;
        Plugin::add_to_linker::<_, HasSelf<StoreData>>(&mut linker, |data| data)
            .map_err(StageError::engine)?;

        let stop_ticker = Arc::new(AtomicBool::new(false));
        let ticker_engine = engine.clone();
        let stop = stop_ticker.clone();
        std::thread::Builder::new()
            .name("epoch-ticker".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    ticker_engine.increment_epoch();
                }
            })
            .map_err(|e| StageError::Engine(format!("cannot start the epoch thread: {e}")))?;

        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let compat = hasher.finish();
        if let Some(dir) = &cache_dir {
            if let Err(e) = std::fs::create_dir_all(dir) {
                tracing::warn!(dir = %dir.display(), "compile cache disabled: {e}");
            }
        }
        Ok(Runtime {
            engine,
            linker,
            cache_dir,
            compat,
            stop_ticker,
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Reads, compiles (or deserialises from the cache) and type-checks a
    /// component file.
    pub fn load(&self, path: &Path) -> Result<LoadedComponent, StageError> {
        let started = Instant::now();
        let bytes = std::fs::read(path).map_err(|e| StageError::Load {
            path: path.to_owned(),
            message: format!("cannot read: {e}"),
        })?;
        self.load_bytes(path, &bytes, started)
    }

    fn load_bytes(
        &self,
        path: &Path,
        bytes: &[u8],
        started: Instant,
    ) -> Result<LoadedComponent, StageError> {
        let hash = hex(&Sha256::digest(bytes));
        let cache_file = self
            .cache_dir
            .as_ref()
            .map(|dir| dir.join(format!("{hash}-{:016x}.cwasm", self.compat)));
        let load_error = |message: String| StageError::Load {
            path: path.to_owned(),
            message,
        };

        let mut cached = false;
        let mut component = None;
        if let Some(file) = cache_file.as_ref().filter(|f| f.exists()) {
            // SAFETY: the file was written by `Component::serialize` of an
            // engine with the same compatibility hash (it is in the name)
            // into a cache folder that only this host writes.
            match unsafe { Component::deserialize_file(&self.engine, file) } {
                Ok(c) => {
                    cached = true;
                    component = Some(c);
                }
                Err(e) => {
                    tracing::warn!(file = %file.display(), "ignoring unusable compile cache entry: {e}")
                }
            }
        }
        let component = match component {
            Some(c) => c,
            None => {
                let c = Component::new(&self.engine, bytes).map_err(|e| {
                    load_error(format!(
                        "not a valid WebAssembly component: {}",
                        error_text(&e)
                    ))
                })?;
                if let Some(file) = &cache_file {
                    if let Err(e) = c.serialize().map_err(|e| e.to_string()).and_then(|data| {
                        crate::fsutil::write_atomic(file, &data).map_err(|e| e.to_string())
                    }) {
                        tracing::warn!(file = %file.display(), "cannot write compile cache: {e}");
                    }
                }
                c
            }
        };

        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| StageError::WrongWorld {
                path: path.to_owned(),
                message: format!(
                    "it imports something the host does not provide ({}); a stage may import only WASI 0.2 and `log`",
                    error_text(&e)
                ),
            })?;
        let pre = PluginPre::new(pre).map_err(|e| StageError::WrongWorld {
            path: path.to_owned(),
            message: format!(
                "it does not export the `stage` interface of {WIT_PACKAGE} ({})",
                error_text(&e)
            ),
        })?;
        Ok(LoadedComponent {
            path: path.to_owned(),
            hash,
            pre,
            cached,
            load_time: started.elapsed(),
        })
    }
}

/// The whole chain of a wasmtime error on one line.
pub(crate) fn error_text(e: &wasmtime::Error) -> String {
    format!("{e:#}").replace('\n', " ")
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}
