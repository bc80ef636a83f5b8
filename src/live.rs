//! Introspection of a live VM: guest memory of a paused VM as
//! [`PhysMem`], and the API extension that answers introspection verbs and
//! `dump` over the control socket. kallsyms and BTF are decoded once per VM
//! and kept: they live in kernel image memory that does not change.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
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
pub const PATCH_VERBS: &[&str] = &["apply", "disable", "enable", "remove", "list"];
/// Pause between safe-point attempts.
const RETRY_DELAY: Duration = Duration::from_millis(5);

/// Answers introspection and patching verbs and `dump` for a live VM.
pub struct GuestApi {
    cache: Option<(Kallsyms, Btf)>,
    patcher: Patcher,
}

impl GuestApi {
    pub fn new(vm: &Vm) -> GuestApi {
        let l = vm.layout();
        GuestApi { cache: None, patcher: Patcher::new(l.reserved_start(), l.reserved_size) }
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

    fn patch_verb(&mut self, vm: &Vm, verb: &str, req: &Value) -> Result<Value> {
        let name = || req.get("name").and_then(Value::as_str).map(str::to_owned).ok_or_else(|| anyhow!("{verb} needs \"name\""));
        let force = req.get("force").and_then(Value::as_bool).unwrap_or(false);
        let timeout = Duration::from_secs_f64(req.get("timeout_secs").and_then(Value::as_f64).unwrap_or(30.0).clamp(0.0, 3600.0));
        match verb {
            "list" => Ok(self.list()),
            "remove" => {
                let name = name()?;
                let paused = vm.pause()?;
                let mem = paused.memory();
                self.patcher.remove(&LiveWriter(mem), &name)?;
                drop(paused);
                Ok(json!({"removed": name, "reserved_used": self.patcher.reserved_used()}))
            }
            "apply" | "disable" | "enable" => {
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
                let opts = ApplyOptions { replace: req.get("replace").and_then(Value::as_bool), force };
                let target = match &module {
                    Some(m) => m.name.clone(),
                    None => name()?,
                };
                let start = Instant::now();
                let mut attempts = 0u64;
                let mut unwinder = None;
                loop {
                    attempts += 1;
                    let paused = vm.pause()?;
                    let stopped = Instant::now();
                    let outcome = self.with_kernel(&paused, |p, k, w| {
                        if unwinder.is_none() {
                            unwinder = Some(k.unwinder(&k.modules()?)?);
                        }
                        let u = unwinder.as_ref().ok_or_else(|| anyhow!("unwinder"))?;
                        Ok(match (&module, verb) {
                            (Some(m), _) => p.apply(k, w, u, m, opts)?,
                            (None, "disable") => p.set_enabled(k, w, u, &target, false, force)?,
                            (None, _) => p.set_enabled(k, w, u, &target, true, force)?,
                        })
                    })?;
                    let stopped_for = stopped.elapsed();
                    drop(paused);
                    match outcome {
                        Outcome::Switched { sites, forced } => {
                            if forced {
                                eprintln!("hyperpatch: {verb} {target}: FORCED switch while functions were on stacks (unsafe)");
                            }
                            return Ok(json!({
                                "patch": target, "verb": verb, "sites": sites, "forced": forced,
                                "attempts": attempts, "elapsed_secs": start.elapsed().as_secs_f64(),
                                "stopped_us": stopped_for.as_secs_f64() * 1e6,
                            }));
                        }
                        Outcome::Blocked(blockers) => {
                            if start.elapsed() >= timeout {
                                let list: Vec<String> = blockers.iter().map(|b| b.to_string()).collect();
                                return Err(PatchError::Timeout { secs: timeout.as_secs(), blockers: list.join("; ") }.into());
                            }
                            if attempts % 200 == 1 {
                                eprintln!("hyperpatch: {verb} {target}: waiting for a safe point: {}", blockers.iter().map(|b| b.to_string()).collect::<Vec<_>>().join("; "));
                            }
                            std::thread::sleep(RETRY_DELAY);
                        }
                    }
                }
            }
            other => Err(anyhow!("unknown patch verb {other}")),
        }
    }

    fn list(&self) -> Value {
        json!({
            "patches": self.patcher.patches().iter().map(|p| json!({
                "name": p.name, "enabled": p.enabled, "transition": false, "replace": p.replace,
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
    fn handle(&mut self, vm: &Vm, verb: &str, req: &Value) -> Option<std::result::Result<Value, String>> {
        if verb != "dump" && !crate::inspect::VERBS.contains(&verb) && !PATCH_VERBS.contains(&verb) {
            return None;
        }
        Some(self.run(vm, verb, req).map_err(|e| format!("{e:#}")))
    }
}
