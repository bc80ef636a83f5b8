//! The patch engine: the stack of patches, the func stack of every call site
//! (the newest enabled patch wins), and transitions done at one global safe
//! point: every vCPU stopped, every task's stack and every vCPU's registers
//! checked, then every changed site written at once, or nothing.

use std::collections::BTreeMap;

use introspect::ftrace::{decode_site, SiteInsn, NOP5};
use introspect::kernel::Kernel;
use introspect::stacks::Unwinder;
use introspect::translate::KernelMemory;
use serde::{Deserialize, Serialize};

use crate::error::{PatchError, Result};
use crate::guest::GuestWriter;
use crate::guest_call::{CallArg, CallEngine, CallTicket};
use crate::link::{LinkedModule, SymbolResolver};
use crate::lifecycle::Staged;
use crate::module::{PatchSpec, StateSpec};
use crate::placement::{Allocation, AreaKind, Region};

const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];
const FTRACE_FL_DISABLED: u64 = 1 << 25;

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

/// A call site hyperpatch owns.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SiteState {
    pub function: String,
    pub site: u64,
    pub original: [u8; 5],
    /// The guest's ftrace record flags (address, value before we owned it).
    pub record: Option<(u64, u64)>,
    /// Target the site jumps to now (`None`: original bytes).
    pub active: Option<u64>,
}

/// A task that holds a transition back.
#[derive(Clone, Debug, Serialize)]
pub struct Blocker {
    pub pid: i32,
    pub comm: String,
    pub function: String,
    pub frame: String,
    /// The stack could not be unwound reliably (that alone blocks).
    pub unreliable: bool,
    /// The vCPU the task is running on, if it is running.
    pub running_on: Option<usize>,
}

impl std::fmt::Display for Blocker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.unreliable {
            write!(f, "pid {} ({}): unreliable stack: {}", self.pid, self.comm, self.frame)
        } else {
            write!(f, "pid {} ({}) in {} at {}", self.pid, self.comm, self.function, self.frame)
        }
    }
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

/// KLP_PATCHED in `task_struct.patch_state`: the mark of a migrated task.
const TASK_MIGRATED: i32 = 1;
/// KLP_UNDEFINED: the value every task has outside livepatch transitions.
const TASK_UNDEFINED: i32 = -1;
const STUB_SIZE: u64 = 32;

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

/// A per-task transition in progress.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct TaskTransition {
    patch: String,
    /// Site targets once every task is migrated.
    desired: BTreeMap<u64, Option<u64>>,
    /// Code that unmigrated tasks may still run (must leave their stacks).
    old_ranges: Vec<(String, u64, u64)>,
    /// (site, stub allocation, site bytes before the transition).
    stubs: Vec<(u64, Allocation, [u8; 5])>,
    /// Set `enabled` to this when it completes (disable/enable).
    enable_to: Option<bool>,
    /// The transitioning patch replaces all others when it completes.
    replace: bool,
    /// Code migrated tasks run (must leave their stacks to go back).
    new_ranges: Vec<(String, u64, u64)>,
    /// Sent back: tasks converge to the state before the transition.
    reversed: bool,
    /// The transition applies a new patch (reversing it removes the patch).
    applying: bool,
    /// Forced: every task is migrated now, reliable stack or not.
    #[serde(default)]
    forced: bool,
}

/// Version of the patcher's saved state (in snapshots). Another version
/// is refused, never misread.
pub const STATE_VERSION: u32 = 1;

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

/// Resolves symbols through guest kallsyms and module symbols;
/// `klp_enable_patch` goes to hyperpatch's hook when one is given.
pub(crate) struct GuestResolver<'a, 'm> {
    pub k: &'a Kernel<'m>,
    pub klp_enable_patch: Option<u64>,
    /// hyperpatch's `klp_get_prev_state()` (the guest's sees only its own patches).
    pub klp_get_prev_state: Option<u64>,
}

impl SymbolResolver for GuestResolver<'_, '_> {
    fn resolve(&self, object: Option<&str>, name: &str, sympos: u64) -> Result<u64> {
        if let (None, "klp_enable_patch", Some(hook)) = (object, name, self.klp_enable_patch) {
            return Ok(hook);
        }
        if let (None, "klp_get_prev_state", Some(f)) = (object, name, self.klp_get_prev_state) {
            return Ok(f);
        }
        match object {
            None => match self.k.syms.address_of(name, sympos as u32) {
                Ok(a) => Ok(a),
                Err(introspect::IntrospectError::NoSymbol(_)) => {
                    // Exported by a loaded module?
                    for m in self.k.modules()? {
                        if let Some(s) = self.k.module_symbols(&m)?.into_iter().find(|s| s.name == name) {
                            return Ok(s.addr);
                        }
                    }
                    Err(PatchError::MissingSymbol { name: name.into() })
                }
                Err(e) => Err(PatchError::Function { name: name.into(), detail: e.to_string() }),
            },
            Some(obj) => module_symbol(self.k, obj, name, sympos),
        }
    }
}

fn module_symbol(k: &Kernel<'_>, obj: &str, name: &str, sympos: u64) -> Result<u64> {
    module_function(k, obj, name, sympos).map(|(a, _)| a)
}

/// Address and size of function `name` of loaded module `obj`.
fn module_function(k: &Kernel<'_>, obj: &str, name: &str, sympos: u64) -> Result<(u64, u64)> {
    let m = k
        .modules()?
        .into_iter()
        .find(|m| m.name == obj)
        .ok_or_else(|| PatchError::Function { name: name.into(), detail: format!("module {obj} is not loaded") })?;
    let syms: Vec<(u64, u64)> = k.module_symbols(&m)?.into_iter().filter(|s| s.name == name).map(|s| (s.addr, s.size)).collect();
    let addrs: Vec<u64> = syms.iter().map(|s| s.0).collect();
    let a = pick(name, &addrs, sympos)?;
    let size = syms.iter().find(|s| s.0 == a).map(|s| s.1).unwrap_or(0);
    if size == 0 {
        return Err(PatchError::Function { name: name.into(), detail: format!("module {obj} gives no size for it") });
    }
    Ok((a, size))
}

fn pick(name: &str, hits: &[u64], sympos: u64) -> Result<u64> {
    match (hits.len(), sympos) {
        (0, _) => Err(PatchError::MissingSymbol { name: name.into() }),
        (1, 0) | (1, 1) => Ok(hits[0]),
        (_, 0) => Err(PatchError::Function { name: name.into(), detail: format!("{} symbols have this name: give old_sympos", hits.len()) }),
        (n, p) => hits.get((p - 1) as usize).copied().ok_or_else(|| PatchError::Function {
            name: name.into(),
            detail: format!("old_sympos {p} but only {n} symbols have this name"),
        }),
    }
}

fn write_virt(k: &Kernel<'_>, w: &dyn GuestWriter, va: u64, bytes: &[u8]) -> Result<()> {
    // Sites never cross a page: a 5-byte instruction may, so write bytewise by page.
    let mut done = 0usize;
    while done < bytes.len() {
        let at = field(va, done as u64)?;
        let pa = k.mem.translate(at)?;
        let room = (0x1000 - (at & 0xfff)) as usize;
        let n = room.min(bytes.len() - done);
        w.write_phys(pa, &bytes[done..done + n])?;
        done += n;
    }
    Ok(())
}

/// `base + off` for guest-derived addresses: overflow is an error, not a panic.
fn field(base: u64, off: u64) -> Result<u64> {
    base.checked_add(off).ok_or(PatchError::Guest(introspect::IntrospectError::Overflow(base)))
}

/// The functions a patch changes as placed: each resolved old function
/// (spec, object, address, size, site) with its new function's address in
/// `linked`. A new function of unknown size is refused.
#[allow(clippy::type_complexity)]
pub(crate) fn patched_funcs(
    linked: &LinkedModule,
    funcs: &[(crate::module::FuncSpec, Option<String>, u64, u64, u64)],
) -> Result<Vec<PatchedFunc>> {
    let mut out = Vec::new();
    for (f, object, old_addr, old_size, site) in funcs {
        let new_addr = linked.address(f.new_section, f.new_offset).ok_or_else(|| PatchError::Function {
            name: f.old_name.clone(),
            detail: "new function's section was not placed".into(),
        })?;
        if f.new_size == 0 {
            return Err(PatchError::Function { name: f.new_symbol.clone(), detail: "its size is unknown".into() });
        }
        out.push(PatchedFunc {
            object: object.clone(),
            old_name: f.old_name.clone(),
            old_sympos: f.old_sympos,
            old_addr: *old_addr,
            old_size: *old_size,
            site: *site,
            new_symbol: f.new_symbol.clone(),
            new_addr,
            new_size: f.new_size,
        });
    }
    Ok(out)
}

fn jmp_bytes(site: u64, target: u64) -> Result<[u8; 5]> {
    let rel = i128::from(target) - i128::from(site) - 5;
    let rel = i32::try_from(rel).map_err(|_| PatchError::Site {
        name: String::new(),
        site,
        detail: format!("target {target:#x} out of rel32 reach"),
    })?;
    let mut b = [0xe9, 0, 0, 0, 0];
    b[1..].copy_from_slice(&rel.to_le_bytes());
    Ok(b)
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
        region.map(k.mem.phys(), w, cpu0.cr3, cpu0.la57())?;
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
            let virt = Region::choose_virt_base(end, self.reserved_size)?;
            self.region = Some(Region::new(self.reserved_phys, self.reserved_size, virt)?);
        }
        self.region.as_mut().ok_or_else(|| PatchError::State("region".into()))
    }

    /// The target each owned site should jump to with `patches` as given.
    pub(crate) fn desired(patches: &[Patch]) -> BTreeMap<u64, Option<u64>> {
        let mut d: BTreeMap<u64, Option<u64>> = BTreeMap::new();
        for p in patches {
            for f in &p.funcs {
                let e = d.entry(f.site).or_insert(None);
                if p.enabled {
                    *e = Some(f.new_addr);
                }
            }
        }
        d
    }

    /// The code range running now for an owned site (or the original function).
    fn current_range(&self, site: u64, fallback: (u64, u64)) -> (String, u64, u64) {
        let active = self.sites.get(&site).and_then(|s| s.active);
        if let Some(t) = active {
            for p in &self.patches {
                for f in &p.funcs {
                    if f.site == site && f.new_addr == t {
                        return (f.new_symbol.clone(), f.new_addr, f.new_size);
                    }
                }
            }
        }
        let name = self.sites.get(&site).map(|s| s.function.clone()).unwrap_or_default();
        (name, fallback.0, fallback.1)
    }

    /// Every task whose stack (or vCPU) is inside one of `ranges`.
    pub fn blockers(k: &Kernel<'_>, u: &Unwinder, ranges: &[(String, u64, u64)]) -> Result<Vec<Blocker>> {
        let tasks = k.tasks()?;
        Self::blockers_of(k, u, ranges, &tasks)
    }

    fn blockers_of(
        k: &Kernel<'_>,
        u: &Unwinder,
        ranges: &[(String, u64, u64)],
        tasks: &[introspect::tasks::Task],
    ) -> Result<Vec<Blocker>> {
        let mut out = Vec::new();
        let modules = std::cell::OnceCell::new();
        for t in tasks {
            let st = k.unwind_task(u, t);
            if !st.reliable {
                out.push(Blocker {
                    pid: t.pid,
                    comm: t.comm.clone(),
                    function: String::new(),
                    frame: st.reason.clone().unwrap_or_else(|| "unreliable".into()),
                    unreliable: true,
                    running_on: t.running_on,
                });
                continue;
            }
            for f in &st.frames {
                // A return address may sit just past its function's end.
                let ip = if f.is_return_address() { f.ip.saturating_sub(1) } else { f.ip };
                if let Some((name, _, _)) = ranges.iter().find(|(_, a, s)| ip >= *a && ip < a.saturating_add(*s)) {
                    out.push(Blocker {
                        pid: t.pid,
                        comm: t.comm.clone(),
                        function: name.clone(),
                        frame: {
                            let mods = modules.get_or_init(|| k.modules().unwrap_or_default());
                            let sym = introspect::stacks::Symbolizer::new(k, mods);
                            if f.is_return_address() { sym.return_address(f.ip) } else { sym.exact(f.ip) }
                        },
                        unreliable: false,
                        running_on: t.running_on,
                    });
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Writes every site of `desired` that differs from now, and hands the
    /// guest's ftrace records over (a site we jump from is marked
    /// FTRACE_FL_DISABLED so the guest's ftrace leaves it alone; a site back
    /// to its original bytes gets its flags back). Rolls back everything
    /// already written if one write fails.
    pub(crate) fn switch_sites(&mut self, k: &Kernel<'_>, w: &dyn GuestWriter, desired: &BTreeMap<u64, Option<u64>>) -> Result<usize> {
        let mut written: Vec<(u64, u64, Vec<u8>)> = Vec::new(); // (virt, phys?, old bytes) via write_virt
        let mut result = Ok(());
        let mut plan: Vec<(u64, Vec<u8>)> = Vec::new();
        for (site, target) in desired {
            let Some(s) = self.sites.get(site) else { continue };
            if s.active == *target {
                continue;
            }
            let mut now = [0u8; 5];
            k.mem.read_virt(*site, &mut now)?;
            let expect = match s.active {
                Some(t) => jmp_bytes(*site, t)?,
                None => s.original,
            };
            if now != expect {
                return Err(PatchError::Site {
                    name: s.function.clone(),
                    site: *site,
                    detail: format!("holds {now:02x?}, expected {expect:02x?}: changed behind hyperpatch's back"),
                });
            }
            let bytes = match target {
                Some(t) => jmp_bytes(*site, *t)?,
                None => s.original,
            };
            plan.push((*site, bytes.to_vec()));
            if let Some((addr, orig)) = s.record {
                let cur = k.mem.read_u64(addr)?;
                let new = match (s.active, target) {
                    (None, Some(_)) => {
                        if cur & (introspect::ftrace::FTRACE_FL_ENABLED | introspect::ftrace::FTRACE_REF_MASK) != 0 {
                            return Err(PatchError::Site {
                                name: s.function.clone(),
                                site: *site,
                                detail: format!("the guest's ftrace uses this site now (flags {cur:#x})"),
                            });
                        }
                        cur | FTRACE_FL_DISABLED
                    }
                    (Some(_), None) => (cur & !FTRACE_FL_DISABLED) | (orig & FTRACE_FL_DISABLED),
                    _ => cur,
                };
                if new != cur {
                    plan.push((addr, new.to_le_bytes().to_vec()));
                }
            }
        }
        for (va, bytes) in &plan {
            let old = match k.mem.read_bytes(*va, bytes.len()) {
                Ok(o) => o,
                Err(e) => {
                    result = Err(e.into());
                    break;
                }
            };
            if let Err(e) = write_virt(k, w, *va, bytes) {
                result = Err(e);
                break;
            }
            written.push((*va, 0, old));
        }
        if let Err(e) = result {
            for (va, _, old) in written.iter().rev() {
                let _ = write_virt(k, w, *va, old);
            }
            return Err(e);
        }
        let mut n = 0;
        for (site, target) in desired {
            if let Some(s) = self.sites.get_mut(site) {
                if s.active != *target {
                    n += 1;
                }
                s.active = *target;
            }
        }
        Ok(n)
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
        let staged = self.staged.clone().ok_or_else(|| PatchError::State("no module is loaded to apply".into()))?;
        let spec = staged.spec.clone().ok_or_else(|| PatchError::State(format!("{}: its klp_patch was not read", staged.name)))?;
        if self.patches.iter().any(|p| p.name == staged.name) {
            return Err(PatchError::Duplicate(staged.name.clone()));
        }
        let replace = spec.replace;
        self.check_states(&staged.name, &spec.states, replace)?;
        let (funcs, new_sites) = self.resolve_funcs(k, records, &spec)?;
        // Safety: the code running now at every site must be on no stack.
        let mut ranges: Vec<(String, u64, u64)> =
            funcs.iter().map(|(f, _, a, s, site)| self.current_range_or(*site, &f.old_name, *a, *s)).collect();
        if replace {
            let mine: std::collections::BTreeSet<u64> = funcs.iter().map(|f| f.4).collect();
            for s in self.sites.values() {
                if s.active.is_some() && !mine.contains(&s.site) {
                    ranges.push(self.current_range(s.site, (s.site, 5)));
                }
            }
        }
        let blockers = Self::blockers(k, u, &ranges)?;
        let per_task = !blockers.is_empty() && !opts.force && opts.per_task;
        if !blockers.is_empty() && !opts.force && !per_task {
            return Ok(Outcome::Blocked(blockers));
        }
        if self.transition.is_some() {
            return Err(PatchError::State("a per-task transition is still running".into()));
        }
        // The module is placed (staged); its new functions are in it.
        let linked = staged.linked.clone();
        let pfuncs = patched_funcs(&linked, &funcs)?;
        for s in &new_sites {
            self.sites.insert(s.site, s.clone());
        }
        let patch = Patch {
            id: self.next_id,
            name: staged.name.clone(),
            path: staged.path.clone(),
            enabled: true,
            replace,
            forced: !blockers.is_empty() && !per_task,
            states: spec.states.clone(),
            funcs: pfuncs,
            linked: linked.clone(),
            exit: staged.exit,
            this_module: staged.this_module,
            spec: Some(spec.clone()),
            params: staged.params.clone(),
        };
        self.patches.push(patch);
        let mut desired = Self::desired(&self.patches);
        if replace {
            // Nops: every site the new patch does not change returns to the original code.
            let mine: std::collections::BTreeSet<u64> = funcs.iter().map(|f| f.4).collect();
            for (site, t) in desired.iter_mut() {
                if !mine.contains(site) {
                    *t = None;
                }
            }
        }
        let switched = if per_task {
            self.start_task_transition(k, w, u, &staged.name, desired, ranges, None, replace)
        } else {
            self.switch_sites(k, w, &desired).map(|n| Outcome::Switched { sites: n, forced: !blockers.is_empty() })
        };
        match switched {
            Ok(outcome) => {
                self.next_id += 1;
                self.staged = None;
                if replace && matches!(outcome, Outcome::Switched { .. }) && !per_task {
                    self.drop_replaced(w)?;
                }
                Ok(outcome)
            }
            Err(e) => {
                self.patches.pop();
                for s in &new_sites {
                    self.sites.remove(&s.site);
                }
                Err(e)
            }
        }
    }

    /// Every function of `spec` resolved in the guest, its call site checked
    /// (the ftrace NOP, or hyperpatch's own jmp), and the new sites it takes
    /// over; nothing is written.
    #[allow(clippy::type_complexity)]
    pub(crate) fn resolve_funcs(
        &self,
        k: &Kernel<'_>,
        records: &introspect::ftrace::FtraceRecords,
        spec: &PatchSpec,
    ) -> Result<(Vec<(crate::module::FuncSpec, Option<String>, u64, u64, u64)>, Vec<SiteState>)> {
        let guest_klp = k.klp_patches()?;
        let mut funcs = Vec::new();
        let mut new_sites: Vec<SiteState> = Vec::new();
        let loaded = k.modules()?;
        for obj in &spec.objects {
            // A module that is not loaded is patched when it loads
            // (klp_module_coming); only loaded objects are resolved now.
            if let Some(name) = &obj.name {
                if !loaded.iter().any(|m| &m.name == name) {
                    continue;
                }
            }
            for f in &obj.funcs {
                let (old_addr, old_size) = match &obj.name {
                    None => {
                        let a = k.syms.address_of(&f.old_name, f.old_sympos as u32).map_err(|e| PatchError::Function {
                            name: f.old_name.clone(),
                            detail: e.to_string(),
                        })?;
                        let size = k.syms.resolve(a).filter(|s| s.addr == a).map(|s| s.size).unwrap_or(0);
                        if size == 0 {
                            return Err(PatchError::Function { name: f.old_name.clone(), detail: "kallsyms gives no size for it".into() });
                        }
                        (a, size)
                    }
                    Some(o) => module_function(k, o, &f.old_name, f.old_sympos)?,
                };
                let head = k.mem.read_bytes(old_addr, 9)?;
                let site = if head.get(..4) == Some(&ENDBR64[..]) { field(old_addr, 4)? } else { old_addr };
                if funcs.iter().any(|x: &(crate::module::FuncSpec, Option<String>, u64, u64, u64)| x.4 == site) {
                    return Err(PatchError::Function { name: f.old_name.clone(), detail: "listed twice in the patch".into() });
                }
                let mut bytes = [0u8; 5];
                k.mem.read_virt(site, &mut bytes)?;
                let (insn, text) = decode_site(&bytes, site);
                let serr = |d: String| PatchError::Site { name: f.old_name.clone(), site, detail: d };
                if let Some(owned) = self.sites.get(&site) {
                    let ok = match (owned.active, &insn) {
                        (Some(t), SiteInsn::Jmp { target }) => *target == t,
                        (None, SiteInsn::Nop) => bytes == owned.original,
                        _ => false,
                    };
                    if !ok {
                        return Err(serr(format!("holds `{text}`, not what hyperpatch wrote there")));
                    }
                } else {
                    if insn != SiteInsn::Nop || bytes != NOP5 {
                        return Err(serr(format!("holds `{text}`, not the ftrace NOP (traced or patched by the guest?)")));
                    }
                    let mut rec = *records.by_ip.get(&site).ok_or_else(|| {
                        serr("has no ftrace record: the function is notrace and cannot be patched".into())
                    })?;
                    // The records were read before this stop: read the flags again now.
                    rec.flags = k.mem.read_u64(rec.flags_addr)?;
                    if rec.enabled() || rec.refcount() > 0 {
                        return Err(serr(format!("the guest's ftrace uses this site (flags {:#x})", rec.flags)));
                    }
                    if guest_klp.iter().flat_map(|p| &p.objects).flat_map(|o| &o.funcs).any(|gf| gf.old_func == old_addr) {
                        return Err(serr("the guest's own livepatch patches this function".into()));
                    }
                    new_sites.push(SiteState {
                        function: f.old_name.clone(),
                        site,
                        original: bytes,
                        record: Some((rec.flags_addr, rec.flags)),
                        active: None,
                    });
                }
                funcs.push((f.clone(), obj.name.clone(), old_addr, old_size, site));
            }
        }
        Ok((funcs, new_sites))
    }

    /// Checks the staged module's patch as `apply` will (states, every
    /// function and its site), changing nothing: the verdict its
    /// `klp_enable_patch()` returns.
    pub(crate) fn check_staged(&self, k: &Kernel<'_>, records: &introspect::ftrace::FtraceRecords) -> Result<()> {
        let staged = self.staged.as_ref().ok_or_else(|| PatchError::State("no module is loaded to apply".into()))?;
        let spec = staged.spec.as_ref().ok_or_else(|| PatchError::State(format!("{}: its klp_patch was not read", staged.name)))?;
        if self.patches.iter().any(|p| p.name == staged.name) {
            return Err(PatchError::Duplicate(staged.name.clone()));
        }
        self.check_states(&staged.name, &spec.states, spec.replace)?;
        self.resolve_funcs(k, records, spec)?;
        let loaded = k.modules()?;
        if let Some(unloaded) = spec.objects.iter().filter_map(|o| o.name.as_ref()).find(|n| !loaded.iter().any(|m| &m.name == *n)) {
            if let Some(why) = self.calls.as_ref().and_then(|c| c.module_traps_missing.clone()) {
                return Err(PatchError::Lifecycle {
                    module: staged.name.clone(),
                    detail: format!("it patches module {unloaded}, which is not loaded, and module loads cannot be followed: {why}"),
                });
            }
        }
        Ok(())
    }

    /// The patch in a per-task transition, if any.
    pub fn in_transition(&self) -> Option<&str> {
        self.transition.as_ref().map(|t| t.patch.as_str())
    }

    /// Starts a per-task transition toward `desired`: every changed site
    /// jumps to a dispatch stub; tasks already safe are migrated at once.
    #[allow(clippy::too_many_arguments)]
    fn start_task_transition(
        &mut self,
        k: &Kernel<'_>,
        w: &dyn GuestWriter,
        u: &Unwinder,
        patch: &str,
        desired: BTreeMap<u64, Option<u64>>,
        old_ranges: Vec<(String, u64, u64)>,
        enable_to: Option<bool>,
        replace: bool,
    ) -> Result<Outcome> {
        let ps_off = k.off("task_struct", "patch_state")?;
        let current = k.sym("current_task").or_else(|_| k.sym("pcpu_hot"))?;
        // The guest's own livepatch must not be in a transition (it owns patch_state then).
        if k.sym("klp_transition_patch").and_then(|a| k.mem.read_u64(a)).unwrap_or(0) != 0 {
            return Err(PatchError::State("the guest's own livepatch is in a transition; try again later".into()));
        }
        for t in k.tasks()? {
            let v = k.mem.read_i32(field(t.addr, ps_off)?)?;
            if v != TASK_UNDEFINED {
                return Err(PatchError::State(format!("task {} has patch_state {v}: a livepatch transition of the guest runs", t.pid)));
            }
        }
        let mut new_ranges = Vec::new();
        for (site, target) in &desired {
            let Some(st) = self.sites.get(site) else { continue };
            if st.active == *target {
                continue;
            }
            let range = match target {
                Some(t) => self
                    .patches
                    .iter()
                    .flat_map(|p| &p.funcs)
                    .find(|f| f.site == *site && f.new_addr == *t)
                    .map(|f| (f.new_symbol.clone(), f.new_addr, f.new_size)),
                None => self
                    .patches
                    .iter()
                    .flat_map(|p| &p.funcs)
                    .find(|f| f.site == *site)
                    .map(|f| (f.old_name.clone(), f.old_addr, f.old_size)),
            };
            new_ranges.extend(range);
        }
        let region = self.region.as_mut().ok_or_else(|| PatchError::State("region".into()))?;
        let mut stubs: Vec<(u64, Allocation, [u8; 5])> = Vec::new();
        let mut plan: Vec<(u64, Vec<u8>, bool)> = Vec::new(); // (addr, bytes, physical?)
        for (site, target) in &desired {
            let Some(st) = self.sites.get(site) else { continue };
            if st.active == *target {
                continue;
            }
            let body = field(*site, 5)?; // the original function after its NOP
            let new = target.unwrap_or(body);
            let old = st.active.unwrap_or(body);
            let a = region.alloc(AreaKind::Text, STUB_SIZE, 32)?;
            let code = dispatch_stub(a.virt, current, ps_off, new, old)?;
            let mut before = [0u8; 5];
            k.mem.read_virt(*site, &mut before)?;
            plan.push((a.phys, code, true));
            plan.push((*site, jmp_bytes(*site, a.virt)?.to_vec(), false));
            // The site is no longer the NOP: the guest's ftrace must leave it alone.
            if let (None, Some((addr, _))) = (st.active, st.record) {
                let cur = k.mem.read_u64(addr)?;
                if cur & (introspect::ftrace::FTRACE_FL_ENABLED | introspect::ftrace::FTRACE_REF_MASK) != 0 {
                    return Err(PatchError::Site { name: st.function.clone(), site: *site, detail: format!("the guest's ftrace uses this site (flags {cur:#x})") });
                }
                plan.push((k.mem.translate(addr)?, (cur | FTRACE_FL_DISABLED).to_le_bytes().to_vec(), true));
            }
            stubs.push((*site, a, before));
        }
        for (addr, bytes, phys) in &plan {
            if *phys {
                w.write_phys(*addr, bytes)?;
            }
        }
        for (addr, bytes, phys) in &plan {
            if !*phys {
                write_virt(k, w, *addr, bytes)?;
            }
        }
        self.transition = Some(TaskTransition {
            patch: patch.to_string(),
            desired,
            old_ranges,
            stubs,
            enable_to,
            replace,
            new_ranges,
            reversed: false,
            applying: enable_to.is_none(),
            forced: false,
        });
        self.advance(k, w, u)
    }

    /// One step of the per-task transition (all vCPUs stopped): migrates
    /// every task now safe, and completes the transition when none is left.
    pub fn advance(&mut self, k: &Kernel<'_>, w: &dyn GuestWriter, u: &Unwinder) -> Result<Outcome> {
        let Some(tr) = self.transition.clone() else {
            return Ok(Outcome::Switched { sites: 0, forced: false });
        };
        let ps_off = k.off("task_struct", "patch_state")?;
        let tasks = k.tasks()?;
        let mut blockers = Vec::new();
        let mut remaining = 0;
        // Forward: unmigrated tasks move to the target once off the old code.
        // Reversed: migrated tasks move back once off the new code.
        let (from, to, ranges) = if tr.reversed {
            (TASK_MIGRATED, TASK_UNDEFINED, &tr.new_ranges)
        } else {
            (TASK_UNDEFINED, TASK_MIGRATED, &tr.old_ranges)
        };
        for t in &tasks {
            let addr = field(t.addr, ps_off)?;
            let state = k.mem.read_i32(addr)?;
            if state == to || (tr.reversed && state != from) {
                continue;
            }
            let b = if tr.forced { Vec::new() } else { Self::blockers_of(k, u, ranges, std::slice::from_ref(t))? };
            if b.is_empty() {
                w.write_phys(k.mem.translate(addr)?, &to.to_le_bytes())?;
            } else {
                remaining += 1;
                blockers.extend(b);
            }
        }
        if remaining > 0 {
            return Ok(Outcome::InTransition { remaining, blockers });
        }
        if tr.reversed {
            return self.finish_reversed(k, w, &tr, &tasks, ps_off);
        }
        // Every task runs the target code: direct jumps, stubs gone, marks cleared.
        for (site, _, before) in &tr.stubs {
            write_virt(k, w, *site, before)?;
        }
        let n = self.switch_sites(k, w, &tr.desired)?;
        for (_, a, _) in &tr.stubs {
            w.write_phys(a.phys, &[0u8; STUB_SIZE as usize])?;
        }
        if let Some(region) = self.region.as_mut() {
            for (_, a, _) in &tr.stubs {
                region.free(a);
            }
        }
        for t in &tasks {
            let addr = field(t.addr, ps_off)?;
            w.write_phys(k.mem.translate(addr)?, &TASK_UNDEFINED.to_le_bytes())?;
        }
        if let Some(en) = tr.enable_to {
            if let Some(p) = self.patches.iter_mut().find(|p| p.name == tr.patch) {
                p.enabled = en;
            }
        }
        if tr.forced {
            // Some task may still run the code it left: never freed.
            for p in self.patches.iter_mut() {
                p.forced = true;
            }
        }
        self.transition = None;
        if tr.replace {
            self.drop_replaced(w)?;
        }
        Ok(Outcome::Switched { sites: n, forced: false })
    }

    /// Sends the running per-task transition back: tasks converge to the
    /// state before it started, by the same rules.
    pub fn reverse(&mut self, k: &Kernel<'_>, w: &dyn GuestWriter, u: &Unwinder) -> Result<Outcome> {
        let tr = self.transition.as_mut().ok_or_else(|| PatchError::State("no transition is running".into()))?;
        tr.reversed = !tr.reversed;
        self.advance(k, w, u)
    }

    /// A reversed transition has converged: the sites get their bytes from
    /// before it, stubs and marks go, and an applied patch is removed.
    fn finish_reversed(
        &mut self,
        k: &Kernel<'_>,
        w: &dyn GuestWriter,
        tr: &TaskTransition,
        tasks: &[introspect::tasks::Task],
        ps_off: u64,
    ) -> Result<Outcome> {
        for (site, _, before) in &tr.stubs {
            write_virt(k, w, *site, before)?;
            // Sites back at their original bytes get their ftrace record back.
            if let Some(st) = self.sites.get(site) {
                if let (None, Some((addr, orig))) = (st.active, st.record) {
                    let cur = k.mem.read_u64(addr)?;
                    let v = (cur & !FTRACE_FL_DISABLED) | (orig & FTRACE_FL_DISABLED);
                    w.write_phys(k.mem.translate(addr)?, &v.to_le_bytes())?;
                }
            }
        }
        for (_, a, _) in &tr.stubs {
            w.write_phys(a.phys, &[0u8; STUB_SIZE as usize])?;
        }
        if let Some(region) = self.region.as_mut() {
            for (_, a, _) in &tr.stubs {
                region.free(a);
            }
        }
        for t in tasks {
            w.write_phys(k.mem.translate(field(t.addr, ps_off)?)?, &TASK_UNDEFINED.to_le_bytes())?;
        }
        self.transition = None;
        if tr.applying {
            // As upstream frees a patch whose enabling was reversed: it
            // leaves the stack; its module's exit runs before its memory is
            // freed (the caller reaps it).
            if let Some(i) = self.patches.iter().position(|p| p.name == tr.patch) {
                self.patches[i].enabled = false;
                let p = self.patches.remove(i);
                self.forget_unused_sites();
                self.retired.push(p);
            }
        }
        Ok(Outcome::Switched { sites: 0, forced: false })
    }

    /// Forces the running per-task transition to complete now (unsafe).
    pub fn force_transition(&mut self, k: &Kernel<'_>, w: &dyn GuestWriter, u: &Unwinder) -> Result<Outcome> {
        if let Some(tr) = self.transition.as_mut() {
            tr.forced = true;
        }
        match self.advance(k, w, u)? {
            Outcome::Switched { sites, .. } => Ok(Outcome::Switched { sites, forced: true }),
            other => Ok(other),
        }
    }

    /// Linux's klp_is_patch_compatible(): a replacing patch must carry every
    /// state of the enabled patches with an equal or higher version; no patch
    /// may lower a state's version.
    fn check_states(&self, name: &str, states: &[StateSpec], replace: bool) -> Result<()> {
        for old in self.patches.iter().filter(|p| p.enabled) {
            for os in &old.states {
                match states.iter().find(|s| s.id == os.id) {
                    None if replace => {
                        return Err(PatchError::State(format!(
                            "{name} replaces {} but does not carry its state id {} (version {})",
                            old.name, os.id, os.version
                        )))
                    }
                    None => {}
                    Some(s) if s.version < os.version => {
                        return Err(PatchError::State(format!(
                            "{name} has state id {} version {}, lower than version {} of {}",
                            s.id, s.version, os.version, old.name
                        )))
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(())
    }

    /// After a replacing transition: the other patches leave the stack
    /// (their callbacks do not run), and sites nobody changes any more are
    /// forgotten. Their modules are retired: the caller runs their exits
    /// and then frees them (`take_retired`, `free_retired`).
    fn drop_replaced(&mut self, _w: &dyn GuestWriter) -> Result<()> {
        let Some(last) = self.patches.pop() else { return Ok(()) };
        let old = std::mem::take(&mut self.patches);
        self.patches.push(last);
        self.retired.extend(old);
        self.forget_unused_sites();
        Ok(())
    }

    fn current_range_or(&self, site: u64, name: &str, addr: u64, size: u64) -> (String, u64, u64) {
        if self.sites.contains_key(&site) {
            self.current_range(site, (addr, size))
        } else {
            (name.to_string(), addr, size)
        }
    }

    fn index(&self, name: &str) -> Result<usize> {
        self.patches.iter().position(|p| p.name == name).ok_or_else(|| PatchError::NoPatch(name.into()))
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
        let i = self.index(name)?;
        if self.patches[i].enabled == enabled {
            return Err(PatchError::State(format!("patch {name} is already {}", if enabled { "enabled" } else { "disabled" })));
        }
        if enabled {
            // Re-enabling is checked like a new patch: it may not lower a
            // state's version (Linux refuses re-enabling altogether; see
            // docs/LIFECYCLE.md).
            let mut others = self.patches.clone();
            others.remove(i);
            let (me_name, me_states, me_replace) = (self.patches[i].name.clone(), self.patches[i].states.clone(), self.patches[i].replace);
            let saved = std::mem::replace(&mut self.patches, others);
            let r = self.check_states(&me_name, &me_states, me_replace);
            self.patches = saved;
            r?;
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
        if self.transition.is_some() {
            return Err(PatchError::State("a per-task transition is still running".into()));
        }
        let blockers = Self::blockers(k, u, &ranges)?;
        if !blockers.is_empty() && !force {
            if per_task {
                return self.start_task_transition(k, w, u, name, desired, ranges, Some(enabled), false);
            }
            return Ok(Outcome::Blocked(blockers));
        }
        let n = self.switch_sites(k, w, &desired)?;
        self.patches[i].enabled = enabled;
        if !blockers.is_empty() {
            self.patches[i].forced = true;
        }
        Ok(Outcome::Switched { sites: n, forced: !blockers.is_empty() })
    }

    /// Forgets the sites no patch on the stack names any more (they hold
    /// their original bytes).
    pub(crate) fn forget_unused_sites(&mut self) {
        let still: std::collections::BTreeSet<u64> = self.patches.iter().flat_map(|p| p.funcs.iter().map(|f| f.site)).collect();
        self.sites.retain(|site, _| still.contains(site));
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

    #[test]
    fn jmp_encoding_and_reach() {
        let b = jmp_bytes(0x1000, 0x2000).unwrap();
        assert_eq!(b, [0xe9, 0xfb, 0x0f, 0, 0]);
        assert!(jmp_bytes(0, 0x1_0000_0000).is_err());
    }

    #[test]
    fn sympos_rules() {
        assert_eq!(pick("f", &[5], 0).unwrap(), 5);
        assert!(pick("f", &[5, 6], 0).is_err());
        assert_eq!(pick("f", &[5, 6], 2).unwrap(), 6);
        assert!(pick("f", &[5, 6], 3).is_err());
        assert!(pick("f", &[], 0).is_err());
    }
}
