//! Typed bindings generated from `wit/` (the `plugin` world).
//!
//! The generated `Event` is the host's event type end to end: the parser
//! builds it, stages receive and return it, the sink encodes it. Using one
//! type avoids a conversion copy at each boundary.

wasmtime::component::bindgen!({
    world: "plugin",
    path: "../wit",
    additional_derives: [PartialEq, Eq, Hash],
    // Guest calls are futures: the stage's call wraps each in a timeout,
    // so the time limit also covers time spent in host calls.
    exports: { default: async },
});

pub use ecommerce::pipeline::types::{BatchResult, Event, Rejected};
