//! Page tables: fuzz bytes are guest-physical memory, page tables
//! included; translate and read many addresses from a CR3 in it, with 4-
//! and 5-level paging, and check the answers agree with each other.
//!
//! Input: flags (1 byte), CR3 page (1 byte), then memory. With flag bit 1
//! every present entry's address is folded into the memory, so walks go
//! deep (loops, shared tables, huge pages) instead of leaving RAM at once.
#![no_main]

use introspect::memory::{PhysMem, VecMemory};
use introspect::{AddressSpace, KernelMemory};
use introspect_fuzz::le;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let flags = data[0];
    let la57 = flags & 1 != 0;
    let mut phys = data[2..].to_vec();
    let pages = phys.len().div_ceil(0x1000).max(1) as u64;
    phys.resize((pages * 0x1000) as usize, 0);
    if flags & 2 != 0 {
        for w in phys.chunks_exact_mut(8) {
            let v = le::<8>(w, 0);
            if v & 1 != 0 {
                let page = ((v >> 12) & 0xff_ffff) % pages;
                let folded = (v & !0x000f_ffff_ffff_f000) | (page << 12);
                w.copy_from_slice(&folded.to_le_bytes());
            }
        }
    }
    let cr3 = ((u64::from(data[1]) % pages) * 0x1000) | (u64::from(flags) & 0x18);
    let mem = VecMemory(phys);
    let space = AddressSpace::new(&mem, cr3, la57);

    let mut vas: Vec<u64> = vec![
        0,
        0xfff,
        0xffff_ffff_8100_0000,
        0xffff_8880_0000_0000,
        0xff11_0000_0000_0000,
        0x0000_7fff_ffff_f000,
        0x0000_8000_0000_0000,
        0x00ff_ffff_ffff_f000,
        0x0100_0000_0000_0000,
        u64::MAX,
        u64::MAX - 0xffe,
    ];
    // Addresses taken from the memory itself (as a guest would hand them out).
    vas.extend(data.chunks(8).skip(1).take(64).map(|c| le::<8>(c, 0)));

    for &va in &vas {
        let t = space.translate(va);
        if let Ok(pa) = t {
            assert_eq!(pa & 0xfff, va & 0xfff, "page offset kept for {va:#x}");
            let page = space.translate(va & !0xfff).expect("the page of a translated address translates");
            assert_eq!(page | (va & 0xfff), pa);
            let fresh = AddressSpace::new(&mem, cr3, la57);
            assert_eq!(fresh.translate(va).ok(), Some(pa), "cache agrees with a fresh walk");
            let one = space.read_u8(va);
            assert_eq!(one.is_ok(), pa < mem.phys_size(), "read_u8({va:#x}) -> pa {pa:#x}");
        } else {
            assert!(space.read_u8(va).is_err());
        }
        let mut buf = vec![0u8; 0x1800];
        let _ = space.read_virt(va, &mut buf);
        let _ = space.read_virt(va.wrapping_sub(3), &mut buf[..8]);
        if let Ok(s) = space.read_cstr(va, 300) {
            assert!(s.len() <= 300 * 3, "lossy UTF-8 grows at most 3x");
        }
        let _ = space.read_u64(va);
        let _ = space.read_bytes(va, 64);
    }
    space.flush();
    let _ = space.translate(vas[2]);
});
