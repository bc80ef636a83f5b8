//! Stacks read while the guest runs, so a stop re-checks only what may have
//! changed. The pre-scan unwinds every task that is switched out; the stop
//! reuses a task's pre-scan stack when the task provably has not run since.
//!
//! Why that is sound. The pre-scan reads a task's context-switch counts
//! (`nvcsw`, `nivcsw`), then its `on_cpu`, then its stack. `on_cpu == 0`
//! means the task was fully switched out at that read (the kernel clears it
//! in `finish_task()` only after the switch away is complete), so the
//! stack it reads next is the task's saved stack. For the task to run
//! after that read and be switched out again by the stop, `__schedule()`
//! must switch away from it once more, and it bumps one of the two counts
//! before every such switch. So in the stop, a task that is on no vCPU,
//! has `on_cpu == 0`, and has the same counts, pid and `start_time` (a
//! reused `task_struct` has another) as at the pre-scan has not run since,
//! and its stack is the one the pre-scan read. Every other task (running,
//! new, changed, or unreliable at the pre-scan) is unwound in the stop.
//!
//! A stop can do less still when the guest's scheduler did not switch at
//! all. The pre-scan reads every CPU's `rq->nr_switches` before its walk
//! and after it. `__schedule()` bumps it before every switch. If the counts
//! are the same after the walk and again in the stop, no task was switched
//! in or out from before the walk until the stop:
//! - a task that ran meanwhile is still on its CPU, and the stop unwinds
//!   every vCPU's current task;
//! - no task exited (the last switch away from a dying task counts too), so
//!   no `task_struct` the walk followed was freed under it, and it visited
//!   every task that existed throughout;
//! - a task forked meanwhile never ran: its stack is its fork frame, in no
//!   patched function.
//!
//! The stop then checks the pre-scan's stacks and the vCPUs' current tasks
//! and the tasks the walk found on a CPU or could not unwind, without
//! walking the task list. This is for the stack check only: a per-task
//! transition writes every task's mark and walks the list.
//!
//! The unwinder used for the pre-scan must be the stop's: the caller
//! builds it while the guest runs and checks in the stop that the module
//! list it was built from is unchanged.

use std::cell::{Cell, OnceCell, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashMap};

use introspect::kernel::Kernel;
use introspect::stacks::Unwinder;
use introspect::tasks::{RunMarks, Task};
use introspect::translate::KernelMemory;

use crate::addr::{GuestPhys, GuestVirt};
use crate::engine::guest_view::{states_of_all, GuestMem, GuestTasks, LiveGuest, StackFrame, TaskFrames, TaskRef, TaskStates};
use crate::engine::safety::CodeRange;
use crate::error::Result;

/// One task as the pre-scan saw it.
#[derive(Clone, Debug)]
struct Seen {
    pid: i32,
    comm: String,
    marks: RunMarks,
    frames: TaskFrames,
    /// Its `patch_state`, when the pre-scan read them.
    patch_state: Option<i32>,
}

/// Every CPU's `rq->nr_switches` (one per vCPU of `k`).
fn cpu_switches(k: &Kernel<'_>) -> Result<Vec<u64>> {
    let off = k.off("rq", "nr_switches")?;
    (0..k.cpus.len())
        .map(|cpu| {
            let rq = k.per_cpu("runqueues", cpu)?;
            let at = rq.checked_add(off).ok_or(introspect::IntrospectError::Overflow(rq))?;
            Ok(k.mem.read_u64(at)?)
        })
        .collect()
}

/// Every code address on the stacks of `seen`, with the tasks holding it.
fn index_by_ip(seen: &HashMap<u64, Seen>) -> BTreeMap<u64, Vec<u64>> {
    let mut by_ip: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for (addr, s) in seen {
        for f in &s.frames.frames {
            let v = by_ip.entry(f.code_ip()).or_default();
            if v.last() != Some(addr) {
                v.push(*addr);
            }
        }
    }
    by_ip
}

/// The pre-scan: reliable stacks of the tasks that were switched out.
#[derive(Clone, Debug, Default)]
pub struct Prescan {
    seen: HashMap<u64, Seen>,
    /// Every code address on a pre-scanned stack, with the tasks whose
    /// stacks hold it: a quiet stop finds the tasks in a range without
    /// looking at the others.
    by_ip: BTreeMap<u64, Vec<u64>>,
    /// Tasks the pre-scan walked (reused or not).
    pub walked: usize,
    /// Stacks taken from the pre-scan before this one (not unwound again).
    pub carried: usize,
    /// Every CPU's switch count before the walk, if it was the same after.
    quiet_switches: Option<Vec<u64>>,
    /// Tasks the walk found on a CPU or could not unwind (or read).
    unsettled: Vec<u64>,
    /// The `patch_state` offset the walk read each task's at.
    patch_state_off: Option<u64>,
    /// The pre-scanned tasks by the `patch_state` the walk read: a quiet
    /// transition step finds those not yet moved without looking at the
    /// others.
    by_state: BTreeMap<i32, Vec<u64>>,
}

impl Prescan {
    /// Reads and unwinds every task of `k`, a view of the guest's memory
    /// while it runs (reads may be torn; each stack is used only if the
    /// stop shows its task did not run since). A task with the same pid,
    /// counts and `start_time` as in `prev`, and off CPU both times, has
    /// not run between the two reads: its stack is taken from `prev`.
    /// With `patch_state_off`, each task's `patch_state` is read too.
    pub fn take(k: &Kernel<'_>, u: &Unwinder, prev: Option<&Prescan>, patch_state_off: Option<u64>) -> Result<Prescan> {
        let before = cpu_switches(k).ok();
        let tasks = k.tasks_brief()?;
        let after = cpu_switches(k).ok();
        let quiet_switches = before.filter(|b| after.as_ref() == Some(b));
        let mut seen = HashMap::new();
        let mut unsettled = Vec::new();
        let mut carried = 0;
        for t in &tasks {
            let Some(marks) = t.run_marks else {
                unsettled.push(t.addr);
                continue;
            };
            if marks.on_cpu != 0 {
                unsettled.push(t.addr);
                continue;
            }
            let patch_state = match patch_state_off {
                None => None,
                Some(off) => match t.addr.checked_add(off).map(|a| k.mem.read_u32(a)) {
                    Some(Ok(v)) => Some(v as i32),
                    _ => {
                        unsettled.push(t.addr);
                        continue;
                    }
                },
            };
            let earlier = prev.and_then(|p| p.seen.get(&t.addr)).filter(|s| s.pid == t.pid && s.marks == marks);
            let frames = match earlier {
                Some(s) => {
                    carried += 1;
                    s.frames.clone()
                }
                None => {
                    let st = k.unwind_task(u, t);
                    if !st.reliable {
                        unsettled.push(t.addr);
                        continue;
                    }
                    TaskFrames {
                        reliable: true,
                        reason: None,
                        frames: st.frames.iter().map(|f| StackFrame { ip: f.ip, is_return: f.is_return_address() }).collect(),
                    }
                }
            };
            seen.insert(t.addr, Seen { pid: t.pid, comm: t.comm.clone(), marks, frames, patch_state });
        }
        let by_ip = index_by_ip(&seen);
        let mut by_state: BTreeMap<i32, Vec<u64>> = BTreeMap::new();
        for (addr, s) in &seen {
            if let Some(v) = s.patch_state {
                by_state.entry(v).or_default().push(*addr);
            }
        }
        Ok(Prescan { seen, by_ip, walked: tasks.len(), carried, quiet_switches, unsettled, patch_state_off, by_state })
    }

    /// Whether no CPU switched tasks since before the walk (`k`: the
    /// stopped guest). A stop that finds otherwise may give up at once.
    pub fn quiet_now(&self, k: &Kernel<'_>) -> bool {
        match &self.quiet_switches {
            Some(then) => cpu_switches(k).ok().as_ref() == Some(then),
            None => false,
        }
    }

    /// Stacks the pre-scan holds.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// The pre-scanned tasks with a frame in one of `ranges`.
    fn in_ranges(&self, ranges: &[CodeRange]) -> BTreeSet<u64> {
        let mut out = BTreeSet::new();
        for r in ranges {
            let end = r.start.saturating_add(r.size);
            if end <= r.start {
                continue;
            }
            for (_, tasks) in self.by_ip.range(r.start..end) {
                out.extend(tasks.iter().copied());
            }
        }
        out
    }

    /// The pre-scan's stack of `t` (read in the stop), if `t` did not run since.
    fn reusable(&self, t: &Task) -> Option<&TaskFrames> {
        let now = t.run_marks?;
        if t.running_on.is_some() || now.on_cpu != 0 {
            return None;
        }
        let s = self.seen.get(&t.addr)?;
        (s.pid == t.pid && s.marks == now).then_some(&s.frames)
    }
}

/// A stopped guest whose stack reads come from a pre-scan where that is
/// sound, and from the live unwinder otherwise.
pub struct PrescannedGuest<'a, 'm> {
    live: LiveGuest<'a, 'm>,
    prescan: &'a Prescan,
    reused: Cell<usize>,
    unwound: Cell<usize>,
    /// No switch since before the pre-scan's walk (decided once per stop).
    quiet: OnceCell<bool>,
    /// Tasks read one by one in a quiet stop (the list is not walked).
    singles: RefCell<HashMap<u64, Task>>,
    /// The vCPUs' current tasks and the unsettled ones, read alone.
    read_alone: OnceCell<Vec<TaskRef>>,
}

impl<'a, 'm> PrescannedGuest<'a, 'm> {
    pub fn new(live: LiveGuest<'a, 'm>, prescan: &'a Prescan) -> Self {
        PrescannedGuest {
            live,
            prescan,
            reused: Cell::new(0),
            unwound: Cell::new(0),
            quiet: OnceCell::new(),
            singles: RefCell::new(HashMap::new()),
            read_alone: OnceCell::new(),
        }
    }
    /// Stacks taken from the pre-scan, and stacks unwound in the stop.
    pub fn counts(&self) -> (usize, usize) {
        (self.reused.get(), self.unwound.get())
    }
    /// Tasks read in this stop: the task list if it was walked, and the
    /// tasks read alone.
    pub fn tasks_read(&self) -> usize {
        self.live.tasks_read() + self.singles.borrow().len()
    }
    /// Whether no task was switched since before the pre-scan's walk.
    pub fn quiet(&self) -> bool {
        *self.quiet.get_or_init(|| self.prescan.quiet_now(self.live.k))
    }
    /// The task at `addr`, read alone (`running_on`: its vCPU).
    fn single(&self, l: &introspect::tasks::TaskLayout, addr: u64, running_on: Option<usize>) -> Result<TaskRef> {
        let mut t = self.live.k.task_at(l, addr)?;
        t.running_on = running_on;
        let r = TaskRef { pid: t.pid, comm: t.comm.clone(), addr: GuestVirt(addr), running_on };
        self.singles.borrow_mut().insert(addr, t);
        Ok(r)
    }

    /// In a quiet stop, the only tasks that may have run since the
    /// pre-scan: every vCPU's current task and the unsettled ones, each
    /// read alone. Every other task is as the pre-scan saw it.
    fn alone(&self) -> Result<&[TaskRef]> {
        if let Some(v) = self.read_alone.get() {
            return Ok(v);
        }
        let l = introspect::tasks::TaskLayout::from_btf(self.live.k)?;
        let mut out = Vec::new();
        let mut taken = BTreeSet::new();
        for cpu in 0..self.live.k.cpus.len() {
            let cur = self.live.k.current_task(cpu)?;
            if cur != 0 && taken.insert(cur) {
                out.push(self.single(&l, cur, Some(cpu))?);
            }
        }
        for addr in &self.prescan.unsettled {
            if taken.insert(*addr) {
                out.push(self.single(&l, *addr, None)?);
            }
        }
        Ok(self.read_alone.get_or_init(|| out))
    }

    /// A pre-scanned task not read alone in this stop, as a `TaskRef`.
    fn seen_ref(&self, addr: u64, s: &Seen) -> Option<TaskRef> {
        if self.singles.borrow().contains_key(&addr) {
            return None;
        }
        Some(TaskRef { pid: s.pid, comm: s.comm.clone(), addr: GuestVirt(addr), running_on: None })
    }

    /// The quiet stop's tasks for a check against `ranges`: those read
    /// alone, and the pre-scanned ones with a frame in `ranges`. No other
    /// task can be in that code now.
    fn quiet_tasks(&self, ranges: &[CodeRange]) -> Result<Vec<TaskRef>> {
        let mut out = self.alone()?.to_vec();
        for addr in self.prescan.in_ranges(ranges) {
            if let Some(t) = self.prescan.seen.get(&addr).and_then(|s| self.seen_ref(addr, s)) {
                out.push(t);
            }
        }
        Ok(out)
    }

    /// The quiet stop's tasks whose `patch_state` `wanted` accepts: those
    /// read alone (their value read now) and the pre-scanned ones by the
    /// value the pre-scan read. Only hyperpatch's stops write
    /// `patch_state`, besides the guest's own livepatch (refused while it
    /// is in a transition) and fork (a child copies its parent, a vCPU's
    /// current task or one that ran, so a new task is in a quiet stop
    /// only in the state its parent had and has never run).
    fn quiet_states(&self, ps_off: u64, wanted: &dyn Fn(i32) -> bool) -> Result<Option<TaskStates>> {
        if self.prescan.patch_state_off != Some(ps_off) || self.live.guest_klp_in_transition()? {
            return Ok(None);
        }
        let mut tasks = Vec::new();
        for t in self.alone()? {
            let v = self.read_i32(t.addr.offset(ps_off)?)?;
            if wanted(v) {
                tasks.push((t.clone(), v));
            }
        }
        // With the offset known, the walk read every pre-scanned task's value.
        for (v, addrs) in &self.prescan.by_state {
            if !wanted(*v) {
                continue;
            }
            for addr in addrs {
                if let Some(t) = self.prescan.seen.get(addr).and_then(|s| self.seen_ref(*addr, s)) {
                    tasks.push((t, *v));
                }
            }
        }
        Ok(Some(tasks))
    }
}

impl GuestMem for PrescannedGuest<'_, '_> {
    fn read(&self, at: GuestVirt, buf: &mut [u8]) -> Result<()> {
        self.live.read(at, buf)
    }
    fn read_phys(&self, at: GuestPhys, buf: &mut [u8]) -> Result<()> {
        self.live.read_phys(at, buf)
    }
    fn translate(&self, at: GuestVirt) -> Result<GuestPhys> {
        self.live.translate(at)
    }
    fn write_phys(&self, at: GuestPhys, data: &[u8]) -> Result<()> {
        self.live.write_phys(at, data)
    }
}

impl GuestTasks for PrescannedGuest<'_, '_> {
    fn tasks(&self) -> Result<Vec<TaskRef>> {
        self.live.tasks()
    }
    fn tasks_to_check(&self, ranges: &[CodeRange]) -> Result<Vec<TaskRef>> {
        if self.quiet() {
            // A task that cannot be read alone is not left out: the stop
            // walks the task list instead (the pre-scanned stacks stay
            // reusable, since no task switched).
            if let Ok(t) = self.quiet_tasks(ranges) {
                return Ok(t);
            }
        }
        self.live.tasks()
    }
    fn tasks_in_state(&self, ps_off: u64, wanted: &dyn Fn(i32) -> bool) -> Result<TaskStates> {
        if self.quiet() {
            if let Ok(Some(t)) = self.quiet_states(ps_off, wanted) {
                return Ok(t);
            }
        }
        states_of_all(self, ps_off, wanted)
    }
    fn stack(&self, t: &TaskRef) -> TaskFrames {
        if let Some(task) = self.singles.borrow().get(&t.addr.0) {
            self.unwound.set(self.unwound.get() + 1);
            return match self.live.u {
                Some(u) => self.live.unwind(u, task),
                None => TaskFrames { reliable: false, reason: Some("no unwinder for this stop".into()), frames: Vec::new() },
            };
        }
        if t.running_on.is_none() && self.quiet() {
            if let Some(s) = self.prescan.seen.get(&t.addr.0) {
                self.reused.set(self.reused.get() + 1);
                return s.frames.clone();
            }
        }
        if let Some(frames) = self.live.task(t.addr).and_then(|task| self.prescan.reusable(task)) {
            self.reused.set(self.reused.get() + 1);
            return frames.clone();
        }
        self.unwound.set(self.unwound.get() + 1);
        self.live.stack(t)
    }
    fn describe(&self, f: StackFrame) -> String {
        self.live.describe(f)
    }
    fn patch_state_offset(&self) -> Result<u64> {
        self.live.patch_state_offset()
    }
    fn current_task_slot(&self) -> Result<u64> {
        self.live.current_task_slot()
    }
    fn guest_klp_in_transition(&self) -> Result<bool> {
        self.live.guest_klp_in_transition()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(pid: i32, marks: Option<RunMarks>, running_on: Option<usize>) -> Task {
        Task {
            addr: 0xffff_8880_0100_0000,
            pid,
            tgid: pid,
            comm: "t".into(),
            proc_comm: "t".into(),
            state: 'S',
            cpu: 0,
            running_on,
            stack: 0,
            thread_sp: 0,
            run_marks: marks,
        }
    }

    fn marks(nvcsw: u64, nivcsw: u64, on_cpu: u32, start_time: u64) -> RunMarks {
        RunMarks { nvcsw, nivcsw, on_cpu, start_time }
    }

    fn prescan_of(t: &Task) -> Prescan {
        let frames = TaskFrames { reliable: true, reason: None, frames: vec![StackFrame { ip: 0xffff_ffff_8100_1000, is_return: true }] };
        let mut seen = HashMap::new();
        seen.insert(t.addr, Seen { pid: t.pid, comm: t.comm.clone(), marks: t.run_marks.unwrap(), frames, patch_state: None });
        Prescan { seen, walked: 1, ..Prescan::default() }
    }

    #[test]
    fn a_range_finds_exactly_the_tasks_with_a_frame_in_it() {
        let f = |ip: u64, is_return: bool| StackFrame { ip, is_return };
        let seen_with = |frames: Vec<StackFrame>| Seen {
            pid: 1,
            comm: "t".into(),
            marks: marks(1, 1, 0, 1),
            frames: TaskFrames { reliable: true, reason: None, frames },
            patch_state: None,
        };
        let mut seen = HashMap::new();
        // Returns into 0x1000..0x1100: the return address just past its end counts.
        seen.insert(0xa, seen_with(vec![f(0x1100, true), f(0x5000, true)]));
        // A return address at the range's start is in the function before.
        seen.insert(0xb, seen_with(vec![f(0x1000, true), f(0x5000, true)]));
        // An exact ip (a vCPU's, or an interrupted frame) at the start is in it.
        seen.insert(0xc, seen_with(vec![f(0x1000, false)]));
        // Recursion: the task is named once.
        seen.insert(0xd, seen_with(vec![f(0x1050, true), f(0x1050, true)]));
        seen.insert(0xe, seen_with(vec![f(0x2000, true)]));
        let by_ip = index_by_ip(&seen);
        let p = Prescan { seen, by_ip, ..Prescan::default() };
        let r = |start, size| CodeRange { name: "f".into(), start, size };
        let got: Vec<u64> = p.in_ranges(&[r(0x1000, 0x100)]).into_iter().collect();
        assert_eq!(got, vec![0xa, 0xc, 0xd]);
        let got: Vec<u64> = p.in_ranges(&[r(0x1000, 0x100), r(0x1fff, 2)]).into_iter().collect();
        assert_eq!(got, vec![0xa, 0xc, 0xd, 0xe]);
        assert!(p.in_ranges(&[r(0x3000, 0x100), r(u64::MAX, 0)]).is_empty());
        // The stack check agrees with the index on every task.
        for (addr, s) in &p.seen {
            let hit = s.frames.frames.iter().any(|fr| r(0x1000, 0x100).contains(fr.code_ip()));
            assert_eq!(hit, p.in_ranges(&[r(0x1000, 0x100)]).contains(addr), "task {addr:#x}");
        }
    }

    #[test]
    fn a_stack_is_reused_only_for_a_task_that_did_not_run_since() {
        let then = task(5, Some(marks(10, 3, 0, 777)), None);
        let p = prescan_of(&then);
        assert!(p.reusable(&then).is_some(), "unchanged: reused");
        for (why, now) in [
            ("switched away voluntarily", task(5, Some(marks(11, 3, 0, 777)), None)),
            ("preempted", task(5, Some(marks(10, 4, 0, 777)), None)),
            ("on a CPU", task(5, Some(marks(10, 3, 1, 777)), None)),
            ("running on a vCPU", task(5, Some(marks(10, 3, 0, 777)), Some(0))),
            ("another task in the same task_struct", task(6, Some(marks(10, 3, 0, 777)), None)),
            ("another start_time", task(5, Some(marks(10, 3, 0, 778)), None)),
            ("no marks (BTF lacks them)", task(5, None, None)),
        ] {
            assert!(p.reusable(&now).is_none(), "{why}: must be unwound in the stop");
        }
        let mut other = then.clone();
        other.addr += 0x1000;
        assert!(p.reusable(&other).is_none(), "a task the pre-scan did not see");
    }
}
