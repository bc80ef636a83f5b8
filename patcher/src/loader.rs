//! What the kernel's module loader does in `module_finalize`
//! (`arch/x86/kernel/module.c`) for a patch module's code, done on the
//! linked image before it is written: the tables that only tell the loader
//! how to rewrite the code are applied here and never placed.
//!
//! Why on the host: the placed text is mapped read-only and executable
//! before anything runs, so the guest's own `apply_returns()` could not
//! write it, and each decision the loader makes here is one guest value
//! away (`x86_return_thunk`, CR4.CET, the ORC header), read at apply time.
//!
//! - `.return_sites`: every compiled `ret` is `jmp __x86_return_thunk`.
//!   The loader sends it to the thunk boot chose (`x86_return_thunk`) or,
//!   when that is the default thunk, makes it a plain `ret` padded with
//!   `int3`. hyperpatch does the same, with one simplification: under the
//!   ITS thunk the loader keeps a plain `ret` for sites in the upper half of
//!   a cache line; hyperpatch jumps to the thunk from every site, which is
//!   what the thunk is for and never less safe.
//! - `.ibt_endbr_seal`: `endbr64` of functions whose address is never
//!   taken; the loader overwrites each with a 4-byte NOP (6.12 does so
//!   whatever the CPU), so an indirect branch there faults under IBT. With
//!   CR4.CET clear on every vCPU, IBT is not enforced and `endbr64` is a
//!   NOP itself, so hyperpatch checks the table and leaves the bytes (the
//!   seal's NOP is a kernel-version constant it would have to guess); with
//!   CR4.CET set the module is refused. The ftrace site of a sealed guest
//!   function is found by its record, not by its first bytes.
//! - `.orc_header`: the hash of the ORC format the module was built with.
//!   It must equal the guest's own (`__start_orc_header`), or the module's
//!   ORC entries would be read in the wrong format.

use std::collections::HashMap;

use goblin::elf::reloc::R_X86_64_PC32;
use introspect::kernel::Kernel;
use introspect::translate::KernelMemory;

use crate::error::{PatchError, Result};
use crate::module::{PatchModule, SectionKind};

/// Tables the loader applies; they are read, applied and never placed.
pub const LOADER_TABLES: &[&str] = &[".return_sites", ".ibt_endbr_seal", ".orc_header"];

/// CR4.CET: the CPU enforces control-flow protection (IBT, shadow stacks).
const CR4_CET: u64 = 1 << 23;
/// Longest ORC header we compare (upstream's is a 20-byte SHA-1).
const MAX_ORC_HEADER: u64 = 64;
const JMP32: u8 = 0xe9;
const RET: u8 = 0xc3;
const INT3: u8 = 0xcc;

/// What a return-thunk site becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReturnPolicy {
    /// `x86_return_thunk` is the default thunk: `ret` + `int3` padding.
    Ret { default_thunk: u64 },
    /// `jmp` to the thunk boot installed (`retbleed_return_thunk`,
    /// `srso_return_thunk`, `its_return_thunk`, ...).
    Jump { default_thunk: u64, thunk: u64 },
}

impl ReturnPolicy {
    fn default_thunk(&self) -> u64 {
        match self {
            ReturnPolicy::Ret { default_thunk } | ReturnPolicy::Jump { default_thunk, .. } => *default_thunk,
        }
    }
}

/// The guest facts `finalize` needs, read once per module.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoaderFacts {
    /// `None` when the module has no return-thunk sites (not read then).
    pub returns: Option<ReturnPolicy>,
    /// Some vCPU has CR4.CET set.
    pub ibt_enforced: bool,
    /// The guest's `.orc_header`; `None` when it has none (or the module
    /// has none: not read then).
    pub orc_header: Option<Vec<u8>>,
}

impl LoaderFacts {
    /// Reads what `m`'s tables need from the guest.
    pub fn for_module(k: &Kernel<'_>, m: &PatchModule) -> Result<LoaderFacts> {
        let has = |name: &str| m.sections.iter().any(|s| s.name == name && s.size > 0);
        let returns = if has(".return_sites") { Some(return_policy(k)?) } else { None };
        let orc_header = match (k.syms.lookup_unique("__start_orc_header"), k.syms.lookup_unique("__stop_orc_header")) {
            _ if !has(".orc_header") => None,
            (Ok(start), Ok(stop)) => {
                let len = stop.checked_sub(start).filter(|l| *l <= MAX_ORC_HEADER).ok_or(PatchError::GuestOrcHeader { start, stop })?;
                Some(k.mem.read_bytes(start, len as usize)?)
            }
            _ => None,
        };
        Ok(LoaderFacts { returns, ibt_enforced: k.cpus.iter().any(|c| c.cr4 & CR4_CET != 0), orc_header })
    }
}

/// The guest's `x86_return_thunk`, which must be `__x86_return_thunk` or
/// the start of another `*_return_thunk` in kernel text.
fn return_policy(k: &Kernel<'_>) -> Result<ReturnPolicy> {
    let missing = |name: &str| PatchError::MissingSymbol { name: name.into() };
    let var = k.sym("x86_return_thunk").map_err(|_| missing("x86_return_thunk"))?;
    let default_thunk = k.sym("__x86_return_thunk").map_err(|_| missing("__x86_return_thunk"))?;
    let thunk = k.mem.read_u64(var)?;
    if thunk == default_thunk {
        return Ok(ReturnPolicy::Ret { default_thunk });
    }
    let in_text = k.syms.text_range().is_some_and(|t| t.contains(&thunk));
    match k.syms.resolve(thunk) {
        Some(at) if in_text && at.offset == 0 && at.name.ends_with("return_thunk") => Ok(ReturnPolicy::Jump { default_thunk, thunk }),
        at => Err(PatchError::UnknownReturnThunk { value: thunk, symbol: at.map(|a| format!("{}+{:#x}", a.name, a.offset)) }),
    }
}

/// Applies `m`'s loader tables to its linked `images` (section index ->
/// bytes at `section_base`).
pub fn finalize(
    m: &PatchModule,
    section_base: &HashMap<usize, u64>,
    images: &mut HashMap<usize, Vec<u8>>,
    facts: &LoaderFacts,
) -> Result<()> {
    for (idx, s) in m.sections.iter().enumerate() {
        match s.name.as_str() {
            ".return_sites" if s.size > 0 => {
                let policy = facts.returns.ok_or_else(|| m.malformed(".return_sites: the guest's return thunk was not read"))?;
                for site in table_sites(m, idx, section_base)? {
                    rewrite_return(m, images, &site, policy)?;
                }
            }
            ".ibt_endbr_seal" if s.size > 0 => {
                if facts.ibt_enforced {
                    return Err(PatchError::UnhandledSection {
                        path: m.path.clone(),
                        section: s.name.clone(),
                        why: "the guest enforces IBT (CR4.CET) and sealing endbr64 in patch code is not done",
                    });
                }
                // Checked, not applied: sealing is a no-op without IBT.
                table_sites(m, idx, section_base)?;
            }
            ".orc_header" if s.size > 0 && facts.orc_header.as_deref() != Some(s.data.as_slice()) => {
                return Err(PatchError::OrcHeaderMismatch {
                    path: m.path.clone(),
                    module: hex(&s.data),
                    guest: facts.orc_header.as_deref().map(hex),
                });
            }
            _ => {}
        }
    }
    Ok(())
}

/// One entry of a `.long target - .` table: the text section it points
/// into and the offset there.
struct TableSite {
    section: usize,
    offset: u64,
    addr: u64,
}

/// The sites a relative table names. Each entry must be a PC32 relocation
/// into placed text.
fn table_sites(m: &PatchModule, table: usize, section_base: &HashMap<usize, u64>) -> Result<Vec<TableSite>> {
    let s = m.sections.get(table).ok_or_else(|| m.malformed("table section"))?;
    if s.size % 4 != 0 {
        return Err(m.malformed(format!("{} is {} bytes, not a whole number of 4-byte entries", s.name, s.size)));
    }
    let mut out = Vec::new();
    for i in 0..s.size / 4 {
        let bad = |d: String| m.malformed(format!("{} entry {i}: {d}", s.name));
        let r = m.rela_at(table, i * 4).ok_or_else(|| bad("no relocation".into()))?;
        if r.r_type != R_X86_64_PC32 {
            return Err(bad(format!("relocation type {} is not PC32", r.r_type)));
        }
        let sym = m.symbols.get(r.sym).ok_or_else(|| bad("symbol index".into()))?;
        let section = sym.section.ok_or_else(|| bad(format!("points at external symbol {:?}", sym.name)))?;
        let text = m.sections.get(section).filter(|t| t.kind == SectionKind::Text).ok_or_else(|| bad("does not point into text".into()))?;
        let offset = u64::try_from(i128::from(sym.value) + i128::from(r.addend))
            .ok()
            .filter(|o| *o < text.size)
            .ok_or_else(|| bad(format!("offset outside {}", text.name)))?;
        let base = section_base.get(&section).ok_or_else(|| bad(format!("{} is not placed", text.name)))?;
        let addr = base.checked_add(offset).ok_or_else(|| bad("address overflow".into()))?;
        out.push(TableSite { section, offset, addr });
    }
    Ok(out)
}

/// `jmp __x86_return_thunk` at `site` becomes what `policy` says.
fn rewrite_return(m: &PatchModule, images: &mut HashMap<usize, Vec<u8>>, site: &TableSite, policy: ReturnPolicy) -> Result<()> {
    let image = images.get_mut(&site.section).ok_or_else(|| m.malformed("return site in a section with no image"))?;
    let at = usize::try_from(site.offset).map_err(|_| m.malformed("return site offset"))?;
    let end = at.checked_add(5).ok_or_else(|| m.malformed("return site offset"))?;
    let insn = image.get_mut(at..end).ok_or_else(|| m.malformed(format!("return site at {:#x} runs past its section", site.addr)))?;
    let rel = i32::from_le_bytes([insn[1], insn[2], insn[3], insn[4]]);
    let dest = i128::from(site.addr) + 5 + i128::from(rel);
    if insn[0] != JMP32 || dest != i128::from(policy.default_thunk()) {
        return Err(PatchError::ReturnSite { path: m.path.clone(), site: site.addr, found: hex(insn) });
    }
    match policy {
        ReturnPolicy::Ret { .. } => insn.copy_from_slice(&[RET, INT3, INT3, INT3, INT3]),
        ReturnPolicy::Jump { thunk, .. } => {
            let rel = i32::try_from(i128::from(thunk) - (i128::from(site.addr) + 5))
                .map_err(|_| PatchError::ReturnSite { path: m.path.clone(), site: site.addr, found: format!("thunk {thunk:#x} out of rel32 reach") })?;
            insn[0] = JMP32;
            insn[1..].copy_from_slice(&rel.to_le_bytes());
        }
    }
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::module::{Rela, Section, Symbol};

    const TEXT: u64 = 0xffff_ffff_bf00_0000;
    const DEFAULT_THUNK: u64 = 0xffff_ffff_812d_50b0;
    const OTHER_THUNK: u64 = 0xffff_ffff_8102_deb0;

    fn jmp(from: u64, to: u64) -> Vec<u8> {
        let mut v = vec![JMP32];
        v.extend_from_slice(&((to as i64 - (from as i64 + 5)) as i32).to_le_bytes());
        v
    }

    /// A module whose .text is two `jmp __x86_return_thunk` (at 0 and 5),
    /// listed in `table` with the given offsets.
    fn module(table: &str, offsets: &[i64], extra: Option<(&str, Vec<u8>)>) -> (PatchModule, HashMap<usize, Vec<u8>>, HashMap<usize, u64>) {
        let sec = |name: &str, kind, data: Vec<u8>| Section { name: name.into(), kind, size: data.len() as u64, align: 1, data };
        let mut text = jmp(TEXT, DEFAULT_THUNK);
        text.extend(jmp(TEXT + 5, DEFAULT_THUNK));
        let mut sections = vec![sec("", SectionKind::Skip, vec![]), sec(".text", SectionKind::Text, text.clone())];
        sections.push(sec(table, SectionKind::Skip, vec![0; offsets.len() * 4]));
        if let Some((name, data)) = extra {
            sections.push(sec(name, SectionKind::Skip, data));
        }
        let symbols = vec![
            Symbol { name: String::new(), section: None, value: 0, size: 0 },
            Symbol { name: ".text".into(), section: Some(1), value: 0, size: 0 },
        ];
        let rels = offsets.iter().enumerate().map(|(i, o)| Rela { offset: i as u64 * 4, r_type: R_X86_64_PC32, sym: 1, addend: *o }).collect();
        let m = PatchModule {
            path: "t.ko".into(),
            name: "t".into(),
            sections,
            symbols,
            relocs: HashMap::from([(2, rels)]),
            this_module: (0, 0),
            init: None,
            exit: None,
            params: Vec::new(),
        };
        (m, HashMap::from([(1, text)]), HashMap::from([(1, TEXT)]))
    }

    fn facts(returns: Option<ReturnPolicy>) -> LoaderFacts {
        LoaderFacts { returns, ibt_enforced: false, orc_header: None }
    }

    #[test]
    fn return_sites_become_ret_under_the_default_thunk() {
        let (m, mut images, base) = module(".return_sites", &[0, 5], None);
        finalize(&m, &base, &mut images, &facts(Some(ReturnPolicy::Ret { default_thunk: DEFAULT_THUNK }))).unwrap();
        assert_eq!(images[&1], [RET, INT3, INT3, INT3, INT3, RET, INT3, INT3, INT3, INT3]);
    }

    #[test]
    fn return_sites_jump_to_the_thunk_boot_chose() {
        let (m, mut images, base) = module(".return_sites", &[0, 5], None);
        let policy = ReturnPolicy::Jump { default_thunk: DEFAULT_THUNK, thunk: OTHER_THUNK };
        finalize(&m, &base, &mut images, &facts(Some(policy))).unwrap();
        let mut want = jmp(TEXT, OTHER_THUNK);
        want.extend(jmp(TEXT + 5, OTHER_THUNK));
        assert_eq!(images[&1], want);
    }

    #[test]
    fn a_return_site_that_is_not_a_jmp_to_the_default_thunk_is_refused() {
        // Offset 1 lands inside the first jmp.
        let (m, mut images, base) = module(".return_sites", &[0, 1], None);
        let before = images.clone();
        let e = finalize(&m, &base, &mut images, &facts(Some(ReturnPolicy::Ret { default_thunk: DEFAULT_THUNK }))).unwrap_err();
        assert!(matches!(e, PatchError::ReturnSite { site, .. } if site == TEXT + 1), "{e}");
        // Sites already rewritten are in the unwritten image only; the
        // caller discards it. The second site was never touched.
        assert_eq!(images[&1][5..], before[&1][5..]);
        let (m, mut images, base) = module(".return_sites", &[0], None);
        let e = finalize(&m, &base, &mut images, &facts(Some(ReturnPolicy::Ret { default_thunk: OTHER_THUNK }))).unwrap_err();
        assert!(matches!(e, PatchError::ReturnSite { .. }), "{e}");
    }

    #[test]
    fn table_entries_outside_text_or_not_pc32_are_malformed() {
        let (m, mut images, base) = module(".return_sites", &[0, 10], None);
        let e = finalize(&m, &base, &mut images, &facts(Some(ReturnPolicy::Ret { default_thunk: DEFAULT_THUNK }))).unwrap_err();
        assert!(matches!(&e, PatchError::Malformed { detail, .. } if detail.contains("entry 1")), "{e}");
        let (mut m, mut images, base) = module(".return_sites", &[0], None);
        m.relocs.get_mut(&2).unwrap()[0].r_type = goblin::elf::reloc::R_X86_64_64;
        let e = finalize(&m, &base, &mut images, &facts(Some(ReturnPolicy::Ret { default_thunk: DEFAULT_THUNK }))).unwrap_err();
        assert!(matches!(&e, PatchError::Malformed { detail, .. } if detail.contains("not PC32")), "{e}");
    }

    #[test]
    fn endbr_seal_is_a_no_op_without_cet_and_refused_with_it() {
        let (m, mut images, base) = module(".ibt_endbr_seal", &[0], None);
        let before = images.clone();
        finalize(&m, &base, &mut images, &facts(None)).unwrap();
        assert_eq!(images, before);
        let enforced = LoaderFacts { ibt_enforced: true, ..facts(None) };
        let e = finalize(&m, &base, &mut images, &enforced).unwrap_err();
        assert!(matches!(&e, PatchError::UnhandledSection { section, .. } if section == ".ibt_endbr_seal"), "{e}");
    }

    #[test]
    fn orc_header_must_match_the_guests() {
        let hash = vec![0xfe, 0x5d, 0x32, 0xbf];
        let (m, mut images, base) = module(".return_sites", &[], Some((".orc_header", hash.clone())));
        let same = LoaderFacts { orc_header: Some(hash.clone()), ..facts(None) };
        finalize(&m, &base, &mut images, &same).unwrap();
        let other = LoaderFacts { orc_header: Some(vec![1, 2, 3, 4]), ..facts(None) };
        let e = finalize(&m, &base, &mut images, &other).unwrap_err();
        assert!(matches!(&e, PatchError::OrcHeaderMismatch { module, guest: Some(g), .. } if module == "fe5d32bf" && g == "01020304"), "{e}");
        let e = finalize(&m, &base, &mut images, &facts(None)).unwrap_err();
        assert!(matches!(&e, PatchError::OrcHeaderMismatch { guest: None, .. }), "{e}");
    }
}
