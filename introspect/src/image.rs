//! Dump files: an ELF core (like cloud-hypervisor's coredump) whose PT_LOAD
//! segments are guest-physical memory (`p_paddr`) and whose note
//! `HYPERPATCH`/[`NOTE_TYPE`] holds the vCPU states as JSON. Every
//! introspection command works on such a file as on a live VM.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::cpu::CpuState;
use crate::error::{IntrospectError, Result};
use crate::memory::PhysMem;

/// Note name and type of the vCPU-state note.
pub const NOTE_NAME: &str = "HYPERPATCH";
pub const NOTE_TYPE: u32 = 0x4850_0001;
/// Largest vCPU note we accept.
const MAX_NOTE: usize = 1 << 20;
const MAX_SEGMENTS: usize = 64;

/// The JSON inside the vCPU note.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct CpuNote {
    pub version: u32,
    pub cpus: Vec<CpuState>,
}

#[derive(Clone, Copy, Debug)]
struct Segment {
    paddr: u64,
    offset: u64,
    size: u64,
}

/// An opened dump file.
pub struct DumpImage {
    file: File,
    segments: Vec<Segment>,
    pub cpus: Vec<CpuState>,
}

fn bad(path: &Path, detail: impl Into<String>) -> IntrospectError {
    IntrospectError::Image { path: path.display().to_string(), detail: detail.into() }
}

impl DumpImage {
    pub fn open(path: &Path) -> Result<DumpImage> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        let mut header = vec![0u8; 64];
        file.read_exact_at(&mut header, 0).map_err(|_| bad(path, "too short for an ELF header"))?;
        let eh = goblin::elf::Elf::parse_header(&header).map_err(|e| bad(path, format!("not an ELF file: {e}")))?;
        if eh.e_type != goblin::elf::header::ET_CORE || eh.e_machine != goblin::elf::header::EM_X86_64 {
            return Err(bad(path, "not an x86_64 ELF core dump"));
        }
        let phnum = usize::from(eh.e_phnum);
        if phnum == 0 || phnum > MAX_SEGMENTS + 1 || eh.e_phentsize != 56 {
            return Err(bad(path, format!("{phnum} program headers of size {}", eh.e_phentsize)));
        }
        let mut ph_raw = vec![0u8; phnum * 56];
        file.read_exact_at(&mut ph_raw, eh.e_phoff).map_err(|_| bad(path, "program headers past the end"))?;
        let mut segments = Vec::new();
        let mut cpus = None;
        for i in 0..phnum {
            let p = ph_raw.get(i * 56..i * 56 + 56).ok_or_else(|| bad(path, "program header"))?;
            let u32_at = |o: usize| u32::from_le_bytes([p[o], p[o + 1], p[o + 2], p[o + 3]]);
            let u64_at = |o: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&p[o..o + 8]);
                u64::from_le_bytes(b)
            };
            let (p_type, offset, paddr, filesz) = (u32_at(0), u64_at(8), u64_at(24), u64_at(32));
            let end = offset.checked_add(filesz).ok_or_else(|| bad(path, "segment overflows"))?;
            if end > len {
                return Err(bad(path, format!("segment {i} ends at {end:#x}, past the file end {len:#x}")));
            }
            match p_type {
                goblin::elf::program_header::PT_LOAD => segments.push(Segment { paddr, offset, size: filesz }),
                goblin::elf::program_header::PT_NOTE => {
                    if filesz as usize > MAX_NOTE {
                        return Err(bad(path, "note segment too large"));
                    }
                    let mut n = vec![0u8; filesz as usize];
                    file.read_exact_at(&mut n, offset)?;
                    if let Some(c) = parse_cpu_note(&n) {
                        cpus = Some(c);
                    }
                }
                _ => {}
            }
        }
        let cpus = cpus.ok_or_else(|| bad(path, "no HYPERPATCH vCPU note (not a hyperpatch dump)"))?;
        if segments.is_empty() {
            return Err(bad(path, "no memory segments"));
        }
        Ok(DumpImage { file, segments, cpus })
    }
}

fn parse_cpu_note(mut n: &[u8]) -> Option<Vec<CpuState>> {
    while n.len() >= 12 {
        let namesz = u32::from_le_bytes(n.get(0..4)?.try_into().ok()?) as usize;
        let descsz = u32::from_le_bytes(n.get(4..8)?.try_into().ok()?) as usize;
        let ntype = u32::from_le_bytes(n.get(8..12)?.try_into().ok()?);
        let name_end = 12usize.checked_add(namesz)?;
        let desc_start = 12usize.checked_add(namesz.checked_add(3)? & !3)?;
        let desc_end = desc_start.checked_add(descsz)?;
        let name = n.get(12..name_end)?;
        let desc = n.get(desc_start..desc_end)?;
        if ntype == NOTE_TYPE && name.strip_suffix(&[0]).unwrap_or(name) == NOTE_NAME.as_bytes() {
            let note: CpuNote = serde_json::from_slice(desc).ok()?;
            return Some(note.cpus);
        }
        n = n.get((desc_end.checked_add(3)? & !3).min(n.len())..)?;
    }
    None
}

impl PhysMem for DumpImage {
    fn read_phys(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        let oob = || IntrospectError::PhysOutOfRange { addr, len: buf.len() };
        let end = addr.checked_add(buf.len() as u64).ok_or_else(oob)?;
        let seg = self
            .segments
            .iter()
            .find(|s| s.paddr <= addr && end <= s.paddr.saturating_add(s.size))
            .ok_or_else(oob)?;
        self.file.read_exact_at(buf, seg.offset + (addr - seg.paddr))?;
        Ok(())
    }
    fn phys_size(&self) -> u64 {
        self.segments.iter().map(|s| s.paddr.saturating_add(s.size)).max().unwrap_or(0)
    }
}

/// Writes a dump: `regions` are (guest-physical start, bytes) read through
/// `read`, all-zero pages left as holes.
pub fn write_dump(
    path: &Path,
    cpus: &[CpuState],
    regions: &[(u64, u64)],
    read: &dyn Fn(u64, &mut [u8]) -> Result<()>,
) -> Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let note_json = serde_json::to_vec(&CpuNote { version: 1, cpus: cpus.to_vec() })
        .map_err(|e| IntrospectError::Corrupt(format!("encoding vCPU note: {e}")))?;
    let mut note = Vec::new();
    let name = format!("{NOTE_NAME}\0");
    note.extend_from_slice(&(name.len() as u32).to_le_bytes());
    note.extend_from_slice(&(note_json.len() as u32).to_le_bytes());
    note.extend_from_slice(&NOTE_TYPE.to_le_bytes());
    note.extend_from_slice(name.as_bytes());
    while note.len() % 4 != 0 {
        note.push(0);
    }
    note.extend_from_slice(&note_json);
    while note.len() % 4 != 0 {
        note.push(0);
    }
    let phnum = 1 + regions.len();
    let headers_end = 64 + 56 * phnum as u64;
    let note_off = headers_end;
    let mut data_off = (note_off + note.len() as u64 + 0xfff) & !0xfff;
    let mut ph = Vec::new();
    let mut push_ph = |p_type: u32, flags: u32, off: u64, paddr: u64, size: u64, align: u64| {
        ph.extend_from_slice(&p_type.to_le_bytes());
        ph.extend_from_slice(&flags.to_le_bytes());
        ph.extend_from_slice(&off.to_le_bytes());
        ph.extend_from_slice(&paddr.to_le_bytes()); // p_vaddr = guest-physical too
        ph.extend_from_slice(&paddr.to_le_bytes());
        ph.extend_from_slice(&size.to_le_bytes());
        ph.extend_from_slice(&size.to_le_bytes());
        ph.extend_from_slice(&align.to_le_bytes());
    };
    push_ph(goblin::elf::program_header::PT_NOTE, 4, note_off, 0, note.len() as u64, 4);
    let mut placements = Vec::new();
    for (start, size) in regions {
        push_ph(goblin::elf::program_header::PT_LOAD, 6, data_off, *start, *size, 0x1000);
        placements.push((data_off, *start, *size));
        data_off = (data_off + size + 0xfff) & !0xfff;
    }
    let mut eh = vec![0u8; 64];
    eh[0..4].copy_from_slice(b"\x7fELF");
    eh[4] = 2; // 64-bit
    eh[5] = 1; // little endian
    eh[6] = 1; // version
    eh[16..18].copy_from_slice(&goblin::elf::header::ET_CORE.to_le_bytes());
    eh[18..20].copy_from_slice(&goblin::elf::header::EM_X86_64.to_le_bytes());
    eh[20..24].copy_from_slice(&1u32.to_le_bytes());
    eh[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    eh[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    eh[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    eh[56..58].copy_from_slice(&(phnum as u16).to_le_bytes());
    let tmp = path.with_extension("partial");
    let mut f = File::create(&tmp)?;
    f.set_len(data_off)?;
    f.write_all(&eh)?;
    f.write_all(&ph)?;
    f.seek(SeekFrom::Start(note_off))?;
    f.write_all(&note)?;
    let mut buf = vec![0u8; 1 << 20];
    for (off, start, size) in placements {
        let mut done = 0u64;
        while done < size {
            let n = (size - done).min(buf.len() as u64) as usize;
            let chunk = buf.get_mut(..n).ok_or(IntrospectError::Overflow(done))?;
            read(start + done, chunk)?;
            for (i, page) in chunk.chunks(4096).enumerate() {
                if page.iter().any(|b| *b != 0) {
                    f.seek(SeekFrom::Start(off + done + (i as u64) * 4096))?;
                    f.write_all(page)?;
                }
            }
            done += n as u64;
        }
    }
    f.sync_data()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_roundtrip_and_garbage_rejected() {
        let dir = std::env::temp_dir().join(format!("hp-dump-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d.core");
        let mem: Vec<u8> = (0..0x3000u32).map(|i| (i % 251) as u8).collect();
        let cpus = vec![CpuState { rip: 0x1234, cr3: 0x1000, ..Default::default() }];
        let read = |a: u64, b: &mut [u8]| -> Result<()> {
            b.copy_from_slice(&mem[a as usize..a as usize + b.len()]);
            Ok(())
        };
        write_dump(&path, &cpus, &[(0, 0x3000)], &read).unwrap();
        let img = DumpImage::open(&path).unwrap();
        assert_eq!(img.cpus, cpus);
        let mut b = [0u8; 16];
        img.read_phys(0x1ff8, &mut b).unwrap();
        assert_eq!(&b[..], &mem[0x1ff8..0x2008]);
        assert!(img.read_phys(0x2ff8, &mut b).is_err());
        std::fs::write(&path, b"garbage that is not an ELF core at all.......................................").unwrap();
        assert!(DumpImage::open(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
