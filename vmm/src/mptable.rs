//! Intel MultiProcessor Specification 1.4 table, so a guest without ACPI
//! finds every vCPU, the IOAPIC and the ISA interrupt routing.
//!
//! The floating pointer sits at the start of the EBDA, where the guest
//! looks for it; the configuration table it points to sits in the BIOS
//! area at `MP_CONFIG_ADDR` (reserved in the e820 map), which has room for
//! a processor entry per vCPU the VMM allows (20 bytes each: the 1 KiB of
//! the EBDA holds only 8 vCPUs' worth with the rest of the table).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::error::{Result, VmmError};
use crate::layout::{EBDA_START, HIGH_MEMORY_START, IOAPIC_ADDR, LAPIC_ADDR, MP_CONFIG_ADDR};

const MPF_SIZE: usize = 16;
const MPC_HEADER_SIZE: usize = 44;
const ISA_IRQS: u8 = 16;

/// Builds the floating pointer (for `EBDA_START`) and the configuration
/// table (for `MP_CONFIG_ADDR`) for `vcpus` CPUs.
pub fn build(vcpus: u8, cpu_signature: u32, cpu_features: u32) -> (Vec<u8>, Vec<u8>) {
    let ioapic_id = vcpus; // right after the LAPIC ids
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        let mut e = [0u8; 20];
        e[0] = 0; // MP_PROCESSOR
        e[1] = id;
        e[2] = 0x14; // LAPIC version
        e[3] = 1 | if id == 0 { 2 } else { 0 }; // enabled, BSP
        e[4..8].copy_from_slice(&cpu_signature.to_le_bytes());
        e[8..12].copy_from_slice(&cpu_features.to_le_bytes());
        entries.extend_from_slice(&e);
        count += 1;
    }
    // Bus 0: ISA.
    entries.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    count += 1;
    // IOAPIC.
    let mut io = [2u8, ioapic_id, 0x11, 1, 0, 0, 0, 0];
    io[4..8].copy_from_slice(&IOAPIC_ADDR.to_le_bytes());
    entries.extend_from_slice(&io);
    count += 1;
    // ISA IRQ n -> IOAPIC pin n (KVM's default routing).
    for irq in 0..ISA_IRQS {
        entries.extend_from_slice(&[3, 0 /* mp_INT */, 0, 0, 0 /* bus */, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: ExtINT on LINT0, NMI on LINT1, all CPUs.
    entries.extend_from_slice(&[4, 3 /* ExtINT */, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1 /* NMI */, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len = MPC_HEADER_SIZE + entries.len();
    let mut table = vec![0u8; MPC_HEADER_SIZE];
    table[0..4].copy_from_slice(b"PCMP");
    table[4..6].copy_from_slice(&(table_len as u16).to_le_bytes());
    table[6] = 4; // spec 1.4
    table[8..16].copy_from_slice(b"HYPERPCH");
    table[16..28].copy_from_slice(b"HYPERPATCH  ");
    table[34..36].copy_from_slice(&count.to_le_bytes());
    table[36..40].copy_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let table_addr = MP_CONFIG_ADDR as u32;
    let mut mpf = vec![0u8; MPF_SIZE];
    mpf[0..4].copy_from_slice(b"_MP_");
    mpf[4..8].copy_from_slice(&table_addr.to_le_bytes());
    mpf[8] = 1; // length in 16-byte units
    mpf[9] = 4;
    mpf[10] = checksum(&mpf);
    (mpf, table)
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Writes the floating pointer at the start of the EBDA and the table in
/// the BIOS area.
pub fn write(mem: &GuestMemoryMmap, vcpus: u8, cpu_signature: u32, cpu_features: u32) -> Result<()> {
    let (mpf, table) = build(vcpus, cpu_signature, cpu_features);
    if MP_CONFIG_ADDR + table.len() as u64 > HIGH_MEMORY_START {
        return Err(VmmError::Config(format!("MP table for {vcpus} vCPUs does not fit below 1 MiB")));
    }
    mem.write_slice(&mpf, GuestAddress(EBDA_START))
        .and_then(|()| mem.write_slice(&table, GuestAddress(MP_CONFIG_ADDR)))
        .map_err(|e| VmmError::GuestMemory(format!("writing MP table: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_are_zero_and_entries_counted() {
        for vcpus in [1, 8, 64] {
            let (mpf, mpc) = build(vcpus, 0x600, 0x201);
            assert_eq!(mpf.len(), MPF_SIZE);
            assert_eq!(mpf.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            assert_eq!(u32::from_le_bytes([mpf[4], mpf[5], mpf[6], mpf[7]]), MP_CONFIG_ADDR as u32);
            let len = u16::from_le_bytes([mpc[4], mpc[5]]) as usize;
            assert_eq!(len, mpc.len());
            assert_eq!(mpc.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            let count = u16::from_le_bytes([mpc[34], mpc[35]]);
            assert_eq!(count, u16::from(vcpus) + 1 + 1 + 16 + 2);
            // Processor entries: APIC ids 0..vcpus, only the first the BSP;
            // the IOAPIC's id follows them.
            for id in 0..usize::from(vcpus) {
                let e = &mpc[MPC_HEADER_SIZE + 20 * id..][..20];
                assert_eq!((e[0], e[1], e[3]), (0, id as u8, if id == 0 { 3 } else { 1 }));
            }
            let io = &mpc[MPC_HEADER_SIZE + 20 * usize::from(vcpus) + 8..][..8];
            assert_eq!((io[0], io[1]), (2, vcpus));
            assert!(MP_CONFIG_ADDR + mpc.len() as u64 <= HIGH_MEMORY_START);
        }
    }
}
