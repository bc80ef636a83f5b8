//! `hyperpatch`: `run` starts a VM; the other subcommands talk to a running
//! VM over its control socket.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use vmm::api::{ApiClient, Controller};
use vmm::{Vm, VmConfig, VmExit};

/// Command line every guest gets; `--cmdline` and the test image's own
/// options are appended.
/// `clocksource=kvm-clock`: this KVM hands a restored guest the host TSC, so
/// a TSC-clocked guest would replay the snapshot's age; kvm-clock is restored
/// exactly (KVM_SET_CLOCK).
const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 clocksource=kvm-clock";

#[derive(Parser)]
#[command(name = "hyperpatch", version, about = "Live-patch a Linux guest kernel from the hypervisor")]
struct Cli {
    /// Control socket of the VM (created by `run`, used by the other commands).
    #[arg(long, global = true)]
    api_sock: Option<PathBuf>,
    /// Print machine-readable JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// Introspect a dump file (from `dump`) instead of a running VM.
    #[arg(long, global = true, conflicts_with = "api_sock")]
    image: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a guest (the test image when --kernel is not given) or restore a snapshot.
    Run(RunArgs),
    /// Show whether the VM runs, its vCPUs and uptime.
    Status,
    /// Stop every vCPU.
    Pause,
    /// Let the vCPUs run again.
    Resume,
    /// End the VM.
    Shutdown,
    /// Write a snapshot of the VM (memory, vCPUs, devices) to DIR.
    Snapshot { dir: PathBuf },
    /// Write guest memory and vCPU state to one ELF core file.
    Dump {
        #[arg(long)]
        out: PathBuf,
    },
    /// Every guest thread: pid, tgid, comm, state, CPU.
    Ps,
    /// Kernel stacks of one task (pid) or of all.
    Stack { target: String },
    /// A symbol's address(es), or the symbol at an address (0x...).
    Sym { query: String },
    /// A struct's layout from the guest's BTF.
    Types { name: String },
    /// A function's ftrace call site and the guest's record for it.
    Ftrace {
        function: String,
        #[arg(long, default_value_t = 0)]
        sympos: u32,
    },
    /// Loaded modules, as /proc/modules.
    Mods,
    /// The guest's own livepatches.
    Klp,
    /// Apply a livepatch module (.ko) to the running guest from outside.
    Apply {
        module: PathBuf,
        /// Module parameters as insmod takes them (`replace=1`,
        /// `pre_patch_ret=-19`), set through the module's own parameter table.
        params: Vec<String>,
        /// Switch even when a changed function is on a stack (unsafe).
        #[arg(long)]
        force: bool,
        /// Apply a module with klp callbacks without running them.
        #[arg(long)]
        skip_callbacks: bool,
        /// Seconds to wait for a safe point.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
        /// Apply to this guest's control socket too (repeatable): every
        /// guest is patched at once, and each one's result is reported.
        #[arg(long = "guest")]
        guests: Vec<PathBuf>,
        /// Apply to every control socket in this directory.
        #[arg(long)]
        guests_dir: Option<PathBuf>,
    },
    /// Disable a patch (the patch below it on each func stack takes over).
    Disable {
        name: String,
        #[arg(long)]
        force: bool,
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
    },
    /// Enable a disabled patch again.
    Enable {
        name: String,
        #[arg(long)]
        force: bool,
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
    },
    /// Forget a disabled patch and free its guest memory.
    Remove { name: String },
    /// Patches in stack order with their functions and states.
    List,
    /// Complete the running per-task transition at once (unsafe, logged).
    Force,
    /// Send the running per-task transition back.
    Reverse,
    /// The main job end to end: boot the test guest, show its /proc/cmdline,
    /// apply livepatch-sample.ko from outside, show it again, shut down.
    Demo {
        /// Patch module to apply (default: the test image's livepatch-sample.ko).
        #[arg(long)]
        module: Option<PathBuf>,
        /// Kernel line of the test image (a directory of guest-images/).
        #[arg(long, default_value = DEFAULT_GUEST)]
        guest: String,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Kernel: a vmlinux ELF (booted through PVH) or a bzImage.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Without --kernel: the test image's kernel line (6.1, 6.12).
    #[arg(long, default_value = DEFAULT_GUEST, conflicts_with = "kernel")]
    guest: String,
    /// Initial ramdisk (uncompressed cpio is fastest here).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Extra kernel command-line options, appended to the default.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Number of vCPUs (1 to 64; the guest starts as many as its NR_CPUS allows).
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 512)]
    mem: u64,
    /// Size in MiB of the guest-physical region reserved for injected code.
    #[arg(long, default_value_t = 16)]
    reserved: u64,
    /// Start from a snapshot directory instead of booting.
    #[arg(long, conflicts_with_all = ["kernel", "initrd"])]
    restore: Option<PathBuf>,
    /// Write the guest console to this file instead of stdout.
    #[arg(long)]
    console_log: Option<PathBuf>,
    /// Host cache of decoded kernel tables (kallsyms, BTF), shared by every
    /// VMM and keyed by the guest's own bytes (default
    /// ~/.cache/hyperpatch/kernel-tables).
    #[arg(long, conflicts_with = "no_table_cache")]
    table_cache: Option<PathBuf>,
    /// Decode the kernel tables from the guest every time, without the cache.
    #[arg(long)]
    no_table_cache: bool,
}

/// The table cache `run` and `demo` use.
fn table_cache(dir: Option<&Path>, off: bool) -> hyperpatch::table_cache::TableCache {
    use hyperpatch::table_cache::TableCache;
    match (off, dir) {
        (true, _) => TableCache::disabled(),
        (false, Some(d)) => TableCache::for_this_build(d),
        (false, None) => TableCache::default_root().map_or_else(TableCache::disabled, |r| TableCache::for_this_build(&r)),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            let _ = std::io::stdout().flush();
            eprintln!("hyperpatch: {:#}", e);
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> Result<ExitCode> {
    let introspection = match &cli.cmd {
        Cmd::Ps => Some(("ps", json!({}))),
        Cmd::Stack { target } => Some(("stack", json!({"target": target}))),
        Cmd::Sym { query } => Some(("sym", json!({"query": query}))),
        Cmd::Types { name } => Some(("types", json!({"struct": name}))),
        Cmd::Ftrace { function, sympos } => Some(("ftrace", json!({"function": function, "sympos": sympos}))),
        Cmd::Mods => Some(("mods", json!({}))),
        Cmd::Klp => Some(("klp", json!({}))),
        _ => None,
    };
    if let Some((verb, mut req)) = introspection {
        let result = match &cli.image {
            Some(path) => {
                let img = introspect::image::DumpImage::open(path).with_context(|| format!("opening {}", path.display()))?;
                let k = introspect::kernel::Kernel::open(&img, img.cpus.clone()).context("reading the guest kernel")?;
                hyperpatch::inspect::run_verb(&k, verb, &req)?
            }
            None => {
                req["verb"] = json!(verb);
                call(cli.api_sock.as_deref(), req)?
            }
        };
        if cli.json {
            println!("{result}");
        } else {
            print!("{}", hyperpatch::inspect::render(verb, &result));
        }
        return Ok(ExitCode::SUCCESS);
    }
    match cli.cmd {
        Cmd::Run(args) => run(args, cli.api_sock.as_deref()),
        Cmd::Status => client_verb(cli.api_sock.as_deref(), json!({"verb": "status"}), cli.json),
        Cmd::Pause => client_verb(cli.api_sock.as_deref(), json!({"verb": "pause"}), cli.json),
        Cmd::Resume => client_verb(cli.api_sock.as_deref(), json!({"verb": "resume"}), cli.json),
        Cmd::Shutdown => client_verb(cli.api_sock.as_deref(), json!({"verb": "shutdown"}), cli.json),
        Cmd::Snapshot { dir } => {
            let dir = absolute(&dir)?;
            client_verb(cli.api_sock.as_deref(), json!({"verb": "snapshot", "dir": dir}), cli.json)
        }
        Cmd::Apply { module, params, force, skip_callbacks, timeout, guests, guests_dir } => {
            let path = absolute(&module)?;
            let req = json!({"verb": "apply", "path": path, "params": params, "force": force, "skip_callbacks": skip_callbacks, "timeout_secs": timeout});
            if guests.is_empty() && guests_dir.is_none() {
                return patch_verb(cli.api_sock.as_deref(), req, cli.json);
            }
            let mut socks: Vec<PathBuf> = cli.api_sock.iter().cloned().chain(guests).collect();
            if let Some(dir) = guests_dir {
                socks.extend(control_sockets(&dir)?);
            }
            apply_to_many(&socks, &req, cli.json)
        }
        Cmd::Disable { name, force, timeout } => patch_verb(
            cli.api_sock.as_deref(),
            json!({"verb": "disable", "name": name, "force": force, "timeout_secs": timeout}),
            cli.json,
        ),
        Cmd::Enable { name, force, timeout } => patch_verb(
            cli.api_sock.as_deref(),
            json!({"verb": "enable", "name": name, "force": force, "timeout_secs": timeout}),
            cli.json,
        ),
        Cmd::Remove { name } => patch_verb(cli.api_sock.as_deref(), json!({"verb": "remove", "name": name}), cli.json),
        Cmd::List => patch_verb(cli.api_sock.as_deref(), json!({"verb": "list"}), cli.json),
        Cmd::Force => patch_verb(cli.api_sock.as_deref(), json!({"verb": "force"}), cli.json),
        Cmd::Reverse => patch_verb(cli.api_sock.as_deref(), json!({"verb": "reverse"}), cli.json),
        Cmd::Demo { module, guest } => demo(module, &guest),
        Cmd::Dump { out } => {
            let out = absolute(&out)?;
            client_verb(cli.api_sock.as_deref(), json!({"verb": "dump", "out": out}), cli.json)
        }
        _ => unreachable!("introspection verbs are handled above"),
    }
}

fn absolute(p: &Path) -> Result<PathBuf> {
    if p.is_absolute() {
        Ok(p.to_path_buf())
    } else {
        Ok(std::env::current_dir().context("current directory")?.join(p))
    }
}

/// The kernel line `run` and `demo` boot when none is named: the newest.
const DEFAULT_GUEST: &str = "6.12";

/// The test image's directory for kernel line `line`, from
/// `guest-images/build --print-dir LINE` (`HYPERPATCH_IMAGE_DIR` overrides).
fn test_image_dir(line: &str) -> Result<PathBuf> {
    if let Ok(d) = std::env::var("HYPERPATCH_IMAGE_DIR") {
        return Ok(PathBuf::from(d));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest-images/build");
    let out = std::process::Command::new(&script)
        .args(["--print-dir", line])
        .output()
        .with_context(|| format!("running {} --print-dir {line}", script.display()))?;
    if !out.status.success() {
        bail!("{} --print-dir {line} failed: {}", script.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !dir.join("done").exists() {
        bail!("the {line} test image is not built yet; build it with: {} {line}", script.display());
    }
    Ok(dir)
}

fn run(args: RunArgs, api_sock: Option<&Path>) -> Result<ExitCode> {
    let console: Box<dyn Write + Send> = match &args.console_log {
        Some(p) => Box::new(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?),
        None => Box::new(std::io::stdout()),
    };
    let tables = table_cache(args.table_cache.as_deref(), args.no_table_cache);
    // The patcher's state is read (and its version checked) before the
    // VM is restored, so a snapshot this hyperpatch cannot carry on is
    // refused before any guest code runs.
    let mut saved = None;
    let vm = if let Some(dir) = &args.restore {
        saved = vmm::snapshot::extension_state(dir).with_context(|| format!("restoring {}", dir.display()))?;
        vmm::snapshot::restore(dir, console).with_context(|| format!("restoring {}", dir.display()))?
    } else {
        let vcpus = u8::try_from(args.vcpus)
            .ok()
            .filter(|v| (1..=vmm::vm::MAX_VCPUS).contains(v))
            .ok_or_else(|| anyhow!("--vcpus must be 1 to {}, not {}", vmm::vm::MAX_VCPUS, args.vcpus))?;
        let mut cmdline = BASE_CMDLINE.to_string();
        let (kernel, initrd) = match args.kernel {
            Some(k) => (k, args.initrd),
            None => {
                let dir = test_image_dir(&args.guest)?;
                let extra = std::fs::read_to_string(dir.join("cmdline")).unwrap_or_default();
                if !extra.trim().is_empty() {
                    cmdline.push(' ');
                    cmdline.push_str(extra.trim());
                }
                (dir.join("vmlinux"), Some(args.initrd.unwrap_or_else(|| dir.join("initramfs.cpio"))))
            }
        };
        if !args.cmdline.trim().is_empty() {
            cmdline.push(' ');
            cmdline.push_str(args.cmdline.trim());
        }
        let cfg = VmConfig { kernel, initrd, cmdline, vcpus, mem_mib: args.mem, reserved_mib: args.reserved };
        Vm::boot(&cfg, console)?
    };
    let vm = std::sync::Arc::new(vm);
    let api = match saved {
        Some(state) => hyperpatch::live::GuestApi::restored(&vm, state, tables).context("restoring the patcher's state")?,
        None => hyperpatch::live::GuestApi::new(&vm, tables)?,
    };
    let ctl = Controller::new(vm, api_sock, true, std::sync::Arc::new(api))?;
    match ctl.run()? {
        VmExit::Reset | VmExit::Shutdown => Ok(ExitCode::SUCCESS),
        VmExit::Panic => bail!("the guest kernel panicked"),
        VmExit::Error(e) => bail!("{e}"),
    }
}

/// Console output shared between the guest's UART and the demo driver.
#[derive(Clone, Default)]
struct TeeConsole(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Write for TeeConsole {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().map_err(|_| std::io::Error::other("console lock"))?.extend_from_slice(buf);
        let mut out = std::io::stdout();
        out.write_all(buf)?;
        out.flush()?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl TeeConsole {
    fn len(&self) -> usize {
        self.0.lock().map(|b| b.len()).unwrap_or(0)
    }
    /// Waits until `pat` appears after byte `from`; returns the text between.
    fn wait_for(&self, pat: &str, from: usize, timeout: std::time::Duration, vm: &Vm) -> Result<String> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            {
                let b = self.0.lock().map_err(|_| anyhow!("console lock"))?;
                let text = String::from_utf8_lossy(b.get(from..).unwrap_or(&[])).into_owned();
                if let Some(i) = text.find(pat) {
                    return Ok(text[..i].to_string());
                }
            }
            if let Some(why) = vm.exit_reason() {
                bail!("the guest stopped ({why:?}) while waiting for {pat:?}");
            }
            if std::time::Instant::now() > deadline {
                bail!("timed out waiting for {pat:?} on the guest console");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

fn demo(module: Option<PathBuf>, guest: &str) -> Result<ExitCode> {
    let dir = test_image_dir(guest)?;
    let mut cmdline = BASE_CMDLINE.to_string();
    let extra = std::fs::read_to_string(dir.join("cmdline")).unwrap_or_default();
    cmdline.push(' ');
    cmdline.push_str(extra.trim());
    let module = module.unwrap_or_else(|| dir.join("modules/livepatch-sample.ko"));
    let module = absolute(&module)?;
    let cfg = VmConfig {
        kernel: dir.join("vmlinux"),
        initrd: Some(dir.join("initramfs.cpio")),
        cmdline,
        vcpus: 1,
        mem_mib: 512,
        reserved_mib: 16,
    };
    let console = TeeConsole::default();
    let t = std::time::Instant::now();
    let vm = std::sync::Arc::new(Vm::boot(&cfg, Box::new(console.clone()))?);
    let long = std::time::Duration::from_secs(20 * 60);
    console.wait_for("HYPERPATCH-READY", 0, long, &vm)?;
    eprintln!("\n[hyperpatch] guest ready after {:.1} s", t.elapsed().as_secs_f64());
    let show = |vm: &Vm, tag: &str| -> Result<String> {
        let from = console.len();
        vm.console_input(format!("echo '<{tag}''>'; cat /proc/cmdline; echo '</{tag}''>'\n").as_bytes());
        let start = format!("<{tag}>");
        console.wait_for(&start, from, long, vm)?;
        let body = console.wait_for(&format!("</{tag}>"), from, long, vm)?;
        let body = body.rsplit(&start).next().unwrap_or("").trim().to_string();
        Ok(body)
    };
    let before = show(&vm, "before")?;
    let api = hyperpatch::live::GuestApi::new(&vm, table_cache(None, false))?;
    let t = std::time::Instant::now();
    let r = api.call(&vm, &json!({"verb": "apply", "path": module, "wait": true})).map_err(|e| anyhow!("{e}"))?;
    eprintln!(
        "\n[hyperpatch] applied {} from outside in {:.1} ms (guest stopped {:.0} us)",
        module.display(),
        t.elapsed().as_secs_f64() * 1e3,
        r["stopped_us"].as_f64().unwrap_or(0.0)
    );
    let after = show(&vm, "after")?;
    drop(api);
    vm.stop(VmExit::Shutdown);
    println!("\n/proc/cmdline before: {before}\n/proc/cmdline after:  {after}");
    Ok(ExitCode::SUCCESS)
}

/// One request to a running VM; its result or its error.
fn call(api_sock: Option<&Path>, req: Value) -> Result<Value> {
    let sock = api_sock.ok_or_else(|| anyhow!("this command needs --api-sock (or --image for introspection)"))?;
    let mut c = ApiClient::connect(sock).with_context(|| format!("connecting to {}", sock.display()))?;
    let reply = c.call(&req).context("talking to the VM")?;
    if reply.get("ok").and_then(Value::as_bool) != Some(true) {
        let msg = reply.get("error").and_then(Value::as_str).unwrap_or("malformed reply");
        bail!("{msg}");
    }
    Ok(reply.get("result").cloned().unwrap_or(Value::Null))
}

fn client_verb(api_sock: Option<&Path>, req: Value, as_json: bool) -> Result<ExitCode> {
    let result = call(api_sock, req)?;
    if as_json {
        println!("{result}");
    } else {
        print_table(&result);
    }
    Ok(ExitCode::SUCCESS)
}

/// Every Unix socket in `dir` (sorted), for `apply --guests-dir`.
fn control_sockets(dir: &Path) -> Result<Vec<PathBuf>> {
    use std::os::unix::fs::FileTypeExt;
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        if e.file_type()?.is_socket() {
            out.push(e.path());
        }
    }
    out.sort();
    if out.is_empty() {
        bail!("{} holds no control socket", dir.display());
    }
    Ok(out)
}

/// `apply` to several guests at once: one thread per guest, each followed to
/// its end; a guest's failure is reported with its socket and does not stop
/// the others. Fails (exit 1) if any guest failed.
fn apply_to_many(socks: &[PathBuf], req: &Value, as_json: bool) -> Result<ExitCode> {
    let started = std::time::Instant::now();
    let results: Vec<(PathBuf, Result<Value>)> = std::thread::scope(|s| {
        let handles: Vec<_> = socks.iter().map(|sock| (sock.clone(), s.spawn(move || follow(Some(sock), req.clone(), false)))).collect();
        handles
            .into_iter()
            .map(|(sock, h)| (sock, h.join().unwrap_or_else(|_| Err(anyhow!("the thread for this guest panicked")))))
            .collect()
    });
    let failed = results.iter().filter(|(_, r)| r.is_err()).count();
    if as_json {
        let guests: Vec<Value> = results
            .iter()
            .map(|(sock, r)| match r {
                Ok(v) => json!({"guest": sock, "ok": true, "result": v}),
                Err(e) => json!({"guest": sock, "ok": false, "error": format!("{e:#}")}),
            })
            .collect();
        println!("{}", json!({"guests": guests, "failed": failed, "elapsed_secs": started.elapsed().as_secs_f64()}));
    } else {
        for (sock, r) in &results {
            match r {
                Ok(v) => println!(
                    "{}: {} {} (stopped {:.0} us)",
                    sock.display(),
                    v["patch"].as_str().unwrap_or("?"),
                    v["state"].as_str().unwrap_or("?"),
                    v["stopped_us"].as_f64().unwrap_or(0.0)
                ),
                Err(e) => println!("{}: FAILED: {e:#}", sock.display()),
            }
        }
        println!("{} of {} guests patched in {:.2} s", results.len() - failed, results.len(), started.elapsed().as_secs_f64());
    }
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Sends a patch verb and follows a transition that goes on in the VMM to
/// its end (progress on stderr when `progress`); the final result.
fn follow(api_sock: Option<&Path>, req: Value, progress: bool) -> Result<Value> {
    let mut r = call(api_sock, req)?;
    let mut shown = String::new();
    while matches!(r.get("state").and_then(Value::as_str), Some("waiting for a safe point") | Some("per-task transition")) {
        let blockers: Vec<String> = r["blockers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|b| format!("pid {} ({}) in {} at {}", b["pid"], b["comm"].as_str().unwrap_or("?"), b["function"].as_str().unwrap_or("?"), b["frame"].as_str().unwrap_or("?")))
            .collect();
        let line = format!(
            "{} ({:.1} s{}): {}",
            r["state"].as_str().unwrap_or("waiting"),
            r["elapsed_secs"].as_f64().unwrap_or(0.0),
            r["tasks_remaining"].as_u64().map(|n| format!(", {n} tasks left")).unwrap_or_default(),
            blockers.join("; ")
        );
        if line != shown && progress {
            eprintln!("{line}");
            shown = line;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        let l = call(api_sock, json!({"verb": "list"}))?;
        if !l["pending"].is_null() {
            r = l["pending"].clone();
            continue;
        }
        let last = &l["last"];
        if last["ok"].as_bool() == Some(true) {
            r = last["result"].clone();
        } else {
            bail!("{}", last["error"].as_str().unwrap_or("the transition failed"));
        }
    }
    Ok(r)
}

fn patch_verb(api_sock: Option<&Path>, req: Value, as_json: bool) -> Result<ExitCode> {
    let verb = req["verb"].as_str().unwrap_or("").to_string();
    let r = follow(api_sock, req, !as_json)?;
    if as_json {
        println!("{r}");
        return Ok(ExitCode::SUCCESS);
    }
    if verb == "list" {
        for p in r["patches"].as_array().into_iter().flatten() {
            println!(
                "{} enabled={} transition={} replace={}{}",
                p["name"].as_str().unwrap_or("?"),
                p["enabled"],
                p["transition"],
                p["replace"],
                if p["forced"].as_bool() == Some(true) { " FORCED" } else { "" }
            );
            for s in p["states"].as_array().into_iter().flatten() {
                println!("  state id={} version={}", s["id"], s["version"]);
            }
            for f in p["functions"].as_array().into_iter().flatten() {
                println!(
                    "  {},{} {:#x} -> {} {:#x}",
                    f["old_name"].as_str().unwrap_or("?"),
                    f["old_sympos"],
                    f["old_addr"].as_u64().unwrap_or(0),
                    f["new_symbol"].as_str().unwrap_or("?"),
                    f["new_addr"].as_u64().unwrap_or(0)
                );
            }
        }
        println!("reserved region in use: {} bytes", r["reserved_used"]);
    } else {
        print_table(&r);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(v: &Value) {
    match v {
        Value::Object(m) => {
            let w = m.keys().map(String::len).max().unwrap_or(0);
            for (k, val) in m {
                let s = match val {
                    Value::String(s) => s.clone(),
                    Value::Number(n) if n.is_f64() => format!("{:.1}", n.as_f64().unwrap_or(0.0)),
                    other => other.to_string(),
                };
                println!("{k:<w$}  {s}");
            }
        }
        other => println!("{other}"),
    }
}
