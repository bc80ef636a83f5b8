//! Guest-physical memory layout: where the VMM puts boot structures, which
//! ranges the e820 map gives the guest, and the reserved region that
//! hyperpatch fills with injected code later.

/// GDT used for the initial protected/long mode segments.
pub const GDT_ADDR: u64 = 0x500;
/// PVH `hvm_start_info`.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH module list (the initrd).
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
/// PVH memory map table.
pub const PVH_MEMMAP_ADDR: u64 = 0x6100;
/// Linux zero page (`boot_params`) for the bzImage 64-bit boot protocol.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Identity page tables for the bzImage 64-bit entry (PML4, PDPT, PD).
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line we pass (Linux x86 COMMAND_LINE_SIZE).
pub const CMDLINE_MAX: usize = 2048;
/// Start of the extended BIOS data area; the MP floating pointer lives here.
pub const EBDA_START: u64 = 0x9fc00;
/// The MP configuration table, in the BIOS area (reserved in the e820 map).
pub const MP_CONFIG_ADDR: u64 = 0xf_0000;
/// First byte above the legacy hole.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// Upper bound for guest RAM plus the reserved region: we keep all of it
/// below the 32-bit MMIO hole (IOAPIC at 0xfec00000, LAPIC at 0xfee00000).
pub const MAX_GUEST_END: u64 = 0xc000_0000;
/// KVM's TSS and identity-map pages (needed on Intel), just below 4 GiB.
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
/// IOAPIC and LAPIC MMIO bases (handled by the in-kernel irqchip).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;

/// e820 entry types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// One e820 range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The guest's physical layout: RAM from 0 to `ram_end` (minus the legacy
/// hole) and the injection region `[ram_end, ram_end + reserved_size)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryLayout {
    pub ram_end: u64,
    pub reserved_size: u64,
}

impl MemoryLayout {
    /// Total bytes of guest memory backing (RAM plus reserved region).
    pub fn total_size(&self) -> u64 {
        self.ram_end + self.reserved_size
    }

    /// Guest-physical start of the region reserved for injected code.
    pub fn reserved_start(&self) -> u64 {
        self.ram_end
    }

    /// The e820 map the guest sees.
    pub fn e820(&self) -> Vec<E820Entry> {
        let mut v = vec![
            E820Entry { addr: 0, size: EBDA_START, kind: E820_RAM },
            E820Entry {
                addr: EBDA_START,
                size: HIGH_MEMORY_START - EBDA_START,
                kind: E820_RESERVED,
            },
            E820Entry {
                addr: HIGH_MEMORY_START,
                size: self.ram_end - HIGH_MEMORY_START,
                kind: E820_RAM,
            },
        ];
        if self.reserved_size > 0 {
            v.push(E820Entry {
                addr: self.ram_end,
                size: self.reserved_size,
                kind: E820_RESERVED,
            });
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_covers_ram_and_reserved_without_overlap() {
        let l = MemoryLayout { ram_end: 256 << 20, reserved_size: 16 << 20 };
        let e = l.e820();
        for w in e.windows(2) {
            assert_eq!(w[0].addr + w[0].size, w[1].addr);
        }
        assert_eq!(e.last().unwrap().kind, E820_RESERVED);
        assert_eq!(e.last().unwrap().addr, 256 << 20);
        assert_eq!(l.total_size(), 272 << 20);
    }
}
