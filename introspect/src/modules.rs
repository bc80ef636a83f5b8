//! Loaded modules: the `modules` list, each module's text range, its
//! /proc/modules line and its own symbols (from `mod->kallsyms`).

use std::collections::HashSet;

use crate::error::{IntrospectError, Result};
use crate::kernel::Kernel;
use crate::tasks::walk_list;
use crate::translate::KernelMemory;

/// Most modules we walk before calling the list corrupted.
pub const MAX_MODULES: usize = 4096;
/// Most symbols one module may have.
pub const MAX_MODULE_SYMS: u32 = 1 << 20;
/// Most symbols and exports all modules together may claim. Every reader
/// of module symbols loops over [`Kernel::modules`] and reads each
/// module's table, so without a total the per-module and per-list limits
/// multiply (4096 modules x 1M symbols each).
/// (A big distribution system's modules have ~100k; reading 512k takes a
/// few seconds in a debug build.)
pub const MAX_TOTAL_MODULE_SYMS: u64 = 1 << 19;
/// Largest `struct kernel_symbol` we accept (12 bytes on x86_64).
const MAX_KERNEL_SYMBOL_SIZE: u64 = 64;
const MODULE_NAME_LEN: usize = 56;
const ELF64_SYM_SIZE: u64 = 24;
const MODULE_REF_BASE: i64 = 1;
/// Module taint bits and the letters /proc/modules shows (kernel/panic.c).
const MODULE_TAINTS: &[(u32, char)] =
    &[(0, 'P'), (1, 'F'), (10, 'C'), (12, 'O'), (13, 'E'), (15, 'K'), (16, 'X'), (17, 'T'), (18, 'N')];

/// One loaded module.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Module {
    pub addr: u64,
    pub name: String,
    /// "Live", "Loading", "Unloading" or "Gone".
    pub state: String,
    /// Start and size of the module's core text (6.1: the start of
    /// `core_layout`, whose text comes first; 6.4+: `mem[MOD_TEXT]`).
    pub core_base: u64,
    /// All core memory together, as /proc/modules counts it.
    pub core_size: u64,
    pub core_text_size: u64,
    /// All init memory together (0 once init memory is freed).
    pub init_size: u64,
    /// Every core and init memory range (`within_module_core/init`): one
    /// each in 6.1, one per `mod_mem_type` in 6.4+.
    pub core_ranges: Vec<(u64, u64)>,
    pub init_ranges: Vec<(u64, u64)>,
    /// Start and size of the init text (`%pS` sizes init symbols by it).
    pub init_text: (u64, u64),
    pub refcount: i64,
    pub taints: String,
}

impl Module {
    /// The line /proc/modules prints for this module (dependencies as "-").
    pub fn proc_line(&self) -> String {
        let mut s = format!(
            "{} {} {} - {} 0x{:016x}",
            self.name,
            self.core_size + self.init_size,
            self.refcount,
            self.state,
            self.core_base
        );
        let mut flags = self.taints.clone();
        if self.state == "Loading" {
            flags.push('+');
        } else if self.state == "Unloading" {
            flags.push('-');
        }
        if !flags.is_empty() {
            s.push_str(&format!(" ({flags})"));
        }
        s
    }

    /// Whether `addr` is in the module's core text.
    pub fn contains_text(&self, addr: u64) -> bool {
        addr >= self.core_base && addr - self.core_base < self.core_text_size
    }

    /// The kernel's `within_module_core()`.
    pub fn within_core(&self, addr: u64) -> bool {
        self.core_ranges.iter().any(|&(b, n)| b != 0 && addr >= b && addr - b < n)
    }

    /// The kernel's `within_module_init()`.
    pub fn within_init(&self, addr: u64) -> bool {
        self.init_ranges.iter().any(|&(b, n)| b != 0 && addr >= b && addr - b < n)
    }
}

/// The memory types of `enum mod_mem_type` (6.4+), core ones first.
const MOD_CORE_TYPES: [&str; 4] = ["MOD_TEXT", "MOD_DATA", "MOD_RODATA", "MOD_RO_AFTER_INIT"];
const MOD_INIT_TYPES: [&str; 3] = ["MOD_INIT_TEXT", "MOD_INIT_DATA", "MOD_INIT_RODATA"];

/// Where a module's memory is, as `struct module` describes it in the
/// guest's BTF.
struct ModuleMemory {
    core_ranges: Vec<(u64, u64)>,
    init_ranges: Vec<(u64, u64)>,
    core_text: (u64, u64),
    init_text: (u64, u64),
}

/// A symbol of a module.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ModuleSymbol {
    pub module: String,
    pub name: String,
    pub addr: u64,
    /// ELF `st_size` (0 when unknown).
    pub size: u64,
    pub kind: char,
}

impl Kernel<'_> {
    /// Every module on the `modules` list.
    pub fn modules(&self) -> Result<Vec<Module>> {
        let list_off = self.off("module", "list")?;
        let head = self.sym("modules")?;
        let addrs = walk_list(&self.mem, head, list_off, MAX_MODULES, "module list")?;
        let modules: Vec<Module> = addrs.into_iter().map(|a| self.module_at(a)).collect::<Result<_>>()?;
        // What the modules claim to have in all: bounds every caller that
        // reads the symbols of each module in turn.
        let mut claimed = 0u64;
        for m in &modules {
            claimed = claimed.saturating_add(self.module_symbol_claims(m));
        }
        if claimed > MAX_TOTAL_MODULE_SYMS {
            return Err(IntrospectError::Corrupt(format!(
                "the {} modules claim {claimed} symbols and exports in all (more than {MAX_TOTAL_MODULE_SYMS})",
                modules.len()
            )));
        }
        Ok(modules)
    }

    /// `mod->kallsyms->num_symtab + mod->num_syms` as the guest says them
    /// (0 for what cannot be read: reading the table fails later anyway).
    fn module_symbol_claims(&self, m: &Module) -> u64 {
        let field_u32 = |base: u64, ty: &str, f: &str| -> Option<u64> {
            let a = base.checked_add(self.off(ty, f).ok()?)?;
            self.mem.read_u32(a).ok().map(u64::from)
        };
        let symtab = self
            .off("module", "kallsyms")
            .ok()
            .and_then(|o| self.read_ptr(m.addr, o).ok())
            .filter(|ks| *ks != 0)
            .and_then(|ks| field_u32(ks, "mod_kallsyms", "num_symtab"))
            .unwrap_or(0);
        let exports = field_u32(m.addr, "module", "num_syms").unwrap_or(0);
        symtab.saturating_add(exports)
    }

    fn module_at(&self, addr: u64) -> Result<Module> {
        let at = |o: u64| addr.checked_add(o).ok_or(IntrospectError::Overflow(addr));
        let raw = self.mem.read_bytes(at(self.off("module", "name")?)?, MODULE_NAME_LEN)?;
        let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
        let name = String::from_utf8_lossy(raw.get(..end).unwrap_or(&[])).into_owned();
        let state = match self.mem.read_u32(at(self.off("module", "state")?)?)? {
            0 => "Live",
            1 => "Coming",
            2 => "Unloading",
            3 => "Loading",
            _ => "Gone",
        };
        // /proc/modules calls MODULE_STATE_COMING "Loading" too.
        let state = if state == "Coming" { "Loading" } else { state }.to_string();
        let mem = self.module_memory(addr)?;
        let total = |r: &[(u64, u64)]| r.iter().fold(0u64, |a, &(_, n)| a.saturating_add(n));
        let (core_size, init_size) = (total(&mem.core_ranges), total(&mem.init_ranges));
        let (core_base, core_text_size) = mem.core_text;
        let refcount = i64::from(self.mem.read_i32(at(self.off("module", "refcnt")?)?)?) - MODULE_REF_BASE;
        let taint_bits = self.mem.read_u64(at(self.off("module", "taints")?)?)?;
        let taints = MODULE_TAINTS
            .iter()
            .filter(|(bit, _)| taint_bits & (1 << bit) != 0)
            .map(|(_, c)| *c)
            .collect();
        Ok(Module {
            addr,
            name,
            state,
            core_base,
            core_size,
            core_text_size,
            init_size,
            core_ranges: mem.core_ranges,
            init_ranges: mem.init_ranges,
            init_text: mem.init_text,
            refcount,
            taints,
        })
    }

    /// The module's memory: `core_layout`/`init_layout` (each one block,
    /// text first) where the guest's `struct module` has them, else
    /// `mem[]` indexed by `enum mod_mem_type` (6.4+). Any other shape, or a
    /// `mod_mem_type` with types hyperpatch does not know, is refused.
    fn module_memory(&self, addr: u64) -> Result<ModuleMemory> {
        let at = |o: u64| addr.checked_add(o).ok_or(IntrospectError::Overflow(addr));
        let u32_at = |path: &str| -> Result<u64> { Ok(u64::from(self.mem.read_u32(at(self.off("module", path)?)?)?)) };
        if self.btf.member("module", "core_layout").is_ok() {
            let core = (self.read_ptr(addr, self.off("module", "core_layout.base")?)?, u32_at("core_layout.size")?);
            let init = (self.read_ptr(addr, self.off("module", "init_layout.base")?)?, u32_at("init_layout.size")?);
            return Ok(ModuleMemory {
                core_ranges: vec![core],
                init_ranges: vec![init],
                core_text: (core.0, u32_at("core_layout.text_size")?),
                init_text: (init.0, u32_at("init_layout.text_size")?),
            });
        }
        let mem = self.btf.member("module", "mem")?;
        let slots = u64::from(self.btf.array_len(mem.type_id)?);
        let num_types = self.btf.enum_value(Some("mod_mem_type"), "MOD_MEM_NUM_TYPES")?;
        let known = MOD_CORE_TYPES.len() + MOD_INIT_TYPES.len();
        if u64::try_from(num_types).ok() != Some(known as u64) || slots != known as u64 {
            return Err(IntrospectError::Corrupt(format!(
                "struct module.mem has {slots} slots and enum mod_mem_type {num_types} types; hyperpatch knows {known} ({} {})",
                MOD_CORE_TYPES.join(" "),
                MOD_INIT_TYPES.join(" ")
            )));
        }
        let region = |ty: &str| -> Result<(u64, u64)> {
            let index = self.btf.enum_value(Some("mod_mem_type"), ty)?;
            let index = u64::try_from(index).ok().filter(|i| *i < slots).ok_or_else(|| {
                IntrospectError::Corrupt(format!("enum mod_mem_type: {ty} = {index} is outside module.mem[{slots}]"))
            })?;
            let base = self.read_ptr(addr, self.off("module", &format!("mem[{index}].base"))?)?;
            Ok((base, u32_at(&format!("mem[{index}].size"))?))
        };
        let core_ranges = MOD_CORE_TYPES.iter().map(|t| region(t)).collect::<Result<Vec<_>>>()?;
        let init_ranges = MOD_INIT_TYPES.iter().map(|t| region(t)).collect::<Result<Vec<_>>>()?;
        Ok(ModuleMemory { core_text: core_ranges[0], init_text: init_ranges[0], core_ranges, init_ranges })
    }

    /// The defined symbols of `module` (`mod->kallsyms`, undefined ones
    /// left out), typed as /proc/kallsyms types them.
    pub fn module_symbols(&self, module: &Module) -> Result<Vec<ModuleSymbol>> {
        Ok(self
            .module_symtab(module)?
            .into_iter()
            .filter(|s| s.shndx != SHN_UNDEF && !s.sym.name.starts_with("$x"))
            .map(|s| s.sym)
            .collect())
    }

    /// Every line /proc/kallsyms prints for `module`, in its order: each
    /// named `mod->kallsyms` entry, the undefined ones (a livepatch module
    /// keeps them, type `u`) included.
    pub fn module_kallsyms(&self, module: &Module) -> Result<Vec<ModuleSymbol>> {
        Ok(self.module_symtab(module)?.into_iter().map(|s| s.sym).collect())
    }

    /// The kernel's `module_address_lookup()` (`find_kallsyms_symbol`):
    /// the module symbol an address inside a module resolves to, as `%pS`
    /// prints it. The first of several symbols at the same address wins;
    /// the size runs to the next symbol or the end of the module's text.
    pub fn module_address_lookup(&self, addr: u64) -> Result<Option<ModuleAddress>> {
        for m in self.modules()? {
            let in_init = m.within_init(addr);
            if !in_init && !m.within_core(addr) {
                continue;
            }
            let text_end = if in_init {
                m.init_text.0.saturating_add(m.init_text.1)
            } else {
                m.core_base.saturating_add(m.core_text_size)
            };
            let syms = self.module_symtab(&m)?;
            let mut best: Option<&RawModuleSymbol> = None;
            let mut next = text_end;
            for s in syms.iter().filter(|s| s.shndx != SHN_UNDEF && !is_mapping_symbol(&s.sym.name)) {
                let v = s.sym.addr;
                if v <= addr && best.is_none_or(|b| v > b.sym.addr) {
                    best = Some(s);
                }
                if v > addr && v < next {
                    next = v;
                }
            }
            return Ok(best.map(|b| ModuleAddress {
                module: m.name.clone(),
                name: b.sym.name.clone(),
                addr: b.sym.addr,
                offset: addr - b.sym.addr,
                size: next.wrapping_sub(b.sym.addr),
            }));
        }
        Ok(None)
    }

    /// `symbol+offset/size`, `[module]` appended outside vmlinux: `%pS` of
    /// `addr`, or the ftrace trampoline holding it (which /proc/kallsyms
    /// lists but `%pS` does not name). None for an address in none of them.
    pub fn symbolize(&self, addr: u64) -> Option<String> {
        if let Some(s) = self.syms.resolve(addr) {
            return Some(s.format());
        }
        if let Ok(Some(m)) = self.module_address_lookup(addr) {
            return Some(format!("{}+{:#x}/{:#x} [{}]", m.name, m.offset, m.size, m.module));
        }
        let t = self.ftrace_kallsyms().ok()?.into_iter().find(|t| addr >= t.addr && addr - t.addr < t.size.max(1))?;
        Some(format!("{}+{:#x}/{:#x} [{}]", t.name, addr - t.addr, t.size, t.module))
    }

    /// Every line /proc/kallsyms prints after vmlinux's own symbols, in its
    /// order: each module's [`Kernel::module_kallsyms`], then
    /// [`Kernel::ftrace_kallsyms`]. (BPF JIT images and kprobe insn pages
    /// would follow; this kernel has neither.)
    pub fn extra_kallsyms(&self) -> Result<Vec<ModuleSymbol>> {
        let mut out = Vec::new();
        for m in self.modules()? {
            out.extend(self.module_kallsyms(&m)?);
        }
        out.extend(self.ftrace_kallsyms()?);
        Ok(out)
    }

    /// What ftrace adds to /proc/kallsyms (`ftrace_mod_get_kallsym`): the
    /// traced functions of freed module init sections (`ftrace_mod_maps`),
    /// then one `ftrace_trampoline [__builtin__ftrace]` per ftrace_ops with
    /// an allocated trampoline (`ftrace_ops_trampoline_list`).
    pub fn ftrace_kallsyms(&self) -> Result<Vec<ModuleSymbol>> {
        let mut out = Vec::new();
        if let Ok(head) = self.sym("ftrace_mod_maps") {
            let maps = walk_list(&self.mem, head, self.off("ftrace_mod_map", "list")?, MAX_MODULES, "ftrace_mod_maps")?;
            // All maps' func lists together (4096 maps x 1M funcs otherwise).
            let mut budget = MAX_MODULE_SYMS as usize;
            for map in maps {
                let at = |o: u64| map.checked_add(o).ok_or(IntrospectError::Overflow(map));
                let num = self.mem.read_u32(at(self.off("ftrace_mod_map", "num_funcs")?)?)?;
                let module = self.read_ptr(map, self.off("ftrace_mod_map", "mod")?)?;
                let mod_name =
                    self.mem.read_cstr(module.checked_add(self.off("module", "name")?).ok_or(IntrospectError::Overflow(module))?, MODULE_NAME_LEN)?;
                let funcs = walk_list(
                    &self.mem,
                    at(self.off("ftrace_mod_map", "funcs")?)?,
                    self.off("ftrace_mod_func", "list")?,
                    budget,
                    "ftrace_mod_func list",
                )?;
                budget = budget.saturating_sub(funcs.len());
                // The kernel (6.1) shows entry k (0-based) as funcs[max(k-1, 0)]:
                // `if (symnum > 1) symnum--` in ftrace_mod_get_kallsym. Mirror it.
                for k in 0..num as usize {
                    let Some(&f) = funcs.get(k.saturating_sub(1)) else { break };
                    let name = self.mem.read_cstr(self.read_ptr(f, self.off("ftrace_mod_func", "name")?)?, 512)?;
                    let addr = self.read_ptr(f, self.off("ftrace_mod_func", "ip")?)?;
                    let size = u64::from(self.mem.read_u32(f.checked_add(self.off("ftrace_mod_func", "size")?).ok_or(IntrospectError::Overflow(f))?)?);
                    out.push(ModuleSymbol { module: mod_name.clone(), name, addr, size, kind: 'T' });
                }
            }
        }
        if let Ok(head) = self.sym("ftrace_ops_trampoline_list") {
            for ops in walk_list(&self.mem, head, self.off("ftrace_ops", "list")?, MAX_MODULES, "ftrace_ops_trampoline_list")? {
                let addr = self.read_ptr(ops, self.off("ftrace_ops", "trampoline")?)?;
                if addr == 0 {
                    continue;
                }
                let size = self.read_ptr(ops, self.off("ftrace_ops", "trampoline_size")?)?;
                out.push(ModuleSymbol {
                    module: "__builtin__ftrace".into(),
                    name: "ftrace_trampoline".into(),
                    addr,
                    size,
                    kind: 't',
                });
            }
        }
        Ok(out)
    }

    /// Names and values of the symbols `module` exports (`mod->syms`, the
    /// kernel's `is_exported()` looks only there).
    fn module_exports(&self, module: &Module) -> Result<HashSet<(String, u64)>> {
        let at = |o: u64| module.addr.checked_add(o).ok_or(IntrospectError::Overflow(module.addr));
        let syms = self.read_ptr(module.addr, self.off("module", "syms")?)?;
        let num = self.mem.read_u32(at(self.off("module", "num_syms")?)?)?;
        let mut out = HashSet::new();
        if syms == 0 || num == 0 {
            return Ok(out);
        }
        if num > MAX_MODULE_SYMS {
            return Err(IntrospectError::Corrupt(format!("module {} claims {num} exports", module.name)));
        }
        let size = self.btf.struct_size("kernel_symbol")?;
        if size == 0 || size > MAX_KERNEL_SYMBOL_SIZE {
            return Err(IntrospectError::Corrupt(format!("sizeof(struct kernel_symbol) = {size} is implausible")));
        }
        let value_off = self.off("kernel_symbol", "value_offset")?;
        let name_off = self.off("kernel_symbol", "name_offset")?;
        let table = self.mem.read_bytes(syms, usize::try_from(u64::from(num) * size).map_err(|_| IntrospectError::Overflow(syms))?)?;
        // CONFIG_HAVE_ARCH_PREL32_RELOCATIONS: each field is an offset from
        // its own address.
        let prel32 = |i: u64, off: u64| -> Option<u64> {
            let pos = usize::try_from(i * size + off).ok()?;
            let raw = i32::from_le_bytes(table.get(pos..pos + 4)?.try_into().ok()?);
            Some(syms.checked_add(i * size + off)?.wrapping_add(raw as i64 as u64))
        };
        for i in 0..u64::from(num) {
            let (Some(value), Some(name)) = (prel32(i, value_off), prel32(i, name_off)) else { continue };
            if let Ok(n) = self.mem.read_cstr(name, 512) {
                out.insert((n, value));
            }
        }
        Ok(out)
    }

    /// Every named entry of `mod->kallsyms` with its section index, typed
    /// as /proc/kallsyms prints it: upper case when the module exports the
    /// symbol, lower case otherwise.
    fn module_symtab(&self, module: &Module) -> Result<Vec<RawModuleSymbol>> {
        let ks = self.read_ptr(module.addr, self.off("module", "kallsyms")?)?;
        if ks == 0 {
            return Ok(Vec::new());
        }
        let symtab = self.read_ptr(ks, self.off("mod_kallsyms", "symtab")?)?;
        let num = self.mem.read_u32(ks.checked_add(self.off("mod_kallsyms", "num_symtab")?).ok_or(IntrospectError::Overflow(ks))?)?;
        let strtab = self.read_ptr(ks, self.off("mod_kallsyms", "strtab")?)?;
        let typetab = self.read_ptr(ks, self.off("mod_kallsyms", "typetab")?)?;
        if num > MAX_MODULE_SYMS {
            return Err(IntrospectError::Corrupt(format!("module {} claims {num} symbols", module.name)));
        }
        let table = self.mem.read_bytes(symtab, (u64::from(num) * ELF64_SYM_SIZE) as usize)?;
        let types = self.mem.read_bytes(typetab, num as usize)?;
        let exports = self.module_exports(module)?;
        let mut out = Vec::new();
        for i in 0..num as usize {
            let e = table.get(i * 24..i * 24 + 24).ok_or_else(|| IntrospectError::Corrupt("symtab".into()))?;
            let st_name = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
            let shndx = u16::from_le_bytes([e[6], e[7]]);
            let mut v = [0u8; 8];
            v.copy_from_slice(&e[8..16]);
            let value = u64::from_le_bytes(v);
            v.copy_from_slice(&e[16..24]);
            let size = u64::from_le_bytes(v);
            let raw_kind = types.get(i).copied().unwrap_or(b'?') as char;
            // Index 0 is the null symbol; /proc/kallsyms skips empty names.
            if i == 0 || st_name == 0 {
                continue;
            }
            let name = self.mem.read_cstr(strtab.checked_add(u64::from(st_name)).ok_or(IntrospectError::Overflow(strtab))?, 512)?;
            if name.is_empty() {
                continue;
            }
            let kind = if exports.contains(&(name.clone(), value)) {
                raw_kind.to_ascii_uppercase()
            } else {
                raw_kind.to_ascii_lowercase()
            };
            out.push(RawModuleSymbol { shndx, sym: ModuleSymbol { module: module.name.clone(), name, addr: value, size, kind } });
        }
        Ok(out)
    }
}

/// A `mod->kallsyms` entry with its ELF section index.
struct RawModuleSymbol {
    shndx: u16,
    sym: ModuleSymbol,
}

const SHN_UNDEF: u16 = 0;

/// The kernel's `is_arm_mapping_symbol()`: `.L*` and `$a`/`$x`/`$t`/`$d`
/// (optionally followed by `.`), which address lookups skip.
fn is_mapping_symbol(name: &str) -> bool {
    let b = name.as_bytes();
    name.starts_with(".L")
        || (b.first() == Some(&b'$') && matches!(b.get(1), Some(b'a' | b'd' | b't' | b'x')) && matches!(b.get(2), None | Some(b'.')))
}

/// An address inside a module, resolved like the kernel's `%pS`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ModuleAddress {
    pub module: String,
    pub name: String,
    /// Start of the symbol.
    pub addr: u64,
    pub offset: u64,
    /// To the next symbol, or to the end of the module's text.
    pub size: u64,
}
