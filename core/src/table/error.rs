//! Why an operation is refused, and the checks of its arguments.
use portshard_common::{MAX_SLOTS, TABLE_SIZE};

use super::{MAX_WEIGHT, MIN_TABLE_SIZE, Slot};

/// Why a table operation was refused. A refused operation leaves the table unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// The slot number cannot name a socket.
    #[error("slot {slot} is out of range: slots are numbered 0 to {}", MAX_SLOTS - 1)]
    SlotOutOfRange {
        /// The offending slot.
        slot: Slot,
    },
    /// The slot is already a member of the table.
    #[error("slot {slot} is already in the table")]
    AlreadyMember {
        /// The offending slot.
        slot: Slot,
    },
    /// The slot is not a member of the table.
    #[error("slot {slot} is not in the table")]
    NotMember {
        /// The offending slot.
        slot: Slot,
    },
    /// Entries read back from the kernel do not form a table the operations could leave.
    #[error("the pinned table is inconsistent with its slot records: {reason}")]
    Inconsistent {
        /// The first invariant broken.
        reason: String,
    },
    /// A switch named a slot twice among the old or among the new slots.
    #[error("slot {slot} is named twice in a switch")]
    NamedTwice {
        /// The offending slot.
        slot: Slot,
    },
    /// A switch named no new slot: it would empty the table.
    #[error("a switch needs at least one new slot")]
    NoNewSlot,
    /// The table's size is not one the program can index.
    #[error(
        "a table of {size} entries is not possible: use a power of two from {MIN_TABLE_SIZE} to {TABLE_SIZE}"
    )]
    BadSize {
        /// The offending size.
        size: usize,
    },
    /// The weight is zero or too large.
    #[error("weight {weight} for slot {slot} is out of range: use 1 to {MAX_WEIGHT}")]
    BadWeight {
        /// The slot the weight was for.
        slot: Slot,
        /// The offending weight.
        weight: u32,
    },
}

pub(super) fn check_slot(slot: Slot) -> Result<(), TableError> {
    if u32::from(slot) < MAX_SLOTS {
        Ok(())
    } else {
        Err(TableError::SlotOutOfRange { slot })
    }
}

pub(super) fn check_size(size: usize) -> Result<(), TableError> {
    if size.is_power_of_two() && (MIN_TABLE_SIZE..=TABLE_SIZE).contains(&size) {
        Ok(())
    } else {
        Err(TableError::BadSize { size })
    }
}

pub(super) fn check_weight(slot: Slot, weight: u32) -> Result<(), TableError> {
    if (1..=MAX_WEIGHT).contains(&weight) {
        Ok(())
    } else {
        Err(TableError::BadWeight { slot, weight })
    }
}
