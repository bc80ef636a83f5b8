//! Linking a patch module for its place in the guest: every placed section
//! gets an allocation in the reserved region, every relocation is applied
//! (to the module's own sections, to guest kernel and module symbols, and
//! `.klp.rela` entries with `.klp.sym.<obj>.<name>,<pos>` symbols), and the
//! `__fentry__` calls become the ftrace NOP, as the guest's module loader
//! and ftrace would leave them; then the loader's tables are applied
//! (`crate::loader`).

use introspect::orc_format::OrcFormat;
use std::collections::HashMap;

use goblin::elf::reloc::*;

use crate::error::{PatchError, Result};
use crate::loader::LoaderFacts;
use crate::module::{PatchModule, SectionKind};
use crate::placement::{Allocation, AreaKind, Region};

const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];

/// Resolves external symbols against the guest.
pub trait SymbolResolver {
    /// Address of `name` in `object` (`None` = vmlinux or anywhere), the
    /// `sympos`-th of that name when several exist (0 = must be unique).
    fn resolve(&self, object: Option<&str>, name: &str, sympos: u64) -> Result<u64>;
}

/// A module linked at its final guest addresses, not yet written.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct LinkedModule {
    pub allocations: Vec<Allocation>,
    /// Guest-virtual base of each placed section.
    pub section_base: HashMap<usize, u64>,
    /// (guest-physical address, bytes) to write.
    pub images: Vec<(crate::addr::GuestPhys, Vec<u8>)>,
    /// The module's ORC table at its guest addresses, so tasks inside the
    /// new code unwind reliably: (text start, text end, ips, entries).
    pub orc: Option<(u64, u64, Vec<u64>, Vec<introspect::orc::OrcEntry>)>,
}

impl LinkedModule {
    /// Guest address of `section` + `offset`.
    pub fn address(&self, section: usize, offset: u64) -> Option<u64> {
        self.section_base.get(&section).map(|b| b + offset)
    }
}

/// Parses `.klp.sym.<object>.<name>,<sympos>`.
pub fn parse_klp_sym(name: &str) -> Option<(Option<String>, String, u64)> {
    let rest = name.strip_prefix(".klp.sym.")?;
    let (objsym, pos) = rest.rsplit_once(',')?;
    let (obj, sym) = objsym.split_once('.')?;
    let pos: u64 = pos.parse().ok()?;
    let obj = if obj == "vmlinux" { None } else { Some(obj.to_string()) };
    Some((obj, sym.to_string(), pos))
}

/// Allocates and links `m`. On error every allocation made here is freed.
pub fn link(
    m: &PatchModule,
    region: &mut Region,
    resolver: &dyn SymbolResolver,
    orc_format: &OrcFormat,
    facts: &LoaderFacts,
) -> Result<LinkedModule> {
    let mut allocations = Vec::new();
    let r = link_inner(m, region, resolver, orc_format, facts, &mut allocations);
    if r.is_err() {
        for a in &allocations {
            region.free(a);
        }
    }
    r
}

fn link_inner(
    m: &PatchModule,
    region: &mut Region,
    resolver: &dyn SymbolResolver,
    orc_format: &OrcFormat,
    facts: &LoaderFacts,
    allocations: &mut Vec<Allocation>,
) -> Result<LinkedModule> {
    let mut section_base = HashMap::new();
    let mut phys_base = HashMap::new();
    for (i, s) in m.sections.iter().enumerate() {
        let kind = match s.kind {
            SectionKind::Text => AreaKind::Text,
            SectionKind::Rodata => AreaKind::Rodata,
            SectionKind::Data => AreaKind::Data,
            SectionKind::Skip => continue,
        };
        if s.size == 0 {
            continue;
        }
        let a = region.alloc(kind, s.size, s.align)?;
        allocations.push(a);
        section_base.insert(i, a.virt);
        phys_base.insert(i, a.phys);
    }
    let mut images: HashMap<usize, Vec<u8>> =
        section_base.keys().map(|i| (*i, m.sections[*i].data.clone())).collect();
    let rel_err = |sym: &str, d: String| PatchError::Relocation { path: m.path.clone(), symbol: sym.into(), detail: d };

    let mut keys: Vec<usize> = m.relocs.keys().copied().collect();
    keys.sort();
    for target in keys {
        let Some(&sec_base) = section_base.get(&target) else { continue };
        let rels = &m.relocs[&target];
        for r in rels {
            let sym = m.symbols.get(r.sym).ok_or_else(|| rel_err("?", "symbol index".into()))?;
            let image = images.get_mut(&target).ok_or_else(|| rel_err(&sym.name, "section".into()))?;
            let p = sec_base.checked_add(r.offset).ok_or_else(|| rel_err(&sym.name, "offset overflow".into()))?;
            let at = usize::try_from(r.offset).map_err(|_| rel_err(&sym.name, "offset".into()))?;
            if sym.name == "__fentry__" && matches!(r.r_type, R_X86_64_PLT32 | R_X86_64_PC32) {
                let start = at.checked_sub(1).ok_or_else(|| rel_err(&sym.name, "call at section start".into()))?;
                let slot = image.get_mut(start..start + 5).ok_or_else(|| rel_err(&sym.name, "call outside section".into()))?;
                if slot[0] != 0xe8 {
                    return Err(rel_err(&sym.name, format!("__fentry__ relocation at {:#x} is not a call", r.offset)));
                }
                slot.copy_from_slice(&NOP5);
                continue;
            }
            // S: the symbol's guest address; None = in a section we do not place.
            let s_addr: Option<u64> = match sym.section {
                Some(sec) => section_base.get(&sec).map(|b| b + sym.value),
                None if sym.name.is_empty() && r.r_type == R_X86_64_NONE => None,
                None => {
                    let v = if let Some((obj, name, pos)) = parse_klp_sym(&sym.name) {
                        resolver.resolve(obj.as_deref(), &name, pos)?
                    } else {
                        resolver.resolve(None, &sym.name, 0)?
                    };
                    Some(v)
                }
            };
            let value = |s: u64| -> Result<i128> { Ok(i128::from(s) + i128::from(r.addend)) };
            match r.r_type {
                R_X86_64_NONE => {}
                R_X86_64_64 => {
                    // A pointer into init/exit code we do not place stays NULL.
                    let v = match s_addr {
                        Some(s) => value(s)? as u64,
                        None => 0,
                    };
                    put(image, at, &v.to_le_bytes()).map_err(|d| rel_err(&sym.name, d))?;
                }
                R_X86_64_PC32 | R_X86_64_PLT32 => {
                    let s = s_addr.ok_or_else(|| rel_err(&sym.name, "relative reference into a section that is not placed".into()))?;
                    let v = value(s)? - i128::from(p);
                    let v = i32::try_from(v).map_err(|_| rel_err(&sym.name, format!("target {s:#x} is out of rel32 reach of {p:#x}")))?;
                    put(image, at, &v.to_le_bytes()).map_err(|d| rel_err(&sym.name, d))?;
                }
                R_X86_64_PC64 => {
                    let s = s_addr.ok_or_else(|| rel_err(&sym.name, "relative reference into a section that is not placed".into()))?;
                    let v = (value(s)? - i128::from(p)) as i64;
                    put(image, at, &v.to_le_bytes()).map_err(|d| rel_err(&sym.name, d))?;
                }
                R_X86_64_32 => {
                    let s = s_addr.ok_or_else(|| rel_err(&sym.name, "reference into a section that is not placed".into()))?;
                    let v = u32::try_from(value(s)?).map_err(|_| rel_err(&sym.name, "value does not fit R_X86_64_32".into()))?;
                    put(image, at, &v.to_le_bytes()).map_err(|d| rel_err(&sym.name, d))?;
                }
                R_X86_64_32S => {
                    let s = s_addr.ok_or_else(|| rel_err(&sym.name, "reference into a section that is not placed".into()))?;
                    let v = i32::try_from(value(s)? as u64 as i64)
                        .map_err(|_| rel_err(&sym.name, "value does not fit R_X86_64_32S".into()))?;
                    put(image, at, &v.to_le_bytes()).map_err(|d| rel_err(&sym.name, d))?;
                }
                other => return Err(rel_err(&sym.name, format!("unsupported relocation type {other}"))),
            }
        }
    }
    crate::loader::finalize(m, &section_base, &mut images, facts)?;
    let images = images
        .into_iter()
        .filter_map(|(i, bytes)| phys_base.get(&i).map(|p| (*p, bytes)))
        .collect();
    let orc = orc_table(m, &section_base, orc_format);
    Ok(LinkedModule { allocations: allocations.clone(), section_base, images, orc })
}

/// The module's `.orc_unwind_ip`/`.orc_unwind` at the placed addresses;
/// `None` when the module has none or they do not make sense.
/// Its entries are in the guest kernel's format (a module is built for it).
fn orc_table(
    m: &PatchModule,
    section_base: &HashMap<usize, u64>,
    format: &OrcFormat,
) -> Option<(u64, u64, Vec<u64>, Vec<introspect::orc::OrcEntry>)> {
    let ip_sec = m.sections.iter().position(|s| s.name == ".orc_unwind_ip")?;
    let orc_sec = m.sections.iter().position(|s| s.name == ".orc_unwind")?;
    let n = m.sections.get(ip_sec)?.data.len() / 4;
    let raw = &m.sections.get(orc_sec)?.data;
    if raw.len() != n * 6 || n == 0 {
        return None;
    }
    let mut pairs = Vec::with_capacity(n);
    for i in 0..n {
        let r = m.rela_at(ip_sec, (i * 4) as u64)?;
        let sym = m.symbols.get(r.sym)?;
        let base = section_base.get(&sym.section?)?;
        let ip = (i128::from(*base) + i128::from(sym.value) + i128::from(r.addend)) as u64;
        let b: [u8; 6] = raw.get(i * 6..i * 6 + 6)?.try_into().ok()?;
        pairs.push((ip, format.decode(b)));
    }
    pairs.sort_by_key(|p| p.0);
    let text: Vec<(u64, u64)> = m
        .sections
        .iter()
        .enumerate()
        .filter(|(_, s)| s.kind == SectionKind::Text)
        .filter_map(|(i, s)| section_base.get(&i).map(|b| (*b, *b + s.size)))
        .collect();
    let start = text.iter().map(|t| t.0).min()?;
    let end = text.iter().map(|t| t.1).max()?;
    Some((start, end, pairs.iter().map(|p| p.0).collect(), pairs.into_iter().map(|p| p.1).collect()))
}

fn put(image: &mut [u8], at: usize, bytes: &[u8]) -> std::result::Result<(), String> {
    let end = at.checked_add(bytes.len()).ok_or("offset overflow")?;
    image.get_mut(at..end).ok_or_else(|| format!("relocation at {at:#x} is outside its section"))?.copy_from_slice(bytes);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn klp_sym_names() {
        assert_eq!(parse_klp_sym(".klp.sym.vmlinux.saved_command_line,0"), Some((None, "saved_command_line".into(), 0)));
        assert_eq!(parse_klp_sym(".klp.sym.mymod.foo,2"), Some((Some("mymod".into()), "foo".into(), 2)));
        assert_eq!(parse_klp_sym("saved_command_line"), None);
        assert_eq!(parse_klp_sym(".klp.sym.vmlinux.x,abc"), None);
    }
}
