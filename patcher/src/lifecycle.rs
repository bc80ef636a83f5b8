//! A livepatch module's life, as the kernel's module loader and livepatch
//! core run it, from outside: the module is linked and placed (its
//! `klp_enable_patch()` bound to hyperpatch's hook), its parameters set,
//! its init run in the guest (a guest call), the `klp_patch` init handed to
//! the hook read from guest memory, and then applied by the engine. On any
//! failure after init succeeded, its exit runs and it is unplaced. A module
//! whose code may still run (an init or exit that timed out) is never freed.

use serde::{Deserialize, Serialize};

use introspect::kernel::Kernel;
use introspect::stacks::Unwinder;

use crate::engine::Patcher;
use crate::error::{PatchError, Result};
use crate::guest::GuestWriter;
use crate::link::{link, LinkedModule};
use crate::module::{PatchModule, PatchSpec};
use crate::params::{self, ParamWrite};
use crate::placement::AreaKind;

/// A module placed in the guest whose patch is not (yet) applied.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Staged {
    pub name: String,
    pub path: String,
    pub linked: LinkedModule,
    /// Guest address of its `__this_module`.
    pub this_module: u64,
    pub init: Option<u64>,
    pub exit: Option<u64>,
    /// The patch its init enabled, once read.
    pub spec: Option<PatchSpec>,
    /// Its init returned 0 (so its exit must run before it is unplaced).
    pub init_ok: bool,
    /// Its parameters (settable later, as through /sys/module/*/parameters).
    #[serde(default)]
    pub params: Vec<crate::params::ParamSpec>,
}

/// What the caller runs next.
#[derive(Clone, Copy, Debug)]
pub struct StageInfo {
    pub init: Option<u64>,
    pub exit: Option<u64>,
}

impl Patcher {
    /// Links and places `m` with `args` as its parameters (every vCPU
    /// stopped). Nothing points at it yet; the caller runs its init.
    pub fn stage(&mut self, k: &Kernel<'_>, w: &dyn GuestWriter, m: &PatchModule, args: &[String]) -> Result<StageInfo> {
        if self.staged.is_some() {
            return Err(PatchError::State("another module is being loaded".into()));
        }
        if self.patches.iter().any(|p| p.name == m.name) {
            return Err(PatchError::Duplicate(m.name.clone()));
        }
        let writes = params::plan(&m.name, &m.params, args)?;
        self.ensure_calls(k, w)?;
        let (hook, prev) = self.call_engine().map(|c| (c.hook_fn, c.prev_state_fn)).ok_or_else(|| PatchError::State("guest-call engine".into()))?;
        let resolver = crate::engine::GuestResolver { k, klp_enable_patch: Some(hook), klp_get_prev_state: Some(prev).filter(|a| *a != 0) };
        let orc_format = introspect::orc_format::OrcFormat::from_btf(&k.btf)?;
        let facts = crate::loader::LoaderFacts::for_module(k, m)?;
        let region = self.region_mut()?;
        let mut linked = link(m, region, &resolver, &orc_format, &facts)?;
        let unplace = |p: &mut Patcher, w: &dyn GuestWriter, linked: &LinkedModule| {
            for (pa, bytes) in &linked.images {
                let _ = w.write_phys(*pa, &vec![0u8; bytes.len()]);
            }
            if let Ok(region) = p.region_mut() {
                for a in &linked.allocations {
                    region.free(a);
                }
            }
        };
        let r = (|| -> Result<()> {
            for (pa, bytes) in &linked.images {
                w.write_phys(*pa, bytes)?;
            }
            // Parameters are set after relocation, as the loader sets them.
            for pw in &writes {
                let (section, offset, bytes) = match pw {
                    ParamWrite::Bytes { section, offset, bytes } => (*section, *offset, bytes.clone()),
                    ParamWrite::Pointer { section, offset, value } => {
                        let region = self.region_mut()?;
                        let a = region.alloc(AreaKind::Data, value.len() as u64 + 1, 8)?;
                        linked.allocations.push(a);
                        let mut s = value.as_bytes().to_vec();
                        s.push(0);
                        w.write_phys(a.phys, &s)?;
                        linked.images.push((a.phys, s));
                        (*section, *offset, a.virt.to_le_bytes().to_vec())
                    }
                };
                let va = linked.address(section, offset).ok_or_else(|| PatchError::Param {
                    module: m.name.clone(),
                    detail: format!("parameter storage in section {section} is not placed"),
                })?;
                let pa = crate::addr::GuestPhys(k.mem.translate(va)?);
                w.write_phys(pa, &bytes)?;
            }
            Ok(())
        })();
        if let Err(e) = r {
            unplace(self, w, &linked);
            return Err(e);
        }
        let this_module = linked.address(m.this_module.0, m.this_module.1);
        let init = m.init.and_then(|(s, o)| linked.address(s, o));
        let exit = m.exit.and_then(|(s, o)| linked.address(s, o));
        let Some(this_module) = this_module else {
            unplace(self, w, &linked);
            return Err(PatchError::Lifecycle { module: m.name.clone(), detail: "__this_module is not placed".into() });
        };
        if let Some(c) = self.call_engine() {
            if let Err(e) = c.reset_hook(w) {
                unplace(self, w, &linked);
                return Err(e);
            }
        }
        self.staged = Some(Staged {
            name: m.name.clone(),
            path: m.path.clone(),
            linked,
            this_module,
            init,
            exit,
            spec: None,
            init_ok: false,
            params: m.params.clone(),
        });
        Ok(StageInfo { init, exit })
    }

    /// The staged module.
    pub fn staged(&self) -> Option<&Staged> {
        self.staged.as_ref()
    }

    /// The staged module's init returned `ret` (every vCPU stopped). It
    /// must have succeeded, and called `klp_enable_patch()` exactly once
    /// (whose patch `enable_called` read).
    pub fn init_returned(&mut self, k: &Kernel<'_>, ret: i64) -> Result<()> {
        let st = self.staged.as_mut().ok_or_else(|| PatchError::State("no module is being loaded".into()))?;
        let name = st.name.clone();
        let lerr = |detail: String| PatchError::Lifecycle { module: name.clone(), detail };
        let ret32 = ret as i32;
        if ret32 != 0 {
            return Err(lerr(format!("its init failed with {ret32} ({})", errno_name(ret32))));
        }
        st.init_ok = true;
        let (count, _) = self.calls.as_ref().ok_or_else(|| PatchError::State("guest-call engine".into()))?.hook_record(k)?;
        let st = self.staged.as_ref().ok_or_else(|| PatchError::State("staged".into()))?;
        match count {
            0 => return Err(lerr("its init returned 0 without calling klp_enable_patch()".into())),
            1 => {}
            n => return Err(lerr(format!("its init called klp_enable_patch() {n} times"))),
        }
        if st.spec.is_none() {
            return Err(lerr("its klp_patch was never read".into()));
        }
        Ok(())
    }

    /// Sets a parameter of patch `name`'s module (every vCPU stopped), as
    /// writing /sys/module/NAME/parameters/PARAM would.
    pub fn set_param(&mut self, k: &Kernel<'_>, w: &dyn GuestWriter, name: &str, arg: &str) -> Result<()> {
        let p = self.patches.iter().find(|p| p.name == name).ok_or_else(|| PatchError::NoPatch(name.into()))?;
        let writes = params::plan(name, &p.params, &[arg.to_string()])?;
        let linked = p.linked.clone();
        for pw in writes {
            let (section, offset, bytes) = match pw {
                ParamWrite::Bytes { section, offset, bytes } => (section, offset, bytes),
                ParamWrite::Pointer { .. } => {
                    return Err(PatchError::Param { module: name.into(), detail: "charp parameters can only be given at apply".into() })
                }
            };
            let va = linked
                .address(section, offset)
                .ok_or_else(|| PatchError::Param { module: name.into(), detail: format!("parameter storage in section {section} is not placed") })?;
            w.write_phys(crate::addr::GuestPhys(k.mem.translate(va)?), &bytes)?;
        }
        Ok(())
    }

    /// Marks the staged module's patch as applied with `skip_callbacks`.
    pub fn set_skip_callbacks(&mut self, skip: bool) {
        if let Some(spec) = self.staged.as_mut().and_then(|s| s.spec.as_mut()) {
            spec.skip_callbacks = skip;
        }
    }

    /// Whether patch `name` runs its callbacks.
    pub fn runs_callbacks(&self, name: &str) -> bool {
        self.spec_of(name).is_some_and(|s| !s.skip_callbacks)
    }

    /// Whether patch `name` is on the stack and enabled.
    pub fn is_enabled(&self, name: &str) -> Option<bool> {
        self.patches.iter().find(|p| p.name == name).map(|p| p.enabled)
    }

    /// Unplaces the staged module (its exit has run, or its init failed):
    /// zeroes and frees its memory.
    pub fn unstage(&mut self, w: &dyn GuestWriter) -> Result<()> {
        let Some(st) = self.staged.take() else { return Ok(()) };
        for (pa, bytes) in &st.linked.images {
            w.write_phys(*pa, &vec![0u8; bytes.len()])?;
        }
        let region = self.region_mut()?;
        for a in &st.linked.allocations {
            region.free(a);
        }
        Ok(())
    }

    /// The staged module's code may still run (its init or exit timed
    /// out): it is forgotten but its memory is never freed.
    pub fn abandon_staged(&mut self) {
        if let Some(st) = self.staged.take() {
            self.lost.extend(st.linked.allocations);
        }
    }

    /// Frees the guest-call routines, and unmaps the region when nothing
    /// else is in it, if no call is running, none was lost, and no task is
    /// inside them (every vCPU stopped; `u` knows their ORC).
    pub fn release_calls_if_idle(&mut self, k: &Kernel<'_>, w: &dyn GuestWriter, u: &Unwinder) -> Result<bool> {
        let Some(c) = self.calls.as_ref() else { return Ok(true) };
        if self.staged.is_some() || !c.idle(k)? {
            return Ok(false);
        }
        let (start, end) = c.text_range();
        let routines = crate::engine::CodeRange { name: "guest-call routines".into(), start, size: end - start };
        let blockers = Patcher::blockers(k, w, u, &[routines])?;
        if !blockers.is_empty() {
            return Ok(false);
        }
        let allocs = c.allocations();
        for a in &allocs {
            w.write_phys(a.phys, &vec![0u8; a.size as usize])?;
        }
        self.calls = None;
        let region = self.region_mut()?;
        for a in &allocs {
            region.free(a);
        }
        if region.used_bytes() == 0 {
            region.unmap(w)?;
        }
        Ok(true)
    }

    /// Bytes of the region the guest-call routines hold.
    pub fn engine_bytes(&self) -> u64 {
        self.calls.as_ref().map(|c| c.allocations().iter().map(|a| a.size).sum()).unwrap_or(0)
    }
}

/// The name of a kernel errno (`-ret`), for messages.
pub fn errno_name(ret: i32) -> &'static str {
    match -ret {
        1 => "EPERM",
        2 => "ENOENT",
        5 => "EIO",
        11 => "EAGAIN",
        12 => "ENOMEM",
        13 => "EACCES",
        14 => "EFAULT",
        16 => "EBUSY",
        17 => "EEXIST",
        19 => "ENODEV",
        22 => "EINVAL",
        28 => "ENOSPC",
        38 => "ENOSYS",
        95 => "EOPNOTSUPP",
        110 => "ETIMEDOUT",
        _ => "errno",
    }
}

/// Which klp callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallbackKind {
    PrePatch,
    PostPatch,
    PreUnpatch,
    PostUnpatch,
}

/// One callback to run: `func(obj)`.
#[derive(Clone, Debug)]
pub struct CallbackCall {
    /// Index of the object in the patch.
    pub object: usize,
    pub func: u64,
    /// Guest address of the `struct klp_object` (its argument).
    pub obj: u64,
    /// The object's name ("vmlinux" or a module).
    pub name: String,
}

impl Patcher {
    fn spec_mut(&mut self, name: &str) -> Option<&mut PatchSpec> {
        if let Some(st) = self.staged.as_mut().filter(|s| s.name == name) {
            return st.spec.as_mut();
        }
        self.patches.iter_mut().chain(self.retired.iter_mut()).find(|p| p.name == name).and_then(|p| p.spec.as_mut())
    }

    fn spec_of(&self, name: &str) -> Option<&PatchSpec> {
        if let Some(st) = self.staged.as_ref().filter(|s| s.name == name) {
            return st.spec.as_ref();
        }
        self.patches.iter().chain(self.retired.iter()).find(|p| p.name == name).and_then(|p| p.spec.as_ref())
    }

    /// The staged module's init called `klp_enable_patch()` and waits for
    /// the verdict (every vCPU stopped): reads the klp_patch it handed over
    /// and binds its objects to the loaded modules (`obj->mod`, as
    /// `klp_init_object_loaded` does), then checks it as `apply` will.
    pub fn enable_called(&mut self, k: &Kernel<'_>, w: &dyn GuestWriter, m: &PatchModule, records: &introspect::ftrace::FtraceRecords) -> Result<()> {
        let st = self.staged.as_ref().ok_or_else(|| PatchError::State("no module is being loaded".into()))?;
        let (count, ptr) = self.calls.as_ref().ok_or_else(|| PatchError::State("guest-call engine".into()))?.hook_record(k)?;
        if count != 1 {
            return Err(PatchError::Lifecycle { module: st.name.clone(), detail: format!("klp_enable_patch() was called {count} times") });
        }
        let spec = crate::klp_read::read_patch(k, ptr, st.this_module, m, &st.linked)?;
        let mod_off = k.btf.member_offset("klp_object", "mod")?;
        let modules = k.modules()?;
        for o in &spec.objects {
            let Some(name) = &o.name else { continue };
            if let Some(md) = modules.iter().find(|x| &x.name == name) {
                let at = o.addr.checked_add(mod_off).ok_or(PatchError::Guest(introspect::IntrospectError::Overflow(o.addr)))?;
                w.write_phys(crate::addr::GuestPhys(k.mem.translate(at)?), &md.addr.to_le_bytes())?;
            }
        }
        if let Some(st) = self.staged.as_mut() {
            st.spec = Some(spec);
        }
        self.check_staged(k, records)
    }

    /// The callbacks of `kind` to run now for patch `name` (staged, on the
    /// stack or retired): those of its loaded objects (vmlinux, or a module
    /// that is loaded); post-unpatch only where the pre-patch ran.
    pub fn callbacks(&self, k: &Kernel<'_>, name: &str, kind: CallbackKind) -> Result<Vec<CallbackCall>> {
        let Some(spec) = self.spec_of(name) else { return Ok(Vec::new()) };
        let modules = k.modules()?;
        let mut out = Vec::new();
        for (i, o) in spec.objects.iter().enumerate() {
            let loaded = match &o.name {
                None => true,
                Some(n) => modules.iter().any(|m| &m.name == n),
            };
            if !loaded {
                continue;
            }
            let func = match kind {
                CallbackKind::PrePatch => o.callbacks.pre_patch,
                CallbackKind::PostPatch => o.callbacks.post_patch,
                CallbackKind::PreUnpatch => o.callbacks.pre_unpatch,
                CallbackKind::PostUnpatch if o.post_unpatch_enabled => o.callbacks.post_unpatch,
                CallbackKind::PostUnpatch => 0,
            };
            // pre_patch also runs (as a no-op) for objects without one: it
            // arms their post-unpatch.
            if func != 0 || kind == CallbackKind::PrePatch {
                out.push(CallbackCall { object: i, func, obj: o.addr, name: o.name.clone().unwrap_or_else(|| "vmlinux".into()) });
            }
        }
        Ok(out)
    }

    /// Points hyperpatch's `klp_get_prev_state()` at the states of the
    /// patches before `name` (every vCPU stopped), as upstream's answers
    /// with the patches listed before the transition patch: the patches on
    /// the stack below it and those it replaced, the newest state of each
    /// id winning.
    pub fn set_prev_states(&self, w: &dyn GuestWriter, name: &str) -> Result<()> {
        let Some(c) = self.calls.as_ref() else { return Ok(()) };
        let mut map: Vec<(u64, u64)> = Vec::new();
        let before = self.retired.iter().chain(self.patches.iter()).take_while(|p| p.name != name);
        for p in before {
            for s in &p.states {
                if s.addr == 0 {
                    continue;
                }
                match map.iter_mut().find(|(id, _)| *id == s.id) {
                    Some(e) => e.1 = s.addr,
                    None => map.push((s.id, s.addr)),
                }
            }
        }
        if map.len() > crate::guest_call::MAX_PREV_STATES {
            return Err(PatchError::State(format!("more than {} states before {name}", crate::guest_call::MAX_PREV_STATES)));
        }
        c.set_prev_states(w, &map)
    }

    /// Records whether object `object` of patch `name` may run its
    /// post-unpatch callback.
    pub fn set_post_unpatch_enabled(&mut self, name: &str, object: usize, enabled: bool) {
        if let Some(o) = self.spec_mut(name).and_then(|s| s.objects.get_mut(object)) {
            o.post_unpatch_enabled = enabled;
        }
    }
}

impl Patcher {
    /// Every (patch, object index) that names module `module`, in stack
    /// order: the patches to apply to it when it loads (patches on the
    /// stack, enabled, as upstream keeps only enabled patches).
    pub fn objects_for_module(&self, module: &str) -> Vec<(String, usize)> {
        let mut out = Vec::new();
        for p in self.patches.iter().filter(|p| p.enabled) {
            if let Some(spec) = &p.spec {
                for (i, o) in spec.objects.iter().enumerate() {
                    if o.name.as_deref() == Some(module) {
                        out.push((p.name.clone(), i));
                    }
                }
            }
        }
        out
    }

    /// Sets `obj->mod` of object `object` of patch `patch` (every vCPU
    /// stopped), as `klp_find_object_module` does for a loaded module.
    pub fn bind_object(&self, k: &Kernel<'_>, w: &dyn GuestWriter, patch: &str, object: usize, mod_addr: u64) -> Result<()> {
        let obj = self
            .spec_of(patch)
            .and_then(|s| s.objects.get(object))
            .ok_or_else(|| PatchError::State(format!("{patch} has no object {object}")))?;
        let mod_off = k.btf.member_offset("klp_object", "mod")?;
        let at = obj.addr.checked_add(mod_off).ok_or(PatchError::Guest(introspect::IntrospectError::Overflow(obj.addr)))?;
        w.write_phys(crate::addr::GuestPhys(k.mem.translate(at)?), &mod_addr.to_le_bytes())
    }

    /// Module `module` (its `struct module` at `mod_addr`) is coming (every
    /// vCPU stopped, its init not run yet): binds object `object` of patch
    /// `patch` to it (`obj->mod`) and patches its functions, as
    /// `klp_init_object_loaded` and `klp_patch_object` do. Its code never
    /// ran, so its sites switch at once.
    pub fn patch_coming_object(
        &mut self,
        k: &Kernel<'_>,
        w: &dyn GuestWriter,
        records: &introspect::ftrace::FtraceRecords,
        patch: &str,
        object: usize,
        mod_addr: u64,
    ) -> Result<usize> {
        let i = self.patches.iter().position(|p| p.name == patch).ok_or_else(|| PatchError::NoPatch(patch.into()))?;
        let spec = self.patches[i].spec.clone().ok_or_else(|| PatchError::State(format!("{patch} has no klp_patch")))?;
        let obj = spec.objects.get(object).ok_or_else(|| PatchError::State(format!("{patch} has no object {object}")))?;
        let mod_off = k.btf.member_offset("klp_object", "mod")?;
        let at = obj.addr.checked_add(mod_off).ok_or(PatchError::Guest(introspect::IntrospectError::Overflow(obj.addr)))?;
        w.write_phys(crate::addr::GuestPhys(k.mem.translate(at)?), &mod_addr.to_le_bytes())?;
        let one = PatchSpec { objects: vec![obj.clone()], ..spec.clone() };
        let (funcs, new_sites) = self.resolve_funcs(k, records, &one)?;
        let linked = self.patches[i].linked.clone();
        let placed = crate::engine::patched_funcs(&linked, &funcs)?;
        self.patches[i].funcs.extend(placed);
        for s in &new_sites {
            self.sites.insert(s.site, s.clone());
        }
        // Only the module's own sites: others may be in a transition.
        let mine: std::collections::BTreeSet<u64> = funcs.iter().map(|f| f.site).collect();
        let desired: std::collections::BTreeMap<u64, Option<u64>> =
            Self::desired(&self.patches).into_iter().filter(|(s, _)| mine.contains(s)).collect();
        match self.switch_sites(&crate::engine::guest_view::LiveGuest::memory(k, w), &desired) {
            Ok(n) => Ok(n),
            Err(e) => {
                self.patches[i].funcs.retain(|f| f.object.as_deref() != obj.name.as_deref());
                for s in &new_sites {
                    self.sites.remove(&s.site);
                }
                Err(e)
            }
        }
    }

    /// Module `module` is going (every vCPU stopped, its exit has run, its
    /// text not freed yet): every site in it returns to its original bytes
    /// and is forgotten, and the objects naming it are unbound.
    pub fn unpatch_going_module(&mut self, k: &Kernel<'_>, w: &dyn GuestWriter, module: &str) -> Result<usize> {
        let gone: Vec<u64> = self
            .patches
            .iter()
            .flat_map(|p| p.funcs.iter())
            .filter(|f| f.object.as_deref() == Some(module))
            .map(|f| f.site)
            .collect();
        let desired: std::collections::BTreeMap<u64, Option<u64>> = gone.iter().map(|s| (*s, None)).collect();
        let n = self.switch_sites(&crate::engine::guest_view::LiveGuest::memory(k, w), &desired)?;
        for p in self.patches.iter_mut() {
            p.funcs.retain(|f| f.object.as_deref() != Some(module));
        }
        for s in &gone {
            self.sites.remove(s);
        }
        Ok(n)
    }

    /// The objects naming `module` forget it (`obj->mod = NULL`, as
    /// `klp_free_object_loaded` does), after its post-unpatch callbacks.
    pub fn unbind_module(&self, k: &Kernel<'_>, w: &dyn GuestWriter, module: &str) -> Result<()> {
        let mod_off = k.btf.member_offset("klp_object", "mod")?;
        for p in &self.patches {
            for o in p.spec.iter().flat_map(|s| &s.objects).filter(|o| o.name.as_deref() == Some(module)) {
                let at = o.addr.checked_add(mod_off).ok_or(PatchError::Guest(introspect::IntrospectError::Overflow(o.addr)))?;
                w.write_phys(crate::addr::GuestPhys(k.mem.translate(at)?), &0u64.to_le_bytes())?;
            }
        }
        Ok(())
    }

    /// The traps that catch module loads and unloads, once the guest-call
    /// routines are placed and a patch or module needs them.
    pub fn module_traps(&self) -> Vec<(u64, u64)> {
        if self.patches.is_empty() && self.staged.is_none() {
            return Vec::new();
        }
        self.calls.as_ref().map(|c| c.module_traps.clone()).unwrap_or_default()
    }
}
