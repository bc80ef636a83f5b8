//! `MODULES_VADDR`, the start of the module mapping area, taken from the
//! guest kernel's own code. It is a compile-time constant
//! (`__START_KERNEL_map + KERNEL_IMAGE_SIZE`, and KERNEL_IMAGE_SIZE is
//! 1 GiB with RANDOMIZE_BASE and 512 MiB without), so no variable holds it;
//! `module_alloc` passes it to `__vmalloc_node_range` as an immediate.

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

fn unknown(why: String) -> IntrospectError {
    IntrospectError::Corrupt(format!("MODULES_VADDR unknown: {why}"))
}

impl Kernel<'_> {
    /// `MODULES_VADDR`: the one of [`MODULES_VADDR_CHOICES`] that the
    /// kernel's `module_alloc` uses (as an immediate or a displacement).
    /// Refused when the function is missing or names neither, or both.
    pub fn modules_vaddr(&self) -> Result<u64> {
        let f = self.sym("module_alloc").map_err(|_| unknown("the kernel has no module_alloc".into()))?;
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
}
