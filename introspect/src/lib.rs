//! Read-only view of a running Linux guest kernel from its memory and vCPU
//! registers: address translation, kallsyms, BTF, tasks, stacks (ORC),
//! ftrace records, modules and the guest's own livepatches. No KVM here:
//! the input is a [`memory::PhysMem`] plus [`cpu::CpuState`]s, from a live
//! paused VM or a dump file. Guest memory is untrusted: every walk is
//! bounded and every failure is an error value.

pub mod btf;
pub mod cpu;
pub mod error;
pub mod ftrace;
pub mod image;
pub mod kallsyms;
pub mod kernel;
pub mod klp;
pub mod memory;
mod name_index;
pub mod module_area;
pub mod modules;
pub mod orc;
pub mod orc_format;
pub mod stacks;
pub mod tasks;
pub mod translate;

pub use cpu::CpuState;
pub use error::{IntrospectError, Result};
pub use memory::PhysMem;
pub use translate::{AddressSpace, KernelMemory};
