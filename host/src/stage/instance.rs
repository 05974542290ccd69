//! One live instance of a stage component: its own store (memory cap,
//! epoch deadline, WASI context per the stage's grants) and the typed
//! handle to its exports.
//!
//! Lifecycle: `start` instantiates and calls `init` once; then `process`
//! per batch, `snapshot` whenever the host commits state, and `restore`
//! only right after `start`. An instance that has trapped is never used
//! again: wasmtime leaves its memory in an unknown state.

use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::ResourceTable;
use wasmtime::Store;
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtxBuilder};

use super::bindings::{BatchResult, Event, Plugin};
use super::manifest::StageSpec;
use super::runtime::{error_text, LoadedComponent, MemoryLimiter, Runtime, StoreData, EPOCH_TICK};
use super::StageError;

pub struct StageInstance {
    pub spec: Arc<StageSpec>,
    pub component: Arc<LoadedComponent>,
    store: Store<StoreData>,
    plugin: Plugin,
    poisoned: bool,
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
            memory: MemoryLimiter {
                max_bytes: spec.limits.memory_bytes,
                hit: false,
            },
        };
        let mut store = Store::new(runtime.engine(), data);
        store.limiter(|data| &mut data.memory);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(ticks(spec.limits.time_per_batch));

        let plugin = component
            .pre
            .instantiate(&mut store)
            .map_err(|e| StageError::Init {
                stage: spec.name.clone(),
                message: format!("cannot instantiate: {}", error_text(&e)),
            })?;
        let mut instance = StageInstance {
            spec,
            component,
            store,
            plugin,
            poisoned: false,
        };
        let config = instance.spec.config.clone();
        match instance.call("init", |plugin, store| {
            plugin.ecommerce_pipeline_stage().call_init(store, &config)
        })? {
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

    /// Runs one batch. A trap, a time-out or an error the stage returns all
    /// come back as `Err`.
    pub fn process(&mut self, batch: &[Event]) -> Result<BatchResult, StageError> {
        match self.call("process", |plugin, store| {
            plugin.ecommerce_pipeline_stage().call_process(store, batch)
        })? {
            Ok(result) => Ok(result),
            Err(message) => Err(StageError::Refused {
                stage: self.spec.name.clone(),
                message,
            }),
        }
    }

    pub fn snapshot(&mut self) -> Result<Vec<u8>, StageError> {
        self.call("snapshot", |plugin, store| {
            plugin.ecommerce_pipeline_stage().call_snapshot(store)
        })
    }

    /// Loads a snapshot. `Ok(Err(reason))` means the stage cannot read it.
    pub fn restore(&mut self, state: &[u8]) -> Result<Result<(), String>, StageError> {
        self.call("restore", |plugin, store| {
            plugin.ecommerce_pipeline_stage().call_restore(store, state)
        })
    }

    /// Marks the instance as not to be used again.
    pub fn retire(&mut self) {
        self.poisoned = true;
    }

    /// Whether a call has trapped: the instance must then be replaced.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Calls into the guest with a fresh time budget, and turns a trap into
    /// an error that says what happened (time-out, memory cap, or trap).
    fn call<R>(
        &mut self,
        what: &str,
        f: impl FnOnce(&Plugin, &mut Store<StoreData>) -> wasmtime::Result<R>,
    ) -> Result<R, StageError> {
        if self.poisoned {
            return Err(StageError::Trap {
                stage: self.spec.name.clone(),
                message: "instance already trapped".into(),
            });
        }
        self.store
            .set_epoch_deadline(ticks(self.spec.limits.time_per_batch));
        self.store.data_mut().memory.hit = false;
        let result = f(&self.plugin, &mut self.store);
        result.map_err(|e| {
            self.poisoned = true;
            let stage = self.spec.name.clone();
            if matches!(
                e.downcast_ref::<wasmtime::Trap>(),
                Some(wasmtime::Trap::Interrupt)
            ) {
                StageError::TimeLimit {
                    stage,
                    limit: self.spec.limits.time_per_batch,
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
            }
        })
    }
}

fn ticks(limit: Duration) -> u64 {
    (limit.as_nanos() / EPOCH_TICK.as_nanos()).max(1) as u64 + 1
}
