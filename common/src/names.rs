//! Names of the program and of the maps: ELF symbols on the eBPF side, pin file names
//! (`<bpffs root>/<service>/<name>`) on the user side. At most 15 bytes each (kernel limit).

/// The `SK_REUSEPORT` select-or-migrate program.
pub const PROGRAM: &str = "steer";
/// Where a new program is pinned before it is renamed over [`PROGRAM`] (the BPF
/// filesystem refuses names with a dot).
pub const PROGRAM_STAGED: &str = "steer_new";
/// `REUSEPORT_SOCKARRAY`: slot number to socket, of the service's first listener.
pub const SOCKETS: &str = "sockets";
/// `REUSEPORT_SOCKARRAY` of the service's second listener (a reuseport group is per
/// transport and address, and a socket array selects only within one group).
pub const SOCKETS_1: &str = "sockets_1";
/// `REUSEPORT_SOCKARRAY` of the service's third listener.
pub const SOCKETS_2: &str = "sockets_2";
/// `REUSEPORT_SOCKARRAY` of the service's fourth listener.
pub const SOCKETS_3: &str = "sockets_3";
/// The socket array of each listener, by listener index ([`crate::MAX_LISTENERS`]).
pub const LISTENER_SOCKETS: [&str; crate::MAX_LISTENERS] =
    [SOCKETS, SOCKETS_1, SOCKETS_2, SOCKETS_3];
/// Array of [`crate::ServiceMeta`], one per listener ([`crate::MAX_LISTENERS`]): what
/// each of the service's listeners listens on; entries past the last listener are
/// zero. Pins of layouts before 4 have none: their one listener is in [`SERVICE`].
pub const LISTENERS: &str = "listeners";
/// Array of [`crate::SlotCookies`], one per slot: the cookie of each of the slot's
/// sockets, listener by listener, so a socket of any listener tells as portshard's.
pub const COOKIES: &str = "slot_cookies";
/// Array with one [`crate::Table`] value: the consistent lookup table.
pub const TABLE: &str = "table";
/// Array of [`crate::SlotMeta`], one per slot, for the CLI and for a restarting daemon.
pub const SLOTS: &str = "slots";
/// Per-CPU array with one [`crate::Counters`] value.
pub const COUNTERS: &str = "counters";
/// Array with one [`crate::ServiceMeta`] value: what the service listens on.
pub const SERVICE: &str = "service";
/// Hash from a UDP flow's [`crate::FlowKey`] to its [`crate::Flow`]: the flow table.
pub const FLOWS: &str = "flow_table";
/// Array of [`crate::PendingFlow`], [`crate::ADMIT_SIZE`] records: flows seen once,
/// waiting for a second datagram to be admitted to the flow table.
pub const ADMISSION: &str = "flow_admit";
/// Per-CPU array with one [`crate::FlowCounters`] value: the flow table's events.
pub const FLOW_COUNTERS: &str = "flow_events";
/// Array with one `u64`: flows the daemon removed from the flow table as idle. Only
/// userspace writes it; the table holds `flows_new` minus this many flows.
pub const FLOW_SWEPT: &str = "flow_swept";
/// The flow table of pin layouts 1 and 2 (an LRU hash keyed by the flow hash alone),
/// removed when pins are migrated to layout 3.
pub const LEGACY_FLOWS: &str = "flows";
/// Hash of health-probe source port (`u32`) to its [`crate::ProbeRoute`].
pub const PROBES: &str = "probes";
/// Array of [`crate::ProbeHealth`], one per slot: the daemon's probe results.
pub const HEALTH: &str = "health";
/// Array with one `u32`: the pin layout version ([`crate::PIN_LAYOUT`]) the pins were
/// written in, so a build never reuses pins it does not understand.
pub const LAYOUT: &str = "layout";
/// Per-CPU array with one [`crate::quic::QuicCounters`] value: how QUIC packets were
/// steered.
pub const QUIC_COUNTERS: &str = "quic_events";
/// Array with one [`crate::quic::QuicKey`]: the key of a service whose workers encrypt
/// their connection IDs, and the round keys the program decrypts them with.
pub const QUIC_KEY: &str = "quic_key";
/// The maps pin layout 3 added, created when older pins are migrated.
pub const ADDED_IN_LAYOUT_3: [&str; 4] = [FLOWS, ADMISSION, FLOW_COUNTERS, FLOW_SWEPT];
/// The maps pin layout 4 added (the QUIC counters and key, the other listeners' socket
/// arrays, the listeners' addresses and their sockets' cookies), created when older pins
/// are migrated.
pub const ADDED_IN_LAYOUT_4: [&str; 7] = [
    QUIC_COUNTERS,
    SOCKETS_1,
    SOCKETS_2,
    SOCKETS_3,
    LISTENERS,
    COOKIES,
    QUIC_KEY,
];

/// Every map the program's object defines, in a fixed order: those every layout has, then
/// those each later layout added.
pub const MAPS: [&str; 19] = concat(&[
    &[
        SOCKETS, TABLE, SLOTS, COUNTERS, SERVICE, PROBES, HEALTH, LAYOUT,
    ],
    &ADDED_IN_LAYOUT_3,
    &ADDED_IN_LAYOUT_4,
]);

/// The names of `lists` one after the other; `N` must be their total length.
const fn concat<const N: usize>(lists: &[&[&'static str]]) -> [&'static str; N] {
    let mut all = [""; N];
    let mut at = 0;
    let mut list = 0;
    while list < lists.len() {
        let mut index = 0;
        while index < lists[list].len() {
            all[at] = lists[list][index];
            at += 1;
            index += 1;
        }
        list += 1;
    }
    assert!(at == N, "N is the lists' total length");
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_map_is_named_once() {
        for (index, name) in MAPS.iter().enumerate() {
            assert!(!MAPS[index + 1..].contains(name), "{name}");
        }
    }
}
