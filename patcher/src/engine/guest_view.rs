//! What the engine reads and writes of a stopped guest. The live VM
//! implements it over introspection ([`LiveGuest`]); the engine's unit
//! tests implement it over a fake guest built in memory, so every writer,
//! rollback and transition is tested off the VM.

use std::cell::OnceCell;
use std::collections::HashMap;

use introspect::kernel::Kernel;
use introspect::stacks::{Symbolizer, Unwinder};
use introspect::translate::KernelMemory;

use crate::addr::{GuestPhys, GuestVirt};
use crate::engine::safety::CodeRange;
use crate::error::{PatchError, Result};
use crate::guest::GuestWriter;

/// Memory of a stopped guest.
pub trait GuestMem {
    /// Fills `buf` from guest-virtual `at`.
    fn read(&self, at: GuestVirt, buf: &mut [u8]) -> Result<()>;
    /// Fills `buf` from guest-physical `at`.
    fn read_phys(&self, at: GuestPhys, buf: &mut [u8]) -> Result<()>;
    /// The guest-physical address `at` maps to now.
    fn translate(&self, at: GuestVirt) -> Result<GuestPhys>;
    /// Writes guest-physical memory.
    fn write_phys(&self, at: GuestPhys, data: &[u8]) -> Result<()>;

    fn read_u64(&self, at: GuestVirt) -> Result<u64> {
        let mut b = [0u8; 8];
        self.read(at, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    fn read_i32(&self, at: GuestVirt) -> Result<i32> {
        let mut b = [0u8; 4];
        self.read(at, &mut b)?;
        Ok(i32::from_le_bytes(b))
    }
}

/// One task of a stopped guest, as the engine needs it.
#[derive(Clone, Debug)]
pub struct TaskRef {
    pub pid: i32,
    pub comm: String,
    /// Its `task_struct`.
    pub addr: GuestVirt,
    /// The vCPU it runs on, if it is running.
    pub running_on: Option<usize>,
}

/// One frame of an unwound stack.
#[derive(Clone, Copy, Debug)]
pub struct StackFrame {
    pub ip: u64,
    /// `ip` is a return address: the frame's code is at `ip - 1`.
    pub is_return: bool,
}

impl StackFrame {
    /// The code address the frame is in: a return address may sit just
    /// past its function's end.
    pub fn code_ip(&self) -> u64 {
        if self.is_return {
            self.ip.saturating_sub(1)
        } else {
            self.ip
        }
    }
}

/// A task's unwound stack.
#[derive(Clone, Debug)]
pub struct TaskFrames {
    pub reliable: bool,
    /// Why it is not reliable.
    pub reason: Option<String>,
    pub frames: Vec<StackFrame>,
}

/// Tasks with their `patch_state`, from [`GuestTasks::tasks_in_state`].
pub type TaskStates = Vec<(TaskRef, i32)>;

/// Every task of `g` (its task list, read now) whose `patch_state` at
/// `ps_off` `wanted` accepts, with that value.
pub fn states_of_all(g: &(impl GuestTasks + ?Sized), ps_off: u64, wanted: &dyn Fn(i32) -> bool) -> Result<TaskStates> {
    let mut out = Vec::new();
    for t in g.tasks()? {
        let v = g.read_i32(t.addr.offset(ps_off)?)?;
        if wanted(v) {
            out.push((t, v));
        }
    }
    Ok(out)
}

/// Tasks and stacks of a stopped guest, and the kernel facts the per-task
/// transition writes by.
pub trait GuestTasks: GuestMem {
    /// Every task (the guest's task list, read now).
    fn tasks(&self) -> Result<Vec<TaskRef>>;
    /// The tasks a stack check against `ranges` must look at. A view
    /// that knows the other tasks have not run since it saw them outside
    /// `ranges` may leave them out ([`crate::engine::prescan`]); by
    /// default, every task.
    fn tasks_to_check(&self, ranges: &[CodeRange]) -> Result<Vec<TaskRef>> {
        let _ = ranges;
        self.tasks()
    }
    /// The tasks whose `patch_state` (at offset `ps_off`) may be one that
    /// `wanted` accepts, each with its value. A view that knows the others'
    /// values cannot have changed may leave them out; by default every
    /// task is read now.
    fn tasks_in_state(&self, ps_off: u64, wanted: &dyn Fn(i32) -> bool) -> Result<TaskStates> {
        states_of_all(self, ps_off, wanted)
    }
    /// `t`'s stack, from its vCPU when it runs, else from its saved state.
    fn stack(&self, t: &TaskRef) -> TaskFrames;
    /// `func+0x12/0x80` for a frame, as the guest's `%pB` would print it.
    fn describe(&self, f: StackFrame) -> String;
    /// Offset of `task_struct.patch_state`.
    fn patch_state_offset(&self) -> Result<u64>;
    /// The per-cpu offset of `current_task` (what `gs:` addresses).
    fn current_task_slot(&self) -> Result<u64>;
    /// The guest's own livepatch is in a transition (`klp_transition_patch`).
    fn guest_klp_in_transition(&self) -> Result<bool>;
}

/// A stopped live guest: introspection to read, the VM's writer to write,
/// the unwinder (with every placed patch's ORC) for stacks. Built for one
/// stop; it reads the task list once.
pub struct LiveGuest<'a, 'm> {
    pub k: &'a Kernel<'m>,
    pub w: &'a dyn GuestWriter,
    pub u: Option<&'a Unwinder>,
    tasks: OnceCell<(Vec<introspect::tasks::Task>, HashMap<u64, usize>)>,
    /// Built at the first frame described in this stop (it reads every
    /// module's symbols), then kept for the others.
    symbolizer: OnceCell<Symbolizer<'a, 'm>>,
}

impl<'a, 'm> LiveGuest<'a, 'm> {
    /// Memory only (no stacks: sites switched without a stack check).
    pub fn memory(k: &'a Kernel<'m>, w: &'a dyn GuestWriter) -> Self {
        LiveGuest { k, w, u: None, tasks: OnceCell::new(), symbolizer: OnceCell::new() }
    }
    /// Memory, tasks and stacks.
    pub fn new(k: &'a Kernel<'m>, w: &'a dyn GuestWriter, u: &'a Unwinder) -> Self {
        LiveGuest { k, w, u: Some(u), tasks: OnceCell::new(), symbolizer: OnceCell::new() }
    }
    /// The task whose `task_struct` is at `addr`, as read in this stop.
    pub fn task(&self, addr: GuestVirt) -> Option<&introspect::tasks::Task> {
        let (all, index) = self.read_tasks().ok()?;
        index.get(&addr.0).and_then(|i| all.get(*i))
    }
    fn read_tasks(&self) -> Result<&(Vec<introspect::tasks::Task>, HashMap<u64, usize>)> {
        if self.tasks.get().is_none() {
            let t = self.k.tasks_brief()?;
            let index = t.iter().enumerate().map(|(i, t)| (t.addr, i)).collect();
            let _ = self.tasks.set((t, index));
        }
        self.tasks.get().ok_or_else(|| PatchError::State("task list".into()))
    }
    /// Unwinds `task` (read in this stop) with `u`.
    pub fn unwind(&self, u: &Unwinder, task: &introspect::tasks::Task) -> TaskFrames {
        let st = self.k.unwind_task(u, task);
        TaskFrames {
            reliable: st.reliable,
            reason: st.reason.clone(),
            frames: st.frames.iter().map(|f| StackFrame { ip: f.ip, is_return: f.is_return_address() }).collect(),
        }
    }
    /// Tasks read from the task list in this stop (0 if it was not walked).
    pub fn tasks_read(&self) -> usize {
        self.tasks.get().map(|(t, _)| t.len()).unwrap_or(0)
    }
    fn all_tasks(&self) -> Result<&[introspect::tasks::Task]> {
        Ok(self.read_tasks()?.0.as_slice())
    }
}

impl GuestMem for LiveGuest<'_, '_> {
    fn read(&self, at: GuestVirt, buf: &mut [u8]) -> Result<()> {
        Ok(self.k.mem.read_virt(at.0, buf)?)
    }
    fn read_phys(&self, at: GuestPhys, buf: &mut [u8]) -> Result<()> {
        Ok(self.k.mem.phys().read_phys(at.0, buf)?)
    }
    fn translate(&self, at: GuestVirt) -> Result<GuestPhys> {
        Ok(GuestPhys(self.k.mem.translate(at.0)?))
    }
    fn write_phys(&self, at: GuestPhys, data: &[u8]) -> Result<()> {
        self.w.write_phys(at, data)
    }
}

impl GuestTasks for LiveGuest<'_, '_> {
    fn tasks(&self) -> Result<Vec<TaskRef>> {
        Ok(self
            .all_tasks()?
            .iter()
            .map(|t| TaskRef { pid: t.pid, comm: t.comm.clone(), addr: GuestVirt(t.addr), running_on: t.running_on })
            .collect())
    }
    fn stack(&self, t: &TaskRef) -> TaskFrames {
        let unreliable = |why: &str| TaskFrames { reliable: false, reason: Some(why.into()), frames: Vec::new() };
        let Some(u) = self.u else { return unreliable("no unwinder for this stop") };
        let Some(task) = self.task(t.addr) else { return unreliable("the task left the task list") };
        self.unwind(u, task)
    }
    fn describe(&self, f: StackFrame) -> String {
        let sym = self.symbolizer.get_or_init(|| Symbolizer::new(self.k, &self.k.modules().unwrap_or_default()));
        if f.is_return {
            sym.return_address(f.ip)
        } else {
            sym.exact(f.ip)
        }
    }
    fn patch_state_offset(&self) -> Result<u64> {
        Ok(self.k.off("task_struct", "patch_state")?)
    }
    fn current_task_slot(&self) -> Result<u64> {
        // 6.1: the per-cpu `current_task`; newer kernels: a member of the
        // per-cpu `pcpu_hot`, at the offset its BTF gives.
        if let Ok(a) = self.k.sym("current_task") {
            return Ok(a);
        }
        let base = self.k.sym("pcpu_hot")?;
        let off = self.k.off("pcpu_hot", "current_task")?;
        Ok(base.checked_add(off).ok_or(introspect::IntrospectError::Overflow(base))?)
    }
    fn guest_klp_in_transition(&self) -> Result<bool> {
        // A kernel without livepatch has no such symbol: no transition.
        match self.k.sym("klp_transition_patch") {
            Ok(a) => Ok(self.k.mem.read_u64(a)? != 0),
            Err(_) => Ok(false),
        }
    }
}
