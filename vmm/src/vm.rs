//! A running VM: KVM objects, guest memory, devices and vCPU threads, with
//! the stop-all primitive (`PausedVm`) everything else stands on.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::boot::{self, LoadedKernel};
use crate::cpuid::filter_cpuid;
use crate::devices::{ConsoleOut, PioBus, SerialConsole, SERIAL_IRQ};
use crate::error::{Result, VmmError};
use crate::layout::*;
use crate::mptable;
pub use crate::vcpu::StepOutcome;
use crate::vcpu::{kick_handler, RunControl, VcpuThread, VmExit};

/// Most vCPUs a VM may have: the 6.12 test kernel's NR_CPUS. (APIC ids
/// are 8-bit in the MP table, and the IOAPIC takes the id after the last
/// vCPU's.)
pub const MAX_VCPUS: u8 = 64;
/// Smallest guest RAM we accept.
pub const MIN_MEM_MIB: u64 = 32;

/// How to build a VM from a kernel.
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u8,
    pub mem_mib: u64,
    pub reserved_mib: u64,
}

impl VmConfig {
    /// Checks the numbers before anything is created.
    pub fn validate(&self) -> Result<MemoryLayout> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(VmmError::Config(format!("--vcpus must be 1 to {MAX_VCPUS}, not {}", self.vcpus)));
        }
        if self.mem_mib < MIN_MEM_MIB {
            return Err(VmmError::Config(format!("--mem must be at least {MIN_MEM_MIB} MiB, not {}", self.mem_mib)));
        }
        let ram_end = self.mem_mib.checked_mul(1 << 20).ok_or_else(|| VmmError::Config("--mem too large".into()))?;
        let reserved = self
            .reserved_mib
            .checked_mul(1 << 20)
            .ok_or_else(|| VmmError::Config("--reserved too large".into()))?;
        let layout = MemoryLayout { ram_end, reserved_size: reserved };
        if layout.total_size() > MAX_GUEST_END {
            return Err(VmmError::Config(format!(
                "--mem plus the reserved region must stay below {} MiB",
                MAX_GUEST_END >> 20
            )));
        }
        if !self.kernel.exists() {
            return Err(VmmError::Config(format!("kernel {} does not exist", self.kernel.display())));
        }
        if let Some(i) = &self.initrd {
            if !i.exists() {
                return Err(VmmError::Config(format!("initrd {} does not exist", i.display())));
            }
        }
        Ok(layout)
    }
}

/// Registers of one stopped vCPU that introspection needs.
#[derive(Clone, Debug)]
pub struct VcpuRegs {
    pub regs: kvm_bindings::kvm_regs,
    pub sregs: kvm_bindings::kvm_sregs,
    pub efer: u64,
    pub lstar: u64,
    pub gs_base: u64,
    pub kernel_gs_base: u64,
}

pub const MSR_EFER: u32 = 0xc000_0080;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_GS_BASE: u32 = 0xc000_0101;
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// A VM with its vCPU threads.
pub struct Vm {
    pub(crate) kvm: Kvm,
    pub(crate) vm_fd: VmFd,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) layout: MemoryLayout,
    pub(crate) vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    pub(crate) control: Arc<RunControl>,
    pub(crate) bus: Arc<Mutex<PioBus>>,
    pub(crate) panicked: Arc<std::sync::atomic::AtomicBool>,
    /// Bytes written to the console output so far (see `ConsoleOut::written`).
    pub(crate) console_written: Arc<std::sync::atomic::AtomicU64>,
    started: Instant,
    /// What was booted, when it was booted here (not restored).
    pub kernel: Option<LoadedKernel>,
}

fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

static SIGNAL_INIT: std::sync::Once = std::sync::Once::new();

fn install_kick_handler() -> Result<()> {
    let mut res = Ok(());
    SIGNAL_INIT.call_once(|| {
        res = register_signal_handler(kick_signal(), kick_handler)
            .map_err(|e| VmmError::Config(format!("cannot install the vCPU kick signal handler: {e}")));
    });
    res
}

impl Vm {
    /// Creates the KVM VM, irqchip and PIT, and maps `mem` as slot 0.
    pub(crate) fn create_kvm(mem: &GuestMemoryMmap) -> Result<(Kvm, VmFd)> {
        let kvm = Kvm::new().map_err(VmmError::Kvm)?;
        let vm_fd = kvm.create_vm().map_err(VmmError::ioctl("KVM_CREATE_VM"))?;
        vm_fd.set_tss_address(KVM_TSS_ADDR).map_err(VmmError::ioctl("KVM_SET_TSS_ADDR"))?;
        vm_fd
            .set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .map_err(VmmError::ioctl("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm_fd.create_irq_chip().map_err(VmmError::ioctl("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        vm_fd.create_pit2(pit).map_err(VmmError::ioctl("KVM_CREATE_PIT2"))?;
        for (slot, region) in mem.iter().enumerate() {
            let host = mem
                .get_host_address(region.start_addr())
                .map_err(|e| VmmError::GuestMemory(e.to_string()))?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mmap owned by `mem`, which the Vm
            // keeps for as long as the VM fd exists.
            unsafe { vm_fd.set_user_memory_region(r) }.map_err(VmmError::ioctl("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok((kvm, vm_fd))
    }

    /// Creates vCPU `index` with its CPUID and LAPIC LINT setup.
    pub(crate) fn create_vcpu(kvm: &Kvm, vm_fd: &VmFd, index: u8, count: u8) -> Result<VcpuFd> {
        let fd = vm_fd.create_vcpu(u64::from(index)).map_err(VmmError::ioctl("KVM_CREATE_VCPU"))?;
        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmmError::ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        filter_cpuid(&mut cpuid, index, count);
        fd.set_cpuid2(&cpuid).map_err(VmmError::ioctl("KVM_SET_CPUID2"))?;
        Ok(fd)
    }

    /// Boots a new VM from `cfg`; console output goes to `console`.
    pub fn boot(cfg: &VmConfig, console: Box<dyn Write + Send>) -> Result<Vm> {
        let layout = cfg.validate()?;
        let total = usize::try_from(layout.total_size()).map_err(|_| VmmError::Config("memory too large".into()))?;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), total)])
            .map_err(|e| VmmError::GuestMemory(format!("cannot allocate {} MiB: {e}", total >> 20)))?;
        let loaded = boot::load_kernel(&mem, &layout, &cfg.kernel, cfg.initrd.as_deref(), &cfg.cmdline)?;
        let (kvm, vm_fd) = Self::create_kvm(&mem)?;

        let mut vcpus = Vec::new();
        for i in 0..cfg.vcpus {
            let fd = Self::create_vcpu(&kvm, &vm_fd, i, cfg.vcpus)?;
            set_lint(&fd)?;
            init_fpu(&fd)?;
            if i == 0 {
                let sregs = fd.get_sregs().map_err(VmmError::ioctl("KVM_GET_SREGS"))?;
                let (regs, sregs) = boot::boot_vcpu_state(loaded.entry, sregs);
                fd.set_sregs(&sregs).map_err(VmmError::ioctl("KVM_SET_SREGS"))?;
                fd.set_regs(&regs).map_err(VmmError::ioctl("KVM_SET_REGS"))?;
            }
            vcpus.push(fd);
        }
        let (sig, feat) = cpu_signature(&vcpus[0]);
        mptable::write(&mem, cfg.vcpus, sig, feat)?;

        let irq = EventFd::new(libc::EFD_NONBLOCK)?;
        vm_fd.register_irqfd(&irq, SERIAL_IRQ).map_err(VmmError::ioctl("KVM_IRQFD"))?;
        let out = ConsoleOut::new(console);
        let (panicked, written) = (out.panicked.clone(), out.written.clone());
        let bus = PioBus::new(SerialConsole::new(irq, out));
        let mut vm = Vm::assemble(kvm, vm_fd, mem, layout, vcpus, bus, (panicked, written))?;
        vm.kernel = Some(loaded);
        vm.start()?;
        Ok(vm)
    }

    pub(crate) fn assemble(
        kvm: Kvm,
        vm_fd: VmFd,
        mem: GuestMemoryMmap,
        layout: MemoryLayout,
        vcpus: Vec<VcpuFd>,
        bus: PioBus,
        (panicked, console_written): (Arc<std::sync::atomic::AtomicBool>, Arc<std::sync::atomic::AtomicU64>),
    ) -> Result<Vm> {
        Ok(Vm {
            kvm,
            vm_fd,
            mem,
            layout,
            vcpus: vcpus.into_iter().map(|v| Arc::new(Mutex::new(v))).collect(),
            threads: Mutex::new(Vec::new()),
            control: Arc::new(RunControl::new()?),
            bus: Arc::new(Mutex::new(bus)),
            panicked,
            console_written,
            started: Instant::now(),
            kernel: None,
        })
    }

    /// Starts one thread per vCPU.
    pub(crate) fn start(&mut self) -> Result<()> {
        install_kick_handler()?;
        self.control.lock().running_threads = self.vcpus.len();
        for (index, fd) in self.vcpus.iter().enumerate() {
            let t = VcpuThread {
                index,
                fd: fd.clone(),
                control: self.control.clone(),
                bus: self.bus.clone(),
                mem: self.mem.clone(),
            };
            let h = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || t.run())
                .map_err(VmmError::Io)?;
            self.threads.lock().unwrap_or_else(|e| e.into_inner()).push(h);
        }
        self.started = Instant::now();
        Ok(())
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// Time since the vCPUs started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Guest memory (RAM and reserved region).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Physical layout, including the reserved injection region.
    pub fn layout(&self) -> MemoryLayout {
        self.layout
    }

    /// Whether the vCPUs are stopped by a pause.
    pub fn is_paused(&self) -> bool {
        self.control.lock().pause_requested
    }

    /// The exit event the main loop waits on.
    pub fn exit_event(&self) -> &EventFd {
        &self.control.exit_evt
    }

    /// Why the VM ended, once it has.
    pub fn exit_reason(&self) -> Option<VmExit> {
        let e = self.control.lock().exit.clone();
        match e {
            Some(VmExit::Reset) if self.panicked.load(std::sync::atomic::Ordering::SeqCst) => Some(VmExit::Panic),
            other => other,
        }
    }

    /// Bytes the guest has printed on its console so far. Read while every
    /// vCPU is paused, it is exact: nothing more is printed until resume.
    pub fn console_bytes(&self) -> u64 {
        self.console_written.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Feeds host bytes to the guest console.
    pub fn console_input(&self, bytes: &[u8]) {
        self.bus.lock().unwrap_or_else(|e| e.into_inner()).console.queue_input(bytes);
    }

    fn kick_all(&self) {
        for t in self.threads.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            // A thread that already ended cannot be signalled; that is fine.
            let _ = t.kill(kick_signal());
        }
    }

    /// Stops every vCPU on an instruction boundary and returns a guard that
    /// resumes them when dropped. Pauses nest.
    pub fn pause(&self) -> Result<PausedVm<'_>> {
        self.pause_hold()?;
        Ok(PausedVm { vm: self })
    }

    /// Pauses without a guard (API `pause`); undo with `resume_hold`.
    pub fn pause_hold(&self) -> Result<()> {
        let mut st = self.control.lock();
        if st.exit.is_some() {
            return Err(VmmError::Stopped);
        }
        st.pause_depth += 1;
        if st.pause_depth > 1 {
            return Ok(());
        }
        st.pause_requested = true;
        drop(st);
        self.kick_all();
        let mut st = self.control.lock();
        let deadline = Instant::now() + Duration::from_secs(10);
        while st.paused < st.running_threads && st.exit.is_none() {
            let now = Instant::now();
            if now >= deadline {
                st.pause_depth -= 1;
                st.pause_requested = false;
                drop(st);
                self.control.cond.notify_all();
                return Err(VmmError::Vcpu { index: 0, detail: "vCPUs did not stop within 10 s".into() });
            }
            let (g, _) = self
                .control
                .cond
                .wait_timeout(st, (deadline - now).min(Duration::from_millis(50)))
                .unwrap_or_else(|e| e.into_inner());
            st = g;
            if st.paused < st.running_threads {
                drop(st);
                self.kick_all();
                st = self.control.lock();
            }
        }
        drop(st);
        for v in &self.vcpus {
            // EINVAL until the guest enables kvmclock: nothing to tell then.
            let _ = v.lock().unwrap_or_else(|e| e.into_inner()).kvmclock_ctrl();
        }
        Ok(())
    }

    /// Undoes one `pause_hold`; the vCPUs run again when none is left.
    pub fn resume_hold(&self) {
        let mut st = self.control.lock();
        if st.pause_depth == 0 {
            return;
        }
        st.pause_depth -= 1;
        if st.pause_depth == 0 {
            st.pause_requested = false;
            drop(st);
            self.control.cond.notify_all();
        }
    }

    /// Ends the VM: stops and joins every vCPU thread.
    pub fn stop(&self, why: VmExit) {
        self.control.set_exit(why);
        self.kick_all();
        let threads: Vec<JoinHandle<()>> = self.threads.lock().unwrap_or_else(|e| e.into_inner()).drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }

    /// Sends `vector` to the local APIC with ID `apic_id` as a fixed,
    /// edge-triggered MSI (how hyperpatch raises the guest's own irq_work
    /// interrupt for a guest call).
    pub fn inject_msi(&self, apic_id: u8, vector: u8) -> Result<()> {
        let msi = kvm_bindings::kvm_msi {
            address_lo: 0xfee0_0000 | (u32::from(apic_id) << 12),
            address_hi: 0,
            data: u32::from(vector),
            ..Default::default()
        };
        match self.vm_fd.signal_msi(msi) {
            Ok(n) if n > 0 => Ok(()),
            Ok(_) => Err(VmmError::Vcpu { index: usize::from(apic_id), detail: format!("MSI vector {vector:#x} was not delivered (blocked by the guest)") }),
            Err(e) => Err(VmmError::KvmIoctl { what: "KVM_SIGNAL_MSI", source: e }),
        }
    }

    /// The APIC ID of vCPU `index`: the MP table gives vCPU i the APIC ID i.
    pub fn apic_id(&self, index: usize) -> Option<u8> {
        if index < self.vcpus.len() {
            u8::try_from(index).ok()
        } else {
            None
        }
    }

    /// Arms execution traps (at most 4; empty disarms): a vCPU reaching a
    /// trap's address continues at its redirect, the VMM changing only its
    /// RIP. Applied by each vCPU thread before its next KVM_RUN; the VM is
    /// paused and resumed here so every vCPU has them on return.
    pub fn set_exec_traps(&self, traps: Vec<crate::vcpu::ExecTrap>) -> Result<()> {
        if traps.len() > 4 {
            return Err(VmmError::Config(format!("at most 4 execution traps, not {}", traps.len())));
        }
        let paused = self.pause()?;
        {
            let mut st = self.control.lock();
            st.traps = traps;
            st.traps_generation += 1;
        }
        drop(paused);
        Ok(())
    }

    /// A client of the control API pauses the VM and holds it: no guest
    /// code runs until `client_release`, not even a single step.
    pub fn client_hold(&self) -> Result<()> {
        self.pause_hold()?;
        let mut st = self.control.lock();
        if st.client_hold {
            drop(st);
            self.resume_hold();
        } else {
            st.client_hold = true;
        }
        Ok(())
    }

    /// Ends a client's hold (API `resume`).
    pub fn client_release(&self) {
        let mut st = self.control.lock();
        if !st.client_hold {
            return;
        }
        st.client_hold = false;
        drop(st);
        self.resume_hold();
    }

    /// Whether a client of the control API holds the VM paused.
    pub fn client_holds(&self) -> bool {
        self.control.lock().client_hold
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop(VmExit::Shutdown);
    }
}

/// While this lives every vCPU is stopped outside KVM_RUN; dropping it
/// resumes them. Gives registers and guest memory.
pub struct PausedVm<'a> {
    pub(crate) vm: &'a Vm,
}

impl PausedVm<'_> {
    /// The VM.
    pub fn vm(&self) -> &Vm {
        self.vm
    }

    /// Guest memory, readable and writable while paused.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.vm.mem
    }

    /// Direct access to vCPU `index`'s KVM fd (for debug controls).
    pub fn vcpu(&self, index: usize) -> Result<MutexGuard<'_, VcpuFd>> {
        let v = self
            .vm
            .vcpus
            .get(index)
            .ok_or_else(|| VmmError::Vcpu { index, detail: "no such vCPU".into() })?;
        Ok(v.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Registers, special registers and the MSRs introspection needs.
    pub fn vcpu_regs(&self, index: usize) -> Result<VcpuRegs> {
        let fd = self.vcpu(index)?;
        let e = |what: &'static str| move |err: kvm_ioctls::Error| VmmError::Vcpu { index, detail: format!("{what}: {err}") };
        let regs = fd.get_regs().map_err(e("get_regs"))?;
        let sregs = fd.get_sregs().map_err(e("get_sregs"))?;
        let ids = [MSR_EFER, MSR_LSTAR, MSR_GS_BASE, MSR_KERNEL_GS_BASE];
        let entries: Vec<kvm_bindings::kvm_msr_entry> =
            ids.iter().map(|i| kvm_bindings::kvm_msr_entry { index: *i, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|err| VmmError::Vcpu { index, detail: format!("msrs: {err:?}") })?;
        let n = fd.get_msrs(&mut msrs).map_err(e("get_msrs"))?;
        let got = msrs.as_slice();
        let val = |i: usize| if i < n { got.get(i).map(|m| m.data).unwrap_or(0) } else { 0 };
        // GS base lives in the segment register; the MSR read may not be offered.
        let gs_base = if n > 2 { val(2) } else { sregs.gs.base };
        Ok(VcpuRegs { regs, sregs, efer: sregs.efer, lstar: val(1), gs_base, kernel_gs_base: val(3) })
    }
}

/// How long a single step may take before it is reported as stuck.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

impl PausedVm<'_> {
    /// Executes exactly one guest instruction on vCPU `index` while every
    /// other vCPU stays stopped (KVM single-step with interrupts blocked),
    /// serving the port I/O it does on the way. Used to step a vCPU out of a
    /// function that is being changed.
    ///
    /// The step runs on the vCPU's own thread (its KVM_RUN, its kick
    /// signal), never on the caller's, and is refused while a client of the
    /// control API holds the VM paused: that client was promised that no
    /// guest code runs.
    pub fn single_step(&self, index: usize) -> Result<StepOutcome> {
        if index >= self.vm.vcpus.len() {
            return Err(VmmError::Vcpu { index, detail: "no such vCPU".into() });
        }
        let mut st = self.vm.control.lock();
        if st.client_hold {
            return Err(VmmError::ClientHold);
        }
        if st.exit.is_some() {
            return Err(VmmError::Stopped);
        }
        st.step_result = None;
        st.step_request = Some(index);
        drop(st);
        self.vm.control.cond.notify_all();
        let deadline = Instant::now() + STEP_TIMEOUT;
        let mut st = self.vm.control.lock();
        loop {
            if let Some((i, r)) = st.step_result.take() {
                if i == index {
                    return r.map_err(|detail| VmmError::Vcpu { index, detail });
                }
            }
            if st.exit.is_some() {
                st.step_request = None;
                return Err(VmmError::Stopped);
            }
            let now = Instant::now();
            if now >= deadline {
                st.step_request = None;
                return Err(VmmError::Vcpu { index, detail: "single step did not finish within 5 s".into() });
            }
            let (g, _) = self
                .vm
                .control
                .cond
                .wait_timeout(st, (deadline - now).min(Duration::from_millis(50)))
                .unwrap_or_else(|e| e.into_inner());
            st = g;
        }
    }
}

impl Drop for PausedVm<'_> {
    fn drop(&mut self) {
        self.vm.resume_hold();
    }
}

/// LINT0 as ExtINT and LINT1 as NMI, as a BIOS would leave them.
fn set_lint(fd: &VcpuFd) -> Result<()> {
    let mut lapic = fd.get_lapic().map_err(VmmError::ioctl("KVM_GET_LAPIC"))?;
    let set = |regs: &mut [i8], off: usize, mode: u32| {
        if let Some(slice) = regs.get_mut(off..off + 4) {
            let mut b = [0u8; 4];
            for (d, s) in b.iter_mut().zip(slice.iter()) {
                *d = *s as u8;
            }
            let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
            for (d, s) in slice.iter_mut().zip(v.to_le_bytes()) {
                *d = s as i8;
            }
        }
    };
    set(&mut lapic.regs, 0x350, 7); // LVT0: ExtINT
    set(&mut lapic.regs, 0x360, 4); // LVT1: NMI
    fd.set_lapic(&lapic).map_err(VmmError::ioctl("KVM_SET_LAPIC"))
}

fn init_fpu(fd: &VcpuFd) -> Result<()> {
    let fpu = kvm_bindings::kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    fd.set_fpu(&fpu).map_err(VmmError::ioctl("KVM_SET_FPU"))
}

/// CPUID leaf 1 EAX and EDX for the MP table.
fn cpu_signature(fd: &VcpuFd) -> (u32, u32) {
    match fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES) {
        Ok(c) => c
            .as_slice()
            .iter()
            .find(|e| e.function == 1)
            .map(|e| (e.eax, e.edx))
            .unwrap_or((0x600, 0x201)),
        Err(_) => (0x600, 0x201),
    }
}
