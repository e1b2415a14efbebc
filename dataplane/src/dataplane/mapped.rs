//! The table map, memory-mapped, so userspace rewrites changed entries with atomic stores
//! and no syscalls.
use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
    ptr::NonNull,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::maps::MapData;
use portshard_common::{FLAGS_WORD, FLOW_IDLE_WORD, Table, TableEntry};

use super::{DataplaneError, Result};

/// The table map, memory-mapped: userspace reads and writes entries as 32-bit words.
pub(super) struct MappedTable {
    words: NonNull<AtomicU32>,
    _map: MapData,
}

// SAFETY: the mapping is shared memory accessed only through atomics.
unsafe impl Send for MappedTable {}
unsafe impl Sync for MappedTable {}

impl MappedTable {
    const BYTES: usize = size_of::<Table>();

    pub(super) fn new(map: MapData, path: &Path) -> Result<Self> {
        let fd = map.fd().as_fd().as_raw_fd();
        // SAFETY: maps a BPF_F_MMAPABLE array whose single value is exactly `BYTES` long
        // (checked against the object's spec when opened); the mapping lives as long as `self`.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                Self::BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DataplaneError::Mmap {
                path: path.to_path_buf(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self {
            words: NonNull::new(ptr.cast()).expect("mmap never returns null on success"),
            _map: map,
        })
    }

    /// Entry `index`, or the flags word at [`FLAGS_WORD`], or the idle word after it.
    fn word(&self, index: usize) -> &AtomicU32 {
        assert!(index <= FLOW_IDLE_WORD, "table word {index} out of range");
        // SAFETY: in bounds of the mapping, 4-byte aligned (page-aligned base).
        unsafe { self.words.add(index).as_ref() }
    }

    /// Sets the flags word the program reads with each entry.
    pub(super) fn set_flags(&self, flags: u32) {
        self.word(FLAGS_WORD).store(flags, Ordering::Relaxed);
    }

    /// The flags word.
    pub(super) fn flags(&self) -> u32 {
        self.word(FLAGS_WORD).load(Ordering::Relaxed)
    }

    /// Sets the flow idle time, in seconds, the program reads with the flags.
    pub(super) fn set_flow_idle(&self, seconds: u32) {
        self.word(FLOW_IDLE_WORD).store(seconds, Ordering::Relaxed);
    }

    /// The flow idle time, in seconds.
    pub(super) fn flow_idle(&self) -> u32 {
        self.word(FLOW_IDLE_WORD).load(Ordering::Relaxed)
    }

    pub(super) fn store(&self, index: usize, entry: TableEntry) {
        self.word(index).store(entry.to_word(), Ordering::Relaxed);
    }

    pub(super) fn load(&self, index: usize) -> TableEntry {
        TableEntry::from_word(self.word(index).load(Ordering::Relaxed))
    }
}

impl Drop for MappedTable {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        unsafe { libc::munmap(self.words.as_ptr().cast(), Self::BYTES) };
    }
}
