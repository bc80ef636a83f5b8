//! hyperpatch's VMM: boots an x86_64 Linux guest on KVM (PVH vmlinux or
//! bzImage), drives its console, stops and resumes every vCPU on demand,
//! snapshots and restores it, and serves a JSON control API on a Unix socket.
//! Only this crate touches KVM; introspection and patching work on the
//! `PausedVm` view it gives.

pub mod api;
pub mod boot;
pub mod cpuid;
pub mod decode;
pub mod devices;
pub mod error;
pub mod layout;
pub mod mptable;
pub mod snapshot;
pub mod vcpu;
pub mod vm;

pub use error::{Result, VmmError};
pub use vcpu::VmExit;
pub use vm::{PausedVm, VcpuRegs, Vm, VmConfig};
