//! The host of the ecommerce event pipeline: CSV files in, WebAssembly
//! stages in the middle, PostgreSQL out, exactly once.
//!
//! ```text
//! source (files) -> parse -> batch -> stages (wasm) -> sink (postgres)
//! ```
//! Each arrow is a bounded channel; see `pipeline` for the wiring.

pub mod batch;
pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod embedded;
pub mod fsutil;
pub mod generate;
pub mod http;
pub mod jetstream;
pub mod metrics;
pub mod parse;
pub mod pause;
pub mod pipeline;
pub mod plugin_test;
pub mod plugins;
pub mod progress;
pub mod publish;
pub mod quarantine;
pub mod replay;
pub mod scaffold;
pub mod sink;
pub mod source;
pub mod stage;
pub mod status;
pub mod top;
pub mod watch;
