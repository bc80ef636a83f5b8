//! Reading a livepatch module (`.ko`, as kbuild, kpatch-build or klp-build
//! make it) without loading it: its sections, symbols and relocations, its
//! init and exit functions and its parameters. Its `struct klp_patch` is
//! not read from the file: the module's init builds (or points at) it and
//! hands it to `klp_enable_patch()`, which hyperpatch serves, and the
//! patch is read from guest memory then (`klp_read`). Struct layouts come
//! from the guest's BTF: the module was built for that kernel. The file is
//! untrusted input.

use std::collections::HashMap;

use goblin::elf::section_header::{SHF_ALLOC, SHF_EXECINSTR, SHF_WRITE, SHT_NOBITS, SHT_RELA};
use goblin::elf::Elf;
use introspect::btf::Btf;

use crate::error::{PatchError, Result};

/// Version of what `PatchModule::parse` keeps; part of the host cache's
/// key, so a parse made by an older hyperpatch is never reused. 2: the
/// loader tables (`crate::loader::LOADER_TABLES`) keep their contents.
pub const PARSE_VERSION: u32 = 2;

/// Largest module file we read.
pub const MAX_MODULE_SIZE: usize = 64 << 20;
const MAX_STRING: usize = 512;

/// How a section is placed in the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SectionKind {
    Text,
    Rodata,
    Data,
    /// Not placed (init/exit code, metadata, debug info).
    Skip,
}

/// One ELF section of the module.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Section {
    pub name: String,
    pub kind: SectionKind,
    pub size: u64,
    pub align: u64,
    /// File contents (zeros for NOBITS).
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// One symbol-table entry.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Symbol {
    pub name: String,
    /// Defining section; `None` for undefined (external) symbols.
    pub section: Option<usize>,
    pub value: u64,
    pub size: u64,
}

/// One RELA entry.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
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
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct FuncSpec {
    pub old_name: String,
    pub old_sympos: u64,
    /// Section and offset of the new function in the module.
    pub new_section: usize,
    pub new_offset: u64,
    pub new_symbol: String,
    /// Size of the new function (its symbol's st_size).
    #[serde(default)]
    pub new_size: u64,
    /// Guest address of this `struct klp_func`.
    #[serde(default)]
    pub addr: u64,
}

/// An object's `struct klp_callbacks` (guest addresses, 0 = none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Callbacks {
    pub pre_patch: u64,
    pub post_patch: u64,
    pub pre_unpatch: u64,
    pub post_unpatch: u64,
}

impl Callbacks {
    pub fn any(&self) -> bool {
        *self != Callbacks::default()
    }
}

/// One patched object: `None` is vmlinux, else a module name.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ObjectSpec {
    pub name: Option<String>,
    pub funcs: Vec<FuncSpec>,
    /// The object's callbacks.
    #[serde(default)]
    pub callbacks: Callbacks,
    /// Guest address of this `struct klp_object`.
    #[serde(default)]
    pub addr: u64,
    /// Its pre-patch callback ran and succeeded (or it has none) since it
    /// was last unpatched: its post-unpatch callback may run
    /// (`callbacks.post_unpatch_enabled` upstream).
    #[serde(default)]
    pub post_unpatch_enabled: bool,
}

/// A `klp_state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StateSpec {
    pub id: u64,
    pub version: u32,
    /// Guest address of this `struct klp_state` (0 when not known).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub addr: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// The `struct klp_patch` the module's init handed to `klp_enable_patch()`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PatchSpec {
    pub replace: bool,
    pub objects: Vec<ObjectSpec>,
    pub states: Vec<StateSpec>,
    /// Guest address of the `struct klp_patch`.
    #[serde(default)]
    pub addr: u64,
    /// Applied with `skip_callbacks`: none of its callbacks ever run.
    #[serde(default)]
    pub skip_callbacks: bool,
}

/// A parsed livepatch module. Serializable: it depends only on the .ko's
/// bytes and the kernel's BTF, so the host cache keeps one per kernel build.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PatchModule {
    pub path: String,
    /// The module name (`__this_module.name`), as /sys/kernel/livepatch shows it.
    pub name: String,
    pub sections: Vec<Section>,
    pub symbols: Vec<Symbol>,
    /// Relocations by the section they apply to.
    pub relocs: HashMap<usize, Vec<Rela>>,
    /// `__this_module`: (section, offset).
    pub this_module: (usize, u64),
    /// The module's init and exit functions (`__this_module.init`/`.exit`).
    pub init: Option<(usize, u64)>,
    pub exit: Option<(usize, u64)>,
    /// Its parameters (`__param`).
    pub params: Vec<crate::params::ParamSpec>,
}

/// `struct module` offsets from the guest's BTF.
struct ModuleLayout {
    name: u64,
    init: u64,
    exit: u64,
}

impl ModuleLayout {
    fn from_btf(btf: &Btf) -> Result<ModuleLayout> {
        Ok(ModuleLayout {
            name: btf.member_offset("module", "name")?,
            init: btf.member_offset("module", "init")?,
            exit: btf.member_offset("module", "exit")?,
        })
    }
}

/// Allocated sections that the kernel's module loader processes and
/// hyperpatch does not (yet): each refuses the module by name, with what
/// the loader would have done with it.
const UNHANDLED_SECTIONS: &[(&str, &str)] = &[
    ("__ex_table", "exception-table entries the fault handler must find"),
    ("__bug_table", "BUG/WARN entries report_bug must find"),
    (".altinstructions", "alternatives applied against the CPU's features"),
    (".altinstr_replacement", "alternatives applied against the CPU's features"),
    (".altinstr_aux", "alternatives applied against the CPU's features"),
    (".parainstructions", "paravirt patch sites"),
    (".smp_locks", "lock prefixes the loader registers"),
    ("__jump_table", "static branches that follow their keys"),
    (".static_call_sites", "static call sites"),
    (".static_call.text", "static call trampolines"),
    (".retpoline_sites", "retpoline sites the loader rewrites"),
    (".call_sites", "call-depth tracking sites"),
    (".ibt_endbr_seal", "IBT endbr sealing"),
    (".data..percpu", "per-cpu data needs a per-cpu area from the guest's allocator"),
    ("__ksymtab", "symbols the module exports"),
    ("__kcrctab", "symbols the module exports"),
    ("__ksymtab_strings", "symbols the module exports"),
    ("__tracepoints", "tracepoints the loader registers"),
    ("__tracepoints_ptrs", "tracepoints the loader registers"),
    ("__tracepoints_strings", "tracepoints the loader registers"),
    ("_ftrace_events", "trace events the loader registers"),
    ("_ftrace_eval_map", "trace events the loader registers"),
    ("__bpf_raw_tp_map", "BPF raw tracepoints the loader registers"),
    ("__dyndbg", "dynamic debug sites the loader registers"),
    ("__dyndbg_classes", "dynamic debug sites the loader registers"),
    (".init_array", "constructors the loader runs"),
    (".ctors", "constructors the loader runs"),
    (".kunit_test_suites", "KUnit suites the loader registers"),
    (".printk_index", "printk index entries the loader registers"),
    ("__patchable_function_entries", "function entries the loader records"),
    ("__kprobes", "kprobe blacklist entries"),
    ("_kprobe_blacklist", "kprobe blacklist entries"),
    ("_error_injection_whitelist", "error-injection entries"),
    (".static_call_tramp_key", "static call keys"),
];

/// A table the loader applies at link time (`crate::loader`): read, not
/// placed.
fn keeps_table(name: &str) -> bool {
    crate::loader::LOADER_TABLES.contains(&name)
}

/// How an allocated section is placed, or why the module is refused.
/// Placed: text, rodata, data and bss (with their init and exit forms),
/// `__param` (parameters, set as the loader sets them), `.modinfo` and
/// `.gnu.linkonce.this_module`; the ORC tables are registered with the
/// unwinder; the loader tables of `crate::loader` are applied. Every other allocated section is refused by name.
fn section_kind(name: &str, flags: u64) -> std::result::Result<SectionKind, &'static str> {
    // Not placed: metadata (.modinfo and the ORC tables are read), debug
    // info, and the patch's own ftrace call sites (`__mcount_loc`: its
    // `__fentry__` calls stay calls, and the guest's ftrace never sees them).
    let skip_prefixes = ["__mcount_loc", ".note", ".modinfo", "__versions", ".orc_unwind", ".BTF", ".discard"];
    if flags & u64::from(SHF_ALLOC) == 0 || skip_prefixes.iter().any(|p| name.starts_with(p)) || keeps_table(name) {
        return Ok(SectionKind::Skip);
    }
    if let Some((_, why)) = UNHANDLED_SECTIONS.iter().find(|(n, _)| name == *n || name.starts_with(&format!("{n}_")) || name.starts_with(&format!("{n}."))) {
        return Err(why);
    }
    // Init and exit code and data are placed too: hyperpatch runs them.
    let plain = [".text", ".init.text", ".exit.text", ".sched.text", ".ref.text", ".noinstr.text", ".rodata", ".init.rodata",
        ".data", ".init.data", ".exit.data", ".ref.data", ".bss", ".gnu.linkonce.this_module", "__param"];
    let placed = plain.iter().any(|p| name == *p || name.strip_prefix(p).is_some_and(|rest| rest.starts_with('.')));
    if !placed || name.starts_with(".data..percpu") {
        return Err("a section the module loader knows and hyperpatch does not");
    }
    Ok(if flags & u64::from(SHF_EXECINSTR) != 0 {
        SectionKind::Text
    } else if flags & u64::from(SHF_WRITE) != 0 {
        SectionKind::Data
    } else {
        SectionKind::Rodata
    })
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
            let kind = section_kind(&name, sh.sh_flags).map_err(|why| PatchError::UnhandledSection { path: path.into(), section: name.clone(), why })?;
            let data = if sh.sh_type == SHT_NOBITS {
                if kind != SectionKind::Skip && sh.sh_size > MAX_MODULE_SIZE as u64 {
                    return Err(malformed(format!("section {name} claims {} bytes", sh.sh_size)));
                }
                if kind == SectionKind::Skip { Vec::new() } else { vec![0u8; sh.sh_size as usize] }
            } else if kind == SectionKind::Skip && !name.starts_with(".orc_unwind") && name != ".modinfo" && !keeps_table(&name) {
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
            this_module: (0, 0),
            init: None,
            exit: None,
            params: Vec::new(),
        };
        if !m.modinfo().iter().any(|kv| kv == "livepatch=Y") {
            return Err(m.not_livepatch("its .modinfo has no livepatch=Y (MODULE_INFO(livepatch, \"Y\"))"));
        }
        let layout = ModuleLayout::from_btf(btf)?;
        m.this_module = m.this_module()?;
        m.name = m.module_name(&layout)?;
        let (sec, off) = m.this_module;
        m.init = m.code_pointer(sec, off + layout.init, "init")?;
        m.exit = m.code_pointer(sec, off + layout.exit, "exit")?;
        m.params = crate::params::ParamSpec::read_all(&m, btf)?;
        Ok(m)
    }

    /// A malformed-module error naming this module.
    pub fn malformed(&self, d: impl Into<String>) -> PatchError {
        self.err(d)
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

    /// The `key=value` strings of `.modinfo`.
    pub fn modinfo(&self) -> Vec<String> {
        self.sections
            .iter()
            .filter(|s| s.name == ".modinfo")
            .flat_map(|s| s.data.split(|b| *b == 0).filter(|x| !x.is_empty()).map(|x| String::from_utf8_lossy(x).into_owned()))
            .collect()
    }

    /// A function pointer field of `__this_module` (init, exit): it must
    /// point into the module's own text.
    fn code_pointer(&self, sec: usize, off: u64, what: &str) -> Result<Option<(usize, u64)>> {
        match self.pointer_at(sec, off) {
            None => Ok(None),
            Some(Target::Local { section, offset }) if self.sections.get(section).map(|s| s.kind) == Some(SectionKind::Text) => {
                Ok(Some((section, offset)))
            }
            Some(t) => Err(self.err(format!("__this_module.{what} points at {t:?}, not into the module's text"))),
        }
    }

    /// The NUL-terminated string at a module-local pointer target (public
    /// for the parameter table).
    pub fn string(&self, t: &Target) -> Result<String> {
        self.string_at(t)
    }

    /// A little-endian u32 at `section`+`offset`.
    pub fn read_u32(&self, section: usize, offset: u64) -> Result<u32> {
        self.u32_at(section, offset)
    }

    fn module_name(&self, l: &ModuleLayout) -> Result<String> {
        let (sec, off) = self.this_module;
        let raw = self.bytes(sec, off + l.name, 56)?;
        let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
        let name = String::from_utf8_lossy(raw.get(..end).unwrap_or(&[])).into_owned();
        if name.is_empty() {
            return Err(self.err("__this_module has no name"));
        }
        Ok(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: u64 = SHF_ALLOC as u64;
    const AX: u64 = (SHF_ALLOC | SHF_EXECINSTR) as u64;
    const WA: u64 = (SHF_ALLOC | SHF_WRITE) as u64;

    #[test]
    fn sections_are_placed_skipped_or_refused_by_name() {
        for (name, flags, kind) in [
            (".text", AX, SectionKind::Text),
            (".text.unlikely", AX, SectionKind::Text),
            (".init.text", AX, SectionKind::Text),
            (".rodata.str1.1", A, SectionKind::Rodata),
            (".data", WA, SectionKind::Data),
            (".data.once", WA, SectionKind::Data),
            (".data..read_mostly", WA, SectionKind::Data),
            (".exit.data", WA, SectionKind::Data),
            (".gnu.linkonce.this_module", WA, SectionKind::Data),
            ("__param", A, SectionKind::Rodata),
            (".orc_unwind_ip", A, SectionKind::Skip),
            ("__mcount_loc", A, SectionKind::Skip),
            (".debug_info", 0, SectionKind::Skip),
            ("__jump_table", 0, SectionKind::Skip),
            (".return_sites", A, SectionKind::Skip),
            (".ibt_endbr_seal", A, SectionKind::Skip),
            (".orc_header", A, SectionKind::Skip),
        ] {
            assert_eq!(section_kind(name, flags), Ok(kind), "{name}");
        }
        for name in [
            "__ex_table", "__bug_table", ".altinstructions", ".altinstr_replacement", ".parainstructions", ".smp_locks",
            "__jump_table", ".static_call_sites", ".retpoline_sites", ".data..percpu", "__ksymtab_gpl",
            "__tracepoints", ".init_array", "__dyndbg", ".some_new_section", "text",
        ] {
            assert!(section_kind(name, WA).is_err(), "{name} must be refused");
        }
    }
}
