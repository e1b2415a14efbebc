//! What every object of this crate carries besides its programs: a panic handler and a
//! license.

/// Only for the BPF target: a host check of this crate (clippy over the workspace) links
/// `std`, whose panic handler would clash.
#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// The kernel checks the license of programs that call GPL-only helpers; ours call none,
/// but the verifier log is clearer with one.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
