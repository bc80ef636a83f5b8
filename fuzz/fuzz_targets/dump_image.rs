//! Dump files: a file made of fuzz bytes is opened with `DumpImage::open`,
//! then read at many guest-physical addresses and through vCPU 0's page
//! tables.
//!
//! First byte = mode: 0 = the rest is the file; otherwise a valid dump
//! (written by `write_dump`) edited by the rest (13-byte edits).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use introspect::image::{write_dump, DumpImage};
use introspect::memory::PhysMem;
use introspect::{AddressSpace, CpuState, KernelMemory};
use introspect_fuzz::mutate;
use libfuzzer_sys::fuzz_target;

fn scratch() -> PathBuf {
    std::env::temp_dir().join(format!("introspect-fuzz-dump-{}", std::process::id()))
}

/// A small valid dump: two memory regions (one page apart) and two vCPUs.
fn valid_dump() -> &'static [u8] {
    static DUMP: OnceLock<Vec<u8>> = OnceLock::new();
    DUMP.get_or_init(|| {
        let path = scratch().with_extension("seed");
        let mem: Vec<u8> = (0..0x6000u32).map(|i| (i % 253) as u8).collect();
        let cpus = vec![
            CpuState { rip: 0xffff_ffff_8100_0040, cr3: 0x1000, lstar: 0xffff_ffff_8100_0040, ..Default::default() },
            CpuState { cs: 0x33, cr3: 0x2000, cr4: 1 << 12, ..Default::default() },
        ];
        let read = |a: u64, b: &mut [u8]| -> introspect::Result<()> {
            b.copy_from_slice(&mem[a as usize..a as usize + b.len()]);
            Ok(())
        };
        write_dump(&path, &cpus, &[(0, 0x3000), (0x4000, 0x2000)], &read).expect("write seed dump");
        let bytes = std::fs::read(&path).expect("read seed dump");
        let _ = std::fs::remove_file(&path);
        bytes
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let file = if mode % 2 == 0 {
        rest.to_vec()
    } else {
        let mut f = valid_dump().to_vec();
        mutate(&mut f, rest);
        f
    };
    let path = scratch();
    std::fs::write(&path, &file).expect("write scratch dump");
    let img = DumpImage::open(&path);
    let _ = std::fs::remove_file(&path);
    let Ok(img) = img else { return };
    let size = img.phys_size();
    let mut buf = vec![0u8; 0x2000];
    for addr in [0, 0xff8, 0x1000, 0x2ffc, 0x3000, 0x4000, size.saturating_sub(8), size, u64::MAX - 3, u64::MAX] {
        for len in [1usize, 8, 0x1000, 0x2000] {
            let r = img.read_phys(addr, &mut buf[..len]);
            if addr.checked_add(len as u64).is_none_or(|e| e > size) {
                assert!(r.is_err(), "read past phys_size {size:#x} at {addr:#x}+{len}");
            }
        }
    }
    for cpu in img.cpus.iter().take(4) {
        let space = AddressSpace::new(&img, cpu.cr3, cpu.la57());
        for va in [cpu.rip, cpu.rsp, cpu.lstar, 0, 0xffff_8880_0000_0000] {
            let _ = space.read_u64(va);
        }
    }
});
