//! Guest-physical memory access. The same introspection code runs on a live
//! paused VM (the VMM implements [`PhysMem`] over its guest memory) and on a
//! saved image file.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{IntrospectError, Result};

/// Reads guest-physical memory.
pub trait PhysMem {
    /// Fills `buf` from guest-physical `addr`; fails if any byte is outside
    /// guest memory.
    fn read_phys(&self, addr: u64, buf: &mut [u8]) -> Result<()>;
    /// Bytes of guest-physical address space backed by memory.
    fn phys_size(&self) -> u64;
}

/// Guest memory held in a byte vector (tests, small images).
pub struct VecMemory(pub Vec<u8>);

impl PhysMem for VecMemory {
    fn read_phys(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        let oob = || IntrospectError::PhysOutOfRange { addr, len: buf.len() };
        let start = usize::try_from(addr).map_err(|_| oob())?;
        let end = start.checked_add(buf.len()).ok_or_else(oob)?;
        let src = self.0.get(start..end).ok_or_else(oob)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn phys_size(&self) -> u64 {
        self.0.len() as u64
    }
}

/// Guest memory in a file where file offset = guest-physical address
/// (a snapshot's `memory.bin`, or a PT_LOAD run of a dump).
pub struct FileMemory {
    file: File,
    /// File offset of guest-physical address 0.
    base: u64,
    size: u64,
}

impl FileMemory {
    pub fn open(path: &Path) -> Result<FileMemory> {
        let file = File::open(path)?;
        let size = file.metadata()?.len();
        Ok(FileMemory { file, base: 0, size })
    }

    /// Guest-physical `[0, size)` stored at file offset `base`.
    pub fn from_file(file: File, base: u64, size: u64) -> FileMemory {
        FileMemory { file, base, size }
    }
}

impl PhysMem for FileMemory {
    fn read_phys(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        let oob = IntrospectError::PhysOutOfRange { addr, len: buf.len() };
        let end = addr.checked_add(buf.len() as u64);
        match end {
            Some(e) if e <= self.size => {}
            _ => return Err(oob),
        }
        let off = self.base.checked_add(addr).ok_or(IntrospectError::Overflow(addr))?;
        self.file.read_exact_at(buf, off)?;
        Ok(())
    }
    fn phys_size(&self) -> u64 {
        self.size
    }
}
