//! kallsyms: fuzz bytes become guest memory behind a fixed page table
//! (`TEXT` -> `DATA`), then `Kallsyms::locate` runs from LSTAR.
//!
//! First byte = mode:
//! - 0: the rest is the kernel image as is (text page at LSTAR first);
//! - 1: a valid kallsyms blob, edited by the rest (13-byte edits);
//! - 2: like 1, and the edits may also hit the page tables (the whole
//!   physical memory is the edit target).
#![no_main]

use introspect::kallsyms::Kallsyms;
use introspect::AddressSpace;
use introspect_fuzz::{kallsyms_blob, kallsyms_image, mapped_memory, mutate, TEXT};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let lstar = TEXT + 0x40;
    let mem = match mode % 3 {
        0 => {
            let mut image = vec![0u8; 0x1000];
            image[0x40..0x43].copy_from_slice(&[0x0f, 0x01, 0xf8]);
            image.extend_from_slice(rest);
            mapped_memory(&image, &[])
        }
        1 => {
            let mut blob = kallsyms_blob();
            mutate(&mut blob, rest);
            let (image, holes) = kallsyms_image(&blob);
            mapped_memory(&image, &holes)
        }
        _ => {
            let (image, holes) = kallsyms_image(&kallsyms_blob());
            let mut mem = mapped_memory(&image, &holes);
            mutate(&mut mem.0, rest);
            mem
        }
    };
    let space = AddressSpace::new(&mem, 0x1000, false);
    let Ok(k) = Kallsyms::locate(&space, lstar) else { return };
    // Whatever decoded answers every query without panicking.
    let _ = k.lookup("entry_SYSCALL_64");
    let _ = k.lookup_unique("dup");
    for pos in 0..4 {
        let _ = k.address_of("dup", pos);
    }
    for addr in [0, 0x20, TEXT, TEXT + 0x41, TEXT + 0x3fff, TEXT + 0x7000, u64::MAX, lstar] {
        if let Some(s) = k.resolve(addr) {
            assert!(s.addr <= addr && s.offset == addr - s.addr);
            let _ = s.format();
        }
    }
    assert_eq!(k.symbols().count(), k.len());
    assert_eq!(k.symbols_by_addr().count(), k.len());
    let _ = (k.text_range(), k.kernel_range(), k.tables());
});
