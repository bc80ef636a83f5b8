//! Test harness: starts `hyperpatch run` as a child process, drives the
//! guest console through its stdin/stdout, and talks to its control socket.
//! A cold boot takes minutes here, so `ready_snapshot()` boots the test image
//! once (per image and vCPU count), snapshots it while it is quiet (the shell
//! asleep at its prompt, every vCPU in its idle task), and every other test
//! restores from that snapshot. A test that needs the guest in some state
//! drives it there itself ([`Guest::pause_quiet`], [`Guest::quiet_dump`]); it
//! never relies on the moment the cached snapshot was taken.

#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm::api::ApiClient;

pub const BIN: &str = env!("CARGO_BIN_EXE_hyperpatch");
pub const READY: &str = "HYPERPATCH-READY";
/// A cold boot of the test kernel: minutes here, bounded generously.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// One guest shell command: seconds here.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(180);
/// busybox ash's prompt on the test guest's console.
pub const PROMPT: &str = "/ # ";
/// Where ready snapshots are cached unless `HYPERPATCH_SNAPSHOT_CACHE` says
/// otherwise: `snapshots` next to the image cache (`~/.cache/hyperpatch/`).
pub const SNAPSHOT_CACHE_ENV: &str = "HYPERPATCH_SNAPSHOT_CACHE";
/// Extra kernel options of the boot behind the ready snapshot. With its
/// default clocksource (the TSC) a restored guest sees every second since the
/// snapshot was taken pass at once: this KVM gives the guest the host TSC
/// whatever the snapshot says, so after a restore the guest's timekeeping
/// catches up second by second (measured: ~50 ms of emulated guest kernel
/// time at 2 minutes of snapshot age, ~160 ms at 12 minutes, growing by
/// ~0.15 ms per second of age, about 13 s per restore for a day-old cache),
/// its timers expire, idle workers exit, and after a host reboot its clock
/// stands still. kvm-clock is restored by the VMM (KVM_SET_CLOCK): restored
/// guests continue where the snapshot left them, whatever its age.
pub const READY_CMDLINE: &str = "clocksource=kvm-clock";
/// What the ready snapshot is made of besides the image, the vCPU count and
/// the snapshot format version (part of the cache key): taken quiet, booted
/// with [`READY_CMDLINE`].
const READY_RECIPE: &str = "quiet-kvmclock";

/// The kernel line the tests run on: `HYPERPATCH_GUEST` (a directory of
/// `guest-images/`), default the newest, as `hyperpatch run` boots it
/// (`tests/lines` runs the suite on every line).
pub fn guest_line() -> String {
    std::env::var("HYPERPATCH_GUEST").unwrap_or_else(|_| "6.12".to_string())
}

/// Directory of the built test image (kernel, initramfs, modules) of
/// [`guest_line`]; `HYPERPATCH_IMAGE_DIR` overrides it.
pub fn image_dir() -> PathBuf {
    if let Ok(d) = std::env::var("HYPERPATCH_IMAGE_DIR") {
        return PathBuf::from(d);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest-images/build");
    let line = guest_line();
    let out = Command::new(&script).args(["--print-dir", &line]).output().expect("guest-images/build --print-dir");
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        dir.join("done").exists(),
        "test image missing: run {} first (the README test command does)",
        script.display()
    );
    dir
}

/// Path of one of the test image's modules (`image_dir()/modules/NAME`).
pub fn module(name: &str) -> String {
    image_dir().join("modules").join(name).display().to_string()
}

/// Applies a module of the test image and waits for the transition to end;
/// `extra` adds request fields (`replace`, `per_task`, ...).
pub fn apply(g: &Guest, m: &str, extra: Value) -> Value {
    let mut req = json!({"verb": "apply", "path": module(m), "wait": true});
    if let Value::Object(o) = extra {
        for (k, v) in o {
            req[k] = v;
        }
    }
    g.api_ok(req)
}

/// Waits until some task's stack (`frames` as /proc/PID/stack shows it, or
/// `all_frames`) has a frame in a function starting with `prefix`; returns
/// its pid.
pub fn wait_for_frame(g: &Guest, frames: &str, prefix: &str) -> i64 {
    wait_for_frames(g, frames, prefix, 1)[0]
}

/// Waits until `n` tasks have a frame starting with `prefix` (as
/// [`wait_for_frame`]); their pids.
pub fn wait_for_frames(g: &Guest, frames: &str, prefix: &str, n: usize) -> Vec<i64> {
    let deadline = Instant::now() + CMD_TIMEOUT;
    loop {
        let st = g.api_ok(json!({"verb": "stack", "target": "all"}));
        let found: Vec<i64> = st
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t[frames].as_array().into_iter().flatten().any(|f| f["symbol"].as_str().unwrap_or("").starts_with(prefix)))
            .filter_map(|t| t["pid"].as_i64())
            .collect();
        if found.len() >= n {
            return found;
        }
        assert!(Instant::now() < deadline, "{} of {n} tasks ever ran in {prefix}", found.len());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A fresh scratch directory under the target dir.
pub fn scratch(name: &str) -> PathBuf {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    base
}

/// A running `hyperpatch run` child with its console.
pub struct Guest {
    pub child: Child,
    stdin: Option<ChildStdin>,
    pub console: Arc<Mutex<Vec<u8>>>,
    pub stderr: Arc<Mutex<Vec<u8>>>,
    pub api_sock: PathBuf,
    seq: u32,
    /// Console offset just past the end marker of the last `sh` command.
    last_end: usize,
    pub dir: PathBuf,
}

impl Guest {
    /// Starts `hyperpatch run ARGS --api-sock DIR/api.sock`.
    pub fn start(name: &str, args: &[&str]) -> Guest {
        let dir = scratch(name);
        let api_sock = dir.join("api.sock");
        let mut child = Command::new(BIN)
            .arg("run")
            .args(args)
            .arg("--api-sock")
            .arg(&api_sock)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn hyperpatch");
        let console = Arc::new(Mutex::new(Vec::new()));
        let mut out = child.stdout.take().unwrap();
        let c2 = console.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                c2.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        let mut err = child.stderr.take().unwrap();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let c3 = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                c3.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        let stdin = child.stdin.take();
        Guest { child, stdin, console, stderr, api_sock, seq: 0, last_end: 0, dir }
    }

    /// Boots the test image cold.
    pub fn boot_test_image(name: &str, vcpus: u32, extra: &[&str]) -> Guest {
        let v = vcpus.to_string();
        let line = guest_line();
        let mut args = vec!["--guest", line.as_str(), "--vcpus", v.as_str()];
        args.extend_from_slice(extra);
        Guest::start(name, &args)
    }

    /// Restores a guest from a snapshot directory.
    pub fn restore(name: &str, snapshot: &Path) -> Guest {
        Guest::start(name, &["--restore", snapshot.to_str().unwrap()])
    }

    pub fn console_text(&self) -> String {
        String::from_utf8_lossy(&self.console.lock().unwrap()).into_owned()
    }

    /// The console bytes `[from, to)` as text. Offsets are raw byte
    /// offsets (as `console_len` and `wait_for_from` count them), so they
    /// stay right when the guest printed bytes that are not UTF-8.
    pub fn console_slice(&self, from: usize, to: usize) -> String {
        let c = self.console.lock().unwrap();
        let to = to.min(c.len());
        String::from_utf8_lossy(&c[from.min(to)..to]).into_owned()
    }

    /// Waits until the console (from byte `from`) contains `pat`; returns
    /// the offset just past it.
    pub fn wait_for_from(&mut self, pat: &str, from: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let c = self.console.lock().unwrap();
                let hay = &c[from.min(c.len())..];
                if let Some(pos) = find(hay, pat.as_bytes()) {
                    return from + pos + pat.len();
                }
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("VMM exited ({st}) while waiting for {pat:?}; console:\n{}", self.tail(4000));
            }
            if Instant::now() > deadline {
                panic!("timed out after {timeout:?} waiting for {pat:?}; console:\n{}", self.tail(4000));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn wait_for(&mut self, pat: &str, timeout: Duration) -> usize {
        self.wait_for_from(pat, 0, timeout)
    }

    /// Console bytes read so far: the raw bytes of the VMM's stdout, counted
    /// as the VMM counts what it writes there (`console_bytes` in the replies
    /// of `status` and `pause`).
    pub fn console_len(&self) -> usize {
        self.console.lock().unwrap().len()
    }

    /// Waits until the console has at least `len` bytes.
    pub fn wait_for_console_len(&mut self, len: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.console_len() < len {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("VMM exited ({st}) while waiting for console output; console:\n{}", self.tail(4000));
            }
            assert!(Instant::now() < deadline, "no console output past byte {len} within {timeout:?}:\n{}", self.tail(2000));
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits (bounded) until the reader has seen exactly `bytes` console
    /// bytes, e.g. the `console_bytes` of a paused VMM; more is an error.
    pub fn wait_console_bytes(&self, bytes: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let have = self.console_len() as u64;
            assert!(have <= bytes, "read {have} console bytes, the VMM reports writing {bytes}");
            if have == bytes {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the console reader saw {have} of the {bytes} bytes the VMM wrote within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    pub fn tail(&self, n: usize) -> String {
        let t = format!("{}\n[VMM stderr] {}", self.console_text(), self.stderr_text());
        let start = t.len().saturating_sub(n);
        let mut s = start;
        while !t.is_char_boundary(s) {
            s += 1;
        }
        t[s..].to_string()
    }

    /// Types raw text on the console.
    pub fn send(&mut self, text: &str) {
        let s = self.stdin.as_mut().expect("stdin open");
        s.write_all(text.as_bytes()).unwrap();
        s.flush().unwrap();
    }

    /// Runs a shell command line in the guest and returns its output (the
    /// lines between two markers; the typed echo is not included).
    pub fn sh(&mut self, cmd: &str) -> String {
        self.sh_timeout(cmd, CMD_TIMEOUT)
    }

    pub fn sh_timeout(&mut self, cmd: &str, timeout: Duration) -> String {
        self.seq += 1;
        let n = self.seq;
        let start_mark = format!("<S{n}>");
        let end_mark = format!("<E{n}>");
        let from = self.console_len();
        // The quotes keep the typed echo from matching the markers.
        self.send(&format!("echo '<S''{n}>'; {cmd}; echo '<E''{n}>'\n"));
        let s = self.wait_for_from(&start_mark, from, timeout);
        let e = self.wait_for_from(&end_mark, s, timeout);
        self.last_end = e;
        let body = self.console_slice(s, e - end_mark.len());
        body.replace('\r', "").trim_matches('\n').to_string()
    }

    /// Drives the guest to a quiet state and leaves it paused there: the
    /// shell runs a builtin and prints its prompt again, then the VM is
    /// paused and `ps` must show every vCPU in its idle task and no other
    /// task runnable; if not, it is resumed and looked at again (bounded).
    /// Returns that `ps` (taken while paused). The caller resumes.
    pub fn pause_quiet(&mut self) -> Value {
        self.wait_api();
        assert_eq!(self.sh("echo quiet-$((3+4))"), "quiet-7");
        self.wait_for_from(PROMPT, self.last_end, CMD_TIMEOUT);
        let deadline = Instant::now() + CMD_TIMEOUT;
        for attempt in 1u64.. {
            let st = self.api_ok(json!({"verb": "pause"}));
            assert_eq!(st["state"], json!("paused"), "{st}");
            let ps = self.api_ok(json!({"verb": "ps"}));
            let busy = busy_tasks(&ps);
            if busy.is_empty() {
                if attempt > 1 {
                    println!("guest quiet after {attempt} looks");
                }
                return ps;
            }
            self.api_ok(json!({"verb": "resume"}));
            assert!(Instant::now() < deadline, "the guest never became quiet ({attempt} looks), last: {busy:?}");
            std::thread::sleep(Duration::from_millis(20 * attempt.min(25)));
        }
        unreachable!()
    }

    /// A dump (`{"verb":"dump"}`) of the guest taken while it is quiet (see
    /// [`Guest::pause_quiet`]); the guest runs again afterwards. Returns the
    /// dump's path and the `ps` seen in the same pause.
    pub fn quiet_dump(&mut self, name: &str) -> (PathBuf, Value) {
        let ps = self.pause_quiet();
        let path = self.dir.join(format!("{name}.core"));
        let _ = std::fs::remove_file(&path);
        self.api_ok(json!({"verb": "dump", "out": path}));
        self.api_ok(json!({"verb": "resume"}));
        (path, ps)
    }

    /// One control API request.
    pub fn api(&self, req: Value) -> Value {
        let mut c = ApiClient::connect(&self.api_sock).expect("connect api socket");
        c.call(&req).expect("api call")
    }

    pub fn api_ok(&self, req: Value) -> Value {
        let r = self.api(req.clone());
        assert_eq!(r["ok"], json!(true), "request {req} failed: {r}");
        r["result"].clone()
    }

    /// Waits for the api socket to appear.
    pub fn wait_api(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while ApiClient::connect(&self.api_sock).is_err() {
            assert!(Instant::now() < deadline, "api socket never came up; console:\n{}", self.tail(2000));
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the VMM process to end.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                panic!("VMM did not exit within {timeout:?}; console:\n{}", self.tail(3000));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Tasks that keep a `ps` listing (taken while paused) from being quiet:
/// any task but an idle one (pid 0) running on a vCPU, and any runnable
/// task that is not running (it is about to).
pub fn busy_tasks(ps: &Value) -> Vec<String> {
    ps.as_array()
        .expect("ps: a list")
        .iter()
        .filter(|t| t["pid"].as_i64() != Some(0))
        .filter(|t| !t["running_on"].is_null() || t["state"] == json!("R"))
        .map(|t| format!("pid {} {} state {} on vCPU {}", t["pid"], t["proc_comm"], t["state"], t["running_on"]))
        .collect()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Serializes cold boots between test processes and finds/creates the
/// shared ready snapshot.
struct DirLock(File);

impl DirLock {
    fn take(path: &Path) -> DirLock {
        let f = File::create(path).unwrap();
        // SAFETY: flock on a file we own.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(r, 0);
        DirLock(f)
    }
}

/// The directory ready snapshots are cached in: `$HYPERPATCH_SNAPSHOT_CACHE`
/// when set, else `snapshots` next to the image cache
/// (`~/.cache/hyperpatch/snapshots`).
pub fn snapshot_cache_dir() -> PathBuf {
    match std::env::var_os(SNAPSHOT_CACHE_ENV) {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => {
            let image = image_dir();
            image.parent().and_then(Path::parent).expect("image dir has two parents").join("snapshots")
        }
    }
}

/// Boots the test image once with `vcpus` vCPUs (plus [`READY_CMDLINE`]) and
/// snapshots it while it is quiet (the shell asleep at its prompt, every vCPU
/// in its idle task, checked while paused: [`Guest::pause_quiet`]), so every
/// restore starts from the same state. Later calls (and later test
/// processes) reuse the snapshot, cached per image, vCPU count, snapshot
/// format version, saved patcher state versions and [`READY_RECIPE`].
pub fn ready_snapshot(vcpus: u32) -> PathBuf {
    let image = image_dir();
    let key = format!(
        "{}-{}vcpu-v{}-s{}p{}-{READY_RECIPE}",
        image.file_name().unwrap().to_string_lossy(),
        vcpus,
        vmm::snapshot::FORMAT_VERSION,
        hyperpatch::live::SAVED_STATE_VERSION,
        patcher::engine::STATE_VERSION
    );
    let root = snapshot_cache_dir();
    std::fs::create_dir_all(&root).unwrap_or_else(|e| panic!("creating {}: {e}", root.display()));
    let snap = root.join(&key);
    let _lock = DirLock::take(&root.join(format!("{key}.lock")));
    if snap.join("state.json").exists() {
        return snap;
    }
    let t = Instant::now();
    let mut g = Guest::boot_test_image(&format!("snapboot{vcpus}"), vcpus, &["--cmdline", READY_CMDLINE]);
    g.wait_for(READY, BOOT_TIMEOUT);
    let cs = g.sh("read c < /sys/devices/system/clocksource/clocksource0/current_clocksource; echo $c");
    assert_eq!(cs, "kvm-clock", "the guest did not take {READY_CMDLINE}");
    // The snapshot is cached under the image's name: it must be that line.
    let version = g.sh("read v < /proc/version; echo $v");
    let line = guest_line();
    assert!(version.starts_with(&format!("Linux version {line}.")), "booted {version:?}, not the {line} line");
    // Paused while quiet (the shell has answered a command); the snapshot is
    // taken in that same pause.
    g.pause_quiet();
    let tmp = root.join(format!("{key}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    g.api_ok(json!({"verb": "snapshot", "dir": tmp}));
    std::fs::rename(&tmp, &snap).unwrap();
    g.api_ok(json!({"verb": "shutdown"}));
    let _ = g.wait_exit(Duration::from_secs(30));
    println!("ready snapshot {} made in {:.1} s", snap.display(), t.elapsed().as_secs_f64());
    snap
}
