//! Turning VMM state (live or snapshotted) into the plain inputs of
//! introspection: physical memory and per-vCPU [`CpuState`].

use std::path::Path;

use anyhow::{Context, Result};
use introspect::memory::FileMemory;
use introspect::CpuState;
use vmm::VcpuRegs;

/// Converts the VMM's register view of one vCPU.
pub fn cpu_state(r: &VcpuRegs) -> CpuState {
    let g = &r.regs;
    CpuState {
        rax: g.rax,
        rbx: g.rbx,
        rcx: g.rcx,
        rdx: g.rdx,
        rsi: g.rsi,
        rdi: g.rdi,
        rsp: g.rsp,
        rbp: g.rbp,
        r8: g.r8,
        r9: g.r9,
        r10: g.r10,
        r11: g.r11,
        r12: g.r12,
        r13: g.r13,
        r14: g.r14,
        r15: g.r15,
        rip: g.rip,
        rflags: g.rflags,
        cs: r.sregs.cs.selector,
        cr0: r.sregs.cr0,
        cr3: r.sregs.cr3,
        cr4: r.sregs.cr4,
        efer: r.efer,
        lstar: r.lstar,
        gs_base: r.gs_base,
        kernel_gs_base: r.kernel_gs_base,
    }
}

/// A snapshot directory opened for offline introspection.
pub struct SnapshotImage {
    pub mem: FileMemory,
    pub cpus: Vec<CpuState>,
}

impl SnapshotImage {
    pub fn open(dir: &Path) -> Result<SnapshotImage> {
        let regs = vmm::snapshot::load_vcpu_regs(dir).with_context(|| format!("reading {}", dir.display()))?;
        let mem = FileMemory::open(&vmm::snapshot::memory_file(dir))
            .with_context(|| format!("opening memory of {}", dir.display()))?;
        Ok(SnapshotImage { mem, cpus: regs.iter().map(cpu_state).collect() })
    }
}
