//! vCPU threads: the KVM_RUN loop, exit handling, and the stop protocol
//! (a pause request is seen either before KVM_RUN or through a signal that
//! sets `immediate_exit`, so no request is ever lost).

use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::{PioAction, PioBus};

/// Why the VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset the machine (i8042, triple fault): a clean exit.
    Reset,
    /// The guest kernel panicked.
    Panic,
    /// The host asked the VM to stop (API `shutdown`).
    Shutdown,
    /// A vCPU hit something the VMM cannot continue from.
    Error(String),
}

/// Why a single step ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepOutcome {
    /// One instruction executed; the vCPU is stopped again.
    Stepped,
    /// The guest asked for a reset while stepping.
    Reset,
}

/// Pause/exit state shared by the controller and all vCPU threads.
#[derive(Debug, Default)]
pub struct RunState {
    pub pause_requested: bool,
    pub pause_depth: usize,
    pub paused: usize,
    pub running_threads: usize,
    pub exit: Option<VmExit>,
    /// A client of the control API holds the VM paused: no guest code may
    /// run, not even one single step.
    pub client_hold: bool,
    /// A single step asked of a paused vCPU (its index), served by that
    /// vCPU's own thread.
    pub step_request: Option<usize>,
    /// The answer to `step_request`: (vCPU index, outcome).
    pub step_result: Option<(usize, Result<StepOutcome, String>)>,
    /// Execution traps (at most 4, hardware breakpoints at CPL0): a vCPU
    /// reaching `addr` continues at `redirect`. Each vCPU thread applies a
    /// new generation before its next KVM_RUN.
    pub traps: Vec<ExecTrap>,
    pub traps_generation: u64,
}

/// One execution trap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecTrap {
    pub addr: u64,
    pub redirect: u64,
}

/// The KVM_SET_GUEST_DEBUG setting for `traps`, plus single-stepping.
fn guest_debug(traps: &[ExecTrap], step: bool) -> kvm_bindings::kvm_guest_debug {
    let mut d = kvm_bindings::kvm_guest_debug::default();
    if traps.is_empty() && !step {
        return d;
    }
    d.control = kvm_bindings::KVM_GUESTDBG_ENABLE;
    if step {
        d.control |= kvm_bindings::KVM_GUESTDBG_SINGLESTEP | kvm_bindings::KVM_GUESTDBG_BLOCKIRQ;
    }
    if !traps.is_empty() {
        d.control |= kvm_bindings::KVM_GUESTDBG_USE_HW_BP;
        // DR7: bit 10 is reserved as 1; L0..L3 enable, R/W and LEN 00 (execute, 1 byte).
        let mut dr7 = 1u64 << 10;
        for (i, t) in traps.iter().take(4).enumerate() {
            d.arch.debugreg[i] = t.addr;
            dr7 |= 1 << (2 * i);
        }
        d.arch.debugreg[7] = dr7;
    }
    d
}

/// The controller's handle on the vCPU threads' state.
pub struct RunControl {
    pub state: Mutex<RunState>,
    pub cond: Condvar,
    /// Written when `exit` is set, so the main loop wakes up.
    pub exit_evt: EventFd,
}

impl RunControl {
    pub fn new() -> std::io::Result<Self> {
        Ok(RunControl {
            state: Mutex::new(RunState::default()),
            cond: Condvar::new(),
            exit_evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Locks the state; a poisoned lock (a panicked vCPU thread) still gives
    /// the data, which stays consistent because every update is one field.
    pub fn lock(&self) -> MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the first reason the VM ends and wakes everybody.
    pub fn set_exit(&self, why: VmExit) {
        let mut st = self.lock();
        if st.exit.is_none() {
            st.exit = Some(why);
        }
        drop(st);
        self.cond.notify_all();
        let _ = self.exit_evt.write(1);
    }
}

thread_local! {
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// Signal handler for the vCPU kick signal: makes the current or next
/// KVM_RUN of this thread return at once.
pub extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let p = KVM_RUN_PTR.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: `p` points at this thread's kvm_run mapping, which lives as
        // long as the VcpuFd the thread owns an Arc of; a volatile byte store
        // is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*p).immediate_exit).write_volatile(1) };
    }
}

fn clear_immediate_exit() {
    let p = KVM_RUN_PTR.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: as in `kick_handler`; only this thread and its signal
        // handler write this byte.
        unsafe { std::ptr::addr_of_mut!((*p).immediate_exit).write_volatile(0) };
    }
}

/// What one vCPU thread needs.
pub struct VcpuThread {
    pub index: usize,
    pub fd: Arc<Mutex<VcpuFd>>,
    pub control: Arc<RunControl>,
    pub bus: Arc<Mutex<PioBus>>,
    pub mem: GuestMemoryMmap,
}

const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;

impl VcpuThread {
    /// Runs the vCPU until the VM exits.
    pub fn run(self) {
        {
            let mut fd = self.fd.lock().unwrap_or_else(|e| e.into_inner());
            let p: *mut kvm_run = fd.get_kvm_run();
            KVM_RUN_PTR.with(|c| c.set(p));
        }
        let mut applied_generation = 0u64;
        let mut traps: Vec<ExecTrap> = Vec::new();
        loop {
            clear_immediate_exit();
            {
                let mut st = self.control.lock();
                if st.exit.is_some() {
                    break;
                }
                if st.traps_generation != applied_generation {
                    applied_generation = st.traps_generation;
                    traps = st.traps.clone();
                    let fd = self.fd.lock().unwrap_or_else(|e| e.into_inner());
                    if let Err(e) = fd.set_guest_debug(&guest_debug(&traps, false)) {
                        drop(fd);
                        drop(st);
                        self.control.set_exit(VmExit::Error(format!("vCPU {}: KVM_SET_GUEST_DEBUG for traps: {e}", self.index)));
                        break;
                    }
                }
                if st.pause_requested {
                    st.paused += 1;
                    self.control.cond.notify_all();
                    while st.pause_requested && st.exit.is_none() {
                        if st.step_request == Some(self.index) {
                            // Served here, on this vCPU's own thread, while
                            // the others stay paused.
                            st.step_request = None;
                            let traps_now = st.traps.clone();
                            drop(st);
                            let r = self.single_step(&traps_now);
                            st = self.control.lock();
                            st.step_result = Some((self.index, r));
                            self.control.cond.notify_all();
                            continue;
                        }
                        st = self.control.cond.wait(st).unwrap_or_else(|e| e.into_inner());
                    }
                    st.paused -= 1;
                    continue;
                }
            }
            let mut fd = self.fd.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(exit) = self.run_once(&mut fd, &traps) {
                drop(fd);
                self.control.set_exit(exit);
                break;
            }
        }
        KVM_RUN_PTR.with(|c| c.set(std::ptr::null_mut()));
        let mut st = self.control.lock();
        st.running_threads = st.running_threads.saturating_sub(1);
        drop(st);
        self.control.cond.notify_all();
    }

    /// Executes exactly one guest instruction (KVM single-step with
    /// interrupts blocked), serving the port I/O it does on the way.
    fn single_step(&self, traps: &[ExecTrap]) -> Result<StepOutcome, String> {
        let mut fd = self.fd.lock().unwrap_or_else(|e| e.into_inner());
        fd.set_guest_debug(&guest_debug(traps, true)).map_err(|e| format!("KVM_SET_GUEST_DEBUG: {e}"))?;
        let mut result = Err("no debug exit after 64 exits".to_string());
        for _ in 0..64 {
            clear_immediate_exit();
            match fd.run() {
                Ok(VcpuExit::Debug(_)) => {
                    result = Ok(StepOutcome::Stepped);
                    break;
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    self.bus.lock().unwrap_or_else(|e| e.into_inner()).read(port, data);
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    let a = self.bus.lock().unwrap_or_else(|e| e.into_inner()).write(port, data);
                    if a == PioAction::Reset {
                        result = Ok(StepOutcome::Reset);
                        break;
                    }
                }
                Ok(VcpuExit::MmioRead(_, data)) => data.fill(0xff),
                Ok(VcpuExit::MmioWrite(..)) | Ok(VcpuExit::Intr) => {}
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Ok(other) => {
                    result = Err(format!("unexpected exit while single-stepping: {other:?}"));
                    break;
                }
                Err(e) => {
                    result = Err(format!("KVM_RUN while single-stepping: {e}"));
                    break;
                }
            }
        }
        fd.set_guest_debug(&guest_debug(traps, false)).map_err(|e| format!("KVM_SET_GUEST_DEBUG (after the step): {e}"))?;
        result
    }

    /// One KVM_RUN; returns why the VM must end, if it must.
    fn run_once(&self, fd: &mut VcpuFd, traps: &[ExecTrap]) -> Option<VmExit> {
        match fd.run() {
            Ok(VcpuExit::Debug(d)) => {
                let pc = d.pc;
                match traps.iter().find(|t| t.addr == pc) {
                    Some(t) => {
                        let redirect = t.redirect;
                        match fd.get_regs() {
                            Ok(mut regs) if regs.rip == pc => {
                                regs.rip = redirect;
                                fd.set_regs(&regs).err().map(|e| VmExit::Error(format!("vCPU {}: redirecting a trap: {e}", self.index)))
                            }
                            Ok(regs) => Some(VmExit::Error(format!("vCPU {}: trap exit at {pc:#x} but RIP is {:#x}", self.index, regs.rip))),
                            Err(e) => Some(VmExit::Error(format!("vCPU {}: trap exit, get_regs: {e}", self.index))),
                        }
                    }
                    None => Some(VmExit::Error(format!("vCPU {}: debug exit at {pc:#x}, which is no trap", self.index))),
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                self.bus.lock().unwrap_or_else(|e| e.into_inner()).read(port, data);
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                let action = self.bus.lock().unwrap_or_else(|e| e.into_inner()).write(port, data);
                match action {
                    PioAction::Reset => Some(VmExit::Reset),
                    PioAction::None => None,
                }
            }
            Ok(VcpuExit::MmioRead(_, data)) => {
                data.fill(0xff);
                None
            }
            Ok(VcpuExit::MmioWrite(..)) => None,
            Ok(VcpuExit::Hlt) | Ok(VcpuExit::IrqWindowOpen) | Ok(VcpuExit::Intr) => None,
            Ok(VcpuExit::Shutdown) => Some(VmExit::Reset),
            Ok(VcpuExit::InternalError) => self.internal_error(fd),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(VmExit::Error(format!(
                "vCPU {}: KVM entry failed (hardware reason {reason:#x}, cpu {cpu})",
                self.index
            ))),
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                // KVM_SYSTEM_EVENT_SHUTDOWN = 1, RESET = 2, CRASH = 3.
                if kind == 3 {
                    Some(VmExit::Panic)
                } else {
                    Some(VmExit::Reset)
                }
            }
            Ok(other) => Some(VmExit::Error(format!("vCPU {}: unexpected KVM exit {other:?}", self.index))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => Some(VmExit::Error(format!("vCPU {}: KVM_RUN failed: {e}", self.index))),
        }
    }

    /// KVM_EXIT_INTERNAL_ERROR: an `int3` at CPL0 is not emulated here, so the
    /// VMM delivers #BP itself; anything else stops the VM with the decoded
    /// instruction.
    fn internal_error(&self, fd: &mut VcpuFd) -> Option<VmExit> {
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal`
        // is the active member of the kvm_run union.
        let suberror = unsafe { fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
        let regs = match fd.get_regs() {
            Ok(r) => r,
            Err(e) => return Some(VmExit::Error(format!("vCPU {}: internal error, get_regs: {e}", self.index))),
        };
        let bytes = read_guest_code(fd, &self.mem, regs.rip);
        if suberror == KVM_INTERNAL_ERROR_EMULATION && bytes.first() == Some(&0xcc) {
            return match inject_breakpoint(fd, regs) {
                Ok(()) => None,
                Err(e) => Some(VmExit::Error(format!("vCPU {}: delivering #BP failed: {e}", self.index))),
            };
        }
        let text = crate::decode::describe_instruction(&bytes, regs.rip);
        Some(VmExit::Error(format!(
            "vCPU {}: the guest executed an instruction this KVM cannot emulate (suberror {suberror}): {text} at {:#x}",
            self.index, regs.rip
        )))
    }
}

/// Reads up to 15 bytes of guest code at `rip` through the vCPU's paging.
pub fn read_guest_code(fd: &VcpuFd, mem: &GuestMemoryMmap, rip: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(15);
    for i in 0..15u64 {
        let Some(va) = rip.checked_add(i) else { break };
        let Ok(t) = fd.translate_gva(va) else { break };
        if t.valid == 0 {
            break;
        }
        let mut b = [0u8; 1];
        if mem.read_slice(&mut b, GuestAddress(t.physical_address)).is_err() {
            break;
        }
        out.push(b[0]);
    }
    out
}

/// Delivers #BP for the `int3` at `regs.rip`: RIP past it, vector 3 injected.
pub fn inject_breakpoint(fd: &VcpuFd, mut regs: kvm_bindings::kvm_regs) -> std::result::Result<(), kvm_ioctls::Error> {
    regs.rip = regs.rip.wrapping_add(1);
    fd.set_regs(&regs)?;
    let mut ev = fd.get_vcpu_events()?;
    ev.exception.injected = 1;
    ev.exception.pending = 0;
    ev.exception.nr = 3;
    ev.exception.has_error_code = 0;
    ev.exception.error_code = 0;
    fd.set_vcpu_events(&ev)
}
