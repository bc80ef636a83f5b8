//! `MODULES_VADDR`, the start of the module mapping area, taken from the
//! guest kernel's own code. It is a compile-time constant
//! (`__START_KERNEL_map + KERNEL_IMAGE_SIZE`, and KERNEL_IMAGE_SIZE is
//! 1 GiB with RANDOMIZE_BASE and 512 MiB without), so no variable holds it.
//! Up to 6.9 `module_alloc` passes it to `__vmalloc_node_range` as an
//! immediate. From 6.10 the module area is an execmem range:
//! `execmem_arch_setup()` (init code, gone after boot) stores
//! `MODULES_VADDR` plus a random offset of at most 1024 pages as the start of
//! `execmem_info.ranges[EXECMEM_DEFAULT]`, which stays in memory.

use iced_x86::{Decoder, DecoderOptions, OpKind};

use crate::error::{IntrospectError, Result};
use crate::kernel::Kernel;
use crate::translate::KernelMemory;

/// `__START_KERNEL_map` on x86_64 (4- and 5-level paging alike).
pub const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
/// The two values `MODULES_VADDR` can have.
pub const MODULES_VADDR_CHOICES: [u64; 2] = [START_KERNEL_MAP + (1 << 30), START_KERNEL_MAP + (512 << 20)];
/// Bytes of `module_alloc` decoded (it is a few dozen instructions).
const DECODE_SPAN: usize = 256;
/// Largest random offset `execmem_arch_setup` adds to MODULES_VADDR (1024
/// pages of 4 KiB).
const EXECMEM_MAX_OFFSET: u64 = 1024 * 4096;

fn unknown(why: String) -> IntrospectError {
    IntrospectError::Corrupt(format!("MODULES_VADDR unknown: {why}"))
}

impl Kernel<'_> {
    /// `MODULES_VADDR`: the one of [`MODULES_VADDR_CHOICES`] that the
    /// kernel's `module_alloc` uses (as an immediate or a displacement).
    /// Refused when the function is missing or names neither, or both.
    pub fn modules_vaddr(&self) -> Result<u64> {
        if self.syms.lookup("module_alloc").is_empty() && !self.syms.lookup("execmem_info").is_empty() {
            return self.modules_vaddr_from_execmem();
        }
        let f = self.sym("module_alloc").map_err(|_| unknown("the kernel has neither module_alloc nor execmem_info".into()))?;
        let mut code = vec![0u8; DECODE_SPAN];
        self.mem.read_virt(f, &mut code)?;
        let mut dec = Decoder::with_ip(64, &code, f, DecoderOptions::NONE);
        let mut seen: Vec<u64> = Vec::new();
        while dec.can_decode() {
            let ins = dec.decode();
            if ins.is_invalid() {
                break;
            }
            let mut values = Vec::new();
            for i in 0..ins.op_count() {
                match ins.op_kind(i) {
                    OpKind::Immediate32to64 | OpKind::Immediate64 | OpKind::Immediate32 => values.push(ins.immediate(i)),
                    OpKind::Memory => values.push(ins.memory_displacement64()),
                    _ => {}
                }
            }
            for v in values {
                if MODULES_VADDR_CHOICES.contains(&v) && !seen.contains(&v) {
                    seen.push(v);
                }
            }
            if ins.mnemonic() == iced_x86::Mnemonic::Ret {
                break;
            }
        }
        match seen.as_slice() {
            [v] => Ok(*v),
            [] => Err(unknown(format!("module_alloc at {f:#x} uses neither {:#x} nor {:#x}", MODULES_VADDR_CHOICES[0], MODULES_VADDR_CHOICES[1]))),
            _ => Err(unknown(format!("module_alloc at {f:#x} uses both {:#x} and {:#x}", MODULES_VADDR_CHOICES[0], MODULES_VADDR_CHOICES[1]))),
        }
    }

    /// `MODULES_VADDR` from the start of the execmem default range. There
    /// are two `execmem_info` symbols (the arch's struct and mm's pointer
    /// to it); each is tried as the struct and as the pointer, and every
    /// reading that makes sense must name the same choice.
    fn modules_vaddr_from_execmem(&self) -> Result<u64> {
        let ranges = self.off("execmem_info", "ranges")?;
        let range_size = self.btf.struct_size("execmem_range")?;
        let start_off = self.off("execmem_range", "start")?;
        let end_off = self.off("execmem_range", "end")?;
        let default = self.btf.enum_value(Some("execmem_type"), "EXECMEM_DEFAULT")?;
        let default = u64::try_from(default).map_err(|_| unknown(format!("EXECMEM_DEFAULT is {default}")))?;
        let at = default
            .checked_mul(range_size)
            .and_then(|o| o.checked_add(ranges))
            .ok_or_else(|| unknown("execmem range offset overflows".into()))?;
        let mut found: Vec<(u64, u64)> = Vec::new();
        for sym in self.syms.lookup("execmem_info") {
            let as_pointer = self.mem.read_u64(sym).ok();
            for base in std::iter::once(sym).chain(as_pointer) {
                let Some(field) = base.checked_add(at) else { continue };
                let (Ok(start), Ok(end)) = (self.read_ptr(field, start_off), self.read_ptr(field, end_off)) else { continue };
                let choice = MODULES_VADDR_CHOICES
                    .iter()
                    .copied()
                    .filter(|c| start >= *c && start - c <= EXECMEM_MAX_OFFSET && start % 4096 == 0 && end > start)
                    .collect::<Vec<_>>();
                if let [c] = choice.as_slice() {
                    if !found.iter().any(|(v, _)| v == c) {
                        found.push((*c, start));
                    }
                }
            }
        }
        match found.as_slice() {
            [(v, _)] => Ok(*v),
            [] => Err(unknown(format!(
                "no execmem_info default range starts within {EXECMEM_MAX_OFFSET:#x} above {:#x} or {:#x}",
                MODULES_VADDR_CHOICES[0], MODULES_VADDR_CHOICES[1]
            ))),
            _ => Err(unknown(format!("execmem_info readings disagree: {found:x?}"))),
        }
    }
}
