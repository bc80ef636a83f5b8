//! Snapshots: guest memory as a sparse raw file plus every vCPU's and
//! device's state as JSON. Restore maps the memory file copy-on-write
//! (MAP_PRIVATE), so a restore takes milliseconds and many guests can start
//! from one snapshot side by side.

use std::fs::{self, File};
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VcpuFd;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::{ConsoleOut, PioBus, SerialConsole, SerialSnapshot, SERIAL_IRQ};
use crate::error::{Result, VmmError};
use crate::layout::MemoryLayout;
use crate::vm::{PausedVm, Vm};

/// Version of the snapshot format. A snapshot of any other version is
/// refused; caches of snapshots key on it.
pub const FORMAT_VERSION: u32 = 2;
const MEMORY_FILE: &str = "memory.bin";
const STATE_FILE: &str = "state.json";
/// What the control API's extension (the patcher) keeps of its own state.
const EXTENSION_FILE: &str = "extension.json";
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

#[derive(serde::Serialize, serde::Deserialize)]
struct VcpuState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: Option<kvm_xcrs>,
    msrs: Vec<kvm_msr_entry>,
    lapic: kvm_lapic_state,
    events: kvm_vcpu_events,
    mp_state: kvm_mp_state,
    debugregs: kvm_debugregs,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct VmState {
    version: u32,
    layout: MemoryLayout,
    vcpus: Vec<VcpuState>,
    pic_master: kvm_irqchip,
    pic_slave: kvm_irqchip,
    ioapic: kvm_irqchip,
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
    serial: SerialSnapshot,
}

fn snap_err(what: &str) -> impl Fn(kvm_ioctls::Error) -> VmmError + '_ {
    move |e| VmmError::Snapshot(format!("{what}: {e}"))
}

/// MSRs KVM can save for this vCPU (each probed alone, once).
fn saveable_msrs(vm: &Vm, fd: &VcpuFd) -> Result<Vec<u32>> {
    let list = vm.kvm.get_msr_index_list().map_err(snap_err("KVM_GET_MSR_INDEX_LIST"))?;
    let mut ok = Vec::new();
    for idx in list.as_slice() {
        let mut one = Msrs::from_entries(&[kvm_msr_entry { index: *idx, ..Default::default() }])
            .map_err(|e| VmmError::Snapshot(format!("msrs: {e:?}")))?;
        if fd.get_msrs(&mut one).map(|n| n == 1).unwrap_or(false) {
            ok.push(*idx);
        }
    }
    Ok(ok)
}

fn save_vcpu(vm: &Vm, fd: &VcpuFd) -> Result<VcpuState> {
    let ids = saveable_msrs(vm, fd)?;
    let entries: Vec<kvm_msr_entry> = ids.iter().map(|i| kvm_msr_entry { index: *i, ..Default::default() }).collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|e| VmmError::Snapshot(format!("msrs: {e:?}")))?;
    let n = fd.get_msrs(&mut msrs).map_err(snap_err("KVM_GET_MSRS"))?;
    let msrs = msrs.as_slice().iter().take(n).copied().collect();
    Ok(VcpuState {
        regs: fd.get_regs().map_err(snap_err("KVM_GET_REGS"))?,
        sregs: fd.get_sregs().map_err(snap_err("KVM_GET_SREGS"))?,
        xsave: fd.get_xsave().map_err(snap_err("KVM_GET_XSAVE"))?,
        xcrs: fd.get_xcrs().ok(),
        msrs,
        lapic: fd.get_lapic().map_err(snap_err("KVM_GET_LAPIC"))?,
        events: fd.get_vcpu_events().map_err(snap_err("KVM_GET_VCPU_EVENTS"))?,
        mp_state: fd.get_mp_state().map_err(snap_err("KVM_GET_MP_STATE"))?,
        debugregs: fd.get_debug_regs().map_err(snap_err("KVM_GET_DEBUGREGS"))?,
    })
}

fn irqchip(vm: &Vm, id: u32) -> Result<kvm_irqchip> {
    let mut c = kvm_irqchip { chip_id: id, ..Default::default() };
    vm.vm_fd.get_irqchip(&mut c).map_err(snap_err("KVM_GET_IRQCHIP"))?;
    Ok(c)
}

/// Writes a snapshot of the paused VM to `dir` (created if missing), with
/// `extension`, the state of whatever changed the guest from outside (the
/// patcher's patches, sites and transition), when there is one.
pub fn save(paused: &PausedVm<'_>, dir: &Path, extension: Option<&serde_json::Value>) -> Result<()> {
    let vm = paused.vm();
    fs::create_dir_all(dir).map_err(|source| VmmError::File { path: dir.into(), source })?;
    let mut vcpus = Vec::new();
    for i in 0..vm.vcpu_count() {
        let fd = paused.vcpu(i)?;
        vcpus.push(save_vcpu(vm, &fd)?);
    }
    let serial = {
        let bus = vm.bus.lock().unwrap_or_else(|e| e.into_inner());
        SerialSnapshot::from(&bus.console.serial.state())
    };
    let state = VmState {
        version: FORMAT_VERSION,
        layout: vm.layout,
        vcpus,
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.vm_fd.get_pit2().map_err(snap_err("KVM_GET_PIT2"))?,
        clock: vm.vm_fd.get_clock().map_err(snap_err("KVM_GET_CLOCK"))?,
        serial,
    };
    write_memory(&vm.mem, vm.layout.total_size(), &dir.join(MEMORY_FILE))?;
    let ext_path = dir.join(EXTENSION_FILE);
    match extension {
        Some(v) => {
            let json = serde_json::to_vec(v).map_err(|e| VmmError::Snapshot(format!("encoding extension state: {e}")))?;
            write_atomically(&ext_path, &json)?;
        }
        None => match fs::remove_file(&ext_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(VmmError::File { path: ext_path, source }),
        },
    }
    // state.json last: a snapshot dir is complete once it exists.
    let json = serde_json::to_vec(&state).map_err(|e| VmmError::Snapshot(format!("encoding state: {e}")))?;
    write_atomically(&dir.join(STATE_FILE), &json)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    fs::write(&tmp, bytes).map_err(|source| VmmError::File { path: tmp.clone(), source })?;
    fs::rename(&tmp, path).map_err(|source| VmmError::File { path: tmp, source })
}

/// Reads `state.json`, refusing any format version but this one before
/// the rest is decoded, so another version is never misread.
fn read_state(dir: &Path) -> Result<VmState> {
    #[derive(serde::Deserialize)]
    struct VersionOnly {
        version: u64,
    }
    let state_path = dir.join(STATE_FILE);
    let raw = fs::read(&state_path).map_err(|source| VmmError::File { path: state_path.clone(), source })?;
    let v: VersionOnly = serde_json::from_slice(&raw)
        .map_err(|e| VmmError::Snapshot(format!("{} is not a hyperpatch snapshot: {e}", state_path.display())))?;
    if v.version != u64::from(FORMAT_VERSION) {
        return Err(VmmError::SnapshotVersion { path: state_path, found: v.version, supported: FORMAT_VERSION });
    }
    serde_json::from_slice(&raw)
        .map_err(|e| VmmError::Snapshot(format!("{} is not a hyperpatch snapshot: {e}", state_path.display())))
}

/// The extension state saved with the snapshot in `dir`, if any. Checks
/// the snapshot's format version first.
pub fn extension_state(dir: &Path) -> Result<Option<serde_json::Value>> {
    read_state(dir)?;
    let path = dir.join(EXTENSION_FILE);
    match fs::read(&path) {
        Ok(raw) => serde_json::from_slice(&raw)
            .map(Some)
            .map_err(|e| VmmError::Snapshot(format!("{} is malformed: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(VmmError::File { path, source }),
    }
}

/// Writes guest memory as a sparse file: all-zero pages are holes.
fn write_memory(mem: &GuestMemoryMmap, total: u64, path: &Path) -> Result<()> {
    let ferr = |source| VmmError::File { path: path.into(), source };
    let mut f = File::create(path).map_err(ferr)?;
    f.set_len(total).map_err(ferr)?;
    const CHUNK: usize = 64 << 10;
    let mut buf = vec![0u8; CHUNK];
    let mut addr = 0u64;
    while addr < total {
        let len = CHUNK.min((total - addr) as usize);
        let slice = mem
            .get_slice(GuestAddress(addr), len)
            .map_err(|e| VmmError::Snapshot(format!("reading guest memory at {addr:#x}: {e}")))?;
        let b = buf.get_mut(..len).ok_or_else(|| VmmError::Snapshot("buffer".into()))?;
        slice.copy_to(b);
        for (i, page) in b.chunks(4096).enumerate() {
            if page.iter().any(|x| *x != 0) {
                f.seek(SeekFrom::Start(addr + (i as u64) * 4096)).map_err(ferr)?;
                f.write_all(page).map_err(ferr)?;
            }
        }
        addr += len as u64;
    }
    f.sync_data().map_err(ferr)?;
    Ok(())
}

/// Starts a VM from the snapshot in `dir`.
pub fn restore(dir: &Path, console: Box<dyn Write + Send>) -> Result<Vm> {
    let state = read_state(dir)?;
    let n = state.vcpus.len();
    if n == 0 || n > usize::from(crate::vm::MAX_VCPUS) {
        return Err(VmmError::Snapshot(format!("snapshot has {n} vCPUs")));
    }
    let mem_path = dir.join(MEMORY_FILE);
    let file = File::open(&mem_path).map_err(|source| VmmError::File { path: mem_path.clone(), source })?;
    let size = file.metadata().map_err(|source| VmmError::File { path: mem_path.clone(), source })?.len();
    if size != state.layout.total_size() {
        return Err(VmmError::Snapshot(format!(
            "{} has {size} bytes, the snapshot says {}",
            mem_path.display(),
            state.layout.total_size()
        )));
    }
    let region = MmapRegionBuilder::new(size as usize)
        .with_file_offset(FileOffset::new(file, 0))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
        .build()
        .map_err(|e| VmmError::Snapshot(format!("mapping {}: {e}", mem_path.display())))?;
    let region = GuestRegionMmap::new(region, GuestAddress(0))
        .ok_or_else(|| VmmError::Snapshot("guest memory region overflows".into()))?;
    let mem = GuestMemoryMmap::from_regions(vec![region]).map_err(|e| VmmError::Snapshot(format!("{e}")))?;
    let _ = mem.num_regions();

    let (kvm, vm_fd) = Vm::create_kvm(&mem)?;
    let mut vcpus = Vec::new();
    for (i, s) in state.vcpus.iter().enumerate() {
        let fd = Vm::create_vcpu(&kvm, &vm_fd, i as u8, n as u8)?;
        restore_vcpu(&fd, s)?;
        vcpus.push(fd);
    }
    vm_fd.set_irqchip(&state.pic_master).map_err(snap_err("KVM_SET_IRQCHIP (PIC master)"))?;
    vm_fd.set_irqchip(&state.pic_slave).map_err(snap_err("KVM_SET_IRQCHIP (PIC slave)"))?;
    vm_fd.set_irqchip(&state.ioapic).map_err(snap_err("KVM_SET_IRQCHIP (IOAPIC)"))?;
    vm_fd.set_pit2(&state.pit).map_err(snap_err("KVM_SET_PIT2"))?;
    let mut clock = state.clock;
    clock.flags = 0;
    vm_fd.set_clock(&clock).map_err(snap_err("KVM_SET_CLOCK"))?;

    let irq = EventFd::new(libc::EFD_NONBLOCK)?;
    vm_fd.register_irqfd(&irq, SERIAL_IRQ).map_err(snap_err("KVM_IRQFD"))?;
    let out = ConsoleOut::new(console);
    let (panicked, written) = (out.panicked.clone(), out.written.clone());
    let console = SerialConsole::from_state(&(&state.serial).into(), irq, out).map_err(VmmError::Snapshot)?;
    let mut vm = Vm::assemble(kvm, vm_fd, mem, state.layout, vcpus, PioBus::new(console), (panicked, written))?;
    vm.start()?;
    let _ = Arc::strong_count(&vm.control);
    Ok(vm)
}

/// The registers of every vCPU in a snapshot, for offline introspection.
pub fn load_vcpu_regs(dir: &Path) -> Result<Vec<crate::vm::VcpuRegs>> {
    let state = read_state(dir)?;
    Ok(state
        .vcpus
        .iter()
        .map(|v| {
            let msr = |i: u32| v.msrs.iter().find(|m| m.index == i).map(|m| m.data).unwrap_or(0);
            crate::vm::VcpuRegs {
                regs: v.regs,
                sregs: v.sregs,
                efer: v.sregs.efer,
                lstar: msr(crate::vm::MSR_LSTAR),
                gs_base: v.sregs.gs.base,
                kernel_gs_base: msr(crate::vm::MSR_KERNEL_GS_BASE),
            }
        })
        .collect())
}

/// Path of the raw guest-physical memory file inside a snapshot.
pub fn memory_file(dir: &Path) -> std::path::PathBuf {
    dir.join(MEMORY_FILE)
}

fn restore_vcpu(fd: &VcpuFd, s: &VcpuState) -> Result<()> {
    fd.set_sregs(&s.sregs).map_err(snap_err("KVM_SET_SREGS"))?;
    let msrs = Msrs::from_entries(&s.msrs).map_err(|e| VmmError::Snapshot(format!("msrs: {e:?}")))?;
    let n = fd.set_msrs(&msrs).map_err(snap_err("KVM_SET_MSRS"))?;
    if n != s.msrs.len() {
        let bad = s.msrs.get(n).map(|m| m.index).unwrap_or(0);
        return Err(VmmError::Snapshot(format!("KVM refused MSR {bad:#x} ({n} of {} set)", s.msrs.len())));
    }
    fd.set_regs(&s.regs).map_err(snap_err("KVM_SET_REGS"))?;
    // SAFETY: `kvm_xsave` comes from KVM_GET_XSAVE on the same host kind; the
    // ioctl reads exactly size_of::<kvm_xsave>() bytes from it.
    unsafe { fd.set_xsave(&s.xsave) }.map_err(snap_err("KVM_SET_XSAVE"))?;
    if let Some(x) = &s.xcrs {
        fd.set_xcrs(x).map_err(snap_err("KVM_SET_XCRS"))?;
    }
    fd.set_debug_regs(&s.debugregs).map_err(snap_err("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&s.lapic).map_err(snap_err("KVM_SET_LAPIC"))?;
    // The TSC deadline only sticks once the LAPIC is in deadline mode.
    if let Some(d) = s.msrs.iter().find(|m| m.index == MSR_IA32_TSC_DEADLINE) {
        let saved_tsc = s.msrs.iter().find(|m| m.index == MSR_IA32_TSC).map(|m| m.data);
        let deadline = kvm_msr_entry { data: rebased_deadline(d.data, saved_tsc, guest_tsc(fd)), ..*d };
        let m = Msrs::from_entries(&[deadline]).map_err(|e| VmmError::Snapshot(format!("msrs: {e:?}")))?;
        let _ = fd.set_msrs(&m);
    }
    fd.set_mp_state(s.mp_state).map_err(snap_err("KVM_SET_MP_STATE"))?;
    fd.set_vcpu_events(&s.events).map_err(snap_err("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// The vCPU's TSC as the guest reads it now (None if KVM will not say).
fn guest_tsc(fd: &VcpuFd) -> Option<u64> {
    let mut m = Msrs::from_entries(&[kvm_msr_entry { index: MSR_IA32_TSC, ..Default::default() }]).ok()?;
    match fd.get_msrs(&mut m) {
        Ok(1) => m.as_slice().first().map(|e| e.data),
        _ => None,
    }
}

/// A saved TSC deadline moved to the restored vCPU's TSC: the same time left
/// until it fires as when the snapshot was taken. Some KVMs (this machine's
/// `kvm_pvm`) give the guest the host TSC whatever IA32_TSC is set to, so
/// the saved deadline is in another TSC's terms: in the past after a
/// while (the timer fires at once), or far in the future after a host reboot
/// (the guest's timer would stall). Where KVM did restore the TSC this
/// changes nothing. 0 (disarmed) stays 0; a deadline that had passed fires at
/// once.
fn rebased_deadline(deadline: u64, saved_tsc: Option<u64>, now: Option<u64>) -> u64 {
    match (deadline, saved_tsc, now) {
        (0, _, _) => 0,
        (d, Some(then), Some(now)) => now.saturating_add(d.saturating_sub(then)).max(1),
        (d, _, _) => d,
    }
}

#[cfg(test)]
mod tests {
    use super::rebased_deadline;

    #[test]
    fn tsc_deadline_keeps_the_time_left() {
        // Disarmed stays disarmed.
        assert_eq!(rebased_deadline(0, Some(1000), Some(5_000_000)), 0);
        // 300 cycles were left: still 300 after the TSC jumped, forward or back.
        assert_eq!(rebased_deadline(1300, Some(1000), Some(5_000_000)), 5_000_300);
        assert_eq!(rebased_deadline(5_000_300, Some(5_000_000), Some(1000)), 1300);
        // Already due: fires at once.
        assert_eq!(rebased_deadline(900, Some(1000), Some(5_000_000)), 5_000_000);
        // Nothing to rebase against: as saved.
        assert_eq!(rebased_deadline(1300, None, Some(5_000_000)), 1300);
        assert_eq!(rebased_deadline(1300, Some(1000), None), 1300);
        assert_eq!(rebased_deadline(u64::MAX, Some(0), Some(10)), u64::MAX);
    }
}
