//! Reference programs for `cargo xtask bench`, in their own object (the daemon never loads
//! it): what an `SK_REUSEPORT` program costs at the least (`ref_pass` only returns
//! `SK_PASS`), and what any table-steered program must at least do (`ref_select`: one array
//! lookup and one `select_reuseport`), the same over an array as large as portshard's table
//! (`ref_select_table`). portshard's select path is measured against the second, and the
//! third shows what of its cost is the table's size.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::sk_action::SK_PASS,
    macros::{map, sk_reuseport},
    maps::{Array, ReusePortSockArray},
    programs::SkReuseportContext,
};
use portshard_common::{TABLE_MASK, TABLE_SIZE, reference::SLOTS};

mod runtime;

/// Slot number to listening socket (`reference::SOCKETS`).
#[map(name = "ref_sockets")]
static SOCKETS: ReusePortSockArray = ReusePortSockArray::with_max_entries(SLOTS, 0);

/// The slot each masked hash goes to (`reference::SLOT_OF`).
#[map(name = "ref_slots")]
static SLOT_OF: Array<u32> = Array::with_max_entries(SLOTS, 0);

/// The slot each masked hash goes to, as many entries as portshard's table
/// (`reference::TABLE_SLOT_OF`).
#[map(name = "ref_table")]
static TABLE_SLOT_OF: Array<u32> = Array::with_max_entries(TABLE_SIZE as u32, 0);

/// Slot number to listening socket of `ref_select_table`'s group
/// (`reference::TABLE_SOCKETS`).
#[map(name = "ref_table_sockets")]
static TABLE_SOCKETS: ReusePortSockArray = ReusePortSockArray::with_max_entries(SLOTS, 0);

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

/// One lookup in an array of portshard's table size and one selection
/// (`reference::SELECT_TABLE`).
#[sk_reuseport]
pub fn ref_select_table(ctx: SkReuseportContext) -> u32 {
    if let Some(&slot) = TABLE_SLOT_OF.get(ctx.hash() & TABLE_MASK) {
        let _ = TABLE_SOCKETS.select_reuseport(&ctx, slot);
    }
    SK_PASS
}
