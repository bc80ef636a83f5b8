//! Introspection and patching of a live VM: guest memory of a paused VM as
//! [`PhysMem`], and the API extension that serves the introspection, `dump`
//! and patch verbs over the control socket.
//!
//! Every verb is decoded into a typed request (unknown fields refused by
//! name) and run on one worker thread ([`GuestApi`]): the control loop
//! never stops the guest or waits for a transition itself, so `status`,
//! `list` and `pause` answer while a transition waits. `list` is served
//! from a view the worker publishes after every change. kallsyms and BTF
//! are decoded once per VM and kept: they live in kernel image memory that
//! does not change.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use anyhow::{anyhow, bail, Context, Result};
use introspect::btf::Btf;
use introspect::kallsyms::Kallsyms;
use introspect::orc::OrcTables;
use introspect::kernel::Kernel;
use introspect::{CpuState, IntrospectError, PhysMem};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use patcher::guest::GuestWriter;
use introspect::translate::KernelMemory;
use crate::table_cache::{ModuleOrigin, TableCache, TablesOrigin};
use patcher::lifecycle::CallbackKind;
use patcher::{ApplyOptions, Outcome, PatchError, PatchModule, Patcher};
use std::time::{Duration, Instant};
use vmm::api::{ApiExtension, Handled};
use vmm::{PausedVm, Vm};
use patcher::engine::guest_view::LiveGuest;
use patcher::engine::prescan::{Prescan, PrescannedGuest};

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

/// Reads `op`'s ORC tables (vmlinux, modules, placed patches) and, for an
/// apply, the ftrace records.
fn read_tables(op: &mut PendingOp, p: &Patcher, k: &Kernel<'_>, vmlinux_orc: &mut Option<OrcTables>) -> Result<()> {
    let mods = k.modules()?;
    let mut u = unwinder_for(k, vmlinux_orc, &mods)?;
    p.register_orc(&mut u);
    op.unwinder = Some(u);
    op.unwinder_modules = module_signature(&mods);
    if op.verb == "apply" {
        op.records = Some(k.ftrace_records()?);
    }
    Ok(())
}

/// An unwinder over vmlinux's ORC tables, read once (they never change
/// while the kernel runs) and kept in `vmlinux_orc`, and those of `mods`,
/// read now.
fn unwinder_for(k: &Kernel<'_>, vmlinux_orc: &mut Option<OrcTables>, mods: &[introspect::modules::Module]) -> Result<introspect::stacks::Unwinder> {
    if vmlinux_orc.is_none() {
        *vmlinux_orc = Some(k.vmlinux_orc()?);
    }
    Ok(k.unwinder_with(vmlinux_orc.as_ref(), mods)?)
}

/// What identifies the module ORC tables an unwinder holds.
fn module_signature(mods: &[introspect::modules::Module]) -> Vec<(u64, String, u64, u64)> {
    mods.iter().map(|m| (m.addr, m.name.clone(), m.core_base, m.core_text_size)).collect()
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
    fn write_phys(&self, addr: patcher::GuestPhys, data: &[u8]) -> patcher::Result<()> {
        self.0
            .write_slice(data, GuestAddress(addr.0))
            .map_err(|e| PatchError::Vm(format!("writing guest-physical {:#x}+{}: {e}", addr.0, data.len())))
    }
}

/// Verbs of the patcher.
pub const PATCH_VERBS: &[&str] = &["apply", "disable", "enable", "remove", "list", "force", "reverse", "release", "set_param"];
/// Most instructions a vCPU is single-stepped to leave a changed function
/// within one stop, and how many between checks.
const MAX_STEP_OUT: u32 = 400;
/// Stops an attempt gives up when a task switched since its pre-scan.
const QUIET_RETRIES: u32 = 3;
/// Pre-scans an attempt takes again, before stopping, when the guest
/// switched tasks since the walk.
const PRESCAN_RETAKES: u32 = 5;
const STEP_BATCH: u32 = 20;
/// Pause between safe-point attempts.
const RETRY_DELAY: Duration = Duration::from_millis(5);
/// Pause between checks of a per-task transition (Linux: every second).
const TASK_CHECK_DELAY: Duration = Duration::from_millis(50);
/// How long a module's init or exit may run.
const MODULE_CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Version of the state this API saves in a snapshot (the patcher's own
/// state carries [`patcher::engine::STATE_VERSION`] too).
pub const SAVED_STATE_VERSION: u32 = 1;

fn default_timeout() -> f64 {
    30.0
}
fn yes() -> bool {
    true
}

/// The patch verbs, typed.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "verb", rename_all = "snake_case", deny_unknown_fields)]
pub enum PatchRequest {
    /// Apply the livepatch module at `path` from outside.
    Apply {
        path: PathBuf,
        /// Module parameters as insmod takes them (`name=value`).
        #[serde(default)]
        params: Vec<String>,
        #[serde(default)]
        force: bool,
        #[serde(default)]
        skip_callbacks: bool,
        #[serde(default = "yes")]
        per_task: bool,
        #[serde(default = "default_timeout")]
        timeout_secs: f64,
        /// Reply only when the transition has ended.
        #[serde(default)]
        wait: bool,
        /// A testing aid: after the first pre-scan of the stacks (made while
        /// the guest runs), hold the operation until `release`, so a test
        /// can change the guest between the pre-scan and the stop.
        #[serde(default)]
        hold_after_prescan: bool,
        /// Read the stacks while the guest runs and re-check in the stop
        /// only the tasks that ran since (default). `false` unwinds every
        /// stack in the stop (for comparison).
        #[serde(default = "yes")]
        prescan: bool,
    },
    Disable {
        name: String,
        #[serde(default)]
        force: bool,
        #[serde(default = "yes")]
        per_task: bool,
        #[serde(default = "default_timeout")]
        timeout_secs: f64,
        #[serde(default)]
        wait: bool,
    },
    Enable {
        name: String,
        #[serde(default)]
        force: bool,
        #[serde(default = "yes")]
        per_task: bool,
        #[serde(default = "default_timeout")]
        timeout_secs: f64,
        #[serde(default)]
        wait: bool,
    },
    /// Forget a disabled patch and free its guest memory.
    Remove { name: String },
    /// Set a parameter of a patch's module (`param` as `name=value`), as
    /// writing /sys/module/NAME/parameters/PARAM does.
    SetParam { name: String, param: String },
    /// Patches, the running operation and the last finished one.
    List {},
    /// Complete the running per-task transition at once (unsafe, logged).
    Force {},
    /// Send the running per-task transition back.
    Reverse {},
    /// Let an operation held after its pre-scan go on to its stop.
    Release {},
}

/// `call`, typed: runs a guest kernel function in process context.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "verb", rename_all = "snake_case", deny_unknown_fields)]
pub enum CallRequest {
    /// `function` (a vmlinux symbol or `0x...`) with up to six `args`
    /// (numbers, or strings passed as pointers to a NUL-terminated copy).
    Call {
        function: String,
        #[serde(default)]
        args: Vec<patcher::guest_call::CallArg>,
        #[serde(default = "default_call_timeout")]
        timeout_secs: f64,
    },
}

fn default_call_timeout() -> f64 {
    10.0
}

/// `dump`, typed.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "verb", rename_all = "snake_case", deny_unknown_fields)]
pub enum DumpRequest {
    /// Write guest memory and every vCPU's state to one ELF core file.
    Dump { out: PathBuf },
}

type Reply = std::result::Result<Value, String>;

/// Work for the worker thread.
enum Job {
    Inspect(crate::inspect::InspectRequest, Sender<Reply>),
    Dump(PathBuf, Sender<Reply>),
    Call(CallRequest, Sender<Reply>),
    Patch(PatchRequest, Sender<Reply>),
}

/// The stack work of an operation's last stop.
#[derive(Clone, Copy, Debug, Default, Serialize)]
struct StackCounts {
    /// Tasks the pre-scan walked while the guest ran.
    prescanned: usize,
    /// Of those, stacks taken from the pre-scan before (not unwound again).
    carried_from_last_prescan: usize,
    /// Tasks read in the stop (the task list, or only those that may have
    /// run since the pre-scan).
    tasks_read_in_stop: usize,
    /// Stacks looked at in the stop: taken from the pre-scan, or unwound.
    reused: usize,
    unwound_in_stop: usize,
    /// No task switched since before the pre-scan's walk: the stop looked
    /// only at the vCPUs' tasks, the tasks that were on a CPU, and those
    /// with a frame in the checked code.
    no_switch_since_prescan: bool,
    /// Stops given up at once because a task had switched since the
    /// pre-scan (the guest ran on and was pre-scanned again).
    stops_retried: u32,
    /// Pre-scans taken again before stopping, because the counts read
    /// while the guest ran showed a switch since the walk.
    prescans_retaken: u32,
}

/// A patch operation waiting for a safe point.
struct PendingOp {
    verb: String,
    target: String,
    opts: ApplyOptions,
    start: Instant,
    timeout: Duration,
    attempts: u64,
    blockers: Vec<patcher::engine::Blocker>,
    /// ORC tables and ftrace records, read once before the first attempt so
    /// the stops only check stacks and write sites.
    unwinder: Option<introspect::stacks::Unwinder>,
    records: Option<introspect::ftrace::FtraceRecords>,
    /// The modules `unwinder` has the ORC of (address, name, text): a stop
    /// that finds another list builds it again.
    unwinder_modules: Vec<(u64, String, u64, u64)>,
    /// The last stop's stack work.
    stack_counts: Option<StackCounts>,
    /// The last pre-scan: the next one takes the stacks of tasks that did
    /// not run since from it instead of unwinding them again.
    last_prescan: Option<Prescan>,
    /// How long the last attempt stopped the guest (microseconds).
    last_stop_us: Option<f64>,
    /// Pre-scan stacks while the guest runs before each stop.
    prescan: bool,
    /// Hold after the first pre-scan (until `release`), and that pre-scan.
    hold_after_prescan: bool,
    held_prescan: Option<Prescan>,
    /// Per-task transition: tasks not yet migrated.
    remaining: Option<usize>,
    /// Complete a running per-task transition at the next step (unsafe).
    force_now: bool,
    /// Send the running per-task transition back at the next step.
    reverse_now: bool,
    /// Clients waiting for the end of this operation.
    waiters: Vec<Sender<Reply>>,
}

/// How the last finished operation ended (for clients polling `list`).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Finished {
    verb: String,
    target: String,
    result: std::result::Result<Value, String>,
}

/// What a snapshot keeps of a running operation.
#[derive(Debug, Serialize, Deserialize)]
struct SavedOp {
    verb: String,
    target: String,
    opts: ApplyOptions,
    timeout_secs: f64,
    attempts: u64,
    /// A per-task transition runs (the guest holds its stubs and marks).
    per_task: bool,
    /// Tasks not yet migrated at the last check.
    remaining: Option<usize>,
}

/// The state a snapshot carries for this API.
#[derive(Debug, Serialize, Deserialize)]
struct SavedState {
    version: u32,
    patcher_version: u32,
    patcher: Patcher,
    pending: Option<SavedOp>,
    finished: Option<Finished>,
}

/// What the worker owns: the patcher and the operation in flight.
struct State {
    cache: Option<(Kallsyms, Btf)>,
    /// Where `cache` is read from: the host's cache of decoded tables,
    /// keyed by the guest's own bytes, or the guest's memory.
    tables: TableCache,
    /// How `cache` was filled.
    tables_origin: Option<TablesOrigin>,
    /// Where the last loaded module's parse came from.
    module_origin: Option<ModuleOrigin>,
    /// vmlinux's ORC tables, read once while the guest runs.
    vmlinux_orc: Option<OrcTables>,
    /// Every vCPU's registers at the last stop: a view of the running
    /// guest's memory walks its page tables from there (the kernel half
    /// of every page table is the same).
    last_cpus: Option<Vec<CpuState>>,
    patcher: Patcher,
    pending: Option<PendingOp>,
    finished: Option<Finished>,
    /// The execution traps armed in the VM (module loads and unloads).
    armed: Vec<(u64, u64)>,
    /// For the `call` verb: whether the guest was idle when it was queued.
    idle_at_queue: Option<bool>,
    /// Replies to send once the list view is published.
    outbox: Vec<(Sender<Reply>, Reply)>,
    /// The stops of the running apply before its switch: what each did and
    /// how long (microseconds) the guest was stopped for it.
    prep_stops: Vec<(&'static str, f64)>,
}

/// Shared between the control loop, the worker and snapshot threads.
struct Shared {
    state: Mutex<State>,
    jobs: Mutex<VecDeque<Job>>,
    /// Signalled when a job is queued or the worker must stop.
    wake: Condvar,
    stop: std::sync::atomic::AtomicBool,
    /// The `list` answer, published by the worker after every change.
    view: Mutex<ListView>,
}

/// What `list` shows, without the worker's lock.
#[derive(Clone, Default)]
struct ListView {
    patches: Value,
    pending: Option<PendingView>,
    finished: Option<Finished>,
    reserved_used: u64,
    region_mapped: bool,
    kernel_tables: Option<TablesOrigin>,
    last_module_parse: Option<ModuleOrigin>,
}

#[derive(Clone)]
struct PendingView {
    verb: String,
    target: String,
    start: Instant,
    attempts: u64,
    remaining: Option<usize>,
    blockers: Value,
    held: bool,
    held_after_prescan: bool,
    /// The last stop: how long the guest was stopped, and its stack work.
    last_stop: Option<(f64, StackCounts)>,
}

impl PendingView {
    fn of(op: &PendingOp, vm: &Vm) -> PendingView {
        PendingView {
            verb: op.verb.clone(),
            target: op.target.clone(),
            start: op.start,
            attempts: op.attempts,
            remaining: op.remaining,
            blockers: serde_json::to_value(&op.blockers).unwrap_or(Value::Null),
            held: vm.client_holds(),
            held_after_prescan: op.held_prescan.is_some(),
            last_stop: op.last_stop_us.zip(op.stack_counts),
        }
    }

    fn render(&self) -> Value {
        let state = if self.held_after_prescan {
            "held after its pre-scan"
        } else if self.remaining.is_some() {
            "per-task transition"
        } else {
            "waiting for a safe point"
        };
        let mut v = json!({
            "verb": self.verb, "patch": self.target, "state": state,
            "attempts": self.attempts, "elapsed_secs": self.start.elapsed().as_secs_f64(),
            "blockers": self.blockers,
        });
        if let Some(n) = self.remaining {
            v["tasks_remaining"] = json!(n);
        }
        if let Some((us, stacks)) = &self.last_stop {
            v["last_stop"] = json!({"stopped_us": us, "stacks": stacks});
        }
        if self.held {
            v["held_by_client"] = json!(true);
        }
        v
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Answers introspection and patching verbs and `dump` for a live VM; the
/// work runs on its worker thread.
pub struct GuestApi {
    shared: Arc<Shared>,
    worker: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl GuestApi {
    /// Starts the worker for `vm`.
    pub fn new(vm: &Arc<Vm>, tables: TableCache) -> Result<GuestApi> {
        let l = vm.layout();
        Self::start(vm, Patcher::new(l.reserved_start(), l.reserved_size), None, None, tables)
    }

    /// Starts the worker for a VM restored from a snapshot, with the state
    /// saved in it (`vmm::snapshot::extension_state`). A per-task transition
    /// that was running goes on; an operation that was only waiting for a
    /// safe point waits on (an apply's module stays loaded meanwhile).
    pub fn restored(vm: &Arc<Vm>, saved: Value, tables: TableCache) -> Result<GuestApi> {
        #[derive(Deserialize)]
        struct Versions {
            version: u64,
            patcher_version: u64,
        }
        let v: Versions = serde_json::from_value(saved.clone()).context("the snapshot's patcher state is malformed")?;
        if v.version != u64::from(SAVED_STATE_VERSION) || v.patcher_version != u64::from(patcher::engine::STATE_VERSION) {
            bail!(
                "the snapshot's patcher state is version {}/{}, this hyperpatch reads only {}/{}",
                v.version,
                v.patcher_version,
                SAVED_STATE_VERSION,
                patcher::engine::STATE_VERSION
            );
        }
        let s: SavedState = serde_json::from_value(saved).context("the snapshot's patcher state is malformed")?;
        let l = vm.layout();
        if s.patcher.reserved() != (l.reserved_start(), l.reserved_size) {
            bail!("the snapshot's patcher state is for another reserved region than the VM's");
        }
        let finished = s.finished;
        let pending = match s.pending {
            Some(op) if op.per_task && s.patcher.in_transition() != Some(op.target.as_str()) => {
                bail!("the snapshot's patcher state is inconsistent: {} {} runs a per-task transition the patcher does not know", op.verb, op.target)
            }
            Some(op) if op.verb == "apply" && s.patcher.staged().is_none() && !op.per_task => {
                bail!("the snapshot's patcher state is inconsistent: apply {} waits without its module", op.target)
            }
            // A running transition goes on; a wait for a safe point too (an
            // apply's module is loaded and kept in the patcher's state).
            Some(op) => Some(PendingOp {
                verb: op.verb,
                target: op.target,
                opts: op.opts,
                start: Instant::now(),
                timeout: Duration::from_secs_f64(op.timeout_secs.clamp(0.0, 3600.0)),
                attempts: op.attempts,
                blockers: Vec::new(),
                unwinder: None,
                records: None,
                unwinder_modules: Vec::new(),
                stack_counts: None,
                last_prescan: None,
                last_stop_us: None,
                prescan: true,
                hold_after_prescan: false,
                held_prescan: None,
                remaining: if op.per_task { Some(op.remaining.unwrap_or(0)) } else { None },
                force_now: false,
                reverse_now: false,
                waiters: Vec::new(),
            }),
            None if s.patcher.in_transition().is_some() => bail!("the snapshot's patcher state is inconsistent: a per-task transition without its operation"),
            None => None,
        };
        Self::start(vm, s.patcher, pending, finished, tables)
    }

    fn start(vm: &Arc<Vm>, patcher: Patcher, pending: Option<PendingOp>, finished: Option<Finished>, tables: TableCache) -> Result<GuestApi> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State { cache: None, tables, tables_origin: None, module_origin: None, vmlinux_orc: None, last_cpus: None, patcher, pending, finished, armed: Vec::new(), idle_at_queue: Some(false), outbox: Vec::new(), prep_stops: Vec::new() }),
            jobs: Mutex::new(VecDeque::new()),
            wake: Condvar::new(),
            stop: std::sync::atomic::AtomicBool::new(false),
            view: Mutex::new(ListView::default()),
        });
        {
            let st = lock(&shared.state);
            shared.publish(&st, vm);
        }
        let (s2, vm2) = (shared.clone(), vm.clone());
        let worker = std::thread::Builder::new()
            .name("hyperpatch-worker".into())
            .spawn(move || s2.worker(&vm2))
            .context("starting the worker thread")?;
        Ok(GuestApi { shared, worker: Mutex::new(Some(worker)) })
    }

    fn queue(&self, job: Job) {
        lock(&self.shared.jobs).push_back(job);
        self.shared.wake.notify_all();
    }

    /// Runs one request and waits for its reply (the demo, tests).
    pub fn call(&self, vm: &Arc<Vm>, request: &Value) -> Reply {
        match self.handle(vm, request) {
            Handled::Now(r) => r,
            Handled::Later(rx) => rx.recv().unwrap_or_else(|_| Err("the worker ended without a reply".into())),
        }
    }

    fn list(&self) -> Value {
        let v = lock(&self.shared.view).clone();
        json!({
            "pending": v.pending.as_ref().map(PendingView::render),
            "last": v.finished.as_ref().map(|f| json!({
                "verb": f.verb, "patch": f.target,
                "ok": f.result.is_ok(),
                "result": f.result.as_ref().ok(),
                "error": f.result.as_ref().err(),
            })),
            "patches": v.patches,
            "reserved_used": v.reserved_used,
            "region_mapped": v.region_mapped,
            "kernel_tables": v.kernel_tables,
            "last_module_parse": v.last_module_parse,
        })
    }
}

impl Shared {
    /// The worker: serves queued jobs in order and drives the pending
    /// operation (every 5 ms for a global safe point, every 50 ms for a
    /// per-task transition). While a client holds the VM paused it makes no
    /// attempt: an attempt may single-step guest code.
    fn worker(&self, vm: &Arc<Vm>) {
        let mut next_attempt = Instant::now();
        loop {
            if self.stop.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
            {
                // A module coming or going waits in the guest for us.
                let mut st = lock(&self.state);
                if let Err(e) = st.sync_traps(vm) {
                    eprintln!("hyperpatch: arming the module-load traps: {e:#}");
                }
                match st.module_event(vm) {
                    Ok(true) => {
                        self.publish_and_answer(&mut st, vm);
                        continue;
                    }
                    Ok(false) => {}
                    Err(e) => eprintln!("hyperpatch: module event: {e:#}"),
                }
            }
            let job = lock(&self.jobs).pop_front();
            if let Some(job) = job {
                self.run_job(vm, job);
                continue;
            }
            let now = Instant::now();
            let (has_pending, armed, releasable) = {
                let st = lock(&self.state);
                (st.pending.is_some(), !st.armed.is_empty(), st.calls_releasable())
            };
            if !has_pending && releasable && now >= next_attempt && !vm.client_holds() {
                // Routines a release had to leave (a kworker was still
                // inside them) go once nothing uses them.
                let mut st = lock(&self.state);
                if let Err(e) = st.release_calls(vm) {
                    eprintln!("hyperpatch: releasing the guest-call routines: {e:#}");
                }
                self.publish_and_answer(&mut st, vm);
                drop(st);
                next_attempt = Instant::now() + Duration::from_millis(500);
                continue;
            }
            if has_pending && now >= next_attempt {
                let mut st = lock(&self.state);
                let delay = st.tick(vm);
                self.publish_and_answer(&mut st, vm);
                drop(st);
                next_attempt = Instant::now() + delay;
                continue;
            }
            let mut wait = if has_pending { next_attempt.saturating_duration_since(now) } else { Duration::from_millis(500) };
            if armed {
                wait = wait.min(Duration::from_millis(5));
            }
            let jobs = lock(&self.jobs);
            if jobs.is_empty() && !self.stop.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = self.wake.wait_timeout(jobs, wait).unwrap_or_else(|e| e.into_inner());
            }
        }
        // The VM ends: whoever waits gets an answer.
        let mut st = lock(&self.state);
        if let Some(op) = st.pending.take() {
            for w in op.waiters {
                let _ = w.send(Err(format!("{} {}: the VM is shutting down", op.verb, op.target)));
            }
        }
        for job in lock(&self.jobs).drain(..) {
            let tx = match job {
                Job::Inspect(_, tx) | Job::Dump(_, tx) | Job::Patch(_, tx) | Job::Call(_, tx) => tx,
            };
            let _ = tx.send(Err("the VM is shutting down".into()));
        }
    }

    /// Runs one job. Its reply is held until the `list` view has been
    /// published, so a client that gets an answer and then asks `list`
    /// sees what the answer said.
    fn run_job(&self, vm: &Arc<Vm>, job: Job) {
        let mut st = lock(&self.state);
        let (held, replies) = mpsc::channel();
        let client = match job {
            Job::Inspect(req, tx) => {
                let _ = held.send(st.inspect(vm, &req).map_err(|e| format!("{e:#}")));
                tx
            }
            Job::Dump(out, tx) => {
                let r = vm.pause().map_err(anyhow::Error::from).and_then(|p| dump(&p, &out)).map(|()| json!({"out": out}));
                let _ = held.send(r.map_err(|e| format!("{e:#}")));
                tx
            }
            Job::Call(CallRequest::Call { function, args, timeout_secs }, tx) => {
                let r = st.guest_call(vm, &function, &args, timeout_secs);
                let _ = held.send(r.map_err(|e| format!("{e:#}")));
                tx
            }
            Job::Patch(req, tx) => {
                if st.patch_job(vm, req, held.clone()).is_some() {
                    // Answered once the operation has ended (or its first
                    // attempt has, without `wait`).
                    if let Some(op) = st.pending.as_mut() {
                        op.waiters.push(tx.clone());
                    }
                }
                tx
            }
        };
        drop(held);
        self.publish_and_answer(&mut st, vm);
        for r in replies.try_iter() {
            let _ = client.send(r);
        }
    }

    /// Publishes the `list` view, then sends the replies waiting for it.
    fn publish_and_answer(&self, st: &mut State, vm: &Vm) {
        self.publish(st, vm);
        for (w, r) in std::mem::take(&mut st.outbox) {
            let _ = w.send(r);
        }
    }

    fn publish(&self, st: &State, vm: &Vm) {
        let p = &st.patcher;
        let in_transition = st.pending.as_ref().map(|o| o.target.clone());
        let view = ListView {
            patches: Value::Array(
                p.patches()
                    .iter()
                    .map(|x| {
                        json!({
                            "name": x.name, "enabled": x.enabled, "transition": in_transition.as_deref() == Some(x.name.as_str()),
                            "replace": x.replace, "forced": x.forced, "path": x.path,
                            "states": x.states.iter().map(|s| json!({"id": s.id, "version": s.version})).collect::<Vec<_>>(),
                            "functions": x.funcs,
                        })
                    })
                    .collect(),
            ),
            pending: st.pending.as_ref().map(|op| PendingView::of(op, vm)),
            finished: st.finished.clone(),
            reserved_used: p.reserved_used(),
            region_mapped: p.region_mapped(),
            kernel_tables: st.tables_origin.clone(),
            last_module_parse: st.module_origin.clone(),
        };
        *lock(&self.view) = view;
    }
}

impl State {
    /// Runs `f` on the kernel view of the paused VM, keeping kallsyms and BTF.
    fn with_kernel<T>(
        &mut self,
        paused: &PausedVm<'_>,
        f: impl FnOnce(&mut Patcher, &Kernel<'_>, &LiveWriter<'_>) -> Result<T>,
    ) -> Result<T> {
        let cpus = cpu_states(paused)?;
        self.last_cpus = Some(cpus.clone());
        let mem = LiveMemory(paused.memory());
        let k = match self.cache.take() {
            Some((syms, btf)) => Kernel::from_parts(&mem, cpus, syms, btf)?,
            None => {
                let (k, origin) = self.tables.open_kernel(&mem, cpus).context("reading the guest kernel")?;
                self.tables_origin = Some(origin);
                k
            }
        };
        let w = LiveWriter(paused.memory());
        let r = f(&mut self.patcher, &k, &w);
        let Kernel { syms, btf, .. } = k;
        self.cache = Some((syms, btf));
        r
    }

    /// Runs `f` on a view of the guest's memory while the guest runs (no
    /// stop): what it reads may be torn, so it is only for what a stop
    /// checks again (pre-scans, tables that do not change). Needs a stop
    /// before it (its registers give the page-table root).
    fn with_running_kernel<T>(&mut self, vm: &Vm, f: impl FnOnce(&Patcher, &Kernel<'_>) -> Result<T>) -> Result<T> {
        let cpus = self.last_cpus.clone().ok_or_else(|| anyhow!("no stop has read the vCPUs yet"))?;
        let (syms, btf) = self.cache.take().ok_or_else(|| anyhow!("kallsyms and BTF are not read yet"))?;
        let mem = LiveMemory(vm.memory());
        let k = match Kernel::from_parts(&mem, cpus, syms, btf) {
            Ok(k) => k,
            Err(e) => return Err(anyhow!("{e}")),
        };
        let r = f(&self.patcher, &k);
        let Kernel { syms, btf, .. } = k;
        self.cache = Some((syms, btf));
        r
    }

    /// kallsyms and BTF (vmlinux's, which never change), read while the
    /// guest runs after a stop only long enough to take the vCPUs'
    /// registers, so no later stop parses them. On failure the next stop
    /// reads them as before.
    fn read_kernel_tables(&mut self, vm: &Vm) {
        if self.cache.is_some() {
            return;
        }
        let cpus = match vm.pause().map_err(anyhow::Error::from).and_then(|p| cpu_states(&p)) {
            Ok(c) => c,
            Err(_) => return,
        };
        let mem = LiveMemory(vm.memory());
        if let Ok((k, origin)) = self.tables.open_kernel(&mem, cpus.clone()) {
            let Kernel { syms, btf, .. } = k;
            self.cache = Some((syms, btf));
            self.tables_origin = Some(origin);
            self.last_cpus = Some(cpus);
        }
    }

    /// The pending operation's ORC tables and ftrace records, read while
    /// the guest runs: the vmlinux tables and records do not change, module
    /// tables are checked against the module list in every stop, and record
    /// flags and addresses are read again in the stop.
    fn read_tables_running(&mut self, vm: &Vm) -> Result<()> {
        let mut op = self.pending.take().ok_or_else(|| anyhow!("pending"))?;
        let mut base = self.vmlinux_orc.take();
        let r = self.with_running_kernel(vm, |p, k| read_tables(&mut op, p, k, &mut base));
        self.vmlinux_orc = base;
        if r.is_err() {
            op.unwinder = None;
            op.records = None;
        }
        self.pending = Some(op);
        r
    }

    /// Pre-scans the tasks' stacks while the guest runs, for the next stop.
    fn prescan(&mut self, vm: &Vm) -> Option<Prescan> {
        if !self.pending.as_ref()?.prescan {
            return None;
        }
        let mut op = self.pending.take()?;
        let prev = op.last_prescan.take();
        let r = match op.unwinder.as_ref() {
            Some(u) => self
                .with_running_kernel(vm, |_, k| {
                    let ps_off = k.off("task_struct", "patch_state").ok();
                    Ok(Prescan::take(k, u, prev.as_ref(), ps_off)?)
                })
                .ok(),
            None => None,
        };
        self.pending = Some(op);
        r
    }

    /// Pre-scans again, carrying over from `prev` the stacks of tasks that
    /// did not run since.
    fn prescan_again(&mut self, vm: &Vm, prev: Option<Prescan>) -> Option<Prescan> {
        if let Some(op) = self.pending.as_mut() {
            op.last_prescan = prev;
        }
        self.prescan(vm)
    }

    /// Runs guest function `function` with `args` in a kworker and waits
    /// (at most `timeout_secs`) for its result (the `call` verb).
    fn guest_call(&mut self, vm: &Vm, function: &str, args: &[patcher::guest_call::CallArg], timeout_secs: f64) -> Result<Value> {
        if !timeout_secs.is_finite() || timeout_secs <= 0.0 {
            bail!("timeout_secs must be a positive number of seconds, not {timeout_secs}");
        }
        let t0 = Instant::now();
        let func = match function.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16).with_context(|| format!("bad address {function}"))?,
            None => {
                let paused = vm.pause()?;
                self.with_kernel(&paused, |_, k, _| k.syms.address_of(function, 0).with_context(|| format!("guest function {function}")))?
            }
        };
        let timeout = Duration::from_secs_f64(timeout_secs.min(3600.0));
        // Whether every vCPU ran its idle task when the call was queued.
        self.idle_at_queue = None;
        match self.run_call_ticket(vm, func, args, timeout)? {
            (ticket, Some(result)) => Ok(json!({
                "function": function, "addr": func, "result": result, "result_hex": format!("{:#x}", result as u64),
                "slot": ticket.slot, "round_trip_us": t0.elapsed().as_secs_f64() * 1e6,
                "guest_idle_when_queued": self.idle_at_queue,
            })),
            (ticket, None) => {
                Err(PatchError::Call(patcher::guest_call::CallError::TimedOut { func, secs: timeout_secs, slot: ticket.slot }).into())
            }
        }
    }

    /// Runs guest function `func` in a kworker; its result, or `None` when
    /// it did not return within `timeout` (its slot is then lost).
    fn run_call(&mut self, vm: &Vm, func: u64, args: &[patcher::guest_call::CallArg], timeout: Duration) -> Result<Option<i64>> {
        Ok(self.run_call_ticket(vm, func, args, timeout)?.1)
    }

    /// Queues a call of `func` and raises the guest's irq_work interrupt.
    fn start_call(&mut self, vm: &Vm, func: u64, args: &[patcher::guest_call::CallArg]) -> Result<patcher::guest_call::CallTicket> {
        if vm.client_holds() {
            bail!("a client holds the VM paused: a guest call runs guest code; resume first");
        }
        let paused = vm.pause()?;
        let want_idle = self.idle_at_queue.is_none();
        let (ticket, vector, idle) = self.with_kernel(&paused, |p, k, w| {
            let idle = if want_idle { Some(k.tasks()?.iter().all(|t| t.running_on.is_none() || t.pid == 0)) } else { None };
            let (t, v) = p.queue_call(k, w, func, args)?;
            Ok((t, v, idle))
        })?;
        drop(paused);
        if idle.is_some() {
            self.idle_at_queue = idle;
        }
        let apic = vm.apic_id(0).ok_or_else(|| anyhow!("the VM has no vCPU 0"))?;
        vm.inject_msi(apic, vector)?;
        Ok(ticket)
    }

    fn run_call_ticket(
        &mut self,
        vm: &Vm,
        func: u64,
        args: &[patcher::guest_call::CallArg],
        timeout: Duration,
    ) -> Result<(patcher::guest_call::CallTicket, Option<i64>)> {
        let t0 = Instant::now();
        let ticket = self.start_call(vm, func, args)?;
        let deadline = t0 + timeout;
        let mem = LiveMemory(vm.memory());
        loop {
            if let Some(result) = patcher::guest_call::CallEngine::poll(&mem, &ticket)? {
                return Ok((ticket, Some(result)));
            }
            if Instant::now() >= deadline {
                self.patcher.call_lost(&ticket);
                return Ok((ticket, None));
            }
            if vm.exit_reason().is_some() {
                bail!("the VM stopped during the guest call");
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    fn inspect(&mut self, vm: &Vm, req: &crate::inspect::InspectRequest) -> Result<Value> {
        let paused = vm.pause()?;
        self.with_kernel(&paused, |_, k, _| crate::inspect::run(k, req))
    }

    /// One attempt of the pending operation when it is due; how long until
    /// the next.
    fn tick(&mut self, vm: &Vm) -> Duration {
        let Some(op) = self.pending.as_ref() else { return Duration::from_millis(500) };
        if vm.client_holds() {
            if op.remaining.is_none() && op.start.elapsed() >= op.timeout {
                let (verb, target) = (op.verb.clone(), op.target.clone());
                let secs = op.timeout.as_secs();
                let _ = self.finish(vm, Err(format!(
                    "{verb} {target}: timed out after {secs} s while a client held the VM paused; nothing was changed"
                )));
            }
            return Duration::from_millis(20);
        }
        if let Some(result) = self.attempt(vm) {
            let _ = self.finish(vm, result);
            return Duration::from_millis(500);
        }
        if self.pending.as_ref().is_some_and(|p| p.remaining.is_some()) {
            TASK_CHECK_DELAY
        } else {
            RETRY_DELAY
        }
    }

    /// The pending operation has ended: record it and answer its waiters.
    /// A failed apply's module runs its exit and is unplaced first.
    fn finish(&mut self, vm: &Vm, result: Reply) -> Reply {
        let Some(op) = self.pending.take() else { return result };
        let result = match result {
            Err(e) if op.verb == "apply" => {
                // The patch never took effect: post-unpatch for the objects
                // whose pre-patch ran, then the module's exit.
                let mut e = e;
                if let Err(c) = self.run_callbacks(vm, &op.target, CallbackKind::PostUnpatch) {
                    e = format!("{e}; post-unpatch callbacks: {c:#}");
                }
                Err(match self.unload_staged(vm) {
                    Ok(()) => e,
                    Err(u) => format!("{e}; then unloading the module: {u:#}"),
                })
            }
            Err(e) if op.verb == "disable" => {
                // Still patched: as upstream's reversed unpatching, post-patch.
                Err(match self.run_callbacks(vm, &op.target, CallbackKind::PostPatch) {
                    Ok(()) => e,
                    Err(c) => format!("{e}; post-patch callbacks: {c:#}"),
                })
            }
            Ok(v) => {
                // The transition completed (klp_complete_transition): the
                // target state's post callbacks, then replaced or reversed
                // patches' modules are reaped.
                let kind = match op.verb.as_str() {
                    "apply" | "enable" | "reverse disable" => Some(CallbackKind::PostPatch),
                    "disable" | "reverse enable" | "reverse apply" => Some(CallbackKind::PostUnpatch),
                    _ => None,
                };
                let mut r = Ok(v);
                if let Some(kind) = kind {
                    if let Err(c) = self.run_callbacks(vm, &op.target, kind) {
                        r = Err(format!("{} {}: the transition completed, but {c:#}", op.verb, op.target));
                    }
                }
                if let Err(e) = self.reap_retired(vm) {
                    r = Err(format!("{} {}: the transition completed, but freeing the modules it retired failed: {e:#}", op.verb, op.target));
                }
                r
            }
            other => other,
        };
        if let Err(e) = &result {
            eprintln!("hyperpatch: {} {} failed: {e}", op.verb, op.target);
        }
        // Sent once the list view shows the outcome (publish_and_answer).
        for w in &op.waiters {
            self.outbox.push((w.clone(), result.clone()));
        }
        self.finished = Some(Finished { verb: op.verb, target: op.target, result: result.clone() });
        result
    }

    /// Loads the module at `path` with `params` as the kernel's module
    /// loader would: links and places it, sets its parameters and runs its
    /// init in the guest. Its `klp_enable_patch()` is hyperpatch's hook,
    /// which waits while hyperpatch reads the klp_patch, checks it and runs
    /// the pre-patch callbacks of its loaded objects, and returns the
    /// verdict to the init, as upstream's returns its own. Returns the
    /// module's name; on error nothing of it is left in the guest but what
    /// its init or exit did (and the memory of code that may still run).
    fn load_module(&mut self, vm: &Vm, path: &Path, params: &[String], skip_callbacks: bool) -> Result<String> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let shown = path.display().to_string();
        self.prep_stops.clear();
        self.read_kernel_tables(vm);
        // The .ko is parsed against vmlinux's BTF (read once) while the guest runs.
        let btf_key = self.tables_origin.as_ref().map(|o| o.btf_key.clone());
        let m = match (self.cache.as_ref(), btf_key) {
            // Parsed once per kernel build: the host cache holds the parse
            // of these bytes against this BTF.
            (Some((_, btf)), Some(key)) => {
                let (m, origin) = self.tables.patch_module(&shown, &bytes, btf, &key)?;
                self.module_origin = Some(origin);
                m
            }
            (Some((_, btf)), None) => PatchModule::parse(&shown, &bytes, btf)?,
            (None, _) => {
                let paused = vm.pause()?;
                self.with_kernel(&paused, |_, k, _| Ok(PatchModule::parse(&shown, &bytes, &k.btf)?))?
            }
        };
        let paused = vm.pause()?;
        let t = Instant::now();
        let info = self.with_kernel(&paused, |p, k, w| Ok(p.stage(k, w, &m, params)?));
        drop(paused);
        self.prep_stops.push(("link and place", t.elapsed().as_secs_f64() * 1e6));
        let info = match info {
            Ok(i) => i,
            Err(e) => {
                let _ = self.release_calls(vm);
                return Err(e);
            }
        };
        let Some(init) = info.init else {
            self.unload_staged(vm)?;
            bail!("{}: it has no init, so nothing calls klp_enable_patch()", m.name);
        };
        let ticket = self.start_call(vm, init, &[])?;
        let deadline = Instant::now() + MODULE_CALL_TIMEOUT;
        let waiting_phys = self.patcher.call_engine().map(|c| c.hook_waiting_phys()).ok_or_else(|| anyhow!("guest-call engine"))?;
        let mut refusal: Option<(i32, anyhow::Error)> = None;
        let mut verdict_given = false;
        let ret = loop {
            if let Some(r) = patcher::guest_call::CallEngine::poll(&LiveMemory(vm.memory()), &ticket)? {
                break r;
            }
            let mut flag = [0u8; 4];
            vm.memory().read_slice(&mut flag, GuestAddress(waiting_phys.0)).map_err(|e| anyhow!("reading the hook's flag: {e}"))?;
            if !verdict_given && u32::from_le_bytes(flag) == 1 {
                let verdict = match self.enable_verdict(vm, &m, skip_callbacks) {
                    Ok(()) => 0,
                    Err((errno, e)) => {
                        refusal = Some((errno, e));
                        errno
                    }
                };
                let paused = vm.pause()?;
                let t = Instant::now();
                let c = self.patcher.call_engine().ok_or_else(|| anyhow!("guest-call engine"))?;
                c.hook_verdict(&LiveWriter(paused.memory()), verdict)?;
                drop(paused);
                self.prep_stops.push(("klp_enable_patch verdict", t.elapsed().as_secs_f64() * 1e6));
                verdict_given = true;
            }
            if Instant::now() >= deadline {
                self.patcher.call_lost(&ticket);
                self.patcher.abandon_staged();
                bail!(
                    "{}: its init did not return within {} s; its memory stays reserved (the init may still run)",
                    m.name,
                    MODULE_CALL_TIMEOUT.as_secs()
                );
            }
            if vm.exit_reason().is_some() {
                bail!("the VM stopped while {}'s init ran", m.name);
            }
            std::thread::sleep(Duration::from_micros(100));
        };
        let paused = vm.pause()?;
        let t = Instant::now();
        let read = self.with_kernel(&paused, |p, k, _| Ok(p.init_returned(k, ret)?));
        drop(paused);
        self.prep_stops.push(("init returned", t.elapsed().as_secs_f64() * 1e6));
        let err = match (read, refusal) {
            (Ok(()), None) => {
                self.patcher.set_skip_callbacks(skip_callbacks);
                return Ok(m.name);
            }
            // The init returned 0 although its patch was refused.
            (Ok(()), Some((_, e))) => e,
            (Err(e), None) => e,
            // klp_enable_patch() refused it and the init failed with that.
            (Err(e), Some((_, why))) => why.context(format!("{e:#}")),
        };
        // Objects whose pre-patch callback ran get their post-unpatch
        // (upstream's klp_cancel_transition).
        let cancel = self.run_callbacks(vm, &m.name, CallbackKind::PostUnpatch).err();
        let e = match self.unload_staged(vm) {
            Ok(()) => err,
            Err(u) => err.context(format!("then unloading it: {u:#}")),
        };
        Err(match cancel {
            None => e,
            Some(c) => e.context(format!("post-unpatch callbacks: {c:#}")),
        })
    }

    /// The verdict of the module's `klp_enable_patch()`: its klp_patch is
    /// read and checked, and the pre-patch callbacks of its loaded objects
    /// run. An error comes with the errno the hook returns.
    fn enable_verdict(&mut self, vm: &Vm, m: &PatchModule, skip_callbacks: bool) -> std::result::Result<(), (i32, anyhow::Error)> {
        let einval = |e: anyhow::Error| (-22, e);
        // The ftrace records are read while the guest runs: the stop checks
        // each one it uses again (its ip and flags).
        let running = self.with_running_kernel(vm, |_, k| Ok(k.ftrace_records()?)).ok();
        let paused = vm.pause().map_err(|e| einval(e.into()))?;
        let t = Instant::now();
        let r = self.with_kernel(&paused, |p, k, w| {
            let records = match running {
                Some(r) => r,
                None => k.ftrace_records()?,
            };
            p.enable_called(k, w, m, &records).map_err(anyhow::Error::from)
        });
        drop(paused);
        self.prep_stops.push(("read and check the klp_patch", t.elapsed().as_secs_f64() * 1e6));
        if let Err(e) = r {
            let errno = match e.downcast_ref::<PatchError>() {
                Some(PatchError::MissingSymbol { .. }) | Some(PatchError::NoPatch(_)) => -2,
                Some(PatchError::Site { .. }) | Some(PatchError::Duplicate(_)) => -16,
                _ => -22,
            };
            return Err((errno, e));
        }
        if skip_callbacks {
            return Ok(());
        }
        match self.pre_patch(vm, &m.name) {
            Ok(None) => Ok(()),
            Ok(Some((obj, ret))) => Err((ret, anyhow!("{}: pre-patch callback failed for object '{obj}' with {ret} ({})", m.name, patcher::lifecycle::errno_name(ret)))),
            Err(e) => Err(einval(e)),
        }
    }

    /// Runs the pre-patch callbacks of patch `name`'s loaded objects in
    /// order, arming each object's post-unpatch when it succeeds; stops at
    /// the first failure: (object, return value).
    fn pre_patch(&mut self, vm: &Vm, name: &str) -> Result<Option<(String, i32)>> {
        let list = {
            let paused = vm.pause()?;
            self.with_kernel(&paused, |p, k, w| {
                p.set_prev_states(w, name)?;
                Ok(p.callbacks(k, name, CallbackKind::PrePatch)?)
            })?
        };
        for cb in list {
            let ret = if cb.func == 0 {
                0
            } else {
                let r = self
                    .run_call(vm, cb.func, &[patcher::guest_call::CallArg::Value(cb.obj)], MODULE_CALL_TIMEOUT)?
                    .ok_or_else(|| anyhow!("{name}: the pre-patch callback of {} did not return", cb.name))?;
                r as i32
            };
            self.patcher.set_post_unpatch_enabled(name, cb.object, ret == 0);
            if ret != 0 {
                return Ok(Some((cb.name, ret)));
            }
        }
        Ok(None)
    }

    /// Runs the `kind` callbacks of patch `name`'s loaded objects (not
    /// pre-patch: see `pre_patch`). A post-unpatch disarms itself.
    fn run_callbacks(&mut self, vm: &Vm, name: &str, kind: CallbackKind) -> Result<()> {
        if !self.patcher.runs_callbacks(name) {
            return Ok(());
        }
        let list = {
            let paused = vm.pause()?;
            self.with_kernel(&paused, |p, k, w| {
                p.set_prev_states(w, name)?;
                Ok(p.callbacks(k, name, kind)?)
            })?
        };
        for cb in list {
            if kind == CallbackKind::PostUnpatch {
                self.patcher.set_post_unpatch_enabled(name, cb.object, false);
            }
            if cb.func == 0 {
                continue;
            }
            if self.run_call(vm, cb.func, &[patcher::guest_call::CallArg::Value(cb.obj)], MODULE_CALL_TIMEOUT)?.is_none() {
                bail!("{name}: the {kind:?} callback of {} did not return within {} s", cb.name, MODULE_CALL_TIMEOUT.as_secs());
            }
        }
        Ok(())
    }

    /// Before `enable`/`disable` of patch `name` starts: it must be in the
    /// other state and nothing may be running; then the pre-patch (enable)
    /// or pre-unpatch (disable) callbacks run, as upstream runs them before
    /// the transition. A failing pre-patch refuses the enable.
    fn before_switch(&mut self, vm: &Vm, name: &str, enable: bool) -> Result<()> {
        if let Some(p) = &self.pending {
            bail!("{} {} is still running; try again when it ends", p.verb, p.target);
        }
        match self.patcher.is_enabled(name) {
            None => bail!("no patch named {name:?}"),
            Some(e) if e == enable => bail!("patch {name} is already {}", if enable { "enabled" } else { "disabled" }),
            Some(_) => {}
        }
        if !self.patcher.runs_callbacks(name) {
            return Ok(());
        }
        if enable {
            if let Some((obj, ret)) = self.pre_patch(vm, name)? {
                let cancel = self.run_callbacks(vm, name, CallbackKind::PostUnpatch).err();
                bail!(
                    "{name}: pre-patch callback failed for object '{obj}' with {ret} ({}){}",
                    patcher::lifecycle::errno_name(ret),
                    cancel.map(|c| format!("; post-unpatch callbacks: {c:#}")).unwrap_or_default()
                );
            }
            Ok(())
        } else {
            self.run_callbacks(vm, name, CallbackKind::PreUnpatch)
        }
    }

    /// Patches that left the stack (replaced, or their enabling reversed):
    /// their module's exit runs, then their memory is freed (never, when
    /// they were forced or their exit did not return).
    fn reap_retired(&mut self, vm: &Vm) -> Result<()> {
        let retired = self.patcher.take_retired();
        let mut first_err = None;
        for p in retired {
            let mut keep = false;
            if let Some(exit) = p.exit {
                match self.run_call(vm, exit, &[], MODULE_CALL_TIMEOUT) {
                    Ok(Some(_)) => {}
                    Ok(None) => keep = true,
                    Err(e) => {
                        keep = true;
                        first_err.get_or_insert(e);
                    }
                }
            }
            let paused = vm.pause()?;
            let r = self.patcher.free_retired(&LiveWriter(paused.memory()), p, keep);
            drop(paused);
            if let Err(e) = r {
                first_err.get_or_insert(e.into());
            }
        }
        self.release_calls(vm)?;
        match first_err {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    /// Runs the staged module's exit if its init succeeded, then unplaces
    /// it; frees the guest-call routines when they are idle.
    fn unload_staged(&mut self, vm: &Vm) -> Result<()> {
        let Some(st) = self.patcher.staged().cloned() else { return Ok(()) };
        if st.init_ok {
            if let Some(exit) = st.exit {
                if self.run_call(vm, exit, &[], MODULE_CALL_TIMEOUT)?.is_none() {
                    self.patcher.abandon_staged();
                    bail!("{}: its exit did not return within {} s; its memory stays reserved", st.name, MODULE_CALL_TIMEOUT.as_secs());
                }
            }
        }
        let paused = vm.pause()?;
        self.patcher.unstage(&LiveWriter(paused.memory()))?;
        drop(paused);
        self.release_calls(vm)
    }

    /// Arms (or disarms) the traps at the guest's `klp_module_coming` and
    /// `klp_module_going` as the patcher needs them.
    fn sync_traps(&mut self, vm: &Vm) -> Result<()> {
        let want = self.patcher.module_traps();
        if want == self.armed {
            return Ok(());
        }
        let traps = want.iter().map(|(addr, redirect)| vmm::vcpu::ExecTrap { addr: *addr, redirect: *redirect }).collect();
        vm.set_exec_traps(traps)?;
        self.armed = want;
        Ok(())
    }

    /// Serves a module load or unload the guest waits on: patches a coming
    /// module before its init runs (pre-patch and post-patch callbacks of
    /// each patch's object, in stack order; a failing pre-patch fails the
    /// load with its error), or unpatches a going one before its text is
    /// freed (pre-unpatch and post-unpatch). `true` when one was served.
    fn module_event(&mut self, vm: &Vm) -> Result<bool> {
        if self.armed.is_empty() {
            return Ok(false);
        }
        let Some(c) = self.patcher.call_engine() else { return Ok(false) };
        let Some((kind, mod_addr)) = c.pending_event(&LiveMemory(vm.memory()))? else { return Ok(false) };
        let paused = vm.pause()?;
        let name = self.with_kernel(&paused, |_, k, _| {
            let off = k.off("module", "name")?;
            Ok(k.mem.read_cstr(mod_addr.checked_add(off).ok_or_else(|| anyhow!("module address"))?, 56)?)
        });
        drop(paused);
        let verdict = match name {
            Err(e) => {
                eprintln!("hyperpatch: a module event for {mod_addr:#x}: {e:#}");
                0
            }
            Ok(name) if kind == patcher::guest_call::EVENT_COMING => self.module_coming(vm, &name, mod_addr),
            Ok(name) => {
                if let Err(e) = self.module_going(vm, &name) {
                    eprintln!("hyperpatch: unpatching going module {name}: {e:#}");
                }
                0
            }
        };
        let paused = vm.pause()?;
        let c = self.patcher.call_engine().ok_or_else(|| anyhow!("guest-call engine"))?;
        c.answer_event(&LiveWriter(paused.memory()), verdict)?;
        Ok(true)
    }

    /// Runs one object's callback of `kind`; its return value.
    fn object_callback(&mut self, vm: &Vm, patch: &str, object: usize, kind: CallbackKind) -> Result<i32> {
        if !self.patcher.runs_callbacks(patch) {
            return Ok(0);
        }
        let list = {
            let paused = vm.pause()?;
            self.with_kernel(&paused, |p, k, w| {
                p.set_prev_states(w, patch)?;
                Ok(p.callbacks(k, patch, kind)?)
            })?
        };
        let Some(cb) = list.into_iter().find(|c| c.object == object) else { return Ok(0) };
        if kind == CallbackKind::PostUnpatch {
            self.patcher.set_post_unpatch_enabled(patch, object, false);
        }
        let ret = if cb.func == 0 {
            0
        } else {
            self.run_call(vm, cb.func, &[patcher::guest_call::CallArg::Value(cb.obj)], MODULE_CALL_TIMEOUT)?
                .ok_or_else(|| anyhow!("{patch}: the {kind:?} callback of {} did not return", cb.name))? as i32
        };
        if kind == CallbackKind::PrePatch {
            self.patcher.set_post_unpatch_enabled(patch, object, ret == 0);
        }
        Ok(ret)
    }

    /// A module is coming: the verdict klp_module_coming returns.
    fn module_coming(&mut self, vm: &Vm, name: &str, mod_addr: u64) -> i32 {
        let targets = self.patcher.objects_for_module(name);
        let in_transition = self.patcher.in_transition().map(str::to_string);
        let mut done: Vec<(String, usize)> = Vec::new();
        let mut verdict = 0;
        for (patch, idx) in &targets {
            eprintln!("hyperpatch: applying patch '{patch}' to loading module '{name}'");
            let r = (|| -> Result<i32> {
                // obj->mod first: the callbacks read it.
                let paused = vm.pause()?;
                self.with_kernel(&paused, |p, k, w| Ok(p.bind_object(k, w, patch, *idx, mod_addr)?))?;
                drop(paused);
                let ret = self.object_callback(vm, patch, *idx, CallbackKind::PrePatch)?;
                if ret != 0 {
                    eprintln!("hyperpatch: pre-patch callback failed for object '{name}'");
                    return Ok(ret);
                }
                let paused = vm.pause()?;
                self.with_kernel(&paused, |p, k, w| {
                    let records = k.ftrace_records()?;
                    p.patch_coming_object(k, w, &records, patch, *idx, mod_addr)?;
                    Ok(())
                })?;
                drop(paused);
                if in_transition.as_deref() != Some(patch.as_str()) {
                    self.object_callback(vm, patch, *idx, CallbackKind::PostPatch)?;
                }
                Ok(0)
            })();
            match r {
                Ok(0) => done.push((patch.clone(), *idx)),
                Ok(ret) => {
                    verdict = ret;
                    break;
                }
                Err(e) => {
                    eprintln!("hyperpatch: patching loading module {name} with {patch}: {e:#}");
                    verdict = -22;
                    break;
                }
            }
        }
        if verdict != 0 {
            // As klp_cleanup_module_patches_limited: the patches already
            // applied to it leave it again (not the one that failed).
            if let Err(e) = self.module_leave(vm, name, &done) {
                eprintln!("hyperpatch: unpatching module {name} after a failed load: {e:#}");
            }
        }
        verdict
    }

    /// A module is going: every patch leaves it (pre-unpatch, sites back,
    /// post-unpatch).
    fn module_going(&mut self, vm: &Vm, name: &str) -> Result<()> {
        let targets = self.patcher.objects_for_module(name);
        self.module_leave(vm, name, &targets)
    }

    /// The `targets` (patch, object) leave module `name`.
    fn module_leave(&mut self, vm: &Vm, name: &str, targets: &[(String, usize)]) -> Result<()> {
        let in_transition = self.patcher.in_transition().map(str::to_string);
        for (patch, idx) in targets {
            if in_transition.as_deref() != Some(patch.as_str()) {
                self.object_callback(vm, patch, *idx, CallbackKind::PreUnpatch)?;
            }
        }
        eprintln!("hyperpatch: reverting patches on unloading module '{name}'");
        let paused = vm.pause()?;
        self.with_kernel(&paused, |p, k, w| Ok(p.unpatch_going_module(k, w, name)?))?;
        drop(paused);
        for (patch, idx) in targets {
            self.object_callback(vm, patch, *idx, CallbackKind::PostUnpatch)?;
        }
        let paused = vm.pause()?;
        self.with_kernel(&paused, |p, k, w| Ok(p.unbind_module(k, w, name)?))
    }

    /// The guest-call routines are placed although nothing needs them any
    /// more, and they can be freed once no kworker is inside them.
    fn calls_releasable(&self) -> bool {
        self.patcher.call_engine().is_some_and(|c| !c.any_lost())
            && self.patcher.patches().is_empty()
            && self.patcher.staged().is_none()
    }

    /// Frees the guest-call routines if nothing uses them (see
    /// `Patcher::release_calls_if_idle`); the module-load traps are
    /// disarmed first when nothing needs them.
    fn release_calls(&mut self, vm: &Vm) -> Result<()> {
        if self.patcher.call_engine().is_none() {
            return Ok(());
        }
        self.sync_traps(vm)?;
        if !self.armed.is_empty() {
            return Ok(());
        }
        let mut base = self.vmlinux_orc.take();
        if base.is_none() {
            base = self.with_running_kernel(vm, |_, k| Ok(k.vmlinux_orc()?)).ok();
        }
        let paused = vm.pause()?;
        let r = self.with_kernel(&paused, |p, k, w| {
            let mut u = unwinder_for(k, &mut base, &k.modules()?)?;
            p.register_orc(&mut u);
            p.release_calls_if_idle(k, w, &u)?;
            Ok(())
        });
        self.vmlinux_orc = base;
        r
    }

    /// One safe-point attempt of the pending operation, all vCPUs stopped.
    /// `Some(result)` when it has ended (switched, failed or timed out).
    /// At a global safe point, a vCPU running inside a changed function is
    /// single-stepped (bounded) until it has left, then checked again.
    fn attempt(&mut self, vm: &Vm) -> Option<Reply> {
        // Stacks are read while the guest runs; the stop re-checks only the
        // tasks that may have run since (see patcher::engine::prescan).
        let held = self.pending.as_mut().and_then(|op| op.held_prescan.take());
        let is_held = held.is_some();
        let mut prescan = match held {
            Some(p) => Some(p),
            None => self.prescan(vm),
        };
        // A pre-scan that unwound most stacks itself (the operation's first)
        // is taken once more, carrying them over: the stop then follows a
        // short walk that reads only each task's counts, not a long one
        // that read every stack (and took the host's caches with it).
        if !is_held && prescan.as_ref().is_some_and(|p| p.carried.saturating_mul(2) < p.walked) {
            prescan = self.prescan_again(vm, prescan.take());
        }
        if let Some(op) = self.pending.as_mut() {
            if op.hold_after_prescan {
                if op.start.elapsed() >= op.timeout {
                    return Some(Err(format!("{} {}: held after its pre-scan until it timed out; nothing was changed", op.verb, op.target)));
                }
                op.held_prescan = Some(prescan.unwrap_or_default());
                return None;
            }
        }
        // A stop that finds a task switched since the pre-scan gives up at
        // once (a few times): the guest runs on, is pre-scanned again (the
        // stacks of tasks that did not run are carried over), and stops
        // again, so the stop itself need not read every task. A held
        // pre-scan is used as it is (the tests' races depend on it).
        let mut stopped_for = Duration::ZERO;
        let mut retried = 0u32;
        let mut retaken = 0u32;
        let (paused, stopped, mut outcome) = loop {
            // A switch since the pre-scan's walk is seen without stopping
            // too (the counts read while the guest runs): pre-scan again
            // first, rather than stop only to give up.
            if !is_held && retaken < PRESCAN_RETAKES {
                if let Some(p) = prescan.as_ref() {
                    if !self.with_running_kernel(vm, |_, k| Ok(p.quiet_now(k))).unwrap_or(true) {
                        retaken += 1;
                        prescan = self.prescan_again(vm, prescan.take());
                        continue;
                    }
                }
            }
            let paused = match vm.pause() {
                Ok(p) => p,
                Err(e) => return Some(Err(e.to_string())),
            };
            let stopped = Instant::now();
            let retry = !is_held && retried < QUIET_RETRIES && prescan.is_some();
            match self.try_once(&paused, prescan.as_ref(), retry) {
                Ok(None) => {
                    stopped_for += stopped.elapsed();
                    drop(paused);
                    retried += 1;
                    prescan = self.prescan_again(vm, prescan.take());
                }
                Ok(Some(o)) => break (paused, stopped, Ok(o)),
                Err(e) => break (paused, stopped, Err(e)),
            }
        };
        let mut steps = 0u32;
        while let Ok(Outcome::Blocked(b)) = &outcome {
            let running: Vec<usize> = b.iter().filter(|x| !x.unreliable).filter_map(|x| x.running_on).collect();
            if running.is_empty() || running.len() != b.len() || steps >= MAX_STEP_OUT {
                break;
            }
            let mut failed = false;
            for _ in 0..STEP_BATCH {
                for cpu in &running {
                    // Refused while a client holds the VM paused.
                    if paused.single_step(*cpu).is_err() {
                        failed = true;
                    }
                }
                steps += 1;
                if failed {
                    break;
                }
            }
            if failed {
                break;
            }
            outcome = self.try_once(&paused, prescan.as_ref(), false).map(|o| o.unwrap_or(Outcome::Blocked(Vec::new())));
        }
        let stopped_for = stopped_for + stopped.elapsed();
        drop(paused);
        let op = self.pending.as_mut()?;
        if let Some(c) = op.stack_counts.as_mut() {
            c.stops_retried = retried;
            c.prescans_retaken = retaken;
        }
        op.last_stop_us = Some(stopped_for.as_secs_f64() * 1e6);
        op.last_prescan = prescan;
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
                    "stacks": op.stack_counts.unwrap_or_default(),
                    // Where each vCPU was in the stop that switched.
                    "vcpus_at_switch": self.last_cpus.iter().flatten().map(|c| json!({
                        "user_mode": c.in_user_mode(), "rip": c.rip, "cr3": c.cr3,
                    })).collect::<Vec<_>>(),
                    "prep_stops_us": if op.verb == "apply" {
                        self.prep_stops.iter().map(|(what, us)| json!({"stop": what, "us": us})).collect::<Vec<_>>()
                    } else {
                        Vec::new()
                    },
                })))
            }
            Ok(Outcome::InTransition { remaining, blockers }) => {
                op.blockers = blockers;
                op.remaining = Some(remaining);
                None
            }
            Ok(Outcome::Blocked(blockers)) => {
                if op.start.elapsed() >= op.timeout {
                    let list: Vec<String> = blockers.iter().map(|b| b.to_string()).collect();
                    return Some(Err(PatchError::Timeout { secs: op.timeout.as_secs(), blockers: list.join("; ") }.to_string()));
                }
                op.blockers = blockers;
                None
            }
        }
    }

    /// One check-and-switch of the pending operation on a paused VM, with
    /// the stacks of a pre-scan where they are still the tasks' stacks.
    /// With `retry`, `None` when a task switched since the pre-scan
    /// (nothing was checked or changed).
    fn try_once(&mut self, paused: &PausedVm<'_>, prescan: Option<&Prescan>, retry: bool) -> Result<Option<Outcome>> {
        let mut op = self.pending.take().ok_or_else(|| anyhow!("no pending operation"))?;
        let mut base = self.vmlinux_orc.take();
        let outcome = self.with_kernel(paused, |p, k, w| {
            // Given up before anything else is read.
            if retry && prescan.is_some_and(|ps| !ps.quiet_now(k)) {
                return Ok(None);
            }
            op.attempts += 1;
            let mods = k.modules()?;
            let mut prescan = prescan;
            if op.unwinder.is_none() || module_signature(&mods) != op.unwinder_modules {
                // A module came or went since the tables were read: read
                // the modules' tables again (vmlinux's are kept), and
                // unwind every stack in this stop.
                let mut u = unwinder_for(k, &mut base, &mods)?;
                p.register_orc(&mut u);
                op.unwinder = Some(u);
                op.unwinder_modules = module_signature(&mods);
                prescan = None;
            }
            if op.records.is_none() && op.verb == "apply" {
                op.records = Some(k.ftrace_records()?);
            }
            let u = op.unwinder.as_ref().ok_or_else(|| anyhow!("unwinder"))?;
            let empty = Prescan::default();
            let g = PrescannedGuest::new(LiveGuest::new(k, w, u), prescan.unwrap_or(&empty));
            let r = (|| -> Result<Outcome> {
                if p.in_transition().is_some() {
                    if op.reverse_now {
                        op.reverse_now = false;
                        op.verb = format!("reverse {}", op.verb);
                        return Ok(p.reverse_on(&g)?);
                    }
                    return Ok(if op.force_now { p.force_on(&g)? } else { p.advance_on(&g)? });
                }
                Ok(match op.verb.as_str() {
                    "apply" => p.apply_on(k, &g, op.records.as_ref().ok_or_else(|| anyhow!("records"))?, op.opts)?,
                    "disable" => p.set_enabled_on(&g, &op.target, false, op.opts.force, op.opts.per_task)?,
                    _ => p.set_enabled_on(&g, &op.target, true, op.opts.force, op.opts.per_task)?,
                })
            })();
            let (reused, unwound) = g.counts();
            op.stack_counts = Some(StackCounts {
                prescanned: prescan.map(|x| x.walked).unwrap_or(0),
                carried_from_last_prescan: prescan.map(|x| x.carried).unwrap_or(0),
                tasks_read_in_stop: g.tasks_read(),
                reused,
                unwound_in_stop: unwound,
                no_switch_since_prescan: prescan.is_some() && g.quiet(),
                stops_retried: 0,
                prescans_retaken: 0,
            });
            r.map(Some)
        });
        self.vmlinux_orc = base;
        self.pending = Some(op);
        outcome
    }

    fn pending_view(&self, vm: &Vm) -> Value {
        self.pending.as_ref().map(|op| PendingView::of(op, vm).render()).unwrap_or(Value::Null)
    }

    /// Runs a patch verb. Returns the reply channel back when the answer
    /// must wait for the pending operation to end.
    fn patch_job(&mut self, vm: &Vm, req: PatchRequest, tx: Sender<Reply>) -> Option<Sender<Reply>> {
        let (verb, target, opts, timeout, wait, hold) = match req {
            PatchRequest::List {} => {
                let _ = tx.send(Err("list is served by the control loop".into()));
                return None;
            }
            PatchRequest::Remove { name } => {
                let r = (|| -> Result<Value> {
                    if self.pending.as_ref().is_some_and(|p| p.target == name) {
                        bail!("patch {name} is in transition");
                    }
                    // As rmmod: the module's exit runs once its patch is
                    // disabled, then its memory is freed.
                    let exit = self.patcher.exit_of(&name)?;
                    let mut exit_ran = false;
                    if let Some(exit) = exit {
                        if self.run_call(vm, exit, &[], MODULE_CALL_TIMEOUT)?.is_none() {
                            let paused = vm.pause()?;
                            self.patcher.forget_keeping_memory(&name)?;
                            drop(paused);
                            bail!("{name}: its exit did not return within {} s; the patch is forgotten but its memory stays reserved", MODULE_CALL_TIMEOUT.as_secs());
                        }
                        exit_ran = true;
                    }
                    let paused = vm.pause()?;
                    self.patcher.remove(&LiveWriter(paused.memory()), &name)?;
                    drop(paused);
                    self.release_calls(vm)?;
                    Ok(json!({"removed": name, "exit_ran": exit_ran, "reserved_used": self.patcher.reserved_used()}))
                })();
                let _ = tx.send(r.map_err(|e| format!("{e:#}")));
                return None;
            }
            PatchRequest::SetParam { name, param } => {
                let r = (|| -> Result<Value> {
                    let paused = vm.pause()?;
                    self.with_kernel(&paused, |p, k, w| Ok(p.set_param(k, w, &name, &param)?))?;
                    Ok(json!({"patch": name, "param": param}))
                })();
                let _ = tx.send(r.map_err(|e| format!("{e:#}")));
                return None;
            }
            PatchRequest::Disable { ref name, .. }
                if self.pending.as_ref().is_some_and(|p| &p.target == name && p.remaining.is_some() && !p.verb.starts_with("reverse")) =>
            {
                // Disabling a patch in its own transition reverses it, as
                // writing 0 to its `enabled` does upstream.
                return self.patch_job(vm, PatchRequest::Reverse {}, tx);
            }
            PatchRequest::Reverse {} | PatchRequest::Force {} | PatchRequest::Release {} => {
                let force = matches!(req, PatchRequest::Force {});
                let Some(p) = self.pending.as_mut() else {
                    let _ = tx.send(Err("no operation is running".into()));
                    return None;
                };
                if matches!(req, PatchRequest::Release {}) {
                    if !p.hold_after_prescan {
                        let _ = tx.send(Err(format!("{} {} is not held", p.verb, p.target)));
                        return None;
                    }
                    p.hold_after_prescan = false;
                } else if force {
                    p.force_now = true;
                    eprintln!("hyperpatch: {} {}: forcing the transition (unsafe)", p.verb, p.target);
                } else {
                    if p.remaining.is_none() {
                        let _ = tx.send(Err(format!("{} {} waits for a global safe point; nothing to reverse", p.verb, p.target)));
                        return None;
                    }
                    p.reverse_now = true;
                }
                if vm.client_holds() {
                    // Done at the first attempt after the client resumes.
                    let _ = tx.send(Ok(self.pending_view(vm)));
                    return None;
                }
                match self.attempt(vm) {
                    Some(r) => {
                        let r = self.finish(vm, r);
                        let _ = tx.send(r);
                    }
                    None => {
                        let _ = tx.send(Ok(self.pending_view(vm)));
                    }
                }
                return None;
            }
            PatchRequest::Apply { path, params, force, skip_callbacks, per_task, timeout_secs, wait, hold_after_prescan, prescan } => {
                if let Some(p) = &self.pending {
                    let _ = tx.send(Err(format!("{} {} is still running; try again when it ends", p.verb, p.target)));
                    return None;
                }
                if !timeout_secs.is_finite() || timeout_secs < 0.0 {
                    let _ = tx.send(Err(format!("timeout_secs must be a non-negative number of seconds, not {timeout_secs}")));
                    return None;
                }
                match self.load_module(vm, &path, &params, skip_callbacks) {
                    Ok(name) => ("apply", name, ApplyOptions { force, skip_callbacks, per_task }, timeout_secs, wait, (hold_after_prescan, prescan)),
                    Err(e) => {
                        let _ = tx.send(Err(format!("{e:#}")));
                        return None;
                    }
                }
            }
            PatchRequest::Disable { name, force, per_task, timeout_secs, wait } => {
                if let Err(e) = self.before_switch(vm, &name, false) {
                    let _ = tx.send(Err(format!("{e:#}")));
                    return None;
                }
                ("disable", name, ApplyOptions { force, skip_callbacks: false, per_task }, timeout_secs, wait, (false, true))
            }
            PatchRequest::Enable { name, force, per_task, timeout_secs, wait } => {
                if let Err(e) = self.before_switch(vm, &name, true) {
                    let _ = tx.send(Err(format!("{e:#}")));
                    return None;
                }
                ("enable", name, ApplyOptions { force, skip_callbacks: false, per_task }, timeout_secs, wait, (false, true))
            }
        };
        if let Some(p) = &self.pending {
            let _ = tx.send(Err(format!("{} {} is still running; try again when it ends", p.verb, p.target)));
            return None;
        }
        if !timeout.is_finite() || timeout < 0.0 {
            let _ = tx.send(Err(format!("timeout_secs must be a non-negative number of seconds, not {timeout}")));
            return None;
        }
        self.finished = None;
        self.pending = Some(PendingOp {
            verb: verb.to_string(),
            target,
            opts,
            start: Instant::now(),
            timeout: Duration::from_secs_f64(timeout.min(3600.0)),
            attempts: 0,
            blockers: Vec::new(),
            unwinder: None,
            records: None,
            unwinder_modules: Vec::new(),
            stack_counts: None,
            last_prescan: None,
            last_stop_us: None,
            prescan: hold.1,
            hold_after_prescan: hold.0,
            held_prescan: None,
            remaining: None,
            force_now: false,
            reverse_now: false,
            waiters: Vec::new(),
        });
        // Read what does not change while the guest runs without stopping
        // it (a stop checks it again); when that cannot be done, in a
        // first, separate stop, so the switching stops stay short.
        let prep = (|| -> Result<()> {
            if self.read_tables_running(vm).is_ok() {
                return Ok(());
            }
            let paused = vm.pause()?;
            let mut op = self.pending.take().ok_or_else(|| anyhow!("pending"))?;
            let mut base = self.vmlinux_orc.take();
            let r = self.with_kernel(&paused, |p, k, _| read_tables(&mut op, p, k, &mut base));
            self.vmlinux_orc = base;
            self.pending = Some(op);
            r
        })();
        if let Err(e) = prep {
            self.pending = None;
            let e = match self.unload_staged(vm) {
                Ok(()) => format!("{e:#}"),
                Err(u) => format!("{e:#}; then unloading the module: {u:#}"),
            };
            let _ = tx.send(Err(e));
            return None;
        }
        if vm.client_holds() {
            // No attempt while a client holds the VM: the first comes on
            // the worker's tick after it resumes.
            if wait {
                return Some(tx);
            }
            let _ = tx.send(Ok(self.pending_view(vm)));
            return None;
        }
        if let Some(r) = self.attempt(vm) {
            let r = self.finish(vm, r);
            let _ = tx.send(r);
            return None;
        }
        if wait {
            return Some(tx);
        }
        let _ = tx.send(Ok(self.pending_view(vm)));
        None
    }

    fn saved(&self) -> std::result::Result<Value, String> {
        let pending = self.pending.as_ref().map(|op| SavedOp {
            verb: op.verb.clone(),
            target: op.target.clone(),
            opts: op.opts,
            timeout_secs: op.timeout.as_secs_f64(),
            attempts: op.attempts,
            per_task: op.remaining.is_some(),
            remaining: op.remaining,
        });
        #[derive(Serialize)]
        struct SavedRef<'a> {
            version: u32,
            patcher_version: u32,
            patcher: &'a Patcher,
            pending: Option<SavedOp>,
            finished: &'a Option<Finished>,
        }
        serde_json::to_value(SavedRef {
            version: SAVED_STATE_VERSION,
            patcher_version: patcher::engine::STATE_VERSION,
            patcher: &self.patcher,
            pending,
            finished: &self.finished,
        })
        .map_err(|e| format!("encoding the patcher state: {e}"))
    }
}

impl ApiExtension for GuestApi {
    fn verbs(&self) -> Vec<&'static str> {
        let mut v: Vec<&'static str> = crate::inspect::VERBS.to_vec();
        v.push("dump");
        v.push("call");
        v.extend_from_slice(PATCH_VERBS);
        v
    }

    fn handle(&self, _vm: &Arc<Vm>, request: &Value) -> Handled {
        let verb = request.get("verb").and_then(Value::as_str).unwrap_or("");
        let (tx, rx) = mpsc::channel();
        if crate::inspect::VERBS.contains(&verb) {
            match serde_json::from_value::<crate::inspect::InspectRequest>(request.clone()) {
                Ok(r) => self.queue(Job::Inspect(r, tx)),
                Err(e) => return Handled::Now(Err(format!("{verb}: {e}"))),
            }
        } else if verb == "call" {
            match serde_json::from_value::<CallRequest>(request.clone()) {
                Ok(r) => self.queue(Job::Call(r, tx)),
                Err(e) => return Handled::Now(Err(format!("{verb}: {e}"))),
            }
        } else if verb == "dump" {
            match serde_json::from_value::<DumpRequest>(request.clone()) {
                Ok(DumpRequest::Dump { out }) => self.queue(Job::Dump(out, tx)),
                Err(e) => return Handled::Now(Err(format!("{verb}: {e}"))),
            }
        } else {
            match serde_json::from_value::<PatchRequest>(request.clone()) {
                Ok(PatchRequest::List {}) => return Handled::Now(Ok(self.list())),
                Ok(r) => self.queue(Job::Patch(r, tx)),
                Err(e) => return Handled::Now(Err(format!("{verb}: {e}"))),
            }
        }
        Handled::Later(rx)
    }

    fn with_state(
        &self,
        save: &mut dyn FnMut(Option<&Value>) -> std::result::Result<Value, String>,
    ) -> std::result::Result<Value, String> {
        // The worker changes the guest only under this lock: the state and
        // the guest's memory are saved at one moment.
        let st = lock(&self.shared.state);
        let v = st.saved()?;
        save(Some(&v))
    }

    fn shutdown(&self) {
        self.shared.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.shared.wake.notify_all();
        if let Some(h) = lock(&self.worker).take() {
            let _ = h.join();
        }
    }
}

impl Drop for GuestApi {
    fn drop(&mut self) {
        self.shutdown();
    }
}
