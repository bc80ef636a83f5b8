//! Reading the `struct klp_patch` a module's init handed to
//! `klp_enable_patch()` from guest memory: static or allocated, whatever
//! tool built it (kbuild, kpatch-build's hook, klp-build's init.c). Layouts
//! come from the guest's BTF; every walk is bounded, every pointer checked.
//! Guest memory is hostile input.

use introspect::kernel::Kernel;
use introspect::translate::KernelMemory;

use crate::error::{PatchError, Result};
use crate::link::LinkedModule;
use crate::module::{Callbacks, FuncSpec, ObjectSpec, PatchModule, PatchSpec, SectionKind, StateSpec};

const MAX_OBJECTS: usize = 256;
const MAX_FUNCS: usize = 4096;
const MAX_STATES: usize = 256;
/// Longest name read (KSYM_NAME_LEN is at most this).
const MAX_NAME: usize = 512;

/// klp struct offsets from the guest's BTF.
struct Layout {
    patch_mod: u64,
    patch_objs: u64,
    patch_states: u64,
    patch_replace: u64,
    obj_name: u64,
    obj_funcs: u64,
    obj_callbacks: u64,
    obj_size: u64,
    cb_pre_patch: u64,
    cb_post_patch: u64,
    cb_pre_unpatch: u64,
    cb_post_unpatch: u64,
    func_old_name: u64,
    func_new_func: u64,
    func_old_sympos: u64,
    func_size: u64,
    state_id: u64,
    state_version: u64,
    state_size: u64,
}

impl Layout {
    fn of(k: &Kernel<'_>) -> Result<Layout> {
        let b = &k.btf;
        Ok(Layout {
            patch_mod: b.member_offset("klp_patch", "mod")?,
            patch_objs: b.member_offset("klp_patch", "objs")?,
            patch_states: b.member_offset("klp_patch", "states")?,
            patch_replace: b.member_offset("klp_patch", "replace")?,
            obj_name: b.member_offset("klp_object", "name")?,
            obj_funcs: b.member_offset("klp_object", "funcs")?,
            obj_callbacks: b.member_offset("klp_object", "callbacks")?,
            obj_size: b.struct_size("klp_object")?,
            cb_pre_patch: b.member_offset("klp_callbacks", "pre_patch")?,
            cb_post_patch: b.member_offset("klp_callbacks", "post_patch")?,
            cb_pre_unpatch: b.member_offset("klp_callbacks", "pre_unpatch")?,
            cb_post_unpatch: b.member_offset("klp_callbacks", "post_unpatch")?,
            func_old_name: b.member_offset("klp_func", "old_name")?,
            func_new_func: b.member_offset("klp_func", "new_func")?,
            func_old_sympos: b.member_offset("klp_func", "old_sympos")?,
            func_size: b.struct_size("klp_func")?,
            state_id: b.member_offset("klp_state", "id")?,
            state_version: b.member_offset("klp_state", "version")?,
            state_size: b.struct_size("klp_state")?,
        })
    }
}

fn add(a: u64, b: u64) -> Result<u64> {
    a.checked_add(b).ok_or(PatchError::Guest(introspect::IntrospectError::Overflow(a)))
}

/// Reads the klp_patch at `addr`. It must belong to the staged module
/// (`mod` is its `__this_module` at `this_module`), and every function and
/// callback it names must be code of that module.
pub fn read_patch(k: &Kernel<'_>, addr: u64, this_module: u64, m: &PatchModule, linked: &LinkedModule) -> Result<PatchSpec> {
    let l = Layout::of(k)?;
    let bad = |d: String| PatchError::GuestPatch { addr, detail: d };
    let mem = &k.mem;
    let module = mem.read_u64(add(addr, l.patch_mod)?)?;
    if module != this_module {
        return Err(bad(format!("its mod is {module:#x}, not the module's THIS_MODULE ({this_module:#x})")));
    }
    // Where a guest code address lies in the module: (section, offset).
    let text_of = |va: u64| -> Option<(usize, u64)> {
        linked.section_base.iter().find_map(|(sec, base)| {
            let s = m.sections.get(*sec)?;
            (s.kind == SectionKind::Text && va >= *base && va - base < s.size).then(|| (*sec, va - base))
        })
    };
    let replace = mem.read_u8(add(addr, l.patch_replace)?)? != 0;
    let mut objs = mem.read_u64(add(addr, l.patch_objs)?)?;
    if objs == 0 {
        return Err(bad("it has no objects (objs is NULL)".into()));
    }
    let mut objects = Vec::new();
    loop {
        if objects.len() >= MAX_OBJECTS {
            return Err(bad(format!("more than {MAX_OBJECTS} klp_objects (no terminator?)")));
        }
        let name_ptr = mem.read_u64(add(objs, l.obj_name)?)?;
        let mut funcs_ptr = mem.read_u64(add(objs, l.obj_funcs)?)?;
        // klp_for_each_object_static: until an entry with neither.
        if name_ptr == 0 && funcs_ptr == 0 {
            break;
        }
        let name = if name_ptr == 0 { None } else { Some(mem.read_cstr(name_ptr, MAX_NAME)?) };
        if funcs_ptr == 0 {
            return Err(bad(format!("object {} has no funcs", name.as_deref().unwrap_or("vmlinux"))));
        }
        let cb = add(objs, l.obj_callbacks)?;
        let cb_at = |off: u64| -> Result<u64> {
            let v = mem.read_u64(add(cb, off)?)?;
            if v != 0 && text_of(v).is_none() {
                return Err(bad(format!("a callback of {} points at {v:#x}, outside the module's code", name.as_deref().unwrap_or("vmlinux"))));
            }
            Ok(v)
        };
        let callbacks = Callbacks {
            pre_patch: cb_at(l.cb_pre_patch)?,
            post_patch: cb_at(l.cb_post_patch)?,
            pre_unpatch: cb_at(l.cb_pre_unpatch)?,
            post_unpatch: cb_at(l.cb_post_unpatch)?,
        };
        let mut funcs = Vec::new();
        loop {
            if funcs.len() >= MAX_FUNCS {
                return Err(bad(format!("more than {MAX_FUNCS} klp_funcs (no terminator?)")));
            }
            let old_name_ptr = mem.read_u64(add(funcs_ptr, l.func_old_name)?)?;
            let new_func = mem.read_u64(add(funcs_ptr, l.func_new_func)?)?;
            let old_sympos = mem.read_u64(add(funcs_ptr, l.func_old_sympos)?)?;
            // klp_for_each_func_static: until old_name, new_func and old_sympos are all 0.
            if old_name_ptr == 0 && new_func == 0 && old_sympos == 0 {
                break;
            }
            if old_name_ptr == 0 {
                return Err(bad("a klp_func has no old_name".into()));
            }
            let old_name = mem.read_cstr(old_name_ptr, MAX_NAME)?;
            let (new_section, new_offset) =
                text_of(new_func).ok_or_else(|| bad(format!("new_func of {old_name} ({new_func:#x}) is not code of the module")))?;
            let (new_symbol, new_size) = m
                .symbols
                .iter()
                .find(|s| s.section == Some(new_section) && s.value == new_offset && !s.name.is_empty() && s.size > 0)
                .map(|s| (s.name.clone(), s.size))
                .ok_or_else(|| bad(format!("new_func of {old_name} ({new_func:#x}) is not the start of a sized function of the module")))?;
            funcs.push(FuncSpec { old_name, old_sympos, new_section, new_offset, new_symbol, new_size, addr: funcs_ptr });
            funcs_ptr = add(funcs_ptr, l.func_size)?;
        }
        objects.push(ObjectSpec { name, funcs, callbacks, addr: objs, post_unpatch_enabled: false });
        objs = add(objs, l.obj_size)?;
    }
    if objects.is_empty() {
        return Err(bad("it has no objects".into()));
    }
    let mut states = Vec::new();
    let mut sp = mem.read_u64(add(addr, l.patch_states)?)?;
    if sp != 0 {
        loop {
            if states.len() >= MAX_STATES {
                return Err(bad(format!("more than {MAX_STATES} klp_states (no terminator?)")));
            }
            let id = mem.read_u64(add(sp, l.state_id)?)?;
            if id == 0 {
                break;
            }
            let version = mem.read_u32(add(sp, l.state_version)?)?;
            states.push(StateSpec { id, version, addr: sp });
            sp = add(sp, l.state_size)?;
        }
    }
    Ok(PatchSpec { replace, objects, states, addr, skip_callbacks: false })
}
