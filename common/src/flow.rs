//! The UDP flow table: a flow's key and value, its admission record before its second
//! datagram, and the events the program counts.

#[cfg(doc)]
use crate::names;

/// Records in the admission array ([`names::ADMISSION`]), in buckets of [`ADMIT_WAYS`].
/// A new flow's record goes in bucket `hash & ADMIT_BUCKET_MASK`, in a free or stale
/// record, else in place of the bucket's oldest: only when more than [`ADMIT_WAYS`] new
/// flows meet in one bucket before their second datagrams is one displaced.
pub const ADMIT_SIZE: u32 = 1 << 16;

/// Records per admission bucket, searched one by one on a flow table miss.
pub const ADMIT_WAYS: u32 = 8;

/// Mask that turns the flow hash into an admission bucket's number.
pub const ADMIT_BUCKET_MASK: u32 = ADMIT_SIZE / ADMIT_WAYS - 1;

/// Which flow a datagram belongs to: its source address and port as the packet carries
/// them, and the kernel's hash of its whole 4-tuple (which covers the destination, the
/// one part that differs between flows from one source only on a wildcard listener).
/// Two flows share a key only if they come from the same address and port and their
/// 4-tuples' hashes collide too.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// The source address; an IPv4 address fills the first 4 bytes, the rest are 0.
    pub source: [u8; 16],
    /// The source port, in network byte order as read from the UDP header.
    pub port: u16,
    /// 4 or 6: which IP header `source` was read from.
    pub family: u16,
    /// The kernel's reuseport hash of the flow's 4-tuple.
    pub hash: u32,
}

impl FlowKey {
    /// The source address and port.
    pub fn source(&self) -> core::net::SocketAddr {
        let port = u16::from_be(self.port);
        if self.family == 4 {
            let [a, b, c, d, ..] = self.source;
            core::net::SocketAddr::new(core::net::Ipv4Addr::new(a, b, c, d).into(), port)
        } else {
            core::net::SocketAddr::new(core::net::Ipv6Addr::from(self.source).into(), port)
        }
    }
}

/// A flow seen once: where its first datagram went. Its second datagram admits it to the
/// flow table with this slot, so a one-datagram flow (a DNS query, a spoofed flood) never
/// takes a flow table entry and never evicts an established flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingFlow {
    /// The flow.
    pub key: FlowKey,
    /// The slot its first datagram went to.
    pub slot: u16,
    /// Keeps `generation` aligned.
    pub reserved: u16,
    /// That slot's generation then.
    pub generation: u32,
    /// Coarse monotonic time (ns since boot) of its first datagram; 0 for an empty record.
    pub seen: u64,
}

/// The flow table's events, counted per CPU by the program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct FlowCounters {
    /// First datagrams of flows not in the table, recorded for admission.
    pub pending: u64,
    /// Admission records overwritten by another flow's first datagram before their own
    /// flow's second one: flows that stay unadmitted (a flood's mark).
    pub displaced: u64,
    /// Second datagrams whose flow could not be entered because the table was full: the
    /// flow follows the table, unkept.
    pub unkept: u64,
    /// Datagrams of known flows idle past `flow_idle`, steered as new flows.
    pub expired: u64,
    /// Datagrams of known flows whose slot now holds another generation's socket, steered
    /// by the table again rather than delivered there.
    pub reused_slot: u64,
}

impl FlowCounters {
    /// Adds `other` to these counters (to sum the CPUs' copies).
    pub fn add(&mut self, other: &Self) {
        self.pending = self.pending.wrapping_add(other.pending);
        self.displaced = self.displaced.wrapping_add(other.displaced);
        self.unkept = self.unkept.wrapping_add(other.unkept);
        self.expired = self.expired.wrapping_add(other.expired);
        self.reused_slot = self.reused_slot.wrapping_add(other.reused_slot);
    }
}

/// A flow table value: which slot (of which generation) a UDP flow belongs to. The program
/// delivers a flow's datagrams to its slot only while that slot holds the same generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    /// The slot whose socket receives the flow's datagrams.
    pub slot: u16,
    /// Keeps `generation` aligned.
    pub reserved: u16,
    /// The slot's generation when the flow was placed.
    pub generation: u32,
    /// Coarse monotonic time (ns since boot) of the flow's latest datagram.
    pub last_seen: u64,
}
