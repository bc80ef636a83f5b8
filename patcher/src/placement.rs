//! The reserved guest-physical region, mapped into the guest kernel's
//! address space from outside: 2 MiB pages in the hole between the kernel
//! image and `MODULES_VADDR` (inside the kernel page table every process
//! shares, within rel32 reach of kernel and modules), split into executable
//! text, read-only rodata and writable data, with a first-fit allocator.

use serde::{Deserialize, Serialize};

use crate::addr::GuestPhys;
use crate::error::{PatchError, Result};
use crate::guest::GuestWriter;
use introspect::translate::KernelMemory;
use introspect::PhysMem;

const PAGE_2M: u64 = 2 << 20;
const PTE_PRESENT: u64 = 1;
const PTE_RW: u64 = 1 << 1;
const PTE_ACCESSED: u64 = 1 << 5;
const PTE_DIRTY: u64 = 1 << 6;
const PTE_PSE: u64 = 1 << 7;
const PTE_GLOBAL: u64 = 1 << 8;
const PTE_NX: u64 = 1 << 63;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// What an allocation holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AreaKind {
    Text,
    Rodata,
    Data,
}

/// One allocation in the region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub kind: AreaKind,
    pub virt: u64,
    pub phys: GuestPhys,
    pub size: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Area {
    kind: AreaKind,
    virt: u64,
    phys: u64,
    size: u64,
    /// (offset, len), sorted.
    used: Vec<(u64, u64)>,
}

impl Area {
    fn alloc(&mut self, size: u64, align: u64) -> Option<Allocation> {
        let align = align.max(16).next_power_of_two();
        let mut cursor = 0u64;
        let mut at = self.used.len();
        for (i, (off, len)) in self.used.iter().enumerate() {
            let start = cursor.checked_add(align - 1)? & !(align - 1);
            if start.checked_add(size)? <= *off {
                at = i;
                cursor = start;
                break;
            }
            cursor = off + len;
        }
        if at == self.used.len() {
            cursor = cursor.checked_add(align - 1)? & !(align - 1);
            if cursor.checked_add(size)? > self.size {
                return None;
            }
        }
        self.used.insert(at, (cursor, size));
        Some(Allocation { kind: self.kind, virt: self.virt + cursor, phys: GuestPhys(self.phys + cursor), size })
    }

    fn free(&mut self, a: &Allocation) -> bool {
        let off = a.virt.wrapping_sub(self.virt);
        match self.used.iter().position(|(o, l)| *o == off && *l == a.size) {
            Some(i) => {
                self.used.remove(i);
                true
            }
            None => false,
        }
    }
}

/// The reserved region and its mapping.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Region {
    pub phys_base: u64,
    pub virt_base: u64,
    pub size: u64,
    areas: Vec<Area>,
    /// Guest-physical addresses of the PMD entries we wrote while mapped.
    mapped_pmds: Vec<u64>,
}

impl Region {
    /// Plans the region `[phys_base, phys_base + size)`; nothing is written.
    pub fn new(phys_base: u64, size: u64, virt_base: u64) -> Result<Region> {
        if !phys_base.is_multiple_of(PAGE_2M) || !size.is_multiple_of(PAGE_2M) || size < 3 * PAGE_2M {
            return Err(PatchError::Mapping(format!(
                "reserved region {phys_base:#x}+{size:#x} must be 2 MiB aligned and at least 6 MiB"
            )));
        }
        let pages = size / PAGE_2M;
        let text = (pages * 3 / 8).max(1);
        let rodata = (pages / 4).max(1);
        let data = pages - text - rodata;
        let mut areas = Vec::new();
        let mut off = 0;
        for (kind, n) in [(AreaKind::Text, text), (AreaKind::Rodata, rodata), (AreaKind::Data, data)] {
            areas.push(Area { kind, virt: virt_base + off, phys: phys_base + off, size: n * PAGE_2M, used: Vec::new() });
            off += n * PAGE_2M;
        }
        Ok(Region { phys_base, virt_base, size, areas, mapped_pmds: Vec::new() })
    }

    /// Picks the virtual base: the last `size` bytes below
    /// `modules_vaddr` (the guest's `MODULES_VADDR`), above the kernel
    /// image end, where the guest maps nothing.
    pub fn choose_virt_base(kernel_end: u64, modules_vaddr: u64, size: u64) -> Result<u64> {
        match modules_vaddr.checked_sub(size) {
            Some(base) if base >= kernel_end.saturating_add(PAGE_2M) => Ok(base),
            _ => Err(PatchError::Mapping(format!(
                "no room for {size:#x} bytes between the kernel end {kernel_end:#x} and MODULES_VADDR {modules_vaddr:#x}"
            ))),
        }
    }

    /// Bytes allocated now.
    pub fn used_bytes(&self) -> u64 {
        self.areas.iter().flat_map(|a| a.used.iter().map(|(_, l)| *l)).sum()
    }

    /// Whether the PMD entries are installed.
    pub fn is_mapped(&self) -> bool {
        !self.mapped_pmds.is_empty()
    }

    pub fn alloc(&mut self, kind: AreaKind, size: u64, align: u64) -> Result<Allocation> {
        let area = self.areas.iter_mut().find(|a| a.kind == kind).ok_or_else(|| PatchError::Mapping("area".into()))?;
        area.alloc(size.max(1), align).ok_or(PatchError::NoRoom { kind: format!("{kind:?}"), needed: size })
    }

    pub fn free(&mut self, a: &Allocation) {
        for area in &mut self.areas {
            if area.free(a) {
                return;
            }
        }
    }

    fn flags(kind: AreaKind) -> u64 {
        let base = PTE_PRESENT | PTE_ACCESSED | PTE_DIRTY | PTE_PSE | PTE_GLOBAL;
        match kind {
            AreaKind::Text => base,
            AreaKind::Rodata => base | PTE_NX,
            AreaKind::Data => base | PTE_RW | PTE_NX,
        }
    }

    /// Physical address of the PMD entry mapping `va` in the page tables at
    /// `cr3`; the PMD table must exist (the kernel image's), the entry must
    /// be empty unless `expect_present`.
    fn pmd_entry(phys: &dyn PhysMem, cr3: u64, la57: bool, va: u64) -> Result<u64> {
        let mut table = cr3 & ADDR_MASK;
        let shifts: &[u32] = if la57 { &[48, 39, 30] } else { &[39, 30] };
        for shift in shifts {
            let e_addr = table + ((va >> shift) & 0x1ff) * 8;
            let mut b = [0u8; 8];
            phys.read_phys(e_addr, &mut b)?;
            let e = u64::from_le_bytes(b);
            if e & PTE_PRESENT == 0 || e & PTE_PSE != 0 {
                return Err(PatchError::Mapping(format!("no page table for {va:#x} at level shift {shift}")));
            }
            table = e & ADDR_MASK;
        }
        Ok(table + ((va >> 21) & 0x1ff) * 8)
    }

    /// Installs 2 MiB mappings for the whole region (all vCPUs stopped).
    pub fn map(&mut self, phys: &dyn PhysMem, w: &dyn GuestWriter, cr3: u64, la57: bool) -> Result<()> {
        if self.is_mapped() {
            return Ok(());
        }
        let mut writes = Vec::new();
        for area in &self.areas {
            let mut off = 0;
            while off < area.size {
                let va = area.virt + off;
                let entry = Self::pmd_entry(phys, cr3, la57, va)?;
                let mut b = [0u8; 8];
                phys.read_phys(entry, &mut b)?;
                if u64::from_le_bytes(b) & PTE_PRESENT != 0 {
                    return Err(PatchError::Mapping(format!("the guest already maps {va:#x}")));
                }
                writes.push((entry, ((area.phys + off) & ADDR_MASK) | Self::flags(area.kind)));
                off += PAGE_2M;
            }
        }
        for (entry, value) in &writes {
            w.write_phys(GuestPhys(*entry), &value.to_le_bytes())?;
        }
        self.mapped_pmds = writes.into_iter().map(|(e, _)| e).collect();
        Ok(())
    }

    /// Removes the mappings (when nothing is allocated any more).
    pub fn unmap(&mut self, w: &dyn GuestWriter) -> Result<()> {
        for e in self.mapped_pmds.drain(..) {
            w.write_phys(GuestPhys(e), &0u64.to_le_bytes())?;
        }
        Ok(())
    }

    /// Checks through the guest's own page walk that `va` maps to `pa`.
    pub fn verify(mem: &dyn KernelMemory, va: u64) -> bool {
        mem.read_u8(va).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_region_ends_at_the_guests_modules_vaddr() {
        use introspect::module_area::MODULES_VADDR_CHOICES;
        let size = 16 << 20;
        // RANDOMIZE_BASE (1 GiB image) and without it (512 MiB image): the
        // region ends where that kernel's module area starts, never inside it.
        for m in MODULES_VADDR_CHOICES {
            assert_eq!(Region::choose_virt_base(0xffff_ffff_8200_0000, m, size).unwrap(), m - size);
        }
        // A kernel image reaching into the last 16 MiB + 2 MiB: no room.
        let m = MODULES_VADDR_CHOICES[1];
        assert!(Region::choose_virt_base(m - size - PAGE_2M + 1, m, size).is_err());
        assert!(Region::choose_virt_base(0, 0x1000, size).is_err(), "underflow");
    }

    #[test]
    fn allocator_first_fit_alignment_and_free() {
        let mut r = Region::new(0x2000_0000, 16 << 20, 0xffff_ffff_bf00_0000).unwrap();
        let a = r.alloc(AreaKind::Text, 100, 16).unwrap();
        let b = r.alloc(AreaKind::Text, 100, 64).unwrap();
        assert_eq!(a.virt, 0xffff_ffff_bf00_0000);
        assert_eq!(b.virt % 64, 0);
        assert!(b.virt >= a.virt + 100);
        let d = r.alloc(AreaKind::Data, 10, 8).unwrap();
        assert!(d.virt >= 0xffff_ffff_bf00_0000 + (10 << 20));
        r.free(&a);
        let c = r.alloc(AreaKind::Text, 50, 16).unwrap();
        assert_eq!(c.virt, a.virt);
        assert!(matches!(r.alloc(AreaKind::Rodata, 64 << 20, 8), Err(PatchError::NoRoom { .. })));
        r.free(&b);
        r.free(&c);
        r.free(&d);
        assert_eq!(r.used_bytes(), 0);
    }
}
