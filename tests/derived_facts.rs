//! Facts that vary with the kernel build come from the guest, checked
//! against what the build says (System.map, its config), and a guest that
//! hides them is refused by name: THREAD_SIZE, MODULES_VADDR, and the
//! page-table root.
//!
//! Page walks start from the kernel's own top-level table (`init_top_pgt`),
//! not from whatever page table vCPU 0 ran on. Under page-table isolation a
//! vCPU in user mode runs on the user copy of its page table, which maps
//! almost nothing of the kernel; the kernel copy is the 4 KiB page before
//! it. The test kernel has no PTI, so the user copy is built here, on the
//! saved guest, the way the kernel lays it out.

mod common;

use hyperpatch::guest::SnapshotImage;
use introspect::btf::Btf;
use introspect::kernel::{root_candidates, Kernel};
use introspect::memory::{PhysMem, VecMemory};
use introspect::{CpuState, KernelMemory};

/// The saved guest's RAM, plus two spare pages past its end (8 KiB aligned,
/// the way PTI allocates a kernel/user page-table pair): (memory, first
/// spare page).
fn ram_with_spare_pair(mem: &dyn PhysMem) -> (VecMemory, u64) {
    let size = mem.phys_size();
    let spare = (size + 0x1fff) & !0x1fff;
    let mut v = vec![0u8; (spare + 0x2000) as usize];
    for (i, page) in v.chunks_mut(4096).enumerate().take((size / 4096) as usize) {
        let _ = mem.read_phys(i as u64 * 4096, page);
    }
    (VecMemory(v), spare)
}

/// The physical address of `init_top_pgt`, through the kernel as opened.
fn init_top_pgt(k: &Kernel<'_>) -> u64 {
    k.mem.translate(k.sym("init_top_pgt").unwrap()).unwrap()
}

fn pids(k: &Kernel<'_>) -> Vec<i32> {
    k.tasks_brief().unwrap().iter().map(|t| t.pid).collect()
}

#[test]
fn reads_go_through_the_kernels_own_top_level_table() {
    let snap = common::ready_snapshot(1);
    let img = SnapshotImage::open(&snap).unwrap();
    let k = Kernel::open(&img.mem, img.cpus.clone()).unwrap();
    assert_eq!(k.mem.cr3(), init_top_pgt(&k), "the root is init_top_pgt");
    // THREAD_SIZE comes from the guest too: the build's System.map agrees.
    let map = std::fs::read_to_string(common::image_dir().join("System.map")).unwrap();
    let at = |name: &str| {
        map.lines().find_map(|l| l.strip_suffix(name).filter(|p| p.ends_with(" D ")).map(|p| u64::from_str_radix(&p[..16], 16).unwrap()))
    };
    let built = at("__end_init_task")
        .zip(at("__start_init_task"))
        .or_else(|| at("__end_init_stack").zip(at("__start_init_stack")))
        .map(|(e, s)| e - s);
    assert_eq!(Some(k.thread_size().unwrap()), built);
    let again = Kernel::from_parts(&img.mem, img.cpus.clone(), k.syms.clone(), btf_of(&k));
    assert_eq!(again.unwrap().mem.cr3(), k.mem.cr3());
}

/// `Btf` is not `Clone`: parsed again from the guest.
fn btf_of(k: &Kernel<'_>) -> Btf {
    Btf::from_memory(&k.mem, k.sym("__start_BTF").unwrap(), k.sym("__stop_BTF").unwrap()).unwrap()
}

#[test]
fn a_vcpu_in_user_mode_on_an_isolated_user_table_is_read_through_the_kernel_copy() {
    let snap = common::ready_snapshot(1);
    let img = SnapshotImage::open(&snap).unwrap();
    let clean = Kernel::open(&img.mem, img.cpus.clone()).unwrap();
    let (want_root, want_pids) = (clean.mem.cr3(), pids(&clean));
    let (mut ram, pair) = ram_with_spare_pair(&img.mem);
    // The kernel copy: the vCPU's own top-level table. The user copy, right
    // after it: maps nothing (PTI's maps the entry code only).
    let own = (img.cpus[0].cr3 & 0x000f_ffff_ffff_f000) as usize;
    let table = ram.0[own..own + 4096].to_vec();
    ram.0[pair as usize..pair as usize + 4096].copy_from_slice(&table);
    let mut cpus: Vec<CpuState> = img.cpus.clone();
    cpus[0].cr3 = pair + 0x1000;
    cpus[0].cs |= 3;
    assert_eq!(root_candidates(&cpus), vec![pair + 0x1000, pair], "the user copy, then the kernel copy before it");
    let k = Kernel::open(&ram, cpus.clone()).unwrap();
    assert_eq!(k.mem.cr3(), want_root, "read through init_top_pgt, not the copy");
    assert_eq!(pids(&k), want_pids);
    // The same through the host's table cache.
    let dir = common::scratch("page-root-cache").join("tables");
    let _ = std::fs::remove_dir_all(&dir);
    let cache = hyperpatch::table_cache::TableCache::at(dir);
    for _ in 0..2 {
        let (k, _) = cache.open_kernel(&ram, cpus.clone()).unwrap();
        assert_eq!(k.mem.cr3(), want_root);
        assert_eq!(pids(&k), want_pids);
    }
}

#[test]
fn no_vcpu_table_that_maps_the_kernel_is_a_clear_error() {
    let snap = common::ready_snapshot(1);
    let img = SnapshotImage::open(&snap).unwrap();
    let (ram, pair) = ram_with_spare_pair(&img.mem);
    let mut cpus: Vec<CpuState> = img.cpus.clone();
    cpus[0].cr3 = pair; // an empty table, in kernel mode
    let e = Kernel::open(&ram, cpus.clone()).err().expect("nothing maps the kernel");
    assert!(e.to_string().contains("no vCPU's page tables map the kernel's symbols"), "{e}");
    // Decoded symbols but no table that maps init_top_pgt: refused too.
    let clean = Kernel::open(&img.mem, img.cpus.clone()).unwrap();
    let e = Kernel::from_parts(&ram, cpus, clean.syms.clone(), btf_of(&clean)).err().expect("refused");
    assert!(e.to_string().contains("init_top_pgt"), "{e}");
}

#[test]
fn modules_vaddr_is_the_one_the_kernel_uses() {
    let snap = common::ready_snapshot(1);
    let img = SnapshotImage::open(&snap).unwrap();
    let k = Kernel::open(&img.mem, img.cpus.clone()).unwrap();
    // KERNEL_IMAGE_SIZE is 1 GiB with RANDOMIZE_BASE, else 512 MiB.
    let config = std::fs::read_to_string(common::image_dir().join("config")).unwrap();
    let image_size: u64 = if config.lines().any(|l| l == "CONFIG_RANDOMIZE_BASE=y") { 1 << 30 } else { 512 << 20 };
    let want = introspect::module_area::START_KERNEL_MAP + image_size;
    assert_eq!(k.modules_vaddr().unwrap(), want);

    if k.syms.lookup("module_alloc").is_empty() {
        // 6.10+: the start of execmem_info.ranges[EXECMEM_DEFAULT] moved
        // outside both choices' window: refused, by name.
        let range = k.off("execmem_info", "ranges").unwrap()
            + k.btf.struct_size("execmem_range").unwrap() * k.btf.enum_value(Some("execmem_type"), "EXECMEM_DEFAULT").unwrap() as u64
            + k.off("execmem_range", "start").unwrap();
        let mut starts = Vec::new();
        for sym in k.syms.lookup("execmem_info") {
            for base in [sym, k.mem.read_u64(sym).unwrap()] {
                if let Ok(v) = k.mem.read_u64(base + range) {
                    if v >= want && v - want <= 1024 * 4096 {
                        starts.push(base + range);
                    }
                }
            }
        }
        starts.dedup();
        assert_eq!(starts.len(), 1, "one execmem default range: {starts:x?}");
        let pa = k.mem.translate(starts[0]).unwrap() as usize;
        let (mut ram, _) = ram_with_spare_pair(&img.mem);
        ram.0[pa + 3] ^= 0x10;
        let bad = Kernel::open(&ram, img.cpus.clone()).unwrap();
        let e = bad.modules_vaddr().expect_err("refused");
        assert!(e.to_string().contains("MODULES_VADDR unknown") && e.to_string().contains("execmem_info"), "{e}");
        return;
    }
    // The immediate changed to another value: refused, by name.
    let f = k.sym("module_alloc").unwrap();
    let mut code = vec![0u8; 256];
    k.mem.read_virt(f, &mut code).unwrap();
    let imm = ((want as u32) as i32).to_le_bytes();
    let at = code.windows(4).position(|w| w == imm).expect("the immediate in module_alloc");
    let pa = k.mem.translate(f + at as u64).unwrap() as usize;
    let (mut ram, _) = ram_with_spare_pair(&img.mem);
    ram.0[pa + 3] ^= 0x08;
    let bad = Kernel::open(&ram, img.cpus.clone()).unwrap();
    let e = bad.modules_vaddr().expect_err("refused");
    assert!(e.to_string().contains("MODULES_VADDR unknown") && e.to_string().contains("module_alloc"), "{e}");
}

#[test]
fn ftrace_flag_bits_come_from_the_guests_btf_and_a_bad_one_is_refused() {
    let snap = common::ready_snapshot(1);
    let img = SnapshotImage::open(&snap).unwrap();
    let k = Kernel::open(&img.mem, img.cpus.clone()).unwrap();
    let bits = introspect::ftrace::FtraceFlagBits::from_btf(&k.btf).unwrap();
    // include/linux/ftrace.h: ENABLED bit 31 and DISABLED bit 25 in both
    // lines; FTRACE_REF_MAX_SHIFT 23 in 6.1 (its lowest flag is
    // FTRACE_FL_DIRECT_EN) and 19 in 6.12 (FTRACE_FL_CALL_OPS and three more
    // flags at bits 19-22).
    let ref_shift = if common::guest_line() == "6.1" { 23 } else { 19 };
    assert_eq!((bits.enabled, bits.disabled, bits.ref_mask), (1 << 31, 1 << 25, (1 << ref_shift) - 1));
    let records = k.ftrace_records().unwrap();
    assert!(records.by_ip.values().all(|r| r.bits == bits));

    // FTRACE_FL_DISABLED's value in the guest's BTF made two bits: the
    // records are refused, by name, rather than read with a guessed bit.
    let start = k.sym("__start_BTF").unwrap();
    let stop = k.sym("__stop_BTF").unwrap();
    let blob = Btf::read_blob(&k.mem, start, stop).unwrap();
    let str_off = u32::from_le_bytes(blob[16..20].try_into().unwrap()) as usize;
    let hdr = u32::from_le_bytes(blob[4..8].try_into().unwrap()) as usize;
    let strings = &blob[hdr + str_off..];
    let name_at = strings.windows(20).position(|w| w == b"\0FTRACE_FL_DISABLED\0").expect("the name") as u32 + 1;
    let mut entry = name_at.to_le_bytes().to_vec();
    entry.extend_from_slice(&(1u32 << 25).to_le_bytes());
    let at = blob.windows(8).position(|w| w == entry.as_slice()).expect("the btf_enum entry");
    let value_pa = k.mem.translate(start + at as u64 + 4).unwrap() as usize;
    let (mut ram, _) = ram_with_spare_pair(&img.mem);
    ram.0[value_pa] = 3;
    let bad = Kernel::open(&ram, img.cpus.clone()).unwrap();
    let e = bad.ftrace_records().err().expect("refused");
    assert!(e.to_string().contains("ftrace record flags unknown") && e.to_string().contains("FTRACE_FL_DISABLED"), "{e}");
}

#[test]
fn a_vcpu_caught_on_its_entry_stack_unwinds_reliably_to_user_mode() {
    // An interrupt from user mode: the CPU pushes the user frame onto the
    // entry stack the TSS names, and the vCPU is stopped at the first
    // instruction of the interrupt's entry code, before it moves to the
    // task stack.
    let snap = common::ready_snapshot(1);
    let img = SnapshotImage::open(&snap).unwrap();
    let k = Kernel::open(&img.mem, img.cpus.clone()).unwrap();
    let es = k.entry_stack(0).unwrap();
    assert_eq!(es.high - es.low, k.btf.struct_size("entry_stack").unwrap());
    assert!(es.low >= 0xffff_fe00_0000_0000, "in the CPU's entry area: {es:x?}");
    let frame = es.high - 5 * 8;
    let (mut ram, _) = ram_with_spare_pair(&img.mem);
    let pa = k.mem.translate(frame).unwrap() as usize;
    // rip, cs, rflags, rsp, ss of a user task.
    for (i, v) in [0x40_1000u64, 0x33, 0x202, 0x7ffc_0000, 0x2b].iter().enumerate() {
        ram.0[pa + i * 8..pa + i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    let mut cpus = img.cpus.clone();
    cpus[0].rip = k.sym("asm_sysvec_apic_timer_interrupt").unwrap();
    cpus[0].rsp = frame;
    cpus[0].cs = 0x10;
    let current = k.current_task(0).unwrap();
    drop(k);
    let k = Kernel::open(&ram, cpus).unwrap();
    let pid = k.tasks().unwrap().into_iter().find(|t| t.addr == current).map(|t| t.pid).unwrap();
    let st = k.task_stacks(&pid.to_string()).unwrap().into_iter().find(|s| s.running_on == Some(0)).expect("the task on vCPU 0");
    assert!(st.reliable, "{:?} {:?}", st.reason, st.all_frames);
    assert!(st.all_frames.iter().any(|f| f.symbol.starts_with("asm_sysvec_apic_timer_interrupt")), "{:?}", st.all_frames);
}

/// The ORC entry layout comes from `struct orc_entry` in the guest's BTF:
/// the saved 6.1 guest reads as 6.1's format (6.12 as the typed format of
/// 6.4 on), and a guest whose BTF gives
/// the struct another size is refused by name before any stack is read.
#[test]
fn orc_format_comes_from_the_guests_btf_and_an_unknown_one_is_refused() {
    let snap = common::ready_snapshot(1);
    let img = SnapshotImage::open(&snap).unwrap();
    let k = Kernel::open(&img.mem, img.cpus.clone()).unwrap();
    let format = introspect::orc_format::OrcFormat::from_btf(&k.btf).unwrap();
    let want = if common::guest_line() == "6.1" { introspect::orc_format::OrcFormat::LINUX_6_1 } else { introspect::orc_format::OrcFormat::LINUX_6_4 };
    assert_eq!(format, want);
    assert!(k.vmlinux_orc().is_ok());

    let start = k.sym("__start_BTF").unwrap();
    let stop = k.sym("__stop_BTF").unwrap();
    let blob = Btf::read_blob(&k.mem, start, stop).unwrap();
    let hdr = u32::from_le_bytes(blob[4..8].try_into().unwrap()) as usize;
    let type_off = u32::from_le_bytes(blob[8..12].try_into().unwrap()) as usize;
    let str_off = u32::from_le_bytes(blob[16..20].try_into().unwrap()) as usize;
    let strings = &blob[hdr + str_off..];
    let name_at = strings.windows(11).position(|w| w == b"\0orc_entry\0").expect("the name") as u32 + 1;
    // struct btf_type { name_off, info (kind 4 = struct in bits 24..28), size = 6 }
    let types = &blob[hdr + type_off..hdr + str_off];
    let at = (0..types.len().saturating_sub(12))
        .step_by(4)
        .find(|&i| {
            let word = |j: usize| u32::from_le_bytes(types[i + j..i + j + 4].try_into().unwrap());
            word(0) == name_at && (word(4) >> 24) & 0x1f == 4 && word(8) == 6
        })
        .expect("struct orc_entry");
    let size_pa = k.mem.translate(start + (hdr + type_off + at + 8) as u64).unwrap() as usize;
    let (mut ram, _) = ram_with_spare_pair(&img.mem);
    ram.0[size_pa] = 8;
    let bad = Kernel::open(&ram, img.cpus.clone()).unwrap();
    let Err(e) = bad.vmlinux_orc() else { panic!("a 8-byte orc_entry was accepted") };
    assert!(matches!(e, introspect::error::IntrospectError::UnknownOrcFormat(_)), "{e}");
    assert!(e.to_string().contains("8 bytes, not 6"), "{e}");
}
