//! `BPF_MAP_LOOKUP_BATCH` over a hash map: thousands of entries per syscall, so a million
//! flows are read in a few hundred calls rather than two million (`get_next_key` and a
//! lookup per flow). aya 0.14 has no batch operations; this is the one syscall, on the
//! map's file descriptor.
use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{Pod, maps::MapData};

/// Entries asked for per call at first; doubled when one hash bucket holds more.
const FIRST_CHUNK: u32 = 4096;

/// `BPF_MAP_LOOKUP_BATCH`, from `linux/bpf.h`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The `batch` member of `union bpf_attr`, as `linux/bpf.h` lays it out.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every `(key, value)` of the hash map `map`, read in batches. Entries added or removed
/// meanwhile may be missed or seen: a snapshot for counting and listing, not a transaction.
pub(super) fn read_all<K: Pod, V: Pod>(map: &MapData) -> io::Result<Vec<(K, V)>> {
    let mut entries = Vec::new();
    let mut chunk = FIRST_CHUNK;
    // The position in the map: a bucket number for hash maps, opaque to userspace.
    let mut position = [0u64; 1];
    let mut next = [0u64; 1];
    let mut started = false;
    loop {
        let mut keys: Vec<K> = Vec::with_capacity(chunk as usize);
        let mut values: Vec<V> = Vec::with_capacity(chunk as usize);
        let mut attr = BatchAttr {
            in_batch: if started { position.as_ptr() as u64 } else { 0 },
            out_batch: next.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` is a valid `bpf_attr` prefix of the size passed; the kernel writes
        // at most `count` keys and values into buffers with room for `count` of each, and
        // one position into `next`.
        let result = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>() as u32,
            )
        };
        let error = (result < 0).then(io::Error::last_os_error);
        let got = attr.count.min(chunk) as usize;
        // SAFETY: the kernel wrote `got` whole keys and values (plain data, any bytes valid).
        unsafe {
            keys.set_len(got);
            values.set_len(got);
        }
        entries.extend(keys.into_iter().zip(values));
        match error {
            None => {}
            // The end of the map; what this last call found is in `entries`.
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(entries),
            // One bucket holds more entries than asked for: ask for more, from the same place.
            Some(e) if e.raw_os_error() == Some(libc::ENOSPC) && got == 0 => {
                chunk = chunk.saturating_mul(2);
                continue;
            }
            Some(e) => return Err(e),
        }
        position = next;
        started = true;
    }
}
