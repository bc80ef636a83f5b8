//! The guest's own livepatches: `klp_patches` -> klp_patch -> objects ->
//! funcs, plus states and the transition in progress, as
//! /sys/kernel/livepatch shows them.

use crate::error::{IntrospectError, Result};
use crate::kernel::Kernel;
use crate::tasks::walk_list;
use crate::translate::KernelMemory;

const MAX_PATCHES: usize = 1024;
const MAX_OBJECTS: usize = 4096;
const MAX_FUNCS: usize = 1 << 16;
const MAX_STATES: usize = 1024;
/// Objects, funcs and states of all patches together: the per-list limits
/// multiply (patches x objects x funcs), so one budget bounds the whole walk.
const MAX_KLP_NODES: usize = 1 << 16;
const MODULE_NAME_LEN: usize = 56;

/// One klp_func.
#[derive(Clone, Debug, serde::Serialize)]
pub struct KlpFunc {
    pub old_name: String,
    pub old_sympos: u64,
    pub old_func: u64,
    pub new_func: u64,
    pub new_func_symbol: Option<String>,
    pub nop: bool,
    pub patched: bool,
    pub transition: bool,
}

/// One klp_object (NULL name = vmlinux).
#[derive(Clone, Debug, serde::Serialize)]
pub struct KlpObject {
    pub name: Option<String>,
    pub patched: bool,
    pub funcs: Vec<KlpFunc>,
}

/// One klp_state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct KlpState {
    pub id: u64,
    pub version: u32,
}

/// One klp_patch.
#[derive(Clone, Debug, serde::Serialize)]
pub struct KlpPatch {
    pub addr: u64,
    /// The patch module's name, as /sys/kernel/livepatch/<name>.
    pub name: String,
    pub enabled: bool,
    pub forced: bool,
    pub replace: bool,
    /// This patch is the one in transition.
    pub transition: bool,
    pub objects: Vec<KlpObject>,
    pub states: Vec<KlpState>,
}

impl Kernel<'_> {
    fn read_bool(&self, base: u64, ty: &str, field: &str) -> Result<bool> {
        let a = base.checked_add(self.off(ty, field)?).ok_or(IntrospectError::Overflow(base))?;
        Ok(self.mem.read_u8(a)? != 0)
    }

    /// The guest's livepatches in `klp_patches` order (stack order).
    pub fn klp_patches(&self) -> Result<Vec<KlpPatch>> {
        let head = match self.sym("klp_patches") {
            Ok(h) => h,
            Err(IntrospectError::NoSymbol(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let transition_patch = self.sym("klp_transition_patch").and_then(|a| self.mem.read_u64(a)).unwrap_or(0);
        let list_off = self.off("klp_patch", "list")?;
        let mut out = Vec::new();
        let mut budget = MAX_KLP_NODES;
        for p in walk_list(&self.mem, head, list_off, MAX_PATCHES, "klp_patches")? {
            let module = self.read_ptr(p, self.off("klp_patch", "mod")?)?;
            let name = if module == 0 {
                String::new()
            } else {
                let raw = self.mem.read_bytes(module.checked_add(self.off("module", "name")?).ok_or(IntrospectError::Overflow(module))?, MODULE_NAME_LEN)?;
                let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
                String::from_utf8_lossy(raw.get(..end).unwrap_or(&[])).into_owned()
            };
            let objs_head = p.checked_add(self.off("klp_patch", "obj_list")?).ok_or(IntrospectError::Overflow(p))?;
            let obj_node = self.off("klp_object", "node")?;
            let mut objects = Vec::new();
            for o in walk_list(&self.mem, objs_head, obj_node, MAX_OBJECTS.min(budget), "klp objects")? {
                budget = budget.saturating_sub(1);
                objects.push(self.klp_object(o, &mut budget)?);
            }
            out.push(KlpPatch {
                addr: p,
                name,
                enabled: self.read_bool(p, "klp_patch", "enabled")?,
                forced: self.read_bool(p, "klp_patch", "forced")?,
                replace: self.read_bool(p, "klp_patch", "replace")?,
                transition: p == transition_patch,
                objects,
                states: self.klp_states(p, &mut budget)?,
            });
        }
        Ok(out)
    }

    fn klp_object(&self, o: u64, budget: &mut usize) -> Result<KlpObject> {
        let name_ptr = self.read_ptr(o, self.off("klp_object", "name")?)?;
        let name = if name_ptr == 0 { None } else { Some(self.mem.read_cstr(name_ptr, MODULE_NAME_LEN)?) };
        let funcs_head = o.checked_add(self.off("klp_object", "func_list")?).ok_or(IntrospectError::Overflow(o))?;
        let node = self.off("klp_func", "node")?;
        let mut funcs = Vec::new();
        for f in walk_list(&self.mem, funcs_head, node, MAX_FUNCS.min(*budget), "klp funcs")? {
            *budget = budget.saturating_sub(1);
            let old_name_ptr = self.read_ptr(f, self.off("klp_func", "old_name")?)?;
            let new_func = self.read_ptr(f, self.off("klp_func", "new_func")?)?;
            funcs.push(KlpFunc {
                old_name: if old_name_ptr == 0 { String::new() } else { self.mem.read_cstr(old_name_ptr, 512)? },
                old_sympos: self.read_ptr(f, self.off("klp_func", "old_sympos")?)?,
                old_func: self.read_ptr(f, self.off("klp_func", "old_func")?)?,
                new_func,
                new_func_symbol: self.syms.resolve(new_func).map(|s| s.format()),
                nop: self.read_bool(f, "klp_func", "nop")?,
                patched: self.read_bool(f, "klp_func", "patched")?,
                transition: self.read_bool(f, "klp_func", "transition")?,
            });
        }
        Ok(KlpObject { name, patched: self.read_bool(o, "klp_object", "patched")?, funcs })
    }

    fn klp_states(&self, p: u64, budget: &mut usize) -> Result<Vec<KlpState>> {
        let states = self.read_ptr(p, self.off("klp_patch", "states")?)?;
        if states == 0 {
            return Ok(Vec::new());
        }
        let size = self.btf.struct_size("klp_state")?;
        let id_off = self.off("klp_state", "id")?;
        let ver_off = self.off("klp_state", "version")?;
        let mut out = Vec::new();
        for i in 0..MAX_STATES as u64 {
            if *budget == 0 {
                return Err(IntrospectError::WalkLimit { what: "klp patches, objects, funcs and states".into(), limit: MAX_KLP_NODES });
            }
            *budget -= 1;
            let s = states.checked_add(i * size).ok_or(IntrospectError::Overflow(states))?;
            let id = self.read_ptr(s, id_off)?;
            if id == 0 {
                return Ok(out);
            }
            let version = self.mem.read_u32(s.checked_add(ver_off).ok_or(IntrospectError::Overflow(s))?)?;
            out.push(KlpState { id, version });
        }
        Err(IntrospectError::WalkLimit { what: "klp states".into(), limit: MAX_STATES })
    }
}
