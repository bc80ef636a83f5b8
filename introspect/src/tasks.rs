//! Every thread of the guest: processes through `init_task.tasks`, threads
//! through `signal->thread_head`, each walk bounded and cycle-safe.

use std::collections::HashSet;

use crate::error::{IntrospectError, Result};
use crate::kernel::Kernel;
use crate::translate::KernelMemory;

/// Most tasks we walk before calling the list corrupted.
pub const MAX_TASKS: usize = 1 << 16;
/// The range a kernel stack size may have (THREAD_SIZE: 16 KiB on x86_64,
/// 32 KiB with KASAN, more with larger KASAN or page orders).
const THREAD_SIZES: std::ops::RangeInclusive<u64> = (4 << 10)..=(256 << 10);
const TASK_COMM_LEN: usize = 16;

/// One guest thread.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Task {
    /// Address of its `task_struct`.
    pub addr: u64,
    pub pid: i32,
    pub tgid: i32,
    pub comm: String,
    /// The name /proc/PID/comm shows (`proc_task_name()`): a kernel
    /// thread's full name when `comm` truncated it, a workqueue worker's
    /// `comm` plus `-desc` (`+desc` while it runs a work item).
    pub proc_comm: String,
    /// State letter as /proc shows it (R, S, D, T, t, X, Z, P, I).
    pub state: char,
    /// CPU it last ran on.
    pub cpu: u32,
    /// The vCPU it is running on right now, if any.
    pub running_on: Option<usize>,
    /// Kernel stack base (`task->stack`).
    pub stack: u64,
    /// Saved kernel stack pointer (`task->thread.sp`) while switched out.
    pub thread_sp: u64,
    /// What shows the task has not run since it was read: its context
    /// switch counts, its `on_cpu`, and its `start_time` (which tells a
    /// reused `task_struct` apart). `None` when BTF lacks a field. Read in
    /// this order: the counts before `on_cpu`.
    #[serde(skip)]
    pub run_marks: Option<RunMarks>,
}

/// A task's context-switch counts (`nvcsw`, `nivcsw`), whether it was on a
/// CPU (`on_cpu`), and its `start_time`, read in that order. The kernel
/// bumps one count in `__schedule()` before every switch away from a task,
/// and clears `on_cpu` only after the switch is complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunMarks {
    pub nvcsw: u64,
    pub nivcsw: u64,
    pub on_cpu: u32,
    pub start_time: u64,
}

/// Offsets of `task_struct` and friends, from BTF.
#[derive(Clone, Copy, Debug)]
pub struct TaskLayout {
    pub tasks: u64,
    pub pid: u64,
    pub tgid: u64,
    pub comm: u64,
    pub state: u64,
    pub exit_state: u64,
    pub flags: u64,
    pub cpu: u64,
    pub stack: u64,
    pub thread_sp: u64,
    pub signal: u64,
    pub thread_node: u64,
    pub signal_thread_head: u64,
    /// For /proc's name of kernel threads (None when BTF lacks them).
    pub kthread_names: Option<KthreadNameLayout>,
    /// `nvcsw`, `nivcsw`, `on_cpu`, `start_time` (None when BTF lacks one).
    pub run_marks: Option<[u64; 4]>,
}

/// Offsets `proc_task_name()` needs: `task->worker_private` is the
/// `struct kthread` of a kernel thread, whose `data` is the `struct worker`
/// of a workqueue worker.
#[derive(Clone, Copy, Debug)]
pub struct KthreadNameLayout {
    pub worker_private: u64,
    pub kthread_data: u64,
    pub kthread_full_name: u64,
    pub worker_current_work: u64,
    pub worker_pool: u64,
    pub worker_desc: u64,
    pub worker_desc_len: u64,
    /// Where the guest names workers with `format_worker_id()` (6.9+; it
    /// is in kallsyms): `worker.rescue_wq` and `workqueue_struct.name`
    /// (offset, size), since a rescuer is then "kworker/R-" + the
    /// workqueue's full name, longer than its comm.
    pub rescuer_name: Option<(u64, u64, u64)>,
}

const PF_WQ_WORKER: u32 = 0x0000_0020;
const PF_KTHREAD: u32 = 0x0020_0000;
/// proc_task_name()'s buffer, NUL included.
const PROC_COMM_LEN: usize = 64;

impl TaskLayout {
    pub fn from_btf(k: &Kernel<'_>) -> Result<TaskLayout> {
        let cpu = k.off("task_struct", "cpu").or_else(|_| k.off("task_struct", "thread_info.cpu"))?;
        let state = k.off("task_struct", "__state").or_else(|_| k.off("task_struct", "state"))?;
        Ok(TaskLayout {
            tasks: k.off("task_struct", "tasks")?,
            pid: k.off("task_struct", "pid")?,
            tgid: k.off("task_struct", "tgid")?,
            comm: k.off("task_struct", "comm")?,
            state,
            exit_state: k.off("task_struct", "exit_state")?,
            flags: k.off("task_struct", "flags")?,
            cpu,
            stack: k.off("task_struct", "stack")?,
            thread_sp: k.off("task_struct", "thread.sp")?,
            signal: k.off("task_struct", "signal")?,
            thread_node: k.off("task_struct", "thread_node")?,
            signal_thread_head: k.off("signal_struct", "thread_head")?,
            kthread_names: (|| -> Result<KthreadNameLayout> {
                Ok(KthreadNameLayout {
                    worker_private: k.off("task_struct", "worker_private")?,
                    kthread_data: k.off("kthread", "data")?,
                    kthread_full_name: k.off("kthread", "full_name")?,
                    worker_current_work: k.off("worker", "current_work")?,
                    worker_pool: k.off("worker", "pool")?,
                    worker_desc: k.off("worker", "desc")?,
                    worker_desc_len: k.btf.member("worker", "desc")?.size,
                    rescuer_name: if k.syms.lookup("format_worker_id").is_empty() {
                        None
                    } else {
                        Some((k.off("worker", "rescue_wq")?, k.off("workqueue_struct", "name")?, k.btf.member("workqueue_struct", "name")?.size))
                    },
                })
            })()
            .ok(),
            run_marks: (|| -> Result<[u64; 4]> {
                Ok([k.off("task_struct", "nvcsw")?, k.off("task_struct", "nivcsw")?, k.off("task_struct", "on_cpu")?, k.off("task_struct", "start_time")?])
            })()
            .ok(),
        })
    }
}

/// /proc's state letter for `__state | exit_state` (fs/proc/array.c).
pub fn state_letter(state: u32, exit_state: u32) -> char {
    const TASK_REPORT: u32 = 0x7f;
    const TASK_IDLE: u32 = 0x402; // TASK_UNINTERRUPTIBLE | TASK_NOLOAD
    if state & TASK_IDLE == TASK_IDLE {
        return 'I';
    }
    let s = (state | exit_state) & TASK_REPORT;
    let index = if s == 0 { 0 } else { 32 - s.leading_zeros() as usize };
    "RSDTtXZPI".chars().nth(index).unwrap_or('?')
}

fn container(ptr: u64, off: u64) -> Result<u64> {
    ptr.checked_sub(off).ok_or_else(|| IntrospectError::Corrupt(format!("list pointer {ptr:#x} below its offset")))
}

/// Follows a `list_head` ring from `head`, returning the entries' addresses
/// (`container_of` with `off`). Stops at `head`; a ring longer than `limit`
/// or one that revisits an entry is an error.
pub fn walk_list(mem: &dyn KernelMemory, head: u64, off: u64, limit: usize, what: &str) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut cur = mem.read_u64(head)?;
    while cur != head {
        if out.len() >= limit || !seen.insert(cur) {
            return Err(IntrospectError::WalkLimit { what: what.into(), limit });
        }
        out.push(container(cur, off)?);
        cur = mem.read_u64(cur)?;
    }
    Ok(out)
}

impl Kernel<'_> {
    /// Reads one task.
    pub fn task_at(&self, l: &TaskLayout, addr: u64) -> Result<Task> {
        self.task_at_named(l, addr, true)
    }

    /// Reads one task; `names`: also /proc's name of kernel threads (more
    /// reads per task; `proc_comm` is `comm` without it).
    fn task_at_named(&self, l: &TaskLayout, addr: u64, names: bool) -> Result<Task> {
        let at = |o: u64| addr.checked_add(o).ok_or(IntrospectError::Overflow(addr));
        // First the counts, then `on_cpu`: every read after `on_cpu` == 0
        // sees the task switched out (see `RunMarks`).
        let run_marks = match l.run_marks {
            Some([nv, niv, on, start]) if niv == nv.wrapping_add(8) && start == nv.wrapping_add(16) => {
                // Adjacent in task_struct (as in 6.1): one read.
                let b = self.mem.read_bytes(at(nv)?, 24)?;
                let word = |i: usize| b.get(i..i + 8).and_then(|s| s.try_into().ok()).map(u64::from_le_bytes).unwrap_or(0);
                Some(RunMarks { nvcsw: word(0), nivcsw: word(8), start_time: word(16), on_cpu: self.mem.read_u32(at(on)?)? })
            }
            Some([nv, niv, on, start]) => Some(RunMarks {
                nvcsw: self.mem.read_u64(at(nv)?)?,
                nivcsw: self.mem.read_u64(at(niv)?)?,
                start_time: self.mem.read_u64(at(start)?)?,
                on_cpu: self.mem.read_u32(at(on)?)?,
            }),
            None => None,
        };
        let comm_raw = self.mem.read_bytes(at(l.comm)?, TASK_COMM_LEN)?;
        let end = comm_raw.iter().position(|b| *b == 0).unwrap_or(comm_raw.len());
        let comm = String::from_utf8_lossy(comm_raw.get(..end).unwrap_or(&[])).into_owned();
        let pid = self.mem.read_i32(at(l.pid)?)?;
        let stack = self.mem.read_u64(at(l.stack)?)?;
        let thread_sp = self.mem.read_u64(at(l.thread_sp)?)?;
        if !names {
            // What a stop needs: no state, CPU, tgid or /proc name.
            return Ok(Task {
                addr,
                pid,
                tgid: 0,
                proc_comm: comm.clone(),
                comm,
                state: '?',
                cpu: 0,
                running_on: None,
                stack,
                thread_sp,
                run_marks,
            });
        }
        let state = self.mem.read_u32(at(l.state)?)?;
        let exit_state = self.mem.read_u32(at(l.exit_state)?)?;
        let flags = self.mem.read_u32(at(l.flags)?)?;
        let proc_comm = match l.kthread_names {
            Some(n) if flags & (PF_KTHREAD | PF_WQ_WORKER) != 0 => self.proc_task_name(&n, addr, flags, &comm),
            _ => comm.clone(),
        };
        Ok(Task {
            addr,
            pid,
            tgid: self.mem.read_i32(at(l.tgid)?)?,
            comm,
            proc_comm,
            state: state_letter(state, exit_state),
            cpu: self.mem.read_u32(at(l.cpu)?)?,
            running_on: None,
            stack,
            thread_sp,
            run_marks,
        })
    }

    /// `proc_task_name()` for a kernel thread; `comm` when its kthread or
    /// worker cannot be read.
    fn proc_task_name(&self, n: &KthreadNameLayout, task: u64, flags: u32, comm: &str) -> String {
        let clip = |s: String| -> String {
            let mut s = s;
            while s.len() > PROC_COMM_LEN - 1 {
                s.pop();
            }
            s
        };
        let kthread = match task.checked_add(n.worker_private).and_then(|a| self.mem.read_u64(a).ok()) {
            Some(k) if k != 0 => k,
            _ => return comm.to_string(),
        };
        let field = |base: u64, off: u64| base.checked_add(off).and_then(|a| self.mem.read_u64(a).ok());
        if flags & PF_WQ_WORKER != 0 {
            // wq_worker_comm(): the real comm (6.1) or format_worker_id()
            // (which differs from the comm only for a rescuer), then the
            // worker's description of its latest work if it has a pool.
            let Some(worker) = field(kthread, n.kthread_data).filter(|w| *w != 0) else { return comm.to_string() };
            let rescuer = n.rescuer_name.and_then(|(rescue_wq, name, len)| {
                let wq = field(worker, rescue_wq).filter(|w| *w != 0)?;
                let name = self.mem.read_cstr(wq.checked_add(name)?, len.min(64) as usize).ok()?;
                Some(format!("kworker/R-{name}"))
            });
            let comm = rescuer.as_deref().unwrap_or(comm);
            if field(worker, n.worker_pool).unwrap_or(0) == 0 {
                return clip(comm.to_string());
            }
            let desc = worker
                .checked_add(n.worker_desc)
                .and_then(|a| self.mem.read_bytes(a, n.worker_desc_len.min(64) as usize).ok())
                .map(|raw| {
                    let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
                    String::from_utf8_lossy(raw.get(..end).unwrap_or(&[])).into_owned()
                })
                .unwrap_or_default();
            if desc.is_empty() {
                return comm.to_string();
            }
            let running = field(worker, n.worker_current_work).unwrap_or(0) != 0;
            return clip(format!("{comm}{}{desc}", if running { '+' } else { '-' }));
        }
        // get_kthread_comm(): the full name when set_task_comm truncated it.
        match field(kthread, n.kthread_full_name).filter(|p| *p != 0) {
            Some(p) => self.mem.read_cstr(p, PROC_COMM_LEN - 1).map(clip).unwrap_or_else(|_| comm.to_string()),
            None => comm.to_string(),
        }
    }

    /// Every thread (idle tasks of other CPUs included when running), in
    /// process-list order, threads after their group leader.
    pub fn tasks(&self) -> Result<Vec<Task>> {
        self.walk_tasks(true)
    }

    /// [`Kernel::tasks`] with only what a stop needs (address, pid, comm,
    /// stack, saved stack pointer, run marks, vCPU): `tgid` and `cpu` are 0,
    /// `state` is '?', and `proc_comm` is `comm`.
    pub fn tasks_brief(&self) -> Result<Vec<Task>> {
        self.walk_tasks(false)
    }

    /// Every vCPU's idle task (`rq->idle` of its runqueue).
    pub fn idle_tasks(&self) -> Result<Vec<u64>> {
        let off = self.off("rq", "idle")?;
        (0..self.cpus.len())
            .map(|cpu| {
                let rq = self.per_cpu("runqueues", cpu)?;
                self.read_ptr(rq, off)
            })
            .collect()
    }

    fn walk_tasks(&self, names: bool) -> Result<Vec<Task>> {
        let l = TaskLayout::from_btf(self)?;
        let init = self.sym("init_task")?;
        let mut leaders = vec![init];
        let head = init.checked_add(l.tasks).ok_or(IntrospectError::Overflow(init))?;
        leaders.extend(walk_list(&self.mem, head, l.tasks, MAX_TASKS, "task list")?);
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        // Each process has its own signal_struct: walking one thread list
        // once is enough. Without this, leaders that share a long thread
        // list would cost MAX_TASKS steps each (MAX_TASKS^2 in all).
        let mut walked_signals = HashSet::new();
        // All thread-list steps together, whatever the lists look like.
        let mut budget = MAX_TASKS.saturating_mul(2);
        for leader in leaders {
            let signal = self.read_ptr(leader, l.signal)?;
            let threads = if signal == 0 || !walked_signals.insert(signal) {
                vec![leader]
            } else {
                let th = signal.checked_add(l.signal_thread_head).ok_or(IntrospectError::Overflow(signal))?;
                let v = walk_list(&self.mem, th, l.thread_node, MAX_TASKS.min(budget), "thread list")?;
                budget = budget.saturating_sub(v.len().max(1));
                if v.is_empty() {
                    vec![leader]
                } else {
                    v
                }
            };
            for t in threads {
                if out.len() >= MAX_TASKS {
                    return Err(IntrospectError::WalkLimit { what: "tasks".into(), limit: MAX_TASKS });
                }
                if seen.insert(t) {
                    out.push(self.task_at_named(&l, t, names)?);
                }
            }
        }
        for cpu in 0..self.cpus.len() {
            if let Ok(cur) = self.current_task(cpu) {
                if let Some(t) = out.iter_mut().find(|t| t.addr == cur) {
                    t.running_on = Some(cpu);
                } else if cur != 0 && seen.insert(cur) {
                    let mut t = self.task_at_named(&l, cur, names)?;
                    t.running_on = Some(cpu);
                    out.push(t);
                }
            }
        }
        // The idle task of a secondary CPU is on no list: every CPU's
        // (`rq->idle`) is a task too, running or not, as Linux's livepatch
        // checks `idle_task(cpu)`. As with the current tasks, per-cpu data
        // that cannot be read leaves them out rather than failing the walk.
        for idle in self.idle_tasks().unwrap_or_default() {
            if idle != 0 && seen.insert(idle) {
                out.push(self.task_at_named(&l, idle, names)?);
            }
        }
        Ok(out)
    }
}

impl Kernel<'_> {
    /// THREAD_SIZE, the size of a task's kernel stack (and of the IRQ
    /// stack on x86_64), as this kernel was built: the init task's stack,
    /// `__start_init_task` to `__end_init_task` (6.1; `__start_init_stack`
    /// to `__end_init_stack` in 6.12), is laid out as exactly one
    /// THREAD_SIZE. Refused unless it is a power of two in a
    /// plausible range.
    pub fn thread_size(&self) -> Result<u64> {
        let start = self
            .sym("__start_init_task")
            .or_else(|_| self.sym("__start_init_stack"))
            .or_else(|_| self.sym("init_stack"))?;
        let end = self.sym("__end_init_task").or_else(|_| self.sym("__end_init_stack"))?;
        match end.checked_sub(start) {
            Some(n) if n.is_power_of_two() && THREAD_SIZES.contains(&n) => Ok(n),
            _ => Err(IntrospectError::Corrupt(format!(
                "THREAD_SIZE unknown: the init task's stack runs from {start:#x} to {end:#x}, not a power of two of 4 KiB to 256 KiB"
            ))),
        }
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_letters_match_proc() {
        assert_eq!(state_letter(0, 0), 'R');
        assert_eq!(state_letter(1, 0), 'S');
        assert_eq!(state_letter(2, 0), 'D');
        assert_eq!(state_letter(0x402, 0), 'I');
        assert_eq!(state_letter(0, 32), 'Z');
        assert_eq!(state_letter(4, 0), 'T');
    }
}
