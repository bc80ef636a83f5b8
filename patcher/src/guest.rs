//! What the patcher needs from a stopped VM: reading guest-physical memory
//! (through introspection) and writing it. Implemented over a paused live VM
//! by the binary, and over plain memory in tests.

use crate::addr::GuestPhys;
use crate::error::Result;

/// Writes guest-physical memory while every vCPU is stopped.
pub trait GuestWriter {
    fn write_phys(&self, addr: GuestPhys, data: &[u8]) -> Result<()>;
}
