//! Task stacks from outside: every task's kernel stack unwound with the
//! guest's ORC tables (vmlinux and modules), sleeping tasks from their saved
//! `thread.sp`, running ones from their vCPU's registers, symbolized as
//! /proc/PID/stack prints them.

use std::collections::HashMap;

use crate::error::{IntrospectError, Result};
use crate::kernel::Kernel;
use crate::modules::Module;
use crate::orc::{InactiveTaskFrameLayout, OrcTables, PtRegsLayout, Stack, StackBounds, SymbolAddrs, UnwindStart};
use crate::orc_format::OrcFormat;
use crate::tasks::Task;
use crate::translate::KernelMemory;

/// Most frames one unwind follows.
pub const MAX_FRAMES: usize = 128;
/// Most module symbols one [`Symbolizer`] loads, all modules together.
pub const MAX_SYMBOLIZER_MODULE_SYMS: usize = crate::modules::MAX_TOTAL_MODULE_SYMS as usize;

/// One frame as reported.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FrameView {
    pub ip: u64,
    /// `func+0x12/0x80`, or `func+0x12/0x80 [module]`, like `%pB`.
    pub symbol: String,
}

/// The kernel stack of one task.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TaskStack {
    pub pid: i32,
    pub tgid: i32,
    pub comm: String,
    pub running_on: Option<usize>,
    /// The unwind reached the end of the stack with every frame known.
    pub reliable: bool,
    pub reason: Option<String>,
    /// What /proc/PID/stack shows (scheduler functions dropped).
    pub frames: Vec<FrameView>,
    /// Every frame the unwinder found, return addresses as found.
    pub all_frames: Vec<FrameView>,
}

/// Symbolizes kernel and module addresses.
pub struct Symbolizer<'k, 'm> {
    k: &'k Kernel<'m>,
    modules: Vec<(Module, Vec<(u64, String)>)>,
}

impl<'k, 'm> Symbolizer<'k, 'm> {
    pub fn new(k: &'k Kernel<'m>, modules: &[Module]) -> Symbolizer<'k, 'm> {
        // Each module may claim up to MAX_MODULE_SYMS symbols and there may be
        // MAX_MODULES of them: bound the total, modules past it print as
        // plain addresses.
        let mut budget = MAX_SYMBOLIZER_MODULE_SYMS;
        let modules = modules
            .iter()
            .map(|m| {
                let all = if budget == 0 { Vec::new() } else { k.module_symbols(m).unwrap_or_default() };
                budget = budget.saturating_sub(all.len().max(1));
                let mut syms: Vec<(u64, String)> =
                    all.into_iter().filter(|s| matches!(s.kind, 't' | 'T')).map(|s| (s.addr, s.name)).collect();
                syms.sort();
                (m.clone(), syms)
            })
            .collect();
        Symbolizer { k, modules }
    }

    /// `%pB`: the symbol of `ip - 1` (a return address may point just past
    /// its call's function) with the offset of `ip`.
    pub fn return_address(&self, ip: u64) -> String {
        self.format(ip, ip.saturating_sub(1))
    }

    /// `%pS`: the symbol containing `ip`.
    pub fn exact(&self, ip: u64) -> String {
        self.format(ip, ip)
    }

    fn format(&self, ip: u64, key: u64) -> String {
        if let Some(s) = self.k.syms.resolve(key) {
            if s.size > 0 || s.offset == 0 {
                return format!("{}+{:#x}/{:#x}", s.name, ip.wrapping_sub(s.addr), s.size);
            }
        }
        for (m, syms) in &self.modules {
            if !m.contains_text(key) {
                continue;
            }
            let i = syms.partition_point(|(a, _)| *a <= key);
            if let Some((addr, name)) = i.checked_sub(1).and_then(|i| syms.get(i)) {
                let end = syms.get(i).map(|(a, _)| *a).unwrap_or(m.core_base.saturating_add(m.core_text_size));
                return format!("{}+{:#x}/{:#x} [{}]", name, ip.wrapping_sub(*addr), end.wrapping_sub(*addr), m.name);
            }
        }
        format!("{ip:#x}")
    }
}

/// The largest entry stack believed (it is one page).
const MAX_ENTRY_STACK: u64 = 64 << 10;

/// ORC tables plus the layouts an unwind needs, loaded once per stop.
pub struct Unwinder {
    pub tables: OrcTables,
    pub frame: InactiveTaskFrameLayout,
    pub regs: PtRegsLayout,
    /// The size of each task stack and IRQ stack ([`Kernel::thread_size`]).
    pub thread_size: u64,
}

impl Kernel<'_> {
    /// Loads the vmlinux ORC tables and those of every module in `modules`.
    pub fn unwinder(&self, modules: &[Module]) -> Result<Unwinder> {
        self.unwinder_with(None, modules)
    }

    /// vmlinux's ORC tables alone, read from guest memory (they never
    /// change while the kernel runs: read once, then [`Self::unwinder_with`]).
    pub fn vmlinux_orc(&self) -> Result<OrcTables> {
        let syms = SymbolAddrs::from_lookup(|n| self.syms.lookup_unique(n).ok())?;
        OrcTables::load(&self.mem, &syms, OrcFormat::from_btf(&self.btf)?)
    }

    /// An unwinder over `vmlinux` (read before, shared not copied; read now
    /// if `None`) and the ORC tables of every module in `modules`.
    pub fn unwinder_with(&self, vmlinux: Option<&OrcTables>, modules: &[Module]) -> Result<Unwinder> {
        let mut tables = match vmlinux {
            Some(t) => t.vmlinux_only(),
            None => self.vmlinux_orc()?,
        };
        let ip_off = self.off("module", "arch.orc_unwind_ip")?;
        let orc_off = self.off("module", "arch.orc_unwind")?;
        let num_off = self.off("module", "arch.num_orcs")?;
        for m in modules {
            let ips = self.read_ptr(m.addr, ip_off)?;
            let orcs = self.read_ptr(m.addr, orc_off)?;
            let n = self.mem.read_u32(m.addr.checked_add(num_off).ok_or(IntrospectError::Overflow(m.addr))?)?;
            if ips != 0 && orcs != 0 && n != 0 {
                let end = m.core_base.checked_add(m.core_text_size).ok_or(IntrospectError::Overflow(m.core_base))?;
                tables.add_module_table(&self.mem, m.core_base, end, ips, orcs, u64::from(n))?;
            }
        }
        let r = |f: &str| self.off("pt_regs", f);
        Ok(Unwinder {
            thread_size: self.thread_size()?,
            tables,
            frame: InactiveTaskFrameLayout {
                size: self.btf.struct_size("inactive_task_frame")?,
                ret_addr: self.off("inactive_task_frame", "ret_addr")?,
                bp: self.off("inactive_task_frame", "bp")?,
            },
            regs: PtRegsLayout {
                size: self.btf.struct_size("pt_regs")?,
                ip: r("ip")?,
                sp: r("sp")?,
                bp: r("bp")?,
                cs: r("cs")?,
                di: r("di")?,
                dx: r("dx")?,
                r10: r("r10")?,
                r13: r("r13")?,
            },
        })
    }

    /// Unwinds one task: from its vCPU when it is running, else from its
    /// saved stack pointer.
    pub fn unwind_task(&self, u: &Unwinder, t: &Task) -> Stack {
        let task_stack = StackBounds { low: t.stack, high: t.stack.saturating_add(u.thread_size) };
        let start = match t.running_on.and_then(|c| self.cpus.get(c).map(|regs| (c, *regs))) {
            Some((cpu, regs)) => {
                let mut stacks = vec![task_stack];
                if let Ok(irq) = self.irq_stack(cpu, u.thread_size) {
                    stacks.push(irq);
                }
                // An interrupt from user mode lands on the CPU's entry
                // stack before the entry code moves to the task stack.
                if let Ok(entry) = self.entry_stack(cpu) {
                    stacks.push(entry);
                }
                UnwindStart::Running { regs, stacks }
            }
            None => UnwindStart::Sleeping { thread_sp: t.thread_sp, frame: u.frame, stack: task_stack },
        };
        u.tables.unwind(&self.mem, start, &u.regs, MAX_FRAMES)
    }

    /// The IRQ stack of `cpu` (`hardirq_stack_ptr`, in `pcpu_hot` on 6.2+,
    /// points 8 bytes below its top), `size` bytes (IRQ_STACK_SIZE is
    /// THREAD_SIZE on x86_64).
    pub fn irq_stack(&self, cpu: usize, size: u64) -> Result<StackBounds> {
        let ptr = self.mem.read_u64(self.per_cpu_hot("hardirq_stack_ptr", cpu)?)?;
        let high = ptr.checked_add(8).ok_or(IntrospectError::Overflow(ptr))?;
        Ok(StackBounds { low: high.saturating_sub(size), high })
    }

    /// The entry (trampoline) stack of `cpu`, where the CPU pushes an
    /// interrupt frame from user mode: it ends at the TSS's `sp0`
    /// (`cpu_tss_rw.x86_tss.sp0`, in the CPU's entry area) and is one
    /// `struct entry_stack` long.
    pub fn entry_stack(&self, cpu: usize) -> Result<StackBounds> {
        let tss = self.per_cpu("cpu_tss_rw", cpu)?;
        let sp0 = self.read_ptr(tss, self.off("tss_struct", "x86_tss.sp0")?)?;
        let size = self.btf.struct_size("entry_stack")?;
        if size == 0 || size > MAX_ENTRY_STACK {
            return Err(IntrospectError::Corrupt(format!("sizeof(struct entry_stack) = {size} is implausible")));
        }
        let low = sp0.checked_sub(size).ok_or(IntrospectError::Overflow(sp0))?;
        Ok(StackBounds { low, high: sp0 })
    }

    /// Stacks of every task, or of the tasks whose pid is `target`.
    pub fn task_stacks(&self, target: &str) -> Result<Vec<TaskStack>> {
        let tasks = self.tasks()?;
        let want: Option<i32> = if target == "all" {
            None
        } else {
            Some(target.parse().map_err(|_| IntrospectError::Corrupt(format!("stack target {target:?} is not a pid or \"all\"")))?)
        };
        let chosen: Vec<&Task> = tasks.iter().filter(|t| want.is_none_or(|p| t.pid == p)).collect();
        if chosen.is_empty() {
            return Err(IntrospectError::Corrupt(format!("no task with pid {target}")));
        }
        let modules = self.modules()?;
        let u = self.unwinder(&modules)?;
        let sym = Symbolizer::new(self, &modules);
        let mut by_ip: HashMap<(u64, bool), String> = HashMap::new();
        let mut out = Vec::new();
        for t in chosen {
            let st = self.unwind_task(&u, t);
            let mut view = |ip: u64, ret: bool| FrameView {
                ip,
                symbol: by_ip
                    .entry((ip, ret))
                    .or_insert_with(|| if ret { sym.return_address(ip) } else { sym.exact(ip) })
                    .clone(),
            };
            let frames = u.tables.proc_pid_stack(&st).into_iter().map(|ip| view(ip, true)).collect();
            let all_frames = st.frames.iter().map(|f| view(f.ip, f.is_return_address())).collect();
            out.push(TaskStack {
                pid: t.pid,
                tgid: t.tgid,
                comm: t.comm.clone(),
                running_on: t.running_on,
                reliable: st.reliable,
                reason: st.reason.clone(),
                frames,
                all_frames,
            });
        }
        Ok(out)
    }
}
