//! The patch engine, split along Linux livepatch's own lines:
//! - this module, the core: patch objects on the stack and their lifecycle
//!   (apply, enable, disable, replace, retire, remove);
//! - [`sites`]: call sites and their func stacks;
//! - [`transition`]: the per-task consistency model, with its state enum;
//! - [`states`]: klp system states;
//! - [`resolve`]: finding the patched functions and symbols in the guest;
//! - [`safety`]: the stack check;
//! - [`plan`]: the one write plan every writer goes through (validate,
//!   commit, roll back);
//! - [`guest_view`]: what the engine needs of a stopped guest, so it runs
//!   on a live VM and, in unit tests, on a fake one.

pub mod guest_view;
pub mod plan;
pub mod prescan;
pub mod resolve;
pub mod safety;
pub mod sites;
pub mod states;
pub mod transition;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use introspect::kernel::Kernel;
use introspect::stacks::Unwinder;
use serde::{Deserialize, Serialize};

use crate::error::{PatchError, Result};
use crate::guest::GuestWriter;
use crate::guest_call::{CallArg, CallEngine, CallTicket};
use crate::link::LinkedModule;
use crate::lifecycle::Staged;
use crate::module::{PatchSpec, StateSpec};
use crate::placement::{Allocation, Region};

use guest_view::{GuestTasks, LiveGuest};
use resolve::ResolvedFunc;
pub use safety::{Blocker, CodeRange};
pub use sites::SiteState;
pub use transition::{dispatch_stub, TransitionGoal, TransitionState};
use transition::TaskTransition;
pub(crate) use resolve::GuestResolver;

/// Options of `apply`.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct ApplyOptions {
    /// Switch even when a changed function is on a stack (unsafe, logged).
    pub force: bool,
    /// Apply a module whose objects have callbacks without running them.
    pub skip_callbacks: bool,
    /// When a changed function is on some stack, switch task by task through
    /// dispatch stubs instead of waiting for a global safe point.
    pub per_task: bool,
}

/// One function a patch changes, resolved in the guest.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PatchedFunc {
    pub object: Option<String>,
    pub old_name: String,
    pub old_sympos: u64,
    pub old_addr: u64,
    pub old_size: u64,
    pub site: u64,
    pub new_symbol: String,
    pub new_addr: u64,
    pub new_size: u64,
}

/// One applied patch.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Patch {
    pub id: u64,
    pub name: String,
    pub path: String,
    pub enabled: bool,
    pub replace: bool,
    pub forced: bool,
    pub states: Vec<StateSpec>,
    pub funcs: Vec<PatchedFunc>,
    pub(crate) linked: LinkedModule,
    /// The module's exit (run at remove), its `__this_module`, and the
    /// klp_patch its init enabled.
    #[serde(default)]
    pub exit: Option<u64>,
    #[serde(default)]
    pub this_module: u64,
    #[serde(default)]
    pub spec: Option<PatchSpec>,
    #[serde(default)]
    pub(crate) params: Vec<crate::params::ParamSpec>,
}

/// Result of one transition attempt.
#[derive(Clone, Debug, Serialize)]
pub enum Outcome {
    /// Done: sites written.
    Switched { sites: usize, forced: bool },
    /// Not safe now; nothing was changed.
    Blocked(Vec<Blocker>),
    /// A per-task transition runs: migrated tasks use the target code,
    /// the others the old code, until every task is migrated.
    InTransition { remaining: usize, blockers: Vec<Blocker> },
}

/// Version of the patcher's saved state (in snapshots). Another version
/// is refused, never misread. (2: the transition holds a state enum and
/// named code ranges; 3: each site holds its kernel's ftrace flag bits.)
pub const STATE_VERSION: u32 = 3;

/// All patch state of one guest. It is saved with a snapshot of the VM
/// (serde) and restored with it: the guest's memory holds the jumps, stubs
/// and task marks, and this holds what they mean.
#[derive(Debug, Serialize, Deserialize)]
pub struct Patcher {
    reserved_phys: u64,
    reserved_size: u64,
    region: Option<Region>,
    pub(crate) patches: Vec<Patch>,
    pub(crate) sites: BTreeMap<u64, SiteState>,
    next_id: u64,
    transition: Option<TaskTransition>,
    /// The guest-call routines and slots, once a call has been made.
    #[serde(default)]
    pub(crate) calls: Option<CallEngine>,
    /// A module being loaded (placed, its init run or running).
    #[serde(default)]
    pub(crate) staged: Option<Staged>,
    /// Memory of modules whose code may still run: never freed.
    #[serde(default)]
    pub(crate) lost: Vec<Allocation>,
    /// Patches that left the stack (replaced, or their enabling reversed)
    /// whose module exit has not run yet.
    #[serde(default)]
    pub(crate) retired: Vec<Patch>,
}

/// The functions a patch changes as placed: each resolved old function
/// with its new function's address in `linked`. A new function of unknown
/// size is refused.
pub(crate) fn patched_funcs(linked: &LinkedModule, funcs: &[ResolvedFunc]) -> Result<Vec<PatchedFunc>> {
    let mut out = Vec::new();
    for r in funcs {
        let f = &r.spec;
        let new_addr = linked.address(f.new_section, f.new_offset).ok_or_else(|| PatchError::Function {
            name: f.old_name.clone(),
            detail: "new function's section was not placed".into(),
        })?;
        if f.new_size == 0 {
            return Err(PatchError::Function { name: f.new_symbol.clone(), detail: "its size is unknown".into() });
        }
        out.push(PatchedFunc {
            object: r.object.clone(),
            old_name: f.old_name.clone(),
            old_sympos: f.old_sympos,
            old_addr: r.old_addr,
            old_size: r.old_size,
            site: r.site,
            new_symbol: f.new_symbol.clone(),
            new_addr,
            new_size: f.new_size,
        });
    }
    Ok(out)
}

impl Patcher {
    /// A patcher for a guest whose reserved region is `[phys, phys + size)`.
    pub fn new(reserved_phys: u64, reserved_size: u64) -> Patcher {
        Patcher {
            reserved_phys,
            reserved_size,
            region: None,
            patches: Vec::new(),
            sites: BTreeMap::new(),
            next_id: 1,
            transition: None,
            calls: None,
            staged: None,
            lost: Vec::new(),
            retired: Vec::new(),
        }
    }

    /// The reserved region this patcher places code in: (guest-physical
    /// start, size).
    pub fn reserved(&self) -> (u64, u64) {
        (self.reserved_phys, self.reserved_size)
    }

    /// Patches in stack order (oldest first).
    pub fn patches(&self) -> &[Patch] {
        &self.patches
    }

    /// Sites hyperpatch owns.
    pub fn sites(&self) -> impl Iterator<Item = &SiteState> {
        self.sites.values()
    }

    /// Adds the ORC tables of every placed patch (and of the guest-call
    /// routines) to `u`, so stacks through new code unwind reliably.
    pub fn register_orc(&self, u: &mut Unwinder) {
        for p in &self.patches {
            if let Some((start, end, ips, entries)) = &p.linked.orc {
                let _ = u.tables.add_host_table(*start, *end, ips.clone(), entries.clone());
            }
        }
        if let Some(c) = &self.calls {
            let (start, end) = c.text_range();
            let _ = u.tables.add_host_table(start, end, c.orc.0.clone(), c.orc.1.clone());
        }
    }

    /// Queues a call of guest function `func` with `args` (every vCPU
    /// stopped): the first call maps the region and places the routines.
    /// The caller resumes the VM, sends vCPU 0 the MSI for the returned
    /// vector, and polls the ticket (`CallEngine::poll`).
    pub fn queue_call(&mut self, k: &Kernel<'_>, w: &dyn GuestWriter, func: u64, args: &[CallArg]) -> Result<(CallTicket, u8)> {
        self.ensure_calls(k, w)?;
        let c = self.calls.as_mut().ok_or_else(|| PatchError::State("guest-call engine".into()))?;
        let t = c.queue(k, w, func, args)?;
        Ok((t, c.vector))
    }

    /// The guest-call routines and slots, once placed.
    pub fn call_engine(&self) -> Option<&CallEngine> {
        self.calls.as_ref()
    }

    /// A call did not finish in time: its slot is never used again.
    pub fn call_lost(&mut self, t: &CallTicket) {
        if let Some(c) = self.calls.as_mut() {
            c.lose(t);
        }
    }

    /// Bytes of the reserved region patches and modules use (the
    /// guest-call routines not counted).
    pub fn reserved_used(&self) -> u64 {
        self.region.as_ref().map(|r| r.used_bytes()).unwrap_or(0).saturating_sub(self.engine_bytes())
    }

    /// The region, once planned.
    pub(crate) fn region_mut(&mut self) -> Result<&mut Region> {
        self.region.as_mut().ok_or_else(|| PatchError::State("the reserved region is not planned yet".into()))
    }

    /// Maps the region and places the guest-call routines if not yet done.
    pub(crate) fn ensure_calls(&mut self, k: &Kernel<'_>, w: &dyn GuestWriter) -> Result<()> {
        if self.calls.is_some() {
            return Ok(());
        }
        let cpu0 = *k.cpus.first().ok_or_else(|| PatchError::Vm("no vCPU".into()))?;
        let region = self.region(k)?;
        let was_mapped = region.is_mapped();
        // Through the kernel's own top-level table (`Kernel::mem`'s root),
        // which every CPU's kernel half shares.
        region.map(k.mem.phys(), w, k.mem.cr3(), cpu0.la57())?;
        match CallEngine::place(k, w, region) {
            Ok(c) => {
                self.calls = Some(c);
                Ok(())
            }
            Err(e) => {
                if !was_mapped {
                    let _ = region.unmap(w);
                }
                Err(e)
            }
        }
    }

    /// Whether the reserved region is mapped into the guest.
    pub fn region_mapped(&self) -> bool {
        self.region.as_ref().is_some_and(|r| r.is_mapped())
    }

    fn region(&mut self, k: &Kernel<'_>) -> Result<&mut Region> {
        if self.region.is_none() {
            let end = k.sym("_end")?;
            let virt = Region::choose_virt_base(end, k.modules_vaddr()?, self.reserved_size)?;
            self.region = Some(Region::new(self.reserved_phys, self.reserved_size, virt)?);
        }
        self.region.as_mut().ok_or_else(|| PatchError::State("region".into()))
    }

    fn index(&self, name: &str) -> Result<usize> {
        self.patches.iter().position(|p| p.name == name).ok_or_else(|| PatchError::NoPatch(name.into()))
    }

    /// Every task whose stack (or vCPU) is inside one of `ranges`.
    pub fn blockers(k: &Kernel<'_>, w: &dyn GuestWriter, u: &Unwinder, ranges: &[CodeRange]) -> Result<Vec<Blocker>> {
        safety::blockers(&LiveGuest::new(k, w, u), ranges)
    }

    /// Applies the staged module's patch (its init has run and enabled it)
    /// at one safe point (all vCPUs stopped by the caller). Blocked:
    /// nothing in the guest changed; call again after resuming. On success
    /// the staged module becomes a patch; on error it stays staged for the
    /// caller to run its exit and unstage it.
    pub fn apply(
        &mut self,
        k: &Kernel<'_>,
        w: &dyn GuestWriter,
        u: &Unwinder,
        records: &introspect::ftrace::FtraceRecords,
        opts: ApplyOptions,
    ) -> Result<Outcome> {
        self.apply_on(k, &LiveGuest::new(k, w, u), records, opts)
    }

    /// `apply` on any view `g` of the stopped guest `k` (a pre-scanned one
    /// in the live VM).
    pub fn apply_on(
        &mut self,
        k: &Kernel<'_>,
        g: &dyn GuestTasks,
        records: &introspect::ftrace::FtraceRecords,
        opts: ApplyOptions,
    ) -> Result<Outcome> {
        let spec = self.staged_spec()?;
        let (funcs, new_sites) = self.resolve_funcs(k, records, &spec)?;
        self.apply_resolved(g, funcs, new_sites, opts)
    }

    fn staged_spec(&self) -> Result<PatchSpec> {
        let staged = self.staged.as_ref().ok_or_else(|| PatchError::State("no module is loaded to apply".into()))?;
        staged.spec.clone().ok_or_else(|| PatchError::State(format!("{}: its klp_patch was not read", staged.name)))
    }

    /// `apply` with the patch's functions resolved: the stack check, then
    /// one global switch or the start of a per-task transition.
    pub(crate) fn apply_resolved(
        &mut self,
        g: &dyn GuestTasks,
        funcs: Vec<ResolvedFunc>,
        new_sites: Vec<SiteState>,
        opts: ApplyOptions,
    ) -> Result<Outcome> {
        let staged = self.staged.clone().ok_or_else(|| PatchError::State("no module is loaded to apply".into()))?;
        let spec = self.staged_spec()?;
        if self.patches.iter().any(|p| p.name == staged.name) {
            return Err(PatchError::Duplicate(staged.name.clone()));
        }
        if self.transition.is_some() {
            return Err(PatchError::State("a per-task transition is still running".into()));
        }
        let replace = spec.replace;
        states::check_compatible(&staged.name, &spec.states, replace, self.patches.iter())?;
        // Safety: the code running now at every site must be on no stack.
        let mine: std::collections::BTreeSet<u64> = funcs.iter().map(|f| f.site).collect();
        let mut ranges: Vec<CodeRange> =
            funcs.iter().map(|f| self.current_range_or(f.site, &f.spec.old_name, f.old_addr, f.old_size)).collect();
        if replace {
            for s in self.sites.values() {
                if s.active.is_some() && !mine.contains(&s.site) {
                    ranges.push(self.current_range(s.site, (s.site, 5)));
                }
            }
        }
        let blockers = safety::blockers(g, &ranges)?;
        let per_task = !blockers.is_empty() && !opts.force && opts.per_task;
        if !blockers.is_empty() && !opts.force && !per_task {
            return Ok(Outcome::Blocked(blockers));
        }
        let pfuncs = patched_funcs(&staged.linked, &funcs)?;
        for s in &new_sites {
            self.sites.insert(s.site, s.clone());
        }
        self.patches.push(Patch {
            id: self.next_id,
            name: staged.name.clone(),
            path: staged.path.clone(),
            enabled: true,
            replace,
            forced: !blockers.is_empty() && !per_task,
            states: spec.states.clone(),
            funcs: pfuncs,
            linked: staged.linked.clone(),
            exit: staged.exit,
            this_module: staged.this_module,
            spec: Some(spec.clone()),
            params: staged.params.clone(),
        });
        let mut desired = Self::desired(&self.patches);
        if replace {
            // Nops: every site the new patch does not change returns to the original code.
            for (site, t) in desired.iter_mut() {
                if !mine.contains(site) {
                    *t = None;
                }
            }
        }
        let written = if per_task {
            self.start_task_transition(g, &staged.name, desired, ranges, TransitionGoal::Apply, replace).map(|_| 0)
        } else {
            self.switch_sites(g, &desired)
        };
        let n = match written {
            Ok(n) => n,
            Err(e) => {
                // Nothing was written (the plan rolled back): the patch was never in the guest.
                self.patches.pop();
                for s in &new_sites {
                    self.sites.remove(&s.site);
                }
                return Err(e);
            }
        };
        self.next_id += 1;
        self.staged = None;
        if per_task {
            // From here the sites jump through stubs into the patch: it stays
            // on the stack in its transition whatever a step returns.
            return self.advance_on(g);
        }
        if replace {
            self.drop_replaced();
        }
        Ok(Outcome::Switched { sites: n, forced: !blockers.is_empty() })
    }

    /// After a replacing transition: the other patches leave the stack
    /// (their callbacks do not run), and sites nobody changes any more are
    /// forgotten. Their modules are retired: the caller runs their exits
    /// and then frees them (`take_retired`, `free_retired`).
    pub(crate) fn drop_replaced(&mut self) {
        let Some(last) = self.patches.pop() else { return };
        let old = std::mem::take(&mut self.patches);
        self.patches.push(last);
        self.retired.extend(old);
        self.forget_unused_sites();
    }

    /// Enables or disables patch `name` at one safe point.
    #[allow(clippy::too_many_arguments)]
    pub fn set_enabled(
        &mut self,
        k: &Kernel<'_>,
        w: &dyn GuestWriter,
        u: &Unwinder,
        name: &str,
        enabled: bool,
        force: bool,
        per_task: bool,
    ) -> Result<Outcome> {
        self.set_enabled_on(&LiveGuest::new(k, w, u), name, enabled, force, per_task)
    }

    pub fn set_enabled_on(&mut self, g: &dyn GuestTasks, name: &str, enabled: bool, force: bool, per_task: bool) -> Result<Outcome> {
        let i = self.index(name)?;
        if self.patches[i].enabled == enabled {
            return Err(PatchError::State(format!("patch {name} is already {}", if enabled { "enabled" } else { "disabled" })));
        }
        if self.transition.is_some() {
            return Err(PatchError::State("a per-task transition is still running".into()));
        }
        if enabled {
            // Re-enabling is checked like a new patch: it may not lower a
            // state's version (Linux refuses re-enabling altogether; see
            // docs/LIFECYCLE.md).
            let me = &self.patches[i];
            let others = self.patches.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, p)| p);
            states::check_compatible(&me.name, &me.states, me.replace, others)?;
        }
        let mut next = self.patches.clone();
        next[i].enabled = enabled;
        let desired = Self::desired(&next);
        let mut ranges = Vec::new();
        for (site, target) in &desired {
            if let Some(s) = self.sites.get(site) {
                if s.active != *target {
                    let old = self.patches.iter().flat_map(|p| &p.funcs).find(|f| f.site == *site);
                    let (a, sz) = old.map(|f| (f.old_addr, f.old_size)).unwrap_or((*site, 5));
                    ranges.push(self.current_range(*site, (a, sz)));
                }
            }
        }
        let blockers = safety::blockers(g, &ranges)?;
        if !blockers.is_empty() && !force {
            if per_task {
                self.start_task_transition(g, name, desired, ranges, TransitionGoal::SetEnabled(enabled), false)?;
                return self.advance_on(g);
            }
            return Ok(Outcome::Blocked(blockers));
        }
        let n = self.switch_sites(g, &desired)?;
        self.patches[i].enabled = enabled;
        if !blockers.is_empty() {
            self.patches[i].forced = true;
        }
        Ok(Outcome::Switched { sites: n, forced: !blockers.is_empty() })
    }

    /// Patches that left the stack and wait for their module's exit.
    pub fn take_retired(&mut self) -> Vec<Patch> {
        std::mem::take(&mut self.retired)
    }

    /// Frees a retired patch's memory once its exit has run: zeroed and
    /// freed, unless it was forced (a task may still be in its code, as
    /// Linux keeps a forced patch's module forever) or `keep` (its exit did
    /// not return).
    pub fn free_retired(&mut self, w: &dyn GuestWriter, p: Patch, keep: bool) -> Result<()> {
        if keep || p.forced {
            self.lost.extend(p.linked.allocations);
            return Ok(());
        }
        for (pa, bytes) in &p.linked.images {
            w.write_phys(*pa, &vec![0u8; bytes.len()])?;
        }
        let region = self.region_mut()?;
        for a in &p.linked.allocations {
            region.free(a);
        }
        if region.used_bytes() == 0 {
            region.unmap(w)?;
        }
        Ok(())
    }

    /// The exit function of patch `name`, which must be disabled (`remove`
    /// runs it before freeing the patch, as rmmod does).
    pub fn exit_of(&self, name: &str) -> Result<Option<u64>> {
        let i = self.index(name)?;
        if self.patches[i].enabled {
            return Err(PatchError::State(format!("patch {name} is enabled: disable it first")));
        }
        Ok(self.patches[i].exit)
    }

    /// Forgets disabled patch `name` whose code may still run (its exit did
    /// not return): its memory is never freed.
    pub fn forget_keeping_memory(&mut self, name: &str) -> Result<()> {
        let i = self.index(name)?;
        if self.patches[i].enabled {
            return Err(PatchError::State(format!("patch {name} is enabled: disable it first")));
        }
        let p = self.patches.remove(i);
        self.forget_unused_sites();
        self.lost.extend(p.linked.allocations);
        Ok(())
    }

    /// Forgets a disabled patch and frees (zeroes) its guest memory; unmaps
    /// the region when nothing is left in it.
    pub fn remove(&mut self, w: &dyn GuestWriter, name: &str) -> Result<()> {
        let i = self.index(name)?;
        if self.patches[i].enabled {
            return Err(PatchError::State(format!("patch {name} is enabled: disable it first")));
        }
        let p = self.patches.remove(i);
        // Sites no remaining patch names are forgotten (they hold their
        // original bytes: the patch was disabled).
        self.forget_unused_sites();
        if p.forced {
            // A forced transition may have left a task in its code: Linux
            // keeps a forced patch's module forever, and so does hyperpatch.
            self.lost.extend(p.linked.allocations);
            return Ok(());
        }
        let region = self.region.as_mut().ok_or_else(|| PatchError::State("region".into()))?;
        for (pa, bytes) in &p.linked.images {
            w.write_phys(*pa, &vec![0u8; bytes.len()])?;
        }
        for a in &p.linked.allocations {
            region.free(a);
        }
        if region.used_bytes() == 0 {
            region.unmap(w)?;
        }
        Ok(())
    }
}

