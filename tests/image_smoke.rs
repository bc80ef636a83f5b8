//! The saved-image path: a snapshot opens as physical memory plus vCPU
//! state, and its kernel text is reachable through the vCPU's page tables.

mod common;

use hyperpatch::guest::SnapshotImage;
use introspect::{AddressSpace, KernelMemory};

#[test]
fn snapshot_opens_and_lstar_is_mapped_kernel_text() {
    let snap = common::ready_snapshot(1);
    let img = SnapshotImage::open(&snap).unwrap();
    assert_eq!(img.cpus.len(), 1);
    let cpu = img.cpus[0];
    assert!(cpu.lstar >= 0xffff_ffff_8000_0000, "LSTAR {:#x}", cpu.lstar);
    let a = AddressSpace::new(&img.mem, cpu.cr3, cpu.la57());
    // entry_SYSCALL_64 begins with swapgs (0f 01 f8), after endbr64 on
    // kernels with IBT (the 6.12 line).
    let b = a.read_bytes(cpu.lstar, 7).unwrap();
    let swapgs = if b[..4] == [0xf3, 0x0f, 0x1e, 0xfa] { &b[4..7] } else { &b[..3] };
    assert_eq!(swapgs, [0x0f, 0x01, 0xf8], "bytes at LSTAR {:#x}: {b:02x?}", cpu.lstar);
}
