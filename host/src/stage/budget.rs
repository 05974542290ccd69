//! The output budget: a bound on what one `process` call may make the host
//! allocate when its result is lifted out of the guest.
//!
//! Why: a stage's result is copied into host `Vec`s and `String`s by the
//! canonical ABI lift. Guest memory is capped, but the lift is not: a
//! result whose million list entries all point at one large guest string
//! makes the host allocate a million copies, far past any memory cap, and
//! the host is OOM-killed before any check of the output could run.
//!
//! How: `process` is called through its own typed function whose result
//! type mirrors `result<batch-result, string>` with two wrapper types,
//! [`Budgeted`] strings and [`BudgetedList`]s. Their `Lift` reads the
//! length from the guest's (pointer, length) pair first, charges it
//! against the budget of the current call, and only then lets wasmtime
//! copy the data. The charge is made inside the lift, while the guest's
//! return area is still intact (wasmtime calls the guest's post-return,
//! which frees it, right after lifting), so nothing is read from freed
//! guest memory and nothing is allocated past the budget: a list charges
//! `len * size_of::<element>()` before its `Vec` is reserved, a string
//! its length before it is copied. Lazily lifted `WasmList`/`WasmStr`
//! results were the other way considered: they point into memory the
//! post-return has already freed, so their contents cannot be trusted.
//!
//! The budget of a call lives in a thread-local: the lift runs on the
//! calling thread (on the wasmtime fiber, which shares the thread's
//! locals), one call at a time per thread, and the lift functions get no
//! handle to the store. [`Charge`] sets it for the extent of one call.

use std::cell::Cell;

use wasmtime::component::__internal::{CanonicalAbiInfo, InstanceType, InterfaceType, LiftContext};
use wasmtime::component::{ComponentType, Lift, WasmList};
use wasmtime::ValRaw;

use super::bindings::{BatchResult, Event, Rejected};

/// What a call may lift beyond the input's own size: room for rejection
/// reasons and a refusal message on a small batch.
pub const FIXED_ALLOWANCE: usize = 1 << 20;

/// How many times the input's size a result may take: a stage that keeps
/// every event and rejects none returns about 1x.
pub const INPUT_FACTOR: usize = 4;

/// The budget for the result of `process` on `batch`, in bytes.
pub fn for_batch(batch: &[Event]) -> usize {
    let input: usize = batch
        .iter()
        .map(|e| std::mem::size_of::<Event>() + e.event_id.len() + e.event_type.len())
        .sum();
    input
        .saturating_mul(INPUT_FACTOR)
        .saturating_add(FIXED_ALLOWANCE)
}

/// The lift of a call's result went past its budget.
#[derive(Debug, Clone, thiserror::Error)]
#[error("its result would take more than its output budget of {budget} bytes in the host ({INPUT_FACTOR}x the input batch plus {FIXED_ALLOWANCE} bytes); the host refused to copy it")]
pub struct OverBudget {
    pub budget: usize,
}

thread_local! {
    /// (budget, bytes left) of the call in progress on this thread.
    static LEFT: Cell<Option<(usize, usize)>> = const { Cell::new(None) };
}

/// Sets the budget of one call on this thread; cleared on drop.
pub struct Charge(());

impl Charge {
    pub fn start(budget: usize) -> Charge {
        LEFT.with(|l| l.set(Some((budget, budget))));
        Charge(())
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        LEFT.with(|l| l.set(None));
    }
}

/// Takes `bytes` from the current call's budget. Outside a [`Charge`]
/// nothing is counted (these types are only lifted inside one).
pub(super) fn charge(bytes: usize) -> wasmtime::Result<()> {
    LEFT.with(|l| match l.get() {
        None => Ok(()),
        Some((budget, left)) => match left.checked_sub(bytes) {
            Some(rest) => {
                l.set(Some((budget, rest)));
                Ok(())
            }
            None => {
                l.set(Some((budget, 0)));
                Err(wasmtime::Error::new(OverBudget { budget }))
            }
        },
    })
}

/// Reads the length of a (pointer, length) pair lifted from core values.
fn flat_len(src: &[ValRaw; 2]) -> usize {
    src[1].get_u32() as usize
}

/// Reads the length of a (pointer, length) pair stored in guest memory
/// (32-bit memories: pointer at 0, length at 4, little-endian).
fn memory_len(bytes: &[u8]) -> usize {
    match bytes.get(4..8) {
        Some(b) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize,
        None => usize::MAX,
    }
}

/// A string whose copy is charged to the call's budget. The charge is its
/// length in code units: a UTF-16 guest's strings take at most 3x that
/// once transcoded, still a fixed factor.
#[repr(transparent)]
pub struct Budgeted(pub String);

unsafe impl ComponentType for Budgeted {
    type Lower = <String as ComponentType>::Lower;
    const ABI: CanonicalAbiInfo = <String as ComponentType>::ABI;

    fn typecheck(ty: &InterfaceType, types: &InstanceType<'_>) -> wasmtime::Result<()> {
        <String as ComponentType>::typecheck(ty, types)
    }
}

unsafe impl Lift for Budgeted {
    fn linear_lift_from_flat(
        cx: &mut LiftContext<'_>,
        ty: InterfaceType,
        src: &Self::Lower,
    ) -> wasmtime::Result<Self> {
        charge(flat_len(src))?;
        String::linear_lift_from_flat(cx, ty, src).map(Budgeted)
    }

    fn linear_lift_from_memory(
        cx: &mut LiftContext<'_>,
        ty: InterfaceType,
        bytes: &[u8],
    ) -> wasmtime::Result<Self> {
        charge(memory_len(bytes))?;
        String::linear_lift_from_memory(cx, ty, bytes).map(Budgeted)
    }
}

/// A list whose host `Vec` is charged before it is reserved.
pub struct BudgetedList<T>(pub Vec<T>);

unsafe impl<T: ComponentType> ComponentType for BudgetedList<T> {
    type Lower = <Vec<T> as ComponentType>::Lower;
    const ABI: CanonicalAbiInfo = <Vec<T> as ComponentType>::ABI;

    fn typecheck(ty: &InterfaceType, types: &InstanceType<'_>) -> wasmtime::Result<()> {
        <Vec<T> as ComponentType>::typecheck(ty, types)
    }
}

unsafe impl<T: Lift> Lift for BudgetedList<T> {
    fn linear_lift_from_flat(
        cx: &mut LiftContext<'_>,
        ty: InterfaceType,
        src: &Self::Lower,
    ) -> wasmtime::Result<Self> {
        charge(flat_len(src).saturating_mul(std::mem::size_of::<T>()))?;
        let list = WasmList::<T>::linear_lift_from_flat(cx, ty, src)?;
        T::linear_lift_list_from_memory(cx, &list).map(BudgetedList)
    }

    fn linear_lift_from_memory(
        cx: &mut LiftContext<'_>,
        ty: InterfaceType,
        bytes: &[u8],
    ) -> wasmtime::Result<Self> {
        charge(memory_len(bytes).saturating_mul(std::mem::size_of::<T>()))?;
        let list = WasmList::<T>::linear_lift_from_memory(cx, ty, bytes)?;
        T::linear_lift_list_from_memory(cx, &list).map(BudgetedList)
    }
}

/// `event` of the WIT, lifted with budgeted strings.
#[derive(ComponentType, Lift)]
#[component(record)]
pub struct LiftedEvent {
    #[component(name = "event-id")]
    event_id: Budgeted,
    #[component(name = "user-id")]
    user_id: i32,
    #[component(name = "event-type")]
    event_type: Budgeted,
    #[component(name = "product-id")]
    product_id: i32,
    #[component(name = "price-cents")]
    price_cents: i64,
    #[component(name = "event-time")]
    event_time: i64,
}

/// `rejected` of the WIT.
#[derive(ComponentType, Lift)]
#[component(record)]
pub struct LiftedRejected {
    event: LiftedEvent,
    reason: Budgeted,
}

impl From<LiftedRejected> for Rejected {
    fn from(r: LiftedRejected) -> Rejected {
        Rejected {
            event: r.event.into(),
            reason: r.reason.0,
        }
    }
}

/// `batch-result` of the WIT.
#[derive(ComponentType, Lift)]
#[component(record)]
pub struct LiftedBatchResult {
    events: BudgetedList<LiftedEvent>,
    rejected: BudgetedList<LiftedRejected>,
}

/// What `process` returns, as lifted under a budget.
pub type ProcessResult = Result<LiftedBatchResult, Budgeted>;

impl From<LiftedEvent> for Event {
    fn from(e: LiftedEvent) -> Event {
        Event {
            event_id: e.event_id.0,
            user_id: e.user_id,
            event_type: e.event_type.0,
            product_id: e.product_id,
            price_cents: e.price_cents,
            event_time: e.event_time,
        }
    }
}

impl From<LiftedBatchResult> for BatchResult {
    fn from(r: LiftedBatchResult) -> BatchResult {
        // Same size and alignment: `collect` reuses the lifted buffers.
        BatchResult {
            events: r.events.0.into_iter().map(Event::from).collect(),
            rejected: r.rejected.0.into_iter().map(Rejected::from).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_charge_past_the_budget_fails_and_nothing_is_counted_outside_a_call() {
        assert!(charge(usize::MAX).is_ok(), "no call in progress");
        let _call = Charge::start(100);
        assert!(charge(60).is_ok());
        assert!(charge(40).is_ok());
        let err = charge(1).unwrap_err();
        assert!(err.downcast_ref::<OverBudget>().is_some(), "{err}");
    }

    #[test]
    fn the_budget_grows_with_the_batch() {
        let event = Event {
            event_id: "x".repeat(36),
            user_id: 1,
            event_type: "view".into(),
            product_id: 1,
            price_cents: 1,
            event_time: 0,
        };
        assert_eq!(for_batch(&[]), FIXED_ALLOWANCE);
        let one = for_batch(std::slice::from_ref(&event)) - FIXED_ALLOWANCE;
        assert_eq!(one, INPUT_FACTOR * (std::mem::size_of::<Event>() + 40));
    }
}
