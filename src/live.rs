//! Introspection of a live VM: guest memory of a paused VM as
//! [`PhysMem`], and the API extension that answers introspection verbs and
//! `dump` over the control socket. kallsyms and BTF are decoded once per VM
//! and kept: they live in kernel image memory that does not change.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use introspect::btf::Btf;
use introspect::kallsyms::Kallsyms;
use introspect::kernel::Kernel;
use introspect::{CpuState, IntrospectError, PhysMem};
use serde_json::{json, Value};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use patcher::guest::GuestWriter;
use patcher::{ApplyOptions, Outcome, PatchError, PatchModule, Patcher};
use std::time::{Duration, Instant};
use vmm::api::ApiExtension;
use vmm::{PausedVm, Vm};

/// Guest memory of a paused VM.
pub struct LiveMemory<'a>(pub &'a GuestMemoryMmap);

impl PhysMem for LiveMemory<'_> {
    fn read_phys(&self, addr: u64, buf: &mut [u8]) -> introspect::Result<()> {
        self.0
            .read_slice(buf, GuestAddress(addr))
            .map_err(|_| IntrospectError::PhysOutOfRange { addr, len: buf.len() })
    }
    fn phys_size(&self) -> u64 {
        self.0.iter().map(|r| r.start_addr().0 + r.len()).max().unwrap_or(0)
    }
}

/// Every vCPU's state from a paused VM.
pub fn cpu_states(p: &PausedVm<'_>) -> Result<Vec<CpuState>> {
    (0..p.vm().vcpu_count())
        .map(|i| p.vcpu_regs(i).map(|r| crate::guest::cpu_state(&r)).map_err(Into::into))
        .collect()
}

/// Writes a dump of a paused VM to `out`.
pub fn dump(p: &PausedVm<'_>, out: &Path) -> Result<()> {
    let cpus = cpu_states(p)?;
    let mem = p.memory();
    let regions: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    let read = |a: u64, b: &mut [u8]| -> introspect::Result<()> {
        mem.read_slice(b, GuestAddress(a)).map_err(|_| IntrospectError::PhysOutOfRange { addr: a, len: b.len() })
    };
    introspect::image::write_dump(out, &cpus, &regions, &read).with_context(|| format!("writing {}", out.display()))
}

/// Writes guest-physical memory of a paused VM for the patcher.
pub struct LiveWriter<'a>(pub &'a GuestMemoryMmap);

impl GuestWriter for LiveWriter<'_> {
    fn write_phys(&self, addr: u64, data: &[u8]) -> patcher::Result<()> {
        self.0
            .write_slice(data, GuestAddress(addr))
            .map_err(|e| PatchError::Vm(format!("writing guest-physical {addr:#x}+{}: {e}", data.len())))
    }
}

/// Verbs of the patcher.
pub const PATCH_VERBS: &[&str] = &["apply", "disable", "enable", "remove", "list", "force", "reverse"];
/// Most instructions a vCPU is single-stepped to leave a changed function
/// within one stop, and how many between checks.
const MAX_STEP_OUT: u32 = 400;
const STEP_BATCH: u32 = 20;
/// Pause between safe-point attempts.
const RETRY_DELAY: Duration = Duration::from_millis(5);

/// A patch operation waiting for a safe point.
struct PendingOp {
    verb: String,
    target: String,
    module: Option<PatchModule>,
    opts: ApplyOptions,
    start: Instant,
    timeout: Duration,
    attempts: u64,
    blockers: Vec<patcher::engine::Blocker>,
    /// ORC tables and ftrace records, read once before the first attempt so
    /// the stops only check stacks and write sites.
    unwinder: Option<introspect::stacks::Unwinder>,
    records: Option<introspect::ftrace::FtraceRecords>,
    /// Per-task transition: tasks not yet migrated.
    remaining: Option<usize>,
    /// Complete a running per-task transition at the next step (unsafe).
    force_now: bool,
    /// Send the running per-task transition back at the next step.
    reverse_now: bool,
}

/// How the last finished operation ended (for clients polling `list`).
#[derive(Clone, Debug)]
struct Finished {
    verb: String,
    target: String,
    result: std::result::Result<Value, String>,
}

/// Answers introspection and patching verbs and `dump` for a live VM.
pub struct GuestApi {
    cache: Option<(Kallsyms, Btf)>,
    patcher: Patcher,
    pending: Option<PendingOp>,
    finished: Option<Finished>,
}

impl GuestApi {
    pub fn new(vm: &Vm) -> GuestApi {
        let l = vm.layout();
        GuestApi { cache: None, patcher: Patcher::new(l.reserved_start(), l.reserved_size), pending: None, finished: None }
    }

    /// Runs `f` on the kernel view of the paused VM, keeping kallsyms and BTF.
    fn with_kernel<T>(
        &mut self,
        paused: &PausedVm<'_>,
        f: impl FnOnce(&mut Patcher, &Kernel<'_>, &LiveWriter<'_>) -> Result<T>,
    ) -> Result<T> {
        let cpus = cpu_states(paused)?;
        let mem = LiveMemory(paused.memory());
        let k = match self.cache.take() {
            Some((syms, btf)) => Kernel::from_parts(&mem, cpus, syms, btf)?,
            None => Kernel::open(&mem, cpus).context("reading the guest kernel")?,
        };
        let w = LiveWriter(paused.memory());
        let r = f(&mut self.patcher, &k, &w);
        let Kernel { syms, btf, .. } = k;
        self.cache = Some((syms, btf));
        r
    }

    /// One safe-point attempt of the pending operation, all vCPUs stopped.
    /// `Some(result)` when it has ended (switched, failed or timed out).
    /// At a global safe point, a vCPU running inside a changed function is
    /// single-stepped (bounded) until it has left, then checked again.
    fn attempt(&mut self, vm: &Vm) -> Option<std::result::Result<Value, String>> {
        let paused = match vm.pause() {
            Ok(p) => p,
            Err(e) => return Some(Err(e.to_string())),
        };
        let stopped = Instant::now();
        let mut outcome = self.try_once(&paused);
        let mut steps = 0u32;
        while let Ok(Outcome::Blocked(b)) = &outcome {
            let running: Vec<usize> = b.iter().filter(|x| !x.unreliable).filter_map(|x| x.running_on).collect();
            if running.is_empty() || running.len() != b.len() || steps >= MAX_STEP_OUT {
                break;
            }
            let mut failed = false;
            for _ in 0..STEP_BATCH {
                for cpu in &running {
                    if paused.single_step(*cpu).is_err() {
                        failed = true;
                    }
                }
                steps += STEP_BATCH.min(1);
            }
            if failed {
                break;
            }
            outcome = self.try_once(&paused);
        }
        let stopped_for = stopped.elapsed();
        drop(paused);
        let mut op = self.pending.take()?;
        match outcome {
            Err(e) => Some(Err(format!("{e:#}"))),
            Ok(Outcome::Switched { sites, forced }) => {
                let forced = forced || op.force_now;
                if forced {
                    eprintln!("hyperpatch: {} {}: FORCED switch while functions were on stacks (unsafe)", op.verb, op.target);
                }
                Some(Ok(json!({
                    "patch": op.target, "verb": op.verb, "state": "done", "sites": sites, "forced": forced,
                    "attempts": op.attempts, "elapsed_secs": op.start.elapsed().as_secs_f64(),
                    "stopped_us": stopped_for.as_secs_f64() * 1e6, "stepped_instructions": steps,
                })))
            }
            Ok(Outcome::InTransition { remaining, blockers }) => {
                op.blockers = blockers;
                op.remaining = Some(remaining);
                self.pending = Some(op);
                None
            }
            Ok(Outcome::Blocked(blockers)) => {
                if op.start.elapsed() >= op.timeout {
                    let list: Vec<String> = blockers.iter().map(|b| b.to_string()).collect();
                    return Some(Err(PatchError::Timeout { secs: op.timeout.as_secs(), blockers: list.join("; ") }.to_string()));
                }
                op.blockers = blockers;
                self.pending = Some(op);
                None
            }
        }
    }

    /// One check-and-switch of the pending operation on a paused VM.
    fn try_once(&mut self, paused: &PausedVm<'_>) -> Result<Outcome> {
        let mut op = self.pending.take().ok_or_else(|| anyhow!("no pending operation"))?;
        op.attempts += 1;
        let outcome = self.with_kernel(paused, |p, k, w| {
            if op.unwinder.is_none() {
                let mut u = k.unwinder(&k.modules()?)?;
                p.register_orc(&mut u);
                op.unwinder = Some(u);
            }
            if op.records.is_none() && op.module.is_some() {
                op.records = Some(k.ftrace_records()?);
            }
            let u = op.unwinder.as_ref().ok_or_else(|| anyhow!("unwinder"))?;
            if p.in_transition().is_some() {
                if op.reverse_now {
                    op.reverse_now = false;
                    op.verb = format!("reverse {}", op.verb);
                    return Ok(p.reverse(k, w, u)?);
                }
                return Ok(if op.force_now { p.force_transition(k, w, u)? } else { p.advance(k, w, u)? });
            }
            Ok(match (&op.module, op.verb.as_str()) {
                (Some(m), _) => p.apply(k, w, u, op.records.as_ref().ok_or_else(|| anyhow!("records"))?, m, op.opts)?,
                (None, "disable") => p.set_enabled(k, w, u, &op.target, false, op.opts.force, op.opts.per_task)?,
                (None, _) => p.set_enabled(k, w, u, &op.target, true, op.opts.force, op.opts.per_task)?,
            })
        });
        self.pending = Some(op);
        outcome
    }

    fn pending_view(&self) -> Value {
        match &self.pending {
            None => Value::Null,
            Some(op) if op.remaining.is_some() => json!({
                "verb": op.verb, "patch": op.target, "state": "per-task transition",
                "tasks_remaining": op.remaining, "attempts": op.attempts,
                "elapsed_secs": op.start.elapsed().as_secs_f64(), "blockers": op.blockers,
            }),
            Some(op) => json!({
                "verb": op.verb, "patch": op.target, "state": "waiting for a safe point",
                "attempts": op.attempts, "elapsed_secs": op.start.elapsed().as_secs_f64(),
                "blockers": op.blockers,
            }),
        }
    }

    fn patch_verb(&mut self, vm: &Vm, verb: &str, req: &Value) -> Result<Value> {
        let name = || req.get("name").and_then(Value::as_str).map(str::to_owned).ok_or_else(|| anyhow!("{verb} needs \"name\""));
        let force = req.get("force").and_then(Value::as_bool).unwrap_or(false);
        let timeout = Duration::from_secs_f64(req.get("timeout_secs").and_then(Value::as_f64).unwrap_or(30.0).clamp(0.0, 3600.0));
        match verb {
            "list" => Ok(self.list()),
            "remove" => {
                let name = name()?;
                if self.pending.as_ref().is_some_and(|p| p.target == name) {
                    bail!("patch {name} is in transition");
                }
                let paused = vm.pause()?;
                self.patcher.remove(&LiveWriter(paused.memory()), &name)?;
                drop(paused);
                Ok(json!({"removed": name, "reserved_used": self.patcher.reserved_used()}))
            }
            "reverse" => {
                let p = self.pending.as_mut().ok_or_else(|| anyhow!("no transition is running"))?;
                if p.remaining.is_none() {
                    bail!("{} {} waits for a global safe point; nothing to reverse", p.verb, p.target);
                }
                p.reverse_now = true;
                match self.attempt(vm) {
                    Some(r) => r.map_err(|e| anyhow!(e)),
                    None => Ok(self.pending_view()),
                }
            }
            "force" => {
                let p = self.pending.as_mut().ok_or_else(|| anyhow!("no transition is running"))?;
                p.force_now = true;
                eprintln!("hyperpatch: {} {}: forcing the transition (unsafe)", p.verb, p.target);
                match self.attempt(vm) {
                    Some(r) => r.map_err(|e| anyhow!(e)),
                    None => Ok(self.pending_view()),
                }
            }
            "apply" | "disable" | "enable" => {
                if let Some(p) = &self.pending {
                    bail!("{} {} is still waiting for a safe point; try again when it ends", p.verb, p.target);
                }
                let module = if verb == "apply" {
                    let path = req.get("path").and_then(Value::as_str).ok_or_else(|| anyhow!("apply needs \"path\""))?;
                    let bytes = std::fs::read(path).with_context(|| format!("reading {path}"))?;
                    let paused = vm.pause()?;
                    let m = self.with_kernel(&paused, |_, k, _| Ok(PatchModule::parse(path, &bytes, &k.btf)?))?;
                    drop(paused);
                    Some(m)
                } else {
                    None
                };
                let target = match &module {
                    Some(m) => m.name.clone(),
                    None => name()?,
                };
                self.finished = None;
                self.pending = Some(PendingOp {
                    verb: verb.to_string(),
                    target: target.clone(),
                    module,
                    opts: ApplyOptions {
                        replace: req.get("replace").and_then(Value::as_bool),
                        force,
                        skip_callbacks: req.get("skip_callbacks").and_then(Value::as_bool).unwrap_or(false),
                        per_task: req.get("per_task").and_then(Value::as_bool).unwrap_or(true),
                    },
                    start: Instant::now(),
                    timeout,
                    attempts: 0,
                    blockers: Vec::new(),
                    unwinder: None,
                    records: None,
                    remaining: None,
                    force_now: false,
                    reverse_now: false,
                });
                // Read what does not change while the guest runs in a first,
                // separate stop, so the switching stops stay short.
                {
                    let paused = vm.pause()?;
                    let op = self.pending.take();
                    let mut op = op.ok_or_else(|| anyhow!("pending"))?;
                    let prep = self.with_kernel(&paused, |p, k, _| {
                        let mut u = k.unwinder(&k.modules()?)?;
                        p.register_orc(&mut u);
                        op.unwinder = Some(u);
                        if op.module.is_some() {
                            op.records = Some(k.ftrace_records()?);
                        }
                        Ok(())
                    });
                    self.pending = Some(op);
                    drop(paused);
                    if let Err(e) = prep {
                        self.pending = None;
                        return Err(e);
                    }
                }
                let wait = req.get("wait").and_then(Value::as_bool).unwrap_or(false);
                loop {
                    if let Some(r) = self.attempt(vm) {
                        return r.map_err(|e| anyhow!(e));
                    }
                    if !wait {
                        return Ok(self.pending_view());
                    }
                    std::thread::sleep(RETRY_DELAY);
                }
            }
            other => Err(anyhow!("unknown patch verb {other}")),
        }
    }

    fn list(&self) -> Value {
        let pending = self.pending.as_ref().map(|p| p.target.clone());
        json!({
            "pending": self.pending_view(),
            "last": self.finished.as_ref().map(|f| json!({
                "verb": f.verb, "patch": f.target,
                "ok": f.result.is_ok(),
                "result": f.result.as_ref().ok(),
                "error": f.result.as_ref().err(),
            })),
            "patches": self.patcher.patches().iter().map(|p| json!({
                "name": p.name, "enabled": p.enabled, "transition": pending.as_deref() == Some(p.name.as_str()), "replace": p.replace,
                "forced": p.forced, "path": p.path,
                "states": p.states,
                "functions": p.funcs,
            })).collect::<Vec<_>>(),
            "reserved_used": self.patcher.reserved_used(),
            "region_mapped": self.patcher.region_mapped(),
        })
    }

    fn run(&mut self, vm: &Vm, verb: &str, req: &Value) -> Result<Value> {
        if PATCH_VERBS.contains(&verb) {
            return self.patch_verb(vm, verb, req);
        }
        let paused = vm.pause()?;
        if verb == "dump" {
            let out = req.get("out").and_then(Value::as_str).ok_or_else(|| anyhow!("dump needs \"out\""))?;
            dump(&paused, Path::new(out))?;
            return Ok(json!({"out": out}));
        }
        let cpus = cpu_states(&paused)?;
        let mem = LiveMemory(paused.memory());
        let k = match self.cache.take() {
            Some((syms, btf)) => Kernel::from_parts(&mem, cpus, syms, btf)?,
            None => Kernel::open(&mem, cpus).context("reading the guest kernel")?,
        };
        let r = crate::inspect::run_verb(&k, verb, req);
        let Kernel { syms, btf, .. } = k;
        self.cache = Some((syms, btf));
        r
    }
}

impl ApiExtension for GuestApi {
    fn tick(&mut self, vm: &Vm) -> Option<Duration> {
        let p = self.pending.as_ref()?;
        let (verb, target) = (p.verb.clone(), p.target.clone());
        if let Some(result) = self.attempt(vm) {
            if let Err(e) = &result {
                eprintln!("hyperpatch: {verb} {target} failed: {e}");
            }
            self.finished = Some(Finished { verb, target, result });
            return None;
        }
        // A per-task transition checks tasks every 50 ms (Linux: every second);
        // a global safe point is retried every 5 ms.
        if self.pending.as_ref().is_some_and(|p| p.remaining.is_some()) {
            Some(Duration::from_millis(50))
        } else {
            Some(RETRY_DELAY)
        }
    }

    fn handle(&mut self, vm: &Vm, verb: &str, req: &Value) -> Option<std::result::Result<Value, String>> {
        if verb != "dump" && !crate::inspect::VERBS.contains(&verb) && !PATCH_VERBS.contains(&verb) {
            return None;
        }
        Some(self.run(vm, verb, req).map_err(|e| format!("{e:#}")))
    }
}
