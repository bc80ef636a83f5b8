//! The per-task transition, as Linux's `kernel/livepatch/transition.c`
//! does it: every changed site jumps to a dispatch stub that sends migrated
//! tasks (`patch_state == KLP_PATCHED`) to the target code and the others to
//! the code before; a task is migrated once its stack is off the code it
//! leaves; when every task is migrated the sites jump straight to the target
//! and the stubs and marks go. It can be sent back (reversed) and forced.

use serde::{Deserialize, Serialize};

use crate::engine::guest_view::{GuestTasks, LiveGuest};
use crate::engine::plan::WritePlan;
use crate::engine::safety::{blocker, CodeRange};
use crate::engine::sites::Desired;
use crate::engine::{Outcome, Patcher};
use crate::error::{PatchError, Result};
use crate::placement::{Allocation, AreaKind};
use introspect::kernel::Kernel;
use introspect::stacks::Unwinder;

use crate::guest::GuestWriter;

/// KLP_PATCHED in `task_struct.patch_state`: the mark of a migrated task.
pub(crate) const TASK_MIGRATED: i32 = 1;
/// KLP_UNDEFINED: the value every task has outside livepatch transitions.
pub(crate) const TASK_UNDEFINED: i32 = -1;
pub(crate) const STUB_SIZE: u64 = 32;

/// The dispatch stub of one site: migrated tasks (`current->patch_state ==
/// 1`) go to `new`, the others to `old`. Clobbers only r11 and flags, which
/// are free at a function's entry.
pub fn dispatch_stub(at: u64, current_task: u64, patch_state_off: u64, new: u64, old: u64) -> Result<Vec<u8>> {
    let bad = |d: &str| PatchError::State(format!("dispatch stub: {d}"));
    let disp = i32::try_from(current_task as i64).map_err(|_| bad("current_task offset does not fit disp32"))?;
    let ps = i32::try_from(patch_state_off).map_err(|_| bad("patch_state offset"))?;
    let mut b = Vec::with_capacity(STUB_SIZE as usize);
    b.extend_from_slice(&[0x65, 0x4c, 0x8b, 0x1c, 0x25]); // mov r11, gs:[current_task]
    b.extend_from_slice(&disp.to_le_bytes());
    b.extend_from_slice(&[0x41, 0x81, 0xbb]); // cmp dword [r11 + patch_state], 1
    b.extend_from_slice(&ps.to_le_bytes());
    b.extend_from_slice(&TASK_MIGRATED.to_le_bytes());
    let je_end = at.checked_add(b.len() as u64 + 6).ok_or_else(|| bad("stub address overflows"))?;
    let rel = i32::try_from(i128::from(new) - i128::from(je_end)).map_err(|_| bad("new target out of reach"))?;
    b.extend_from_slice(&[0x0f, 0x84]);
    b.extend_from_slice(&rel.to_le_bytes());
    let jmp_end = at.checked_add(b.len() as u64 + 5).ok_or_else(|| bad("stub address overflows"))?;
    let rel = i32::try_from(i128::from(old) - i128::from(jmp_end)).map_err(|_| bad("old target out of reach"))?;
    b.push(0xe9);
    b.extend_from_slice(&rel.to_le_bytes());
    Ok(b)
}

/// Where a per-task transition is going.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransitionState {
    /// Unmigrated tasks move to the target as they leave the old code.
    Patching,
    /// Sent back: migrated tasks move back as they leave the new code, and
    /// the guest ends as it was before the transition.
    Reversing,
    /// Forced toward the target: every task moves now, safe or not. Code a
    /// task was moved off may still run, so it is never freed.
    ForcedPatching,
    /// Forced back: as `Reversing`, every task at once.
    ForcedReversing,
}

impl TransitionState {
    pub fn reversed(self) -> bool {
        matches!(self, TransitionState::Reversing | TransitionState::ForcedReversing)
    }
    pub fn forced(self) -> bool {
        matches!(self, TransitionState::ForcedPatching | TransitionState::ForcedReversing)
    }
    /// Sent back (again). A forced transition is not: tasks already moved
    /// without a check cannot be moved back safely.
    pub(crate) fn reverse(self) -> Result<TransitionState> {
        match self {
            TransitionState::Patching => Ok(TransitionState::Reversing),
            TransitionState::Reversing => Ok(TransitionState::Patching),
            _ => Err(PatchError::State("a forced transition cannot be sent back".into())),
        }
    }
    pub(crate) fn force(self) -> TransitionState {
        if self.reversed() {
            TransitionState::ForcedReversing
        } else {
            TransitionState::ForcedPatching
        }
    }
}

/// What completes when a transition reaches its target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransitionGoal {
    /// A new patch goes on the stack (sent back: it leaves it).
    Apply,
    /// A patch on the stack is enabled (`true`) or disabled.
    SetEnabled(bool),
}

/// The dispatch stub of one site and the region memory it lives in.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Stub {
    pub site: u64,
    pub alloc: Allocation,
}

/// A per-task transition in progress.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct TaskTransition {
    pub patch: String,
    pub goal: TransitionGoal,
    pub state: TransitionState,
    /// The transitioning patch replaces all others when it completes.
    pub replace: bool,
    /// Site targets once every task is migrated.
    pub desired: Desired,
    /// Code that unmigrated tasks may still run (must leave their stacks).
    pub old_ranges: Vec<CodeRange>,
    /// Code migrated tasks run (must leave their stacks to go back).
    pub new_ranges: Vec<CodeRange>,
    pub stubs: Vec<Stub>,
}

fn zeros() -> [u8; STUB_SIZE as usize] {
    [0u8; STUB_SIZE as usize]
}

impl Patcher {
    /// The patch in a per-task transition, if any.
    pub fn in_transition(&self) -> Option<&str> {
        self.transition.as_ref().map(|t| t.patch.as_str())
    }

    /// The running per-task transition's state, if one runs.
    pub fn transition_state(&self) -> Option<TransitionState> {
        self.transition.as_ref().map(|t| t.state)
    }

    /// Starts a per-task transition toward `desired`: every changed site
    /// jumps to a dispatch stub (one write plan: all sites or none). No task
    /// is migrated yet; `advance_on` does that.
    pub(crate) fn start_task_transition(
        &mut self,
        g: &dyn GuestTasks,
        patch: &str,
        desired: Desired,
        old_ranges: Vec<CodeRange>,
        goal: TransitionGoal,
        replace: bool,
    ) -> Result<()> {
        if self.transition.is_some() {
            return Err(PatchError::State("a per-task transition is still running".into()));
        }
        let ps_off = g.patch_state_offset()?;
        let current = g.current_task_slot()?;
        // The guest's own livepatch must not be in a transition (it owns patch_state then).
        if g.guest_klp_in_transition()? {
            return Err(PatchError::State("the guest's own livepatch is in a transition; try again later".into()));
        }
        if let Some((t, v)) = g.tasks_in_state(ps_off, &|v| v != TASK_UNDEFINED)?.first() {
            return Err(PatchError::State(format!("task {} has patch_state {v}: a livepatch transition of the guest runs", t.pid)));
        }
        let mut new_ranges = Vec::new();
        for (site, target) in &desired {
            let Some(st) = self.sites.get(site) else { continue };
            if st.active == *target {
                continue;
            }
            let funcs = || self.patches.iter().flat_map(|p| &p.funcs);
            let range = match target {
                Some(t) => funcs()
                    .find(|f| f.site == *site && f.new_addr == *t)
                    .map(|f| CodeRange { name: f.new_symbol.clone(), start: f.new_addr, size: f.new_size }),
                None => funcs().find(|f| f.site == *site).map(|f| CodeRange { name: f.old_name.clone(), start: f.old_addr, size: f.old_size }),
            };
            new_ranges.extend(range);
        }
        let mut stubs: Vec<Stub> = Vec::new();
        let planned = self.plan_stubs(g, &desired, current, ps_off, &mut stubs);
        let committed = planned.and_then(|plan| plan.commit(g));
        if let Err(e) = committed {
            if let Some(region) = self.region.as_mut() {
                for s in &stubs {
                    region.free(&s.alloc);
                }
            }
            return Err(e);
        }
        self.transition = Some(TaskTransition {
            patch: patch.to_string(),
            goal,
            state: TransitionState::Patching,
            replace,
            desired,
            old_ranges,
            new_ranges,
            stubs,
        });
        Ok(())
    }

    /// Allocates a stub for every site `desired` changes (into `stubs`, so
    /// the caller frees them if the plan fails) and plans their code and
    /// the sites' jumps to them.
    fn plan_stubs(&mut self, g: &dyn GuestTasks, desired: &Desired, current: u64, ps_off: u64, stubs: &mut Vec<Stub>) -> Result<WritePlan> {
        let mut code = WritePlan::new();
        let mut jumps = WritePlan::new();
        let region = self.region.as_mut().ok_or_else(|| PatchError::State("the reserved region is not planned yet".into()))?;
        for (site, target) in desired {
            let Some(st) = self.sites.get(site) else { continue };
            if st.active == *target {
                continue;
            }
            let body = site.checked_add(5).ok_or(PatchError::Guest(introspect::IntrospectError::Overflow(*site)))?; // the original function after its NOP
            let a = region.alloc(AreaKind::Text, STUB_SIZE, 32)?;
            stubs.push(Stub { site: *site, alloc: a });
            let bytes = dispatch_stub(a.virt, current, ps_off, target.unwrap_or(body), st.active.unwrap_or(body))?;
            code.phys(a.phys, &bytes);
            // The site is no longer the NOP: the guest's ftrace must leave it alone.
            st.plan_change(g, &mut jumps, st.active, Some(a.virt))?;
        }
        // Stubs first: a site never jumps to a stub that is not written.
        code.extend(jumps);
        Ok(code)
    }

    /// One step of the per-task transition (all vCPUs stopped): migrates
    /// every task now safe, and completes the transition when none is left.
    pub fn advance(&mut self, k: &Kernel<'_>, w: &dyn GuestWriter, u: &Unwinder) -> Result<Outcome> {
        self.advance_on(&LiveGuest::new(k, w, u))
    }

    /// `advance` on any view of the stopped guest (a pre-scanned one in the live VM).
    pub fn advance_on(&mut self, g: &dyn GuestTasks) -> Result<Outcome> {
        let Some(tr) = self.transition.as_ref() else {
            return Ok(Outcome::Switched { sites: 0, forced: false });
        };
        let ps_off = g.patch_state_offset()?;
        let reversed = tr.state.reversed();
        // Forward: unmigrated tasks move to the target once off the old code.
        // Reversed: migrated tasks move back once off the new code.
        let (from, to, ranges) =
            if reversed { (TASK_MIGRATED, TASK_UNDEFINED, &tr.new_ranges) } else { (TASK_UNDEFINED, TASK_MIGRATED, &tr.old_ranges) };
        // Only tasks not yet where the transition goes (a pre-scanned view
        // reads no other task in a stop where none of them ran).
        let moving = g.tasks_in_state(ps_off, &|state| !(state == to || (reversed && state != from)))?;
        // Only a task the view names for a check against `ranges` can be in
        // that code (every task, unless a pre-scan knows better).
        let suspects: std::collections::HashSet<u64> =
            if tr.state.forced() { Default::default() } else { g.tasks_to_check(ranges)?.iter().map(|t| t.addr.0).collect() };
        let mut marks = WritePlan::new();
        let mut blockers = Vec::new();
        for (t, _) in &moving {
            let addr = t.addr.offset(ps_off)?;
            let suspect = suspects.contains(&t.addr.0);
            match if tr.state.forced() || !suspect { None } else { blocker(g, ranges, t) } {
                None => marks.virt(addr, &to.to_le_bytes()),
                Some(b) => blockers.push(b),
            }
        }
        marks.commit(g)?;
        if !blockers.is_empty() {
            return Ok(Outcome::InTransition { remaining: blockers.len(), blockers });
        }
        // Every task's mark is cleared: the whole task list, read now (a
        // task forked since a pre-scan copied its parent's mark).
        let tasks = g.tasks()?;
        self.complete_transition(g, &tasks, ps_off)
    }

    /// Every task is where the transition goes: the sites get their final
    /// bytes, the stubs and task marks go (one plan), and the goal is
    /// reached.
    fn complete_transition(&mut self, g: &dyn GuestTasks, tasks: &[crate::engine::guest_view::TaskRef], ps_off: u64) -> Result<Outcome> {
        let tr = self.transition.clone().ok_or_else(|| PatchError::State("no transition is running".into()))?;
        let reversed = tr.state.reversed();
        let mut plan = WritePlan::new();
        let mut final_targets: Vec<(u64, Option<u64>)> = Vec::new();
        for stub in &tr.stubs {
            // A site no longer owned was in a module that went away
            // meanwhile: its text is gone, only its stub is left to free.
            let Some(st) = self.sites.get(&stub.site) else { continue };
            // Sent back: the bytes from before the transition.
            let target = if reversed { st.active } else { tr.desired.get(&stub.site).copied().flatten() };
            st.plan_change(g, &mut plan, Some(stub.alloc.virt), target)?;
            final_targets.push((stub.site, target));
        }
        if !reversed {
            // Sites the transition did not stub (a module that came meanwhile).
            for (site, target) in &tr.desired {
                if tr.stubs.iter().any(|s| s.site == *site) {
                    continue;
                }
                if let Some(st) = self.sites.get(site) {
                    st.plan_change(g, &mut plan, st.active, *target)?;
                    final_targets.push((*site, *target));
                }
            }
        }
        for stub in &tr.stubs {
            plan.phys(stub.alloc.phys, &zeros());
        }
        for t in tasks {
            plan.virt(t.addr.offset(ps_off)?, &TASK_UNDEFINED.to_le_bytes());
        }
        plan.commit(g)?;
        let mut changed = 0;
        for (site, target) in final_targets {
            if let Some(st) = self.sites.get_mut(&site) {
                if st.active != target {
                    changed += 1;
                }
                st.active = target;
            }
        }
        if let Some(region) = self.region.as_mut() {
            for stub in &tr.stubs {
                region.free(&stub.alloc);
            }
        }
        self.transition = None;
        let forced = tr.state.forced();
        if forced {
            // Some task may still run the code it was moved off: never freed.
            for p in self.patches.iter_mut() {
                p.forced = true;
            }
        }
        match (reversed, tr.goal) {
            (false, TransitionGoal::SetEnabled(en)) => {
                if let Some(p) = self.patches.iter_mut().find(|p| p.name == tr.patch) {
                    p.enabled = en;
                }
            }
            (false, TransitionGoal::Apply) => {}
            (true, TransitionGoal::Apply) => {
                // As upstream frees a patch whose enabling was reversed: it
                // leaves the stack; its module's exit runs before its memory
                // is freed (the caller reaps it).
                if let Some(i) = self.patches.iter().position(|p| p.name == tr.patch) {
                    let mut p = self.patches.remove(i);
                    p.enabled = false;
                    self.forget_unused_sites();
                    self.retired.push(p);
                }
            }
            (true, TransitionGoal::SetEnabled(_)) => {}
        }
        if !reversed && tr.replace {
            self.drop_replaced();
        }
        Ok(Outcome::Switched { sites: if reversed { 0 } else { changed }, forced })
    }

    /// Sends the running per-task transition back: tasks converge to the
    /// state before it started, by the same rules.
    pub fn reverse(&mut self, k: &Kernel<'_>, w: &dyn GuestWriter, u: &Unwinder) -> Result<Outcome> {
        self.reverse_on(&LiveGuest::new(k, w, u))
    }

    pub fn reverse_on(&mut self, g: &dyn GuestTasks) -> Result<Outcome> {
        let tr = self.transition.as_mut().ok_or_else(|| PatchError::State("no transition is running".into()))?;
        tr.state = tr.state.reverse()?;
        self.advance_on(g)
    }

    /// Forces the running per-task transition to complete now (unsafe).
    pub fn force_transition(&mut self, k: &Kernel<'_>, w: &dyn GuestWriter, u: &Unwinder) -> Result<Outcome> {
        self.force_on(&LiveGuest::new(k, w, u))
    }

    pub fn force_on(&mut self, g: &dyn GuestTasks) -> Result<Outcome> {
        if let Some(tr) = self.transition.as_mut() {
            tr.state = tr.state.force();
        }
        match self.advance_on(g)? {
            Outcome::Switched { sites, .. } => Ok(Outcome::Switched { sites, forced: true }),
            other => Ok(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Mnemonic, Register};

    #[test]
    fn dispatch_stub_decodes_as_intended() {
        let at = 0xffff_ffff_bf00_0000u64;
        let code = dispatch_stub(at, 0x1fdc0, 0x9a8, 0xffff_ffff_bf00_1000, 0xffff_ffff_8120_0005).unwrap();
        assert!(code.len() as u64 <= STUB_SIZE);
        let mut d = Decoder::with_ip(64, &code, at, DecoderOptions::NONE);
        let mov = d.decode();
        assert_eq!(mov.mnemonic(), Mnemonic::Mov);
        assert_eq!(mov.op0_register(), Register::R11);
        assert_eq!(mov.segment_prefix(), Register::GS);
        assert_eq!(mov.memory_displacement64(), 0x1fdc0);
        let cmp = d.decode();
        assert_eq!(cmp.mnemonic(), Mnemonic::Cmp);
        assert_eq!(cmp.memory_base(), Register::R11);
        assert_eq!(cmp.memory_displacement64(), 0x9a8);
        assert_eq!(cmp.immediate32(), 1);
        let je = d.decode();
        assert_eq!(je.mnemonic(), Mnemonic::Je);
        assert_eq!(je.near_branch_target(), 0xffff_ffff_bf00_1000);
        let jmp = d.decode();
        assert_eq!(jmp.mnemonic(), Mnemonic::Jmp);
        assert_eq!(jmp.near_branch_target(), 0xffff_ffff_8120_0005);
    }
}
