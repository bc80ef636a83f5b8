//! Reading a livepatch module (`.ko`, as kbuild or kpatch-build make it)
//! without loading it: its sections, symbols and relocations, and the
//! `struct klp_patch` it would hand to `klp_enable_patch()` (objects, funcs,
//! `replace`, states). Struct layouts come from the guest's BTF: the module
//! was built for that kernel. The file is untrusted input.

use std::collections::HashMap;

use goblin::elf::section_header::{SHF_ALLOC, SHF_EXECINSTR, SHF_WRITE, SHT_NOBITS, SHT_RELA};
use goblin::elf::Elf;
use introspect::btf::Btf;

use crate::error::{PatchError, Result};

/// Largest module file we read.
pub const MAX_MODULE_SIZE: usize = 64 << 20;
const MAX_OBJECTS: usize = 256;
const MAX_FUNCS: usize = 4096;
const MAX_STATES: usize = 256;
const MAX_STRING: usize = 512;

/// How a section is placed in the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum SectionKind {
    Text,
    Rodata,
    Data,
    /// Not placed (init/exit code, metadata, debug info).
    Skip,
}

/// One ELF section of the module.
#[derive(Clone, Debug)]
pub struct Section {
    pub name: String,
    pub kind: SectionKind,
    pub size: u64,
    pub align: u64,
    /// File contents (zeros for NOBITS).
    pub data: Vec<u8>,
}

/// One symbol-table entry.
#[derive(Clone, Debug)]
pub struct Symbol {
    pub name: String,
    /// Defining section; `None` for undefined (external) symbols.
    pub section: Option<usize>,
    pub value: u64,
    pub size: u64,
}

/// One RELA entry.
#[derive(Clone, Copy, Debug)]
pub struct Rela {
    pub offset: u64,
    pub r_type: u32,
    pub sym: usize,
    pub addend: i64,
}

/// Where a pointer in the module's data points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Into one of the module's own sections.
    Local { section: usize, offset: u64 },
    /// To an external symbol (the guest kernel or another module).
    External { name: String, addend: i64 },
}

/// One function the patch replaces.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FuncSpec {
    pub old_name: String,
    pub old_sympos: u64,
    /// Section and offset of the new function in the module.
    pub new_section: usize,
    pub new_offset: u64,
    pub new_symbol: String,
}

/// One patched object: `None` is vmlinux, else a module name.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ObjectSpec {
    pub name: Option<String>,
    pub funcs: Vec<FuncSpec>,
    /// The object has pre/post (un)patch callbacks (hyperpatch does not run them).
    pub has_callbacks: bool,
}

/// A `klp_state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StateSpec {
    pub id: u64,
    pub version: u32,
}

/// The module's `struct klp_patch`, decoded.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PatchSpec {
    pub replace: bool,
    pub objects: Vec<ObjectSpec>,
    pub states: Vec<StateSpec>,
}

/// A parsed livepatch module.
#[derive(Clone, Debug)]
pub struct PatchModule {
    pub path: String,
    /// The module name (`__this_module.name`), as /sys/kernel/livepatch shows it.
    pub name: String,
    pub sections: Vec<Section>,
    pub symbols: Vec<Symbol>,
    /// Relocations by the section they apply to.
    pub relocs: HashMap<usize, Vec<Rela>>,
    pub spec: PatchSpec,
}

/// klp struct offsets from the guest's BTF.
struct KlpLayout {
    patch_mod: u64,
    patch_objs: u64,
    patch_states: u64,
    patch_replace: u64,
    obj_name: u64,
    obj_funcs: u64,
    obj_callbacks: u64,
    callbacks_size: u64,
    obj_size: u64,
    func_old_name: u64,
    func_new_func: u64,
    func_old_sympos: u64,
    func_size: u64,
    state_id: u64,
    state_version: u64,
    state_size: u64,
    module_name: u64,
}

impl KlpLayout {
    fn from_btf(btf: &Btf) -> Result<KlpLayout> {
        Ok(KlpLayout {
            patch_mod: btf.member_offset("klp_patch", "mod")?,
            patch_objs: btf.member_offset("klp_patch", "objs")?,
            patch_states: btf.member_offset("klp_patch", "states")?,
            patch_replace: btf.member_offset("klp_patch", "replace")?,
            obj_name: btf.member_offset("klp_object", "name")?,
            obj_funcs: btf.member_offset("klp_object", "funcs")?,
            obj_callbacks: btf.member_offset("klp_object", "callbacks")?,
            callbacks_size: btf.struct_size("klp_callbacks")?,
            obj_size: btf.struct_size("klp_object")?,
            func_old_name: btf.member_offset("klp_func", "old_name")?,
            func_new_func: btf.member_offset("klp_func", "new_func")?,
            func_old_sympos: btf.member_offset("klp_func", "old_sympos")?,
            func_size: btf.struct_size("klp_func")?,
            state_id: btf.member_offset("klp_state", "id")?,
            state_version: btf.member_offset("klp_state", "version")?,
            state_size: btf.struct_size("klp_state")?,
            module_name: btf.member_offset("module", "name")?,
        })
    }
}

fn section_kind(name: &str, flags: u64) -> SectionKind {
    let skip_prefixes = [".init", ".exit", "__mcount_loc", ".note", ".modinfo", "__versions", ".orc_unwind", ".BTF", ".discard"];
    if flags & u64::from(SHF_ALLOC) == 0 || skip_prefixes.iter().any(|p| name.starts_with(p)) {
        SectionKind::Skip
    } else if flags & u64::from(SHF_EXECINSTR) != 0 {
        SectionKind::Text
    } else if flags & u64::from(SHF_WRITE) != 0 {
        SectionKind::Data
    } else {
        SectionKind::Rodata
    }
}

impl PatchModule {
    /// Parses `bytes` (the contents of `path`) using the guest's BTF for the
    /// klp struct layouts.
    pub fn parse(path: &str, bytes: &[u8], btf: &Btf) -> Result<PatchModule> {
        let malformed = |d: String| PatchError::Malformed { path: path.into(), detail: d };
        if bytes.len() > MAX_MODULE_SIZE {
            return Err(malformed(format!("{} bytes is larger than {MAX_MODULE_SIZE}", bytes.len())));
        }
        if bytes.get(..4) != Some(b"\x7fELF") {
            return Err(PatchError::NotElf { path: path.into(), detail: "no ELF magic".into() });
        }
        let elf = Elf::parse(bytes).map_err(|e| PatchError::NotElf { path: path.into(), detail: e.to_string() })?;
        if elf.header.e_type != goblin::elf::header::ET_REL || elf.header.e_machine != goblin::elf::header::EM_X86_64 || !elf.is_64 {
            return Err(PatchError::NotLivepatch { path: path.into(), detail: "not an x86_64 relocatable object (.ko)".into() });
        }
        let mut sections = Vec::new();
        for sh in &elf.section_headers {
            let name = elf.shdr_strtab.get_at(sh.sh_name).unwrap_or("").to_string();
            let kind = section_kind(&name, sh.sh_flags);
            let data = if sh.sh_type == SHT_NOBITS {
                if kind != SectionKind::Skip && sh.sh_size > MAX_MODULE_SIZE as u64 {
                    return Err(malformed(format!("section {name} claims {} bytes", sh.sh_size)));
                }
                if kind == SectionKind::Skip { Vec::new() } else { vec![0u8; sh.sh_size as usize] }
            } else if kind == SectionKind::Skip && !name.starts_with(".orc_unwind") {
                Vec::new()
            } else {
                let start = usize::try_from(sh.sh_offset).map_err(|_| malformed(format!("section {name} offset")))?;
                let end = start
                    .checked_add(usize::try_from(sh.sh_size).map_err(|_| malformed(format!("section {name} size")))?)
                    .ok_or_else(|| malformed(format!("section {name} overflows")))?;
                bytes.get(start..end).ok_or_else(|| malformed(format!("section {name} is past the end of the file")))?.to_vec()
            };
            sections.push(Section { name, kind, size: sh.sh_size, align: sh.sh_addralign.max(1), data });
        }
        let mut symbols = Vec::new();
        for s in elf.syms.iter() {
            let name = elf.strtab.get_at(s.st_name).unwrap_or("").to_string();
            let section = match s.st_shndx {
                0 => None,
                n if n < sections.len() && n != 0xfff1 => Some(n),
                _ => None,
            };
            symbols.push(Symbol { name, section, value: s.st_value, size: s.st_size });
        }
        let mut relocs: HashMap<usize, Vec<Rela>> = HashMap::new();
        for (idx, rs) in &elf.shdr_relocs {
            let sh = elf.section_headers.get(*idx).ok_or_else(|| malformed("relocation section index".into()))?;
            if sh.sh_type != SHT_RELA {
                continue;
            }
            let target = sh.sh_info as usize;
            if target >= sections.len() {
                return Err(malformed(format!("relocation section {idx} applies to missing section {target}")));
            }
            let v = relocs.entry(target).or_default();
            for r in rs.iter() {
                if r.r_sym >= symbols.len() {
                    return Err(malformed(format!("relocation names symbol {} of {}", r.r_sym, symbols.len())));
                }
                v.push(Rela { offset: r.r_offset, r_type: r.r_type, sym: r.r_sym, addend: r.r_addend.unwrap_or(0) });
            }
        }
        for v in relocs.values_mut() {
            v.sort_by_key(|r| r.offset);
        }
        let mut m = PatchModule {
            path: path.into(),
            name: String::new(),
            sections,
            symbols,
            relocs,
            spec: PatchSpec { replace: false, objects: Vec::new(), states: Vec::new() },
        };
        let layout = KlpLayout::from_btf(btf)?;
        m.name = m.module_name(&layout)?;
        m.spec = m.find_patch(&layout)?;
        Ok(m)
    }

    fn err(&self, d: impl Into<String>) -> PatchError {
        PatchError::Malformed { path: self.path.clone(), detail: d.into() }
    }

    fn not_livepatch(&self, d: impl Into<String>) -> PatchError {
        PatchError::NotLivepatch { path: self.path.clone(), detail: d.into() }
    }

    /// The relocation at exactly `offset` of `section`, if any.
    pub fn rela_at(&self, section: usize, offset: u64) -> Option<&Rela> {
        let v = self.relocs.get(&section)?;
        let i = v.partition_point(|r| r.offset < offset);
        v.get(i).filter(|r| r.offset == offset)
    }

    /// Where the pointer stored at `section`+`offset` points (R_X86_64_64).
    pub fn pointer_at(&self, section: usize, offset: u64) -> Option<Target> {
        let r = self.rela_at(section, offset)?;
        if r.r_type != goblin::elf::reloc::R_X86_64_64 {
            return None;
        }
        let s = self.symbols.get(r.sym)?;
        match s.section {
            Some(sec) => {
                let off = (s.value as i64).checked_add(r.addend)?;
                Some(Target::Local { section: sec, offset: u64::try_from(off).ok()? })
            }
            None => Some(Target::External { name: s.name.clone(), addend: r.addend }),
        }
    }

    fn bytes(&self, section: usize, offset: u64, len: usize) -> Result<&[u8]> {
        let s = self.sections.get(section).ok_or_else(|| self.err(format!("section {section}")))?;
        let start = usize::try_from(offset).map_err(|_| self.err("offset"))?;
        s.data
            .get(start..start.checked_add(len).ok_or_else(|| self.err("offset overflow"))?)
            .ok_or_else(|| self.err(format!("read of {len} bytes at {}+{offset:#x} is outside the section", s.name)))
    }

    fn u64_at(&self, section: usize, offset: u64) -> Result<u64> {
        let b = self.bytes(section, offset, 8)?;
        Ok(u64::from_le_bytes(b.try_into().map_err(|_| self.err("u64"))?))
    }

    fn u32_at(&self, section: usize, offset: u64) -> Result<u32> {
        let b = self.bytes(section, offset, 4)?;
        Ok(u32::from_le_bytes(b.try_into().map_err(|_| self.err("u32"))?))
    }

    /// A NUL-terminated string a pointer field points to.
    fn string_at(&self, t: &Target) -> Result<String> {
        match t {
            Target::Local { section, offset } => {
                let s = self.sections.get(*section).ok_or_else(|| self.err("string section"))?;
                let start = usize::try_from(*offset).map_err(|_| self.err("string offset"))?;
                let tail = s.data.get(start..).ok_or_else(|| self.err("string outside its section"))?;
                let end = tail.iter().take(MAX_STRING).position(|b| *b == 0).ok_or_else(|| self.err("unterminated string"))?;
                Ok(String::from_utf8_lossy(tail.get(..end).unwrap_or(&[])).into_owned())
            }
            Target::External { name, .. } => Err(self.err(format!("string pointer to external symbol {name}"))),
        }
    }

    fn this_module(&self) -> Result<(usize, u64)> {
        let s = self
            .symbols
            .iter()
            .find(|s| s.name == "__this_module" && s.section.is_some())
            .ok_or_else(|| self.not_livepatch("no __this_module (not a kernel module)"))?;
        Ok((s.section.ok_or_else(|| self.err("__this_module"))?, s.value))
    }

    fn module_name(&self, l: &KlpLayout) -> Result<String> {
        let (sec, off) = self.this_module()?;
        let raw = self.bytes(sec, off + l.module_name, 56)?;
        let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
        let name = String::from_utf8_lossy(raw.get(..end).unwrap_or(&[])).into_owned();
        if name.is_empty() {
            return Err(self.err("__this_module has no name"));
        }
        Ok(name)
    }

    /// Finds the `struct klp_patch`: the data object whose `mod` points at
    /// `__this_module` and whose `objs` points into the module.
    fn find_patch(&self, l: &KlpLayout) -> Result<PatchSpec> {
        let this = self.symbols.iter().position(|s| s.name == "__this_module");
        let mut found = Vec::new();
        for (sec, rels) in &self.relocs {
            if self.sections.get(*sec).map(|s| s.kind) != Some(SectionKind::Data) {
                continue;
            }
            for r in rels {
                if Some(r.sym) != this || r.r_type != goblin::elf::reloc::R_X86_64_64 || r.addend != 0 {
                    continue;
                }
                let Some(base) = r.offset.checked_sub(l.patch_mod) else { continue };
                if let Some(Target::Local { .. }) = self.pointer_at(*sec, base + l.patch_objs) {
                    found.push((*sec, base));
                }
            }
        }
        let (sec, base) = match found.as_slice() {
            [one] => *one,
            [] => return Err(self.not_livepatch("no struct klp_patch (no data object with .mod = THIS_MODULE and .objs)")),
            _ => return Err(self.not_livepatch(format!("{} candidate klp_patch objects", found.len()))),
        };
        let replace = self.bytes(sec, base + l.patch_replace, 1)?.first().copied().unwrap_or(0) != 0;
        let Some(Target::Local { section: osec, offset: mut ooff }) = self.pointer_at(sec, base + l.patch_objs) else {
            return Err(self.not_livepatch("klp_patch.objs does not point into the module"));
        };
        let mut objects = Vec::new();
        loop {
            if objects.len() >= MAX_OBJECTS {
                return Err(self.err("too many klp_objects (no terminator?)"));
            }
            let funcs_ptr = self.pointer_at(osec, ooff + l.obj_funcs);
            let Some(Target::Local { section: fsec, offset: mut foff }) = funcs_ptr else {
                // The terminating {} entry has no funcs.
                break;
            };
            let name = match self.pointer_at(osec, ooff + l.obj_name) {
                None => None,
                Some(t) => Some(self.string_at(&t)?),
            };
            let mut funcs = Vec::new();
            loop {
                if funcs.len() >= MAX_FUNCS {
                    return Err(self.err("too many klp_funcs (no terminator?)"));
                }
                let Some(old) = self.pointer_at(fsec, foff + l.func_old_name) else { break };
                let old_name = self.string_at(&old)?;
                let old_sympos = self.u64_at(fsec, foff + l.func_old_sympos)?;
                let (new_section, new_offset) = match self.pointer_at(fsec, foff + l.func_new_func) {
                    Some(Target::Local { section, offset }) => (section, offset),
                    Some(Target::External { name, .. }) => {
                        return Err(self.err(format!("new_func of {old_name} is external symbol {name}")))
                    }
                    None => return Err(self.err(format!("klp_func {old_name} has no new_func"))),
                };
                if self.sections.get(new_section).map(|s| s.kind) != Some(SectionKind::Text) {
                    return Err(self.err(format!("new_func of {old_name} is not in a text section")));
                }
                let new_symbol = self
                    .symbols
                    .iter()
                    .find(|s| s.section == Some(new_section) && s.value == new_offset && !s.name.is_empty() && s.size > 0)
                    .map(|s| s.name.clone())
                    .unwrap_or_else(|| format!("{}+{new_offset:#x}", self.sections[new_section].name));
                funcs.push(FuncSpec { old_name, old_sympos, new_section, new_offset, new_symbol });
                foff = foff.checked_add(l.func_size).ok_or_else(|| self.err("funcs overflow"))?;
            }
            let has_callbacks = (0..l.callbacks_size / 8)
                .filter_map(|i| self.pointer_at(osec, ooff + l.obj_callbacks + i * 8))
                .next()
                .is_some();
            objects.push(ObjectSpec { name, funcs, has_callbacks });
            ooff = ooff.checked_add(l.obj_size).ok_or_else(|| self.err("objs overflow"))?;
        }
        if objects.is_empty() {
            return Err(self.not_livepatch("the klp_patch has no objects"));
        }
        let mut states = Vec::new();
        if let Some(Target::Local { section: ssec, offset: mut soff }) = self.pointer_at(sec, base + l.patch_states) {
            loop {
                if states.len() >= MAX_STATES {
                    return Err(self.err("too many klp_states (no terminator?)"));
                }
                let id = self.u64_at(ssec, soff + l.state_id)?;
                if id == 0 {
                    break;
                }
                let version = self.u32_at(ssec, soff + l.state_version)?;
                states.push(StateSpec { id, version });
                soff = soff.checked_add(l.state_size).ok_or_else(|| self.err("states overflow"))?;
            }
        }
        Ok(PatchSpec { replace, objects, states })
    }
}
