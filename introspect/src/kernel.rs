//! The guest kernel as introspection sees it: one address space, its
//! kallsyms, its BTF and the vCPUs' registers, plus the struct offsets the
//! rest of the crate needs, all taken from BTF once.

use crate::btf::Btf;
use crate::cpu::CpuState;
use crate::error::{IntrospectError, Result};
use crate::kallsyms::Kallsyms;
use crate::memory::PhysMem;
use crate::translate::{AddressSpace, KernelMemory};

/// Link-time start of x86_64 kernel text; the KASLR slide is measured from it.
pub const LINK_TEXT_BASE: u64 = 0xffff_ffff_8100_0000;

/// A guest kernel opened for reading.
pub struct Kernel<'m> {
    pub mem: AddressSpace<'m>,
    pub syms: Kallsyms,
    pub btf: Btf,
    pub cpus: Vec<CpuState>,
}

/// Where the kernel's randomized regions are.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct KernelLayout {
    /// Runtime address of `_text`.
    pub text_base: u64,
    /// `_text` minus its link-time address.
    pub kaslr_slide: i64,
    pub page_offset_base: u64,
    pub vmalloc_base: u64,
    pub vmemmap_base: u64,
}

impl<'m> Kernel<'m> {
    /// Opens the guest kernel: kallsyms from memory (found from LSTAR)
    /// through the first page-table root that maps them
    /// ([`root_candidates`]), then every read through the kernel's own
    /// top-level table ([`kernel_space`]), and BTF from
    /// `__start_BTF`..`__stop_BTF`.
    pub fn open(phys: &'m dyn PhysMem, cpus: Vec<CpuState>) -> Result<Kernel<'m>> {
        let syms = through_first_root(phys, &cpus, |mem, lstar| Kallsyms::locate(mem, lstar))?;
        let mem = kernel_space(phys, &cpus, &syms)?;
        let start = syms.lookup_unique("__start_BTF")?;
        let stop = syms.lookup_unique("__stop_BTF")?;
        let btf = Btf::from_memory(&mem, start, stop)?;
        Ok(Kernel { mem, syms, btf, cpus })
    }

    /// Reassembles a kernel view from kallsyms and BTF decoded earlier (they
    /// live in kernel image memory that does not change while it runs).
    pub fn from_parts(phys: &'m dyn PhysMem, cpus: Vec<CpuState>, syms: Kallsyms, btf: Btf) -> Result<Kernel<'m>> {
        let mem = kernel_space(phys, &cpus, &syms)?;
        Ok(Kernel { mem, syms, btf, cpus })
    }

    /// Address of a unique kernel symbol.
    pub fn sym(&self, name: &str) -> Result<u64> {
        self.syms.lookup_unique(name)
    }

    /// Byte offset of `path` (dotted, nested) in `struct ty`.
    pub fn off(&self, ty: &str, path: &str) -> Result<u64> {
        self.btf.member_offset(ty, path)
    }

    /// Reads a pointer-sized field.
    pub fn read_ptr(&self, base: u64, off: u64) -> Result<u64> {
        self.mem.read_u64(base.checked_add(off).ok_or(IntrospectError::Overflow(base))?)
    }

    /// Text base, KASLR slide and the randomized region bases.
    pub fn layout(&self) -> Result<KernelLayout> {
        let text_base = self.sym("_text")?;
        let var = |name: &str, default: u64| -> u64 {
            self.syms
                .lookup_unique(name)
                .ok()
                .and_then(|a| self.mem.read_u64(a).ok())
                .unwrap_or(default)
        };
        Ok(KernelLayout {
            text_base,
            kaslr_slide: text_base.wrapping_sub(LINK_TEXT_BASE) as i64,
            page_offset_base: var("page_offset_base", 0xffff_8880_0000_0000),
            vmalloc_base: var("vmalloc_base", 0xffff_c900_0000_0000),
            vmemmap_base: var("vmemmap_base", 0xffff_ea00_0000_0000),
        })
    }

    /// Address of per-CPU variable `name` for `cpu`
    /// (`__per_cpu_offset[cpu]` + the symbol's per-CPU offset).
    pub fn per_cpu(&self, name: &str, cpu: usize) -> Result<u64> {
        let var = self.sym(name)?;
        let table = self.sym("__per_cpu_offset")?;
        let slot = table
            .checked_add((cpu as u64).checked_mul(8).ok_or(IntrospectError::Overflow(table))?)
            .ok_or(IntrospectError::Overflow(table))?;
        let off = self.mem.read_u64(slot)?;
        var.checked_add(off).ok_or(IntrospectError::Overflow(var))
    }

    /// Address of `cpu`'s copy of the hot per-CPU variable `name`: a
    /// member of `struct pcpu_hot` where the guest has one (6.2+), else a
    /// per-CPU variable of its own (6.1).
    pub fn per_cpu_hot(&self, name: &str, cpu: usize) -> Result<u64> {
        if let Ok(a) = self.per_cpu("pcpu_hot", cpu) {
            let off = self.off("pcpu_hot", name)?;
            return a.checked_add(off).ok_or(IntrospectError::Overflow(a));
        }
        self.per_cpu(name, cpu)
    }

    /// The task running on vCPU `cpu` (`pcpu_hot.current_task` on newer
    /// kernels, `current_task` on 6.1).
    pub fn current_task(&self, cpu: usize) -> Result<u64> {
        self.mem.read_u64(self.per_cpu_hot("current_task", cpu)?)
    }
}

/// LSTAR and the paging mode, from vCPU 0 (set by the kernel at boot, the
/// same on every CPU).
fn boot_facts(cpus: &[CpuState]) -> Result<(u64, bool)> {
    let cpu0 = cpus.first().ok_or_else(|| IntrospectError::Corrupt("no vCPU state".into()))?;
    if cpu0.lstar == 0 {
        return Err(IntrospectError::Corrupt("MSR_LSTAR is 0: the guest kernel has not set up syscalls yet".into()));
    }
    Ok((cpu0.lstar, cpu0.la57()))
}

/// Page-table roots that may map the kernel, best first: the CR3 of each
/// vCPU in kernel mode, then of each vCPU in user mode, then for every one
/// the kernel half of a page-table-isolation pair. Under PTI a task in user
/// mode runs on the user copy, which maps little more than the entry code,
/// and so does a vCPU stopped in the entry code before it switches CR3 (in
/// kernel mode already); the kernel's copy is the 4 KiB page before it
/// (`PTI_USER_PGTABLE_BIT` is bit 12 of the 8 KiB-aligned pair). Each root
/// is only a candidate: the callers check what it maps.
pub fn root_candidates(cpus: &[CpuState]) -> Vec<u64> {
    let root = |c: &CpuState| c.cr3 & crate::translate::ADDR_MASK;
    let mut out: Vec<u64> = Vec::new();
    let kernel = cpus.iter().filter(|c| !c.in_user_mode()).map(root);
    let user = cpus.iter().filter(|c| c.in_user_mode()).map(root);
    let direct: Vec<u64> = kernel.chain(user).collect();
    for r in direct.iter().copied().chain(direct.iter().map(|r| r & !(1 << 12))) {
        if !out.contains(&r) {
            out.push(r);
        }
    }
    out
}

/// `find` (kallsyms, given the address space and LSTAR) through each of
/// [`root_candidates`] in turn, until one succeeds; the error names every
/// root tried and why it failed.
pub fn through_first_root<T, E: std::fmt::Display>(
    phys: &dyn PhysMem,
    cpus: &[CpuState],
    mut find: impl FnMut(&AddressSpace<'_>, u64) -> std::result::Result<T, E>,
) -> Result<T> {
    let (lstar, la57) = boot_facts(cpus)?;
    let mut failed = Vec::new();
    for root in root_candidates(cpus) {
        match find(&AddressSpace::new(phys, root, la57), lstar) {
            Ok(v) => return Ok(v),
            Err(e) => failed.push(format!("root {root:#x}: {e}")),
        }
    }
    Err(IntrospectError::Kallsyms(format!("no vCPU's page tables map the kernel's symbols ({})", failed.join("; "))))
}

/// The kernel's own address space: rooted at its top-level table
/// `init_top_pgt`, the root every CPU's kernel half shares (drgn reads
/// `swapper_pg_dir` the same way), not at whatever page table a vCPU
/// happened to run on. The table is found through the first candidate root
/// that maps both it and LSTAR, and must map LSTAR to the same place.
pub fn kernel_space<'m>(phys: &'m dyn PhysMem, cpus: &[CpuState], syms: &Kallsyms) -> Result<AddressSpace<'m>> {
    let (lstar, la57) = boot_facts(cpus)?;
    let table = syms.lookup_unique("init_top_pgt")?;
    for root in root_candidates(cpus) {
        let via = AddressSpace::new(phys, root, la57);
        let (Ok(pa), Ok(entry)) = (via.translate(table), via.translate(lstar)) else { continue };
        let own = AddressSpace::new(phys, pa, la57);
        if own.translate(lstar).ok() == Some(entry) && own.translate(table).ok() == Some(pa) {
            return Ok(own);
        }
        return Err(IntrospectError::Corrupt(format!(
            "init_top_pgt (physical {pa:#x}) does not map the kernel as the vCPUs' page tables do (LSTAR {lstar:#x})"
        )));
    }
    Err(IntrospectError::Corrupt(format!("no vCPU's page tables map init_top_pgt at {table:#x}")))
}
