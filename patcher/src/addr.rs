//! Guest addresses by kind. A guest-virtual address goes through the
//! guest's page tables before anything is written there; a guest-physical
//! one is written as is. Two types keep one from being taken for the other.

use serde::{Deserialize, Serialize};

use crate::error::{PatchError, Result};

/// A guest-virtual address (kernel text, data, the reserved region's mapping).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct GuestVirt(pub u64);

/// A guest-physical address (what the VMM's memory is indexed by).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct GuestPhys(pub u64);

fn overflow(base: u64) -> PatchError {
    PatchError::Guest(introspect::IntrospectError::Overflow(base))
}

impl GuestVirt {
    /// `self + off`; guest-derived, so overflow is an error, not a panic.
    pub fn offset(self, off: u64) -> Result<GuestVirt> {
        self.0.checked_add(off).map(GuestVirt).ok_or_else(|| overflow(self.0))
    }
    /// Offset within its 4 KiB page.
    pub fn page_offset(self) -> u64 {
        self.0 & 0xfff
    }
}

impl GuestPhys {
    /// `self + off`, checked.
    pub fn offset(self, off: u64) -> Result<GuestPhys> {
        self.0.checked_add(off).map(GuestPhys).ok_or_else(|| overflow(self.0))
    }
}

/// Offsets inside an allocation hyperpatch made in its own reserved region
/// (host-chosen, never near the top of the address space). Addresses read
/// from the guest use the checked [`GuestPhys::offset`] instead.
impl std::ops::Add<u64> for GuestPhys {
    type Output = GuestPhys;
    fn add(self, off: u64) -> GuestPhys {
        GuestPhys(self.0 + off)
    }
}

impl std::fmt::Display for GuestVirt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl std::fmt::Display for GuestPhys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "phys {:#x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_arithmetic() {
        assert_eq!(GuestVirt(0x1000).offset(0x10).unwrap(), GuestVirt(0x1010));
        assert!(GuestVirt(u64::MAX).offset(1).is_err());
        assert!(GuestPhys(u64::MAX - 1).offset(2).is_err());
        assert_eq!(GuestVirt(0xffff_ffff_8100_0123).page_offset(), 0x123);
    }
}
