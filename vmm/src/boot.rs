//! Direct kernel boot without firmware: a vmlinux ELF through its PVH entry
//! (fast here: no decompressor) or a bzImage through the 64-bit Linux boot
//! protocol. Writes the boot structures into guest memory and says how the
//! boot vCPU must start.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::error::{Result, VmmError};
use crate::layout::*;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// What kind of image `--kernel` is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// Uncompressed ELF, booted through `XEN_ELFNOTE_PHYS32_ENTRY`.
    Elf,
    /// bzImage, booted through the 64-bit boot protocol.
    BzImage,
}

/// How the boot vCPU starts.
#[derive(Clone, Copy, Debug)]
pub enum BootEntry {
    /// 32-bit protected mode, paging off, `rbx` = `hvm_start_info`.
    Pvh { entry: u64 },
    /// 64-bit mode with identity-mapped low memory, `rsi` = zero page.
    Linux64 { entry: u64 },
}

/// Everything a caller needs to know about what was loaded.
#[derive(Clone, Debug)]
pub struct LoadedKernel {
    pub format: KernelFormat,
    pub entry: BootEntry,
    /// Guest-physical range of the loaded kernel image.
    pub kernel_start: u64,
    pub kernel_end: u64,
}

/// Detects the kernel format from its first bytes.
pub fn detect_format(path: &Path) -> Result<KernelFormat> {
    let mut f = File::open(path).map_err(|source| VmmError::File { path: path.into(), source })?;
    let mut magic = [0u8; 4];
    if f.read_exact(&mut magic).is_ok() && magic == *b"\x7fELF" {
        return Ok(KernelFormat::Elf);
    }
    let mut hdrs = [0u8; 4];
    if f.seek(SeekFrom::Start(0x202)).is_ok() && f.read_exact(&mut hdrs).is_ok() && hdrs == *b"HdrS" {
        return Ok(KernelFormat::BzImage);
    }
    Err(VmmError::UnknownKernelFormat { path: path.into() })
}

/// Loads kernel, command line and initrd and writes the boot structures.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<LoadedKernel> {
    if cmdline.len() >= CMDLINE_MAX {
        return Err(VmmError::Config(format!(
            "kernel command line is {} bytes, the limit is {}",
            cmdline.len(),
            CMDLINE_MAX - 1
        )));
    }
    let format = detect_format(kernel)?;
    let mut file = File::open(kernel).map_err(|source| VmmError::File { path: kernel.into(), source })?;
    let kerr = |e: linux_loader::loader::Error| VmmError::KernelLoad { path: kernel.into(), detail: e.to_string() };

    let (entry, kernel_start, kernel_end, setup_header) = match format {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut file, Some(GuestAddress(HIGH_MEMORY_START))).map_err(|e| {
                match e {
                    linux_loader::loader::Error::Elf(_) => kerr(e),
                    _ => VmmError::MemoryTooSmall(format!("kernel {} does not fit: {e}", kernel.display())),
                }
            })?;
            let entry = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(a) => a.raw_value(),
                _ => return Err(VmmError::NoPvhEntry { path: kernel.into() }),
            };
            (BootEntry::Pvh { entry }, r.kernel_load.raw_value(), r.kernel_end, None)
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIGH_MEMORY_START))).map_err(|e| {
                match e {
                    linux_loader::loader::Error::Bzimage(_) => kerr(e),
                    _ => VmmError::MemoryTooSmall(format!("kernel {} does not fit: {e}", kernel.display())),
                }
            })?;
            let hdr = r.setup_header.ok_or_else(|| kerr(linux_loader::loader::Error::InvalidKernelStartAddress))?;
            // The decompressor needs init_size bytes from the load address.
            let end = r.kernel_load.raw_value().saturating_add(u64::from(hdr.init_size));
            (BootEntry::Linux64 { entry: r.kernel_load.raw_value() + 0x200 }, r.kernel_load.raw_value(), end.max(r.kernel_end), Some(hdr))
        }
    };
    if kernel_end > layout.ram_end {
        return Err(VmmError::MemoryTooSmall(format!(
            "kernel needs memory up to {:#x} but RAM ends at {:#x}",
            kernel_end, layout.ram_end
        )));
    }

    // Command line, NUL terminated.
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|e| VmmError::GuestMemory(format!("writing command line: {e}")))?;

    // Initrd at the top of RAM, page aligned.
    let initrd_range = match initrd {
        None => None,
        Some(p) => {
            let mut f = File::open(p).map_err(|source| VmmError::File { path: p.into(), source })?;
            let size = f.metadata().map_err(|source| VmmError::File { path: p.into(), source })?.len();
            let addr = layout
                .ram_end
                .checked_sub(size)
                .map(|a| a & !0xfff)
                .filter(|a| *a >= kernel_end)
                .ok_or_else(|| {
                    VmmError::MemoryTooSmall(format!(
                        "initrd {} ({} KiB) does not fit between the kernel end {:#x} and the end of RAM {:#x}; raise --mem",
                        p.display(),
                        size >> 10,
                        kernel_end,
                        layout.ram_end
                    ))
                })?;
            let len = usize::try_from(size).map_err(|_| VmmError::Config("initrd too large".into()))?;
            mem.read_exact_volatile_from(GuestAddress(addr), &mut f, len)
                .map_err(|e| VmmError::GuestMemory(format!("loading initrd {}: {e}", p.display())))?;
            Some((addr, size))
        }
    };

    match entry {
        BootEntry::Pvh { .. } => write_pvh_info(mem, layout, initrd_range)?,
        BootEntry::Linux64 { .. } => {
            let hdr = setup_header.ok_or_else(|| VmmError::Config("bzImage without setup header".into()))?;
            write_zero_page(mem, layout, hdr, cmdline.len(), initrd_range)?;
            write_identity_page_tables(mem)?;
        }
    }
    write_gdt(mem, matches!(entry, BootEntry::Linux64 { .. }))?;
    Ok(LoadedKernel { format, entry, kernel_start, kernel_end })
}

fn gm_err(what: &'static str) -> impl Fn(vm_memory::GuestMemoryError) -> VmmError {
    move |e| VmmError::GuestMemory(format!("writing {what}: {e}"))
}

fn write_pvh_info(mem: &GuestMemoryMmap, layout: &MemoryLayout, initrd: Option<(u64, u64)>) -> Result<()> {
    let e820 = layout.e820();
    for (i, e) in e820.iter().enumerate() {
        let entry = hvm_memmap_table_entry { addr: e.addr, size: e.size, type_: e.kind, reserved: 0 };
        let at = PVH_MEMMAP_ADDR + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(entry, GuestAddress(at)).map_err(gm_err("PVH memory map"))?;
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: e820.len() as u32,
        ..Default::default()
    };
    if let Some((addr, size)) = initrd {
        let m = hvm_modlist_entry { paddr: addr, size, cmdline_paddr: 0, reserved: 0 };
        mem.write_obj(m, GuestAddress(PVH_MODLIST_ADDR)).map_err(gm_err("PVH module list"))?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_ADDR;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_ADDR)).map_err(gm_err("PVH start info"))
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    hdr: linux_loader::loader::bootparam::setup_header,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
) -> Result<()> {
    let mut params = boot_params { hdr, ..Default::default() };
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.loadflags |= 0x80; // CAN_USE_HEAP
    params.hdr.heap_end_ptr = 0xfe00;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let e820 = layout.e820();
    for (i, e) in e820.iter().enumerate() {
        let slot = params
            .e820_table
            .get_mut(i)
            .ok_or_else(|| VmmError::Config("too many e820 entries".into()))?;
        slot.addr = e.addr;
        slot.size = e.size;
        slot.r#type = e.kind;
    }
    params.e820_entries = e820.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR)).map_err(gm_err("zero page"))
}

/// Identity-maps the first GiB with 2 MiB pages for the 64-bit entry.
fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<()> {
    mem.write_obj(PDPT_ADDR | 0x3, GuestAddress(PML4_ADDR)).map_err(gm_err("PML4"))?;
    mem.write_obj(PD_ADDR | 0x3, GuestAddress(PDPT_ADDR)).map_err(gm_err("PDPT"))?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PD_ADDR + i * 8)).map_err(gm_err("PD"))?;
    }
    Ok(())
}

/// GDT entries: null, code, data, TSS.
fn gdt_entries(long_mode: bool) -> [u64; 4] {
    let code = if long_mode { gdt_entry(0xa09b, 0, 0xfffff) } else { gdt_entry(0xc09b, 0, 0xfffff) };
    [0, code, gdt_entry(0xc093, 0, 0xfffff), gdt_entry(0x808b, 0, 0xfffff)]
}

fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << (56 - 24))
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << (48 - 16))
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let mut limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    if g == 1 {
        limit = (limit << 12) | 0xfff;
    }
    kvm_segment {
        base,
        limit,
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

fn write_gdt(mem: &GuestMemoryMmap, long_mode: bool) -> Result<()> {
    for (i, e) in gdt_entries(long_mode).iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + (i as u64) * 8)).map_err(gm_err("GDT"))?;
    }
    Ok(())
}

/// Registers and special registers of the boot vCPU for `entry`.
pub fn boot_vcpu_state(entry: BootEntry, mut sregs: kvm_sregs) -> (kvm_regs, kvm_sregs) {
    let long_mode = matches!(entry, BootEntry::Linux64 { .. });
    let gdt = gdt_entries(long_mode);
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    let mut regs = kvm_regs { rflags: 0x2, ..Default::default() };
    match entry {
        BootEntry::Pvh { entry } => {
            sregs.cr0 = 0x11; // PE | ET
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry;
            regs.rbx = PVH_INFO_ADDR;
        }
        BootEntry::Linux64 { entry } => {
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 = 0x20; // PAE
            sregs.cr0 = 0x8000_0011; // PG | ET | PE
            sregs.efer = 0x500; // LMA | LME
            regs.rip = entry;
            regs.rsi = ZERO_PAGE_ADDR;
            regs.rsp = 0x8ff0;
            regs.rbp = 0x8ff0;
        }
    }
    (regs, sregs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segment_roundtrip() {
        let s = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(s.l, 1);
        assert_eq!(s.type_, 0xb);
        assert_eq!(s.limit, 0xffff_ffff);
        assert_eq!(s.selector, 8);
        let d = segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!(d.db, 1);
        assert_eq!(d.type_, 3);
        assert_eq!(d.present, 1);
    }

    #[test]
    fn format_detection_rejects_garbage() {
        let dir = std::env::temp_dir().join(format!("hp-fmt-{}", std::process::id()));
        std::fs::write(&dir, b"this is not a kernel at all, just some text....").unwrap();
        assert!(matches!(detect_format(&dir), Err(VmmError::UnknownKernelFormat { .. })));
        std::fs::remove_file(&dir).unwrap();
    }
}
