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

/// Answers introspection verbs and `dump` for a live VM.
#[derive(Default)]
pub struct IntrospectApi {
    cache: Option<(Kallsyms, Btf)>,
}

impl IntrospectApi {
    fn run(&mut self, vm: &Vm, verb: &str, req: &Value) -> Result<Value> {
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

impl ApiExtension for IntrospectApi {
    fn handle(&mut self, vm: &Vm, verb: &str, req: &Value) -> Option<std::result::Result<Value, String>> {
        if verb != "dump" && !crate::inspect::VERBS.contains(&verb) {
            return None;
        }
        Some(self.run(vm, verb, req).map_err(|e| format!("{e:#}")))
    }
}
