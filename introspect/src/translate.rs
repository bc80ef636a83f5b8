//! Guest-virtual to guest-physical translation by walking the guest's page
//! tables from a CR3 (4- and 5-level paging, 1 GiB and 2 MiB pages), with a
//! small cache. Every walk is a fixed number of steps.

use std::cell::RefCell;
use std::collections::HashMap;

use crate::error::{IntrospectError, Result};
use crate::memory::PhysMem;

const PRESENT: u64 = 1;
const PAGE_SIZE_BIT: u64 = 1 << 7;
pub(crate) const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const CACHE_LIMIT: usize = 1 << 16;

/// Reads guest-virtual memory. Everything that decodes kernel objects takes
/// this trait, so it works on a live VM and on a saved image alike.
pub trait KernelMemory {
    /// Fills `buf` from guest-virtual `va`.
    fn read_virt(&self, va: u64, buf: &mut [u8]) -> Result<()>;

    fn read_u8(&self, va: u64) -> Result<u8> {
        let mut b = [0u8; 1];
        self.read_virt(va, &mut b)?;
        Ok(b[0])
    }
    fn read_u16(&self, va: u64) -> Result<u16> {
        let mut b = [0u8; 2];
        self.read_virt(va, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }
    fn read_u32(&self, va: u64) -> Result<u32> {
        let mut b = [0u8; 4];
        self.read_virt(va, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn read_i32(&self, va: u64) -> Result<i32> {
        Ok(self.read_u32(va)? as i32)
    }
    fn read_u64(&self, va: u64) -> Result<u64> {
        let mut b = [0u8; 8];
        self.read_virt(va, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    /// `len` bytes at `va` (callers bound `len`).
    fn read_bytes(&self, va: u64, len: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.read_virt(va, &mut v)?;
        Ok(v)
    }
    /// A NUL-terminated string of at most `max` bytes (lossy UTF-8).
    fn read_cstr(&self, va: u64, max: usize) -> Result<String> {
        let mut out = Vec::new();
        let mut chunk = [0u8; 64];
        let mut at = va;
        while out.len() < max {
            // Read up to the end of the page so an unmapped next page is not touched.
            let room = (0x1000 - (at & 0xfff)) as usize;
            let n = room.min(chunk.len()).min(max - out.len());
            let buf = chunk.get_mut(..n).ok_or(IntrospectError::Overflow(at))?;
            self.read_virt(at, buf)?;
            if let Some(p) = buf.iter().position(|b| *b == 0) {
                out.extend_from_slice(buf.get(..p).unwrap_or(&[]));
                return Ok(String::from_utf8_lossy(&out).into_owned());
            }
            out.extend_from_slice(buf);
            at = at.checked_add(n as u64).ok_or(IntrospectError::Overflow(at))?;
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

/// One guest address space (a CR3) over guest-physical memory.
pub struct AddressSpace<'m> {
    mem: &'m dyn PhysMem,
    cr3: u64,
    la57: bool,
    cache: RefCell<HashMap<u64, u64>>,
}

impl<'m> AddressSpace<'m> {
    pub fn new(mem: &'m dyn PhysMem, cr3: u64, la57: bool) -> AddressSpace<'m> {
        AddressSpace { mem, cr3: cr3 & ADDR_MASK, la57, cache: RefCell::new(HashMap::new()) }
    }

    /// The physical memory under this address space.
    pub fn phys(&self) -> &'m dyn PhysMem {
        self.mem
    }

    /// The page-table root.
    pub fn cr3(&self) -> u64 {
        self.cr3
    }

    fn canonical(&self, va: u64) -> bool {
        let bits = if self.la57 { 57 } else { 48 };
        let top = (va as i64) >> (bits - 1);
        top == 0 || top == -1
    }

    /// Translates one virtual address.
    pub fn translate(&self, va: u64) -> Result<u64> {
        if !self.canonical(va) {
            return Err(IntrospectError::NonCanonical(va));
        }
        let page = va & !0xfff;
        if let Some(pa) = self.cache.borrow().get(&page) {
            return Ok(pa | (va & 0xfff));
        }
        let levels: &[(u8, u32)] = if self.la57 {
            &[(5, 48), (4, 39), (3, 30), (2, 21), (1, 12)]
        } else {
            &[(4, 39), (3, 30), (2, 21), (1, 12)]
        };
        let mut table = self.cr3;
        for (level, shift) in levels {
            let index = (va >> shift) & 0x1ff;
            let entry_addr = table.checked_add(index * 8).ok_or(IntrospectError::Overflow(table))?;
            let mut b = [0u8; 8];
            self.mem.read_phys(entry_addr, &mut b)?;
            let entry = u64::from_le_bytes(b);
            if entry & PRESENT == 0 {
                return Err(IntrospectError::NotMapped { va, level: *level });
            }
            let huge = entry & PAGE_SIZE_BIT != 0;
            if *level == 1 || (huge && (*level == 2 || *level == 3)) {
                let page_mask = (1u64 << shift) - 1;
                let pa = (entry & ADDR_MASK & !page_mask) | (va & page_mask);
                let mut c = self.cache.borrow_mut();
                if c.len() >= CACHE_LIMIT {
                    c.clear();
                }
                c.insert(page, pa & !0xfff);
                return Ok(pa);
            }
            table = entry & ADDR_MASK;
        }
        Err(IntrospectError::NotMapped { va, level: 0 })
    }

    /// Forgets cached translations (after the guest may have changed its
    /// page tables, i.e. after a resume).
    pub fn flush(&self) {
        self.cache.borrow_mut().clear();
    }
}

impl KernelMemory for AddressSpace<'_> {
    fn read_virt(&self, va: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = va.checked_add(done as u64).ok_or(IntrospectError::Overflow(va))?;
            let pa = self.translate(at)?;
            let room = (0x1000 - (at & 0xfff)) as usize;
            let n = room.min(buf.len() - done);
            let dst = buf.get_mut(done..done + n).ok_or(IntrospectError::Overflow(at))?;
            self.mem.read_phys(pa, dst)?;
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::VecMemory;

    fn put(mem: &mut [u8], at: u64, v: u64) {
        mem[at as usize..at as usize + 8].copy_from_slice(&v.to_le_bytes());
    }

    #[test]
    fn walks_4k_2m_and_1g_pages() {
        let mut m = vec![0u8; 0x40_0000];
        // PML4 at 0x1000, PDPT at 0x2000, PD at 0x3000, PT at 0x4000.
        let va4k: u64 = 0xffff_8880_0000_5000;
        let i4 = (va4k >> 39) & 0x1ff;
        put(&mut m, 0x1000 + i4 * 8, 0x2000 | 1);
        put(&mut m, 0x2000, 0x3000 | 1); // pdpt[0]
        put(&mut m, 0x3000, 0x4000 | 1); // pd[0]
        put(&mut m, 0x4000 + 5 * 8, 0x9000 | 1); // pt[5]
        put(&mut m, 0x3000 + 8, 0x20_0000 | 0x81); // pd[1]: 2 MiB page
        put(&mut m, 0x2000 + 8, 0x4000_0000 | 0x81); // pdpt[1]: 1 GiB page
        m[0x9123] = 0xab;
        let mem = VecMemory(m);
        let a = AddressSpace::new(&mem, 0x1000, false);
        assert_eq!(a.translate(va4k + 0x123).unwrap(), 0x9123);
        assert_eq!(a.read_u8(va4k + 0x123).unwrap(), 0xab);
        let base = va4k & !((1 << 39) - 1);
        assert_eq!(a.translate(base + 0x20_0000 + 0x1234).unwrap(), 0x20_1234);
        assert_eq!(a.translate(base + (1 << 30) + 0x12_3456).unwrap(), 0x4012_3456);
        assert!(matches!(a.translate(base + (2 << 30)), Err(IntrospectError::NotMapped { .. })));
        assert!(matches!(a.translate(0x0000_9000_0000_0000), Err(IntrospectError::NonCanonical(_))));
    }

    #[test]
    fn hostile_tables_pointing_outside_memory_are_errors() {
        let mut m = vec![0u8; 0x2000];
        put(&mut m, 0x1000, 0xffff_ffff_f000 | 1);
        let mem = VecMemory(m);
        let a = AddressSpace::new(&mem, 0x1000, false);
        assert!(a.translate(0x1000).is_err());
    }
}
