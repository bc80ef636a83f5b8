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
        let hook = self.call_engine().map(|c| c.hook_fn).ok_or_else(|| PatchError::State("guest-call engine".into()))?;
        let resolver = crate::engine::GuestResolver { k, klp_enable_patch: Some(hook) };
        let region = self.region_mut()?;
        let mut linked = link(m, region, &resolver)?;
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
                let pa = k.mem.translate(va)?;
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
        self.staged = Some(Staged { name: m.name.clone(), path: m.path.clone(), linked, this_module, init, exit, spec: None, init_ok: false });
        Ok(StageInfo { init, exit })
    }

    /// The staged module.
    pub fn staged(&self) -> Option<&Staged> {
        self.staged.as_ref()
    }

    /// The staged module's init returned `ret` (every vCPU stopped): reads
    /// what it handed to `klp_enable_patch()`.
    pub fn init_returned(&mut self, k: &Kernel<'_>, m: &PatchModule, ret: i64) -> Result<()> {
        let st = self.staged.as_mut().ok_or_else(|| PatchError::State("no module is being loaded".into()))?;
        let name = st.name.clone();
        let lerr = |detail: String| PatchError::Lifecycle { module: name.clone(), detail };
        let ret32 = ret as i32;
        if ret32 != 0 {
            return Err(lerr(format!("its init failed with {ret32} ({})", errno_name(ret32))));
        }
        st.init_ok = true;
        let (count, ptr) = self.calls.as_ref().ok_or_else(|| PatchError::State("guest-call engine".into()))?.hook_record(k)?;
        let st = self.staged.as_mut().ok_or_else(|| PatchError::State("staged".into()))?;
        match count {
            0 => return Err(lerr("its init returned 0 without calling klp_enable_patch()".into())),
            1 => {}
            n => return Err(lerr(format!("its init called klp_enable_patch() {n} times"))),
        }
        let spec = crate::klp_read::read_patch(k, ptr, st.this_module, m, &st.linked)?;
        st.spec = Some(spec);
        Ok(())
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
        let blockers = Patcher::blockers(k, u, &[("guest-call routines".to_string(), start, end - start)])?;
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
