//! Loaded modules: the `modules` list, each module's text range, its
//! /proc/modules line and its own symbols (from `mod->kallsyms`).

use crate::error::{IntrospectError, Result};
use crate::kernel::Kernel;
use crate::tasks::walk_list;
use crate::translate::KernelMemory;

/// Most modules we walk before calling the list corrupted.
pub const MAX_MODULES: usize = 4096;
/// Most symbols one module may have.
pub const MAX_MODULE_SYMS: u32 = 1 << 20;
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
    pub core_base: u64,
    pub core_size: u64,
    pub core_text_size: u64,
    pub init_size: u64,
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
        addrs.into_iter().map(|a| self.module_at(a)).collect()
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
        let core_base = self.mem.read_u64(at(self.off("module", "core_layout.base")?)?)?;
        let core_size = u64::from(self.mem.read_u32(at(self.off("module", "core_layout.size")?)?)?);
        let core_text_size = u64::from(self.mem.read_u32(at(self.off("module", "core_layout.text_size")?)?)?);
        let init_size = u64::from(self.mem.read_u32(at(self.off("module", "init_layout.size")?)?)?);
        let refcount = i64::from(self.mem.read_i32(at(self.off("module", "refcnt")?)?)?) - MODULE_REF_BASE;
        let taint_bits = self.mem.read_u64(at(self.off("module", "taints")?)?)?;
        let taints = MODULE_TAINTS
            .iter()
            .filter(|(bit, _)| taint_bits & (1 << bit) != 0)
            .map(|(_, c)| *c)
            .collect();
        Ok(Module { addr, name, state, core_base, core_size, core_text_size, init_size, refcount, taints })
    }

    /// The symbols of `module` as /proc/kallsyms lists them (`mod->kallsyms`).
    pub fn module_symbols(&self, module: &Module) -> Result<Vec<ModuleSymbol>> {
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
        let mut out = Vec::new();
        for i in 0..num as usize {
            let e = table.get(i * 24..i * 24 + 24).ok_or_else(|| IntrospectError::Corrupt("symtab".into()))?;
            let st_name = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
            let st_shndx = u16::from_le_bytes([e[6], e[7]]);
            let mut v = [0u8; 8];
            v.copy_from_slice(&e[8..16]);
            let value = u64::from_le_bytes(v);
            v.copy_from_slice(&e[16..24]);
            let size = u64::from_le_bytes(v);
            let kind = types.get(i).copied().unwrap_or(b'?') as char;
            // Index 0 is the null symbol; undefined ones are not listed.
            if i == 0 || st_shndx == 0 || st_name == 0 {
                continue;
            }
            let name = self.mem.read_cstr(strtab.checked_add(u64::from(st_name)).ok_or(IntrospectError::Overflow(strtab))?, 512)?;
            if name.is_empty() || name.starts_with("$x") || kind == 'U' {
                continue;
            }
            out.push(ModuleSymbol { module: module.name.clone(), name, addr: value, size, kind });
        }
        Ok(out)
    }
}
