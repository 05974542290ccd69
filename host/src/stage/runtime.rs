//! The WebAssembly runtime shared by every stage: one wasmtime `Engine`
//! (async support and epoch interruption on, ticked by a background
//! thread), the linkers (WASI p2 and the `log` import; one with the real
//! monotonic clock for stages granted `clock`, one where every clock
//! pollable is ready at once for the others), and the on-disk cache of
//! compiled components.
//!
//! Why async: a stage can wait in host code (a sleep is a monotonic-clock
//! pollable, a `poll` on a stream), where epochs never fire. With async
//! support every guest call is a future that the stage's call wraps in a
//! timeout (see `instance`), and wasm code yields to it at every epoch
//! tick, so the time limit covers host calls as well as wasm code.
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
use super::cache::CompileCache;
use super::StageError;

/// How often the epoch advances: the granularity of time limits.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// The WIT package version this host implements; plugins built for any
/// `0.1.x` load (see [`wit_version_supported`]).
pub const WIT_PACKAGE: &str = "ecommerce:pipeline@0.1.1";

/// What the host loads, as the refusal of another version says it.
pub const WIT_SUPPORTED: &str = "ecommerce:pipeline 0.1.x (0.1.0 and any later 0.1 patch release)";

/// The name of the interface every stage exports.
pub const STAGE_EXPORT: &str = "ecommerce:pipeline/stage@0.1.1";

/// The interface a stage may also export to take batches in columns
/// (added in 0.1.1; see `columns`).
pub const COLUMNS_EXPORT: &str = "ecommerce:pipeline/columns@0.1.1";

/// Every import or export name of the package starts with this, then
/// the interface name and `@version`: `ecommerce:pipeline/stage@0.1.0`.
const WIT_NAME_PREFIX: &str = "ecommerce:pipeline/";

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
///
/// The cap is one for the whole instance: a component holds several core
/// instances, each of which may define a memory, so the bytes of all its
/// memories are added up, and the number of instances, memories and tables
/// is capped too (wasmtime's defaults allow 10,000 of each).
pub struct MemoryLimiter {
    pub(crate) max_bytes: usize,
    /// Bytes of every linear memory of the store together.
    pub(crate) total_bytes: usize,
    pub(crate) hit: bool,
}

/// Core instances, memories and tables one stage may create. Generous for
/// what language toolchains emit (a Python component has about a dozen
/// core instances, a few memories and tables), small against abuse.
pub const MAX_INSTANCES: usize = 100;
pub const MAX_MEMORIES: usize = 16;
pub const MAX_TABLES: usize = 100;
/// Elements per table.
pub const MAX_TABLE_ELEMENTS: usize = 1_000_000;

impl MemoryLimiter {
    pub fn new(max_bytes: usize) -> MemoryLimiter {
        MemoryLimiter {
            max_bytes,
            total_bytes: 0,
            hit: false,
        }
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = (self.total_bytes - current.min(self.total_bytes)).saturating_add(desired);
        if total > self.max_bytes {
            self.hit = true;
            return Ok(false);
        }
        self.total_bytes = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }
}

/// The monotonic clock of a stage without the `clock` grant: it reads
/// zero and every pollable it makes is ready at once, so a sleep returns
/// immediately instead of holding the stage thread in host code.
struct FrozenMonotonic;

impl wasmtime::component::HasData for FrozenMonotonic {
    type Data<'a> = FrozenClockView<'a>;
}

/// What the frozen clock's host functions see: the store's resources.
struct FrozenClockView<'a>(&'a mut ResourceTable);

/// A pollable that is always ready.
struct Ready;

#[async_trait::async_trait]
impl wasmtime_wasi::p2::Pollable for Ready {
    async fn ready(&mut self) {}
}

fn ready_pollable(
    table: &mut ResourceTable,
) -> wasmtime::Result<wasmtime::component::Resource<wasmtime_wasi::p2::DynPollable>> {
    let ready = table.push(Ready)?;
    wasmtime_wasi::p2::subscribe(table, ready)
}

impl wasmtime_wasi::p2::bindings::clocks::monotonic_clock::Host for FrozenClockView<'_> {
    fn now(&mut self) -> wasmtime::Result<u64> {
        Ok(0)
    }

    fn resolution(&mut self) -> wasmtime::Result<u64> {
        Ok(1_000_000_000)
    }

    fn subscribe_instant(
        &mut self,
        _when: u64,
    ) -> wasmtime::Result<wasmtime::component::Resource<wasmtime_wasi::p2::DynPollable>> {
        ready_pollable(self.0)
    }

    fn subscribe_duration(
        &mut self,
        _duration: u64,
    ) -> wasmtime::Result<wasmtime::component::Resource<wasmtime_wasi::p2::DynPollable>> {
        ready_pollable(self.0)
    }
}

/// A component read from disk, compiled (or taken from the cache) and
/// checked against the `plugin` world.
pub struct LoadedComponent {
    pub path: PathBuf,
    /// Hex SHA-256 of the component file: the identity recorded per batch.
    pub hash: String,
    /// Instantiates with the real monotonic clock (the `clock` grant).
    pub pre: PluginPre<StoreData>,
    /// Instantiates with the frozen one: no clock call can block.
    pub pre_frozen: PluginPre<StoreData>,
    /// True when the compiled code came from the cache.
    pub cached: bool,
    /// The `ecommerce:pipeline` version the component was built for (the
    /// highest in its import and export names): `0.1.0`, `0.1.1`, ...
    pub wit_version: String,
    /// Whether it exports `columns`: batches then go in columns.
    pub columns: bool,
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
    /// WASI with the real clocks, for stages granted `clock`.
    linker: Linker<StoreData>,
    /// The same with [`FrozenMonotonic`] in place of the monotonic clock.
    frozen: Linker<StoreData>,
    cache: Option<CompileCache>,
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
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(StageError::engine)?;
        Plugin::add_to_linker::<_, HasSelf<StoreData>>(&mut linker, |data| data)
            .map_err(StageError::engine)?;
        let mut frozen = linker.clone();
        frozen.allow_shadowing(true);
        wasmtime_wasi::p2::bindings::clocks::monotonic_clock::add_to_linker::<
            StoreData,
            FrozenMonotonic,
        >(&mut frozen, |data| FrozenClockView(&mut data.table))
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
        let cache = cache_dir.and_then(|dir| match CompileCache::open(&dir) {
            Ok(cache) => Some(cache),
            Err(e) => {
                tracing::warn!("{e}: the compile cache is off, every component is compiled");
                None
            }
        });
        Ok(Runtime {
            engine,
            linker,
            frozen,
            cache,
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
        let entry = format!("{hash}-{:016x}", self.compat);
        let load_error = |message: String| StageError::Load {
            path: path.to_owned(),
            message,
        };

        let mut cached = false;
        let mut component = None;
        match self.cache.as_ref().map(|cache| cache.get(&entry)) {
            None | Some(Ok(None)) => {}
            Some(Ok(Some(code))) => {
                // SAFETY: the MAC proves this host wrote the code, with
                // `Component::serialize` of an engine with the same
                // compatibility hash (it is in the entry's name), into a
                // folder only its user may write (see `cache`).
                match unsafe { Component::deserialize(&self.engine, &code) } {
                    Ok(c) => {
                        cached = true;
                        component = Some(c);
                    }
                    Err(e) => {
                        tracing::warn!(entry, "ignoring unusable compile cache entry: {e}")
                    }
                }
            }
            Some(Err(refused)) => tracing::warn!(
                component = %path.display(),
                "refusing to load a compile cache entry: {refused}; compiling the component again and replacing the entry"
            ),
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
                if let Some(cache) = &self.cache {
                    if let Err(e) = c
                        .serialize()
                        .map_err(|e| e.to_string())
                        .and_then(|data| cache.put(&entry, &data).map_err(|e| e.to_string()))
                    {
                        tracing::warn!(file = %cache.path(&entry).display(), "cannot write compile cache: {e}");
                    }
                }
                c
            }
        };

        // The version check comes first: a plugin for another version
        // usually fails the type checks below too, and "built for 0.2.0"
        // is what its author needs to hear, not which function differs.
        let ty = component.component_type();
        let columns_track = COLUMNS_EXPORT.split('@').next().unwrap_or(COLUMNS_EXPORT);
        let columns = ty
            .exports(&self.engine)
            .any(|(name, _)| name.split('@').next() == Some(columns_track));
        // Exports first: `…/stage@0.2.0` names the version more plainly
        // than the `…/types@0.2.0` import that comes with it.
        let names = ty
            .exports(&self.engine)
            .map(|(name, _)| (Direction::Exports, name))
            .chain(
                ty.imports(&self.engine)
                    .map(|(name, _)| (Direction::Imports, name)),
            );
        let target = wit_target(names).map_err(|refused| StageError::UnsupportedWit {
            path: path.to_owned(),
            found: refused.found,
            name: refused.name,
            direction: refused.direction.as_str(),
        })?;
        let wit_version = target
            .as_ref()
            .map_or_else(|| "none".to_owned(), |v| v.to_string());
        // A plugin for a later 0.1 patch that fails a check below may be
        // using something that patch added: say so.
        let newer_hint = match &target {
            Some(v) if *v > host_wit_version() => format!(
                "; it was built for ecommerce:pipeline@{v}, newer than this host's {WIT_PACKAGE}: \
                 it may use an addition of {v}, so rebuild it against this host's wit/ or upgrade the host"
            ),
            _ => String::new(),
        };

        // Imports are matched by name, semver-aware (`NameMap::get`, via
        // `alternate_lookup_key`): an import of `…/types@0.1.1` finds what
        // the linker holds as `…@0.1.0`. `types` holds only records, which
        // link to nothing (the type checker skips type exports); their
        // shape is checked where they are used, in the `stage` signatures.
        let wrong_imports = |e: wasmtime::Error| {
            StageError::WrongWorld {
            path: path.to_owned(),
            message: format!(
                "it imports something the host does not provide ({}); a stage may import only WASI 0.2 and `log`{newer_hint}",
                error_text(&e)
            ),
        }
        };
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(wrong_imports)?;
        let pre_frozen = self
            .frozen
            .instantiate_pre(&component)
            .map_err(wrong_imports)?;
        // The typed bindings look the export up as `…/stage@0.1.1`;
        // wasmtime's export map answers that with the component's
        // `…/stage@0.1.z` of the same 0.1 track (the same `NameMap`
        // rule), then checks each function's type.
        let wrong_exports = |e: wasmtime::Error| StageError::WrongWorld {
            path: path.to_owned(),
            message: format!(
                "it does not export the `stage` interface of {WIT_PACKAGE} ({}){newer_hint}",
                error_text(&e)
            ),
        };
        let pre = PluginPre::new(pre).map_err(wrong_exports)?;
        let pre_frozen = PluginPre::new(pre_frozen).map_err(wrong_exports)?;
        Ok(LoadedComponent {
            path: path.to_owned(),
            hash,
            pre,
            pre_frozen,
            cached,
            wit_version,
            columns,
            load_time: started.elapsed(),
        })
    }
}

/// Whether a plugin built for `ecommerce:pipeline@{version}` loads in
/// this host: the same `0.1` track, not a pre-release. It is the rule by
/// which wasmtime's name maps match `…@0.1.0` to `…@0.1.z`
/// (`wasmtime_environ::component::names::alternate_lookup_key`: for a
/// `0.x` version the track is `0.x`, for `x.y` with `x > 0` it is `x`, a
/// pre-release matches nothing else), so what this accepts the typed
/// bindings then find, and what it refuses they would not.
pub fn wit_version_supported(version: &semver::Version) -> bool {
    let host = host_wit_version();
    version.major == host.major && version.minor == host.minor && version.pre.is_empty()
}

/// The version in [`WIT_PACKAGE`].
fn host_wit_version() -> semver::Version {
    // A unit test parses it, so the fallback is never taken.
    WIT_PACKAGE
        .rsplit_once('@')
        .and_then(|(_, v)| semver::Version::parse(v).ok())
        .unwrap_or_else(|| semver::Version::new(0, 1, 0))
}

/// Whether a name is one the component imports or exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Imports,
    Exports,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Imports => "imports",
            Direction::Exports => "exports",
        }
    }
}

/// The first name of the package that this host cannot serve.
#[derive(Debug, PartialEq, Eq)]
struct Refused {
    /// `ecommerce:pipeline@0.2.0`, or a description when there is no
    /// usable version.
    found: String,
    name: String,
    direction: Direction,
}

/// The `ecommerce:pipeline` version a component targets, read from its
/// import and export names of the package (`…/stage@0.1.1`,
/// `…/types@0.1.1`): the highest one, or `None` if it names none (then
/// the world checks say what is missing). Refuses the first name whose
/// version this host does not support.
fn wit_target<'a>(
    names: impl Iterator<Item = (Direction, &'a str)>,
) -> Result<Option<semver::Version>, Refused> {
    let mut highest: Option<semver::Version> = None;
    for (direction, name) in names {
        let Some(rest) = name.strip_prefix(WIT_NAME_PREFIX) else {
            continue;
        };
        let refuse = |found: String| Refused {
            found,
            name: name.to_owned(),
            direction,
        };
        let Some((_, version)) = rest.split_once('@') else {
            return Err(refuse("ecommerce:pipeline without a version".into()));
        };
        let parsed = semver::Version::parse(version).map_err(|_| {
            refuse(format!(
                "ecommerce:pipeline@{version}, not a semver version"
            ))
        })?;
        if !wit_version_supported(&parsed) {
            return Err(refuse(format!("ecommerce:pipeline@{version}")));
        }
        if highest.as_ref().is_none_or(|h| parsed > *h) {
            highest = Some(parsed);
        }
    }
    Ok(highest)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn target(names: &[(Direction, &str)]) -> Result<Option<String>, Refused> {
        wit_target(names.iter().copied()).map(|v| v.map(|v| v.to_string()))
    }

    fn refused(name: &str) -> String {
        target(&[(Direction::Exports, name)]).unwrap_err().found
    }

    #[test]
    fn the_host_version_parses() {
        let host = WIT_PACKAGE.rsplit_once('@').unwrap().1;
        assert_eq!(host_wit_version(), semver::Version::parse(host).unwrap());
        assert!(wit_version_supported(&host_wit_version()));
    }

    #[test]
    fn later_patches_of_the_same_track_load() {
        use Direction::*;
        assert_eq!(
            target(&[
                (Imports, "log"),
                (Imports, "wasi:io/streams@0.2.6"),
                (Imports, "ecommerce:pipeline/types@0.1.1"),
                (Exports, "ecommerce:pipeline/stage@0.1.1"),
            ]),
            Ok(Some("0.1.1".into()))
        );
        assert_eq!(
            target(&[(Exports, "ecommerce:pipeline/stage@0.1.0")]),
            Ok(Some("0.1.0".into()))
        );
        assert_eq!(
            target(&[(Exports, "ecommerce:pipeline/stage@0.1.17+build.5")]),
            Ok(Some("0.1.17+build.5".into()))
        );
        // Names of other packages are the linker's business.
        assert_eq!(target(&[(Exports, "other:thing/hello@2.0.0")]), Ok(None));
    }

    #[test]
    fn other_versions_are_refused_with_what_they_target() {
        assert_eq!(
            refused("ecommerce:pipeline/stage@0.2.0"),
            "ecommerce:pipeline@0.2.0"
        );
        assert_eq!(
            refused("ecommerce:pipeline/stage@1.0.0"),
            "ecommerce:pipeline@1.0.0"
        );
        assert_eq!(
            refused("ecommerce:pipeline/stage@0.0.1"),
            "ecommerce:pipeline@0.0.1"
        );
        // A pre-release promises nothing, not even to its own track.
        assert_eq!(
            refused("ecommerce:pipeline/stage@0.1.1-rc.1"),
            "ecommerce:pipeline@0.1.1-rc.1"
        );
        assert_eq!(
            refused("ecommerce:pipeline/stage"),
            "ecommerce:pipeline without a version"
        );
        assert_eq!(
            refused("ecommerce:pipeline/stage@next"),
            "ecommerce:pipeline@next, not a semver version"
        );
        // The import side counts as much as the export.
        let mixed = target(&[
            (Direction::Imports, "ecommerce:pipeline/types@0.2.1"),
            (Direction::Exports, "ecommerce:pipeline/stage@0.1.0"),
        ])
        .unwrap_err();
        assert_eq!(mixed.direction, Direction::Imports);
        assert_eq!(mixed.name, "ecommerce:pipeline/types@0.2.1");
    }
}
