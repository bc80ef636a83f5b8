//! ORC: tables and a stack built from fuzz bytes, then `unwind` from a
//! sleeping task's saved frame or from a stopped vCPU's registers; also
//! `OrcTables::load` reading tables out of fuzz-filled guest memory.
//!
//! Layout of the input: flags (1 byte), entry count (1 byte), that many
//! (IP delta u16, 6-byte orc_entry), start value (8 bytes), layout bytes
//! (4), then stack contents. Stack words tagged 0xaa/0xbb/0xcc in their
//! top byte become pointers into the task stack / text / IRQ stack, so the
//! fuzzer can build frames that chain.
#![no_main]

use introspect::error::{IntrospectError, Result};
use introspect::orc::{
    InactiveTaskFrameLayout, OrcTables, PtRegsLayout, StackBounds, SymbolAddrs, UnwindStart,
};
use introspect::{CpuState, KernelMemory};
use introspect::orc_format::OrcFormat;
use introspect_fuzz::{le, FlatMemory, TEXT};
use libfuzzer_sys::fuzz_target;

const TEXT_END: u64 = TEXT + 0x1000;
const STACK_LO: u64 = 0xffff_c900_0000_0000;
const STACK_SIZE: u64 = 0x4000;
const IRQ_LO: u64 = 0xffff_c900_0001_0000;
const MAX_FRAMES: usize = 64;

/// Guest memory as a few flat regions.
struct Regions(Vec<(u64, Vec<u8>)>);

impl KernelMemory for Regions {
    fn read_virt(&self, va: u64, buf: &mut [u8]) -> Result<()> {
        for (base, bytes) in &self.0 {
            let Some(off) = va.checked_sub(*base) else { continue };
            let Ok(off) = usize::try_from(off) else { continue };
            if let Some(src) = off.checked_add(buf.len()).and_then(|end| bytes.get(off..end)) {
                buf.copy_from_slice(src);
                return Ok(());
            }
        }
        Err(IntrospectError::NotMapped { va, level: 1 })
    }
}

fn pointer_hint(w: u64) -> u64 {
    match w >> 56 {
        0xaa => STACK_LO + (w & (STACK_SIZE - 1)),
        0xbb => TEXT + (w & 0xfff),
        0xcc => IRQ_LO + (w & (STACK_SIZE - 1)),
        _ => w,
    }
}

fn stack_bytes(src: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; STACK_SIZE as usize];
    for (i, chunk) in src.chunks(8).take(out.len() / 8).enumerate() {
        let w = pointer_hint(le::<8>(chunk, 0));
        out[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    out
}

fn real_regs() -> PtRegsLayout {
    PtRegsLayout { size: 168, ip: 128, sp: 152, bp: 32, cs: 136, di: 112, dx: 96, r10: 56, r13: 16 }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let flags = data[0];
    let n = usize::from(data[1] % 64) + 1;
    let mut at = 2;
    let mut ips = Vec::with_capacity(n);
    let mut entries = Vec::with_capacity(n);
    let mut ip = TEXT;
    for _ in 0..n {
        ip = ip.saturating_add(le::<2>(data, at) % 0x100);
        ips.push(ip);
        let mut e = [0u8; 6];
        for (i, b) in e.iter_mut().enumerate() {
            *b = data.get(at + 2 + i).copied().unwrap_or(0);
        }
        entries.push(OrcFormat::LINUX_6_1.decode(e));
        at += 8;
    }
    let start_word = le::<8>(data, at);
    at += 8;
    let layout = [0, 1, 2, 3].map(|i| data.get(at + i).copied().unwrap_or(0));
    at += 4;
    let rest = data.get(at..).unwrap_or(&[]);

    let syms = SymbolAddrs {
        text_start: TEXT,
        text_end: TEXT_END,
        ret_from_fork: Some(TEXT + 0x800),
        sched_text: Some((TEXT, TEXT + 0x100)),
        lock_text: Some((TEXT + 0x100, TEXT + 0x140)),
        init_text: if flags & 0x40 != 0 { Some((TEXT_END, TEXT_END + 0x100)) } else { None },
        ..SymbolAddrs::default()
    };
    let lookup = if flags & 2 != 0 {
        // A lookup table as unwind_init() writes it, or one from the fuzz bytes.
        let blocks = (TEXT_END - TEXT) / 256 + 1;
        Some(
            (0..blocks)
                .map(|b| {
                    if flags & 0x80 != 0 {
                        le::<2>(rest, b as usize * 2) as u32
                    } else {
                        ips.partition_point(|&i| i <= TEXT + b * 256).saturating_sub(1) as u32
                    }
                })
                .collect(),
        )
    } else {
        None
    };
    let Ok(mut tables) = OrcTables::from_parts(&syms, OrcFormat::LINUX_6_1, ips.clone(), entries.clone(), lookup) else { return };
    if flags & 0x10 != 0 {
        // The same entries again as a "module" right after vmlinux text.
        let mod_ips: Vec<u64> = ips.iter().map(|i| i - TEXT + TEXT_END + 0x1000).collect();
        let _ = tables.add_host_table(TEXT_END + 0x1000, TEXT_END + 0x2000, mod_ips, entries.clone());
    }
    if flags & 0x20 != 0 {
        let _ = tables.add_trampoline(TEXT_END + 0x3000, 0x100, TEXT + (start_word & 0xfff));
    }

    let regs_layout = if flags & 4 != 0 {
        let f = |b: u8| u64::from(b) * 8;
        PtRegsLayout {
            size: f(layout[0]),
            ip: f(layout[1]),
            sp: f(layout[2]),
            bp: f(layout[3]),
            cs: f(layout[1] ^ 1),
            di: f(layout[2] ^ 2),
            dx: f(layout[3] ^ 3),
            r10: f(layout[0] ^ 4),
            r13: f(layout[0] ^ 5),
        }
    } else {
        real_regs()
    };
    let stack = stack_bytes(rest);
    let irq = stack_bytes(rest.get(STACK_SIZE as usize..).unwrap_or(&[]));
    let text: Vec<u8> = (0..0x4000u32).map(|i| (i % 251) as u8).collect();
    let mem = Regions(vec![(STACK_LO, stack), (IRQ_LO, irq), (TEXT, text)]);
    let task_stack = StackBounds { low: STACK_LO, high: STACK_LO + STACK_SIZE };
    let start = if flags & 1 != 0 {
        let regs = CpuState {
            rip: pointer_hint(le::<8>(rest, 0)),
            rsp: pointer_hint(le::<8>(rest, 8)),
            rbp: pointer_hint(le::<8>(rest, 16)),
            rdi: pointer_hint(le::<8>(rest, 24)),
            rdx: pointer_hint(le::<8>(rest, 32)),
            r10: pointer_hint(le::<8>(rest, 40)),
            r13: pointer_hint(le::<8>(rest, 48)),
            cs: if flags & 8 != 0 { 0x33 } else { 0x10 },
            ..CpuState::default()
        };
        UnwindStart::Running {
            regs,
            stacks: vec![task_stack, StackBounds { low: IRQ_LO, high: IRQ_LO + STACK_SIZE }],
        }
    } else {
        let frame = if flags & 4 != 0 {
            InactiveTaskFrameLayout { size: u64::from(layout[0]), ret_addr: u64::from(layout[1]), bp: u64::from(layout[2]) }
        } else {
            InactiveTaskFrameLayout { size: 56, ret_addr: 48, bp: 40 }
        };
        UnwindStart::Sleeping { thread_sp: pointer_hint(start_word), frame, stack: task_stack }
    };
    let st = tables.unwind(&mem, start, &regs_layout, MAX_FRAMES);
    assert!(st.frames.len() <= MAX_FRAMES + 1, "{} frames", st.frames.len());
    assert!(!st.reliable || st.reason.is_none());
    let shown = tables.proc_pid_stack(&st);
    assert!(shown.len() <= 64);
    for f in &st.frames {
        let _ = tables.find(f.ip.wrapping_sub(1));
        let _ = tables.find_by_full_search(f.ip);
        let _ = tables.in_sched_functions(f.ip);
        let _ = f.is_return_address();
    }

    // The same bytes as guest memory holding the vmlinux tables.
    if flags & 0x08 != 0 {
        let count = u64::from(data[1]);
        let base = TEXT;
        let ip_len = count * 4;
        let orc_len = count * 6;
        let lookup_len = ((TEXT_END - TEXT) / 256 + 1) * 4;
        let mem = FlatMemory { base, bytes: rest.to_vec() };
        let syms = SymbolAddrs {
            start_orc_unwind_ip: base,
            stop_orc_unwind_ip: base + ip_len,
            start_orc_unwind: base + ip_len,
            stop_orc_unwind: base + ip_len + orc_len,
            orc_lookup: base + ip_len + orc_len,
            orc_lookup_end: base + ip_len + orc_len + lookup_len,
            text_start: base - 0x1000 + (start_word & 0xfff),
            text_end: base + 0x1000,
            ..SymbolAddrs::default()
        };
        if let Ok(t) = OrcTables::load(&mem, &syms, OrcFormat::LINUX_6_1) {
            let _ = t.uses_fast_lookup();
            for ip in (0..0x2000).step_by(7) {
                let _ = t.find(base - 0x1000 + ip);
            }
        }
    }
});
