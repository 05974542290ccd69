//! One live instance of a stage component: its own store (memory cap,
//! WASI context per the stage's grants) and the handles to its exports.
//!
//! Lifecycle: `start` instantiates and calls `init` once; then `process`
//! per batch, `snapshot` whenever the host takes the stage's state, and
//! `restore` only right after `start`. An instance whose call failed in
//! any way (trap, time or memory limit, output budget) is never used
//! again: its memory may be half-changed.
//!
//! Every call runs under the stage's `time-per-batch`, host calls
//! included: the call is a future (wasmtime async support) wrapped in a
//! tokio timeout, and wasm code yields to it at every epoch tick. The
//! future is driven by a small current-thread tokio runtime of the calling
//! thread, so a call may be made from any plain thread (the stage thread,
//! a shadow thread, `spawn_blocking`), never from inside an async task.

use std::cell::RefCell;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::{Func, ResourceTable};
use wasmtime::Store;
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtxBuilder};

use super::bindings::{BatchResult, Event, Plugin};
use super::budget::{self, OverBudget, ProcessResult};
use super::columns::{ColumnsResult, EventColumns};
use super::manifest::StageSpec;
use super::runtime::{error_text, LoadedComponent, MemoryLimiter, Runtime, StoreData};
use super::StageError;

pub struct StageInstance {
    pub spec: Arc<StageSpec>,
    pub component: Arc<LoadedComponent>,
    store: Store<StoreData>,
    plugin: Plugin,
    process: Process,
    poisoned: bool,
}

/// How batches are passed: `process-columns` where the stage exports it,
/// `process` otherwise; either is called through the budgeted lift (see
/// `budget`).
#[derive(Clone, Copy)]
enum Process {
    Rows(Func),
    Columns(Func),
}

/// A clock that reads zero: what a stage without the "clock" grant sees.
struct FrozenClock;

impl HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

thread_local! {
    /// The executor of guest calls made on this thread.
    static EXECUTOR: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
}

/// Runs a guest call's future on this thread's executor for at most
/// `limit`: `None` when it ran out of time (the future is then dropped,
/// which stops the guest wherever it was, in wasm or in a host call).
fn limited<F: Future>(limit: Duration, future: F) -> Result<Option<F::Output>, StageError> {
    if tokio::runtime::Handle::try_current().is_ok() {
        // A bug of the caller, not of the stage: say so instead of the
        // panic tokio would raise.
        return Err(StageError::Engine(
            "a stage was called from inside the async runtime; stage calls run on a plain thread"
                .into(),
        ));
    }
    EXECUTOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .enable_io()
                .build()
                .map_err(|e| StageError::Engine(format!("cannot start a stage executor: {e}")))?;
            *slot = Some(rt);
        }
        match slot.as_ref() {
            // The timer is made inside the executor, which drives it.
            Some(rt) => {
                Ok(rt.block_on(async move { tokio::time::timeout(limit, future).await.ok() }))
            }
            None => Err(StageError::Engine("no stage executor".into())),
        }
    })
}

impl StageInstance {
    /// Instantiates the component and calls `init` with the stage config.
    pub fn start(
        runtime: &Runtime,
        spec: Arc<StageSpec>,
        component: Arc<LoadedComponent>,
    ) -> Result<StageInstance, StageError> {
        let mut wasi = WasiCtxBuilder::new();
        wasi.allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        if !spec.grants.clock {
            wasi.wall_clock(FrozenClock).monotonic_clock(FrozenClock);
        }
        if !spec.grants.random {
            use rand::SeedableRng;
            wasi.secure_random(rand::rngs::StdRng::seed_from_u64(0))
                .insecure_random(rand::rngs::StdRng::seed_from_u64(0))
                .insecure_random_seed(0);
        }
        if spec.grants.stderr {
            wasi.inherit_stderr();
        }
        let data = StoreData {
            stage: Arc::from(spec.name.as_str()),
            wasi: wasi.build(),
            table: ResourceTable::new(),
            memory: MemoryLimiter::new(spec.limits.memory_bytes),
        };
        let mut store = Store::new(runtime.engine(), data);
        store.limiter(|data| &mut data.memory);
        // Wasm code yields at every tick, so the call's timeout is checked
        // even while it spins.
        store.set_epoch_deadline(1);
        store.epoch_deadline_async_yield_and_update(1);

        let cannot = |e: wasmtime::Error| StageError::Init {
            stage: spec.name.clone(),
            message: format!("cannot instantiate: {}", error_text(&e)),
        };
        // Without the clock grant the monotonic clock is the frozen one,
        // whose pollables are ready at once: no clock call can block.
        let pre = match spec.grants.clock {
            true => &component.pre,
            false => &component.pre_frozen,
        };
        let limit = spec.limits.time_per_batch;
        let instance = match limited(limit, pre.instance_pre().instantiate_async(&mut store))? {
            Some(result) => result.map_err(cannot)?,
            None => {
                return Err(StageError::TimeLimit {
                    stage: spec.name.clone(),
                    limit,
                })
            }
        };
        let plugin = Plugin::new(&mut store, &instance).map_err(cannot)?;
        let rows = process_export(&mut store, &instance).map_err(cannot)?;
        let process = match columns_export(&mut store, &instance).map_err(cannot)? {
            Some(columns) if !test_row_calls() => Process::Columns(columns),
            _ => Process::Rows(rows),
        };
        let mut instance = StageInstance {
            spec,
            component,
            store,
            plugin,
            process,
            poisoned: false,
        };
        let config = instance.spec.config.clone();
        let outcome = match instance.begin() {
            Ok(limit) => limited(
                limit,
                instance
                    .plugin
                    .ecommerce_pipeline_stage()
                    .call_init(&mut instance.store, &config),
            ),
            Err(e) => Err(e),
        };
        match instance.finish("init", outcome)? {
            Ok(()) => Ok(instance),
            Err(message) => Err(StageError::Init {
                stage: instance.spec.name.clone(),
                message,
            }),
        }
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The version recorded in batch records: the manifest's `version`, or
    /// the start of the component's hash.
    pub fn version(&self) -> String {
        self.spec
            .version
            .clone()
            .unwrap_or_else(|| self.component.short_hash().to_owned())
    }

    /// Runs one batch. A trap, a time-out, a result over the output budget,
    /// columns that do not make a batch, or an error the stage returns all
    /// come back as `Err`.
    pub fn process(&mut self, batch: &[Event]) -> Result<BatchResult, StageError> {
        let limit = self.begin()?;
        let budget = budget::for_batch(batch);
        // Typed per call, so the batch is lowered from the caller's slice
        // without a copy; the check is a comparison of two small type trees.
        let outcome = match self.process {
            Process::Rows(func) => (|| {
                let typed = func
                    .typed::<(&[Event],), (ProcessResult,)>(&self.store)
                    .map_err(StageError::engine)?;
                let _charge = budget::Charge::start(budget);
                limited(limit, typed.call_async(&mut self.store, (batch,)))
                    .map(|r| r.map(|r| r.map(|(r,)| r.map(|r| Ok(r.into())))))
            })(),
            Process::Columns(func) => (|| {
                let typed = func
                    .typed::<(&EventColumns,), (ColumnsResult,)>(&self.store)
                    .map_err(StageError::engine)?;
                let columns = EventColumns::from_rows(batch);
                let _charge = budget::Charge::start(budget);
                let store = &mut self.store;
                limited(limit, async move {
                    let (result,) = typed.call_async(store, (&columns,)).await?;
                    // Back to rows under the same charge.
                    match result {
                        Ok(lifted) => lifted.into_batch_result().map(Ok),
                        Err(message) => Ok(Err(message)),
                    }
                })
            })(),
        };
        match self.finish("process", outcome)? {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(message)) => {
                // A stage whose columns make no batch is not trusted
                // with another one.
                self.poisoned = true;
                Err(StageError::BadOutput {
                    stage: self.spec.name.clone(),
                    message,
                })
            }
            Err(message) => Err(StageError::Refused {
                stage: self.spec.name.clone(),
                message: message.0,
            }),
        }
    }

    pub fn snapshot(&mut self) -> Result<Vec<u8>, StageError> {
        let outcome = match self.begin() {
            Ok(limit) => limited(
                limit,
                self.plugin
                    .ecommerce_pipeline_stage()
                    .call_snapshot(&mut self.store),
            ),
            Err(e) => Err(e),
        };
        self.finish("snapshot", outcome)
    }

    /// Loads a snapshot. A stage that cannot read it, or fails while it
    /// tries (trap, time limit), is a [`StageError::Restore`].
    pub fn restore(&mut self, state: &[u8]) -> Result<(), StageError> {
        let outcome = match self.begin() {
            Ok(limit) => limited(
                limit,
                self.plugin
                    .ecommerce_pipeline_stage()
                    .call_restore(&mut self.store, state),
            ),
            Err(e) => Err(e),
        };
        let stage = self.spec.name.clone();
        match self.finish("restore", outcome) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(StageError::Restore {
                stage,
                message: format!("the stage refused its state: {message}"),
            }),
            Err(e) => Err(StageError::Restore {
                stage,
                message: e.to_string(),
            }),
        }
    }

    /// Marks the instance as not to be used again.
    pub fn retire(&mut self) {
        self.poisoned = true;
    }

    /// Whether a call has failed: the instance must then be replaced.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Prepares a guest call: refuses a failed instance, resets the
    /// memory flag, and returns the call's time limit.
    fn begin(&mut self) -> Result<Duration, StageError> {
        if self.poisoned {
            return Err(StageError::Trap {
                stage: self.spec.name.clone(),
                message: "instance already failed".into(),
            });
        }
        self.store.data_mut().memory.hit = false;
        self.store.set_epoch_deadline(1);
        Ok(self.spec.limits.time_per_batch)
    }

    /// Turns the outcome of a call (`None`: it timed out) into what happened: the result,
    /// a time-out, the memory cap, the output budget, or a trap.
    fn finish<R>(
        &mut self,
        what: &str,
        outcome: Result<Option<wasmtime::Result<R>>, StageError>,
    ) -> Result<R, StageError> {
        let stage = self.spec.name.clone();
        let e = match outcome {
            Ok(Some(Ok(r))) => return Ok(r),
            Ok(Some(Err(e))) => e,
            Ok(None) => {
                self.poisoned = true;
                return Err(StageError::TimeLimit {
                    stage,
                    limit: self.spec.limits.time_per_batch,
                });
            }
            Err(e) => {
                self.poisoned = true;
                return Err(e);
            }
        };
        self.poisoned = true;
        Err(if let Some(over) = e.downcast_ref::<OverBudget>() {
            StageError::OutputBudget {
                stage,
                message: over.to_string(),
            }
        } else if self.store.data().memory.hit {
            StageError::MemoryLimit {
                stage,
                limit_bytes: self.spec.limits.memory_bytes,
            }
        } else {
            StageError::Trap {
                stage,
                message: format!("{what}: {}", error_text(&e)),
            }
        })
    }
}

/// Looks up `process` in the `stage` export (the same semver-aware name
/// lookup the typed bindings use), checked against the budgeted types.
fn process_export(
    store: &mut Store<StoreData>,
    instance: &wasmtime::component::Instance,
) -> wasmtime::Result<Func> {
    let func = export_func(store, instance, super::runtime::STAGE_EXPORT, "process")?
        .ok_or_else(|| wasmtime::format_err!("no export {}", super::runtime::STAGE_EXPORT))?;
    func.typed::<(&[Event],), (ProcessResult,)>(&*store)?;
    Ok(func)
}

/// Test hook (`PIPELINE_TEST_ROW_CALLS=1`): batches go to `process` even
/// where a stage exports `columns`, so a test can hold the two paths of
/// one stage to the same results.
fn test_row_calls() -> bool {
    static ROWS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ROWS.get_or_init(|| std::env::var_os("PIPELINE_TEST_ROW_CALLS").is_some_and(|v| v == "1"))
}

/// `process-columns` in the `columns` export, if the stage has one. A
/// `columns` export whose function is missing or of another type is an
/// error, not a reason to fall back: the stage meant to have it.
fn columns_export(
    store: &mut Store<StoreData>,
    instance: &wasmtime::component::Instance,
) -> wasmtime::Result<Option<Func>> {
    let Some(func) = export_func(
        store,
        instance,
        super::runtime::COLUMNS_EXPORT,
        "process-columns",
    )?
    else {
        return Ok(None);
    };
    func.typed::<(&EventColumns,), (ColumnsResult,)>(&*store)
        .map_err(|e| e.context("its `columns` export does not match the WIT"))?;
    Ok(Some(func))
}

/// Function `name` of the exported interface `interface`: `None` if the
/// interface is not exported, an error if it lacks the function.
fn export_func(
    store: &mut Store<StoreData>,
    instance: &wasmtime::component::Instance,
    interface: &str,
    name: &str,
) -> wasmtime::Result<Option<Func>> {
    let Some(exported) = instance.get_export_index(&mut *store, None, interface) else {
        return Ok(None);
    };
    let func = instance
        .get_export_index(&mut *store, Some(&exported), name)
        .ok_or_else(|| wasmtime::format_err!("no function `{name}` in {interface}"))?;
    instance
        .get_func(&mut *store, func)
        .map(Some)
        .ok_or_else(|| wasmtime::format_err!("`{name}` in {interface} is not a function"))
}
