//! Reference programs for `cargo xtask bench`, in their own object (the daemon never loads
//! it): what an `SK_REUSEPORT` program costs at the least (`ref_pass` only returns
//! `SK_PASS`), and what any table-steered program must at least do (`ref_select`: one array
//! lookup and one `select_reuseport`). portshard's select path is measured against the second.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::sk_action::SK_PASS,
    macros::{map, sk_reuseport},
    maps::{Array, ReusePortSockArray},
    programs::SkReuseportContext,
};
use portshard_common::reference::SLOTS;

mod runtime;

/// Slot number to listening socket (`reference::SOCKETS`).
#[map(name = "ref_sockets")]
static SOCKETS: ReusePortSockArray = ReusePortSockArray::with_max_entries(SLOTS, 0);

/// The slot each masked hash goes to (`reference::SLOT_OF`).
#[map(name = "ref_slots")]
static SLOT_OF: Array<u32> = Array::with_max_entries(SLOTS, 0);

/// The floor: no work at all, the kernel's own hash picks (`reference::PASS`).
#[sk_reuseport]
pub fn ref_pass(_ctx: SkReuseportContext) -> u32 {
    SK_PASS
}

/// One array lookup and one selection (`reference::SELECT`).
#[sk_reuseport]
pub fn ref_select(ctx: SkReuseportContext) -> u32 {
    if let Some(&slot) = SLOT_OF.get(ctx.hash() & (SLOTS - 1)) {
        let _ = SOCKETS.select_reuseport(&ctx, slot);
    }
    SK_PASS
}
