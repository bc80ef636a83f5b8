//! VMM benchmarks on the real test guest:
//! - pause-all + resume with 1, 2 and 4 vCPUs (criterion, plus median/p99
//!   over 2,000 samples printed as a table);
//! - restore from the ready snapshot (criterion): `hyperpatch run --restore`
//!   until its control socket answers `status`, and until the guest shell
//!   answers `echo x`; `snapshot::restore()` itself in-process; eight guests
//!   restored from one snapshot at once until all their shells answer;
//! - where restore time goes (medians, printed): process start, restore(),
//!   socket answering, shell answering, and the same shell round trip in a
//!   guest that has been running a while (guest work only);
//! - host memory (PSS and RSS from /proc/PID/smaps_rollup, and the guest RAM
//!   mapping alone from /proc/PID/smaps) of one restored guest against eight
//!   restored from the same snapshot at once: pages the guests only read stay
//!   shared page cache of the snapshot's memory file;
//! - restore against a cold boot to an answering shell (one run each: a cold
//!   boot takes tens of seconds here), and VMM memory without guest RAM.
//!
//! Run: `cargo bench --bench vmm`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use common::*;
use criterion::{criterion_group, Criterion};

fn restore_in_process(vcpus: u32) -> vmm::Vm {
    let snap = ready_snapshot(vcpus);
    vmm::snapshot::restore(&snap, Box::new(std::io::sink())).expect("restore")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    percentile(&v, 0.5)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn pause_resume(c: &mut Criterion) {
    let mut table = Vec::new();
    for vcpus in [1u32, 2, 4] {
        let vm = restore_in_process(vcpus);
        std::thread::sleep(Duration::from_millis(300));
        let mut samples = Vec::with_capacity(2000);
        for _ in 0..2000 {
            let t = Instant::now();
            let p = vm.pause().expect("pause");
            drop(p);
            samples.push(t.elapsed());
            std::thread::sleep(Duration::from_micros(200));
        }
        samples.sort();
        table.push((vcpus, percentile(&samples, 0.5), percentile(&samples, 0.99)));
        c.bench_function(&format!("pause_resume/{vcpus}vcpu"), |b| {
            b.iter(|| drop(vm.pause().expect("pause")))
        });
    }
    println!("\npause-all + resume (2000 samples each)");
    println!("vcpus  median      p99");
    for (v, m, p) in table {
        println!("{v:>5}  {:>8.1}us  {:>8.1}us", m.as_secs_f64() * 1e6, p.as_secs_f64() * 1e6);
    }
}

// ---------------------------------------------------------------------------
// Restore timing: a `hyperpatch run --restore` child watched closely (the
// test harness polls every 50 ms, too coarse here).

/// A restored guest: its console arrives over a channel as it is read.
struct Restored {
    child: Child,
    stdin: ChildStdin,
    rx: Receiver<Vec<u8>>,
    console: Vec<u8>,
    sock: PathBuf,
    started: Instant,
}

impl Restored {
    /// Starts `hyperpatch run --restore SNAP` (the clock starts just before
    /// the spawn).
    fn spawn(snap: &Path, sock: PathBuf) -> Restored {
        let _ = std::fs::remove_file(&sock);
        let started = Instant::now();
        let mut child = Command::new(BIN)
            .arg("run")
            .arg("--restore")
            .arg(snap)
            .arg("--api-sock")
            .arg(&sock)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn hyperpatch");
        let stdin = child.stdin.take().unwrap();
        let mut out = child.stdout.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Restored { child, stdin, rx, console: Vec::new(), sock, started }
    }

    /// Time from the spawn until the control socket answers `status`.
    fn wait_api(&self) -> Duration {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut s) = UnixStream::connect(&self.sock) {
                s.write_all(b"{\"verb\":\"status\"}\n").unwrap();
                let mut reply = Vec::new();
                let mut b = [0u8; 1024];
                while !reply.ends_with(b"\n") {
                    let n = s.read(&mut b).unwrap();
                    assert!(n > 0, "API closed");
                    reply.extend_from_slice(&b[..n]);
                }
                assert!(reply.starts_with(b"{\"ok\":true"), "{}", String::from_utf8_lossy(&reply));
                return self.started.elapsed();
            }
            assert!(Instant::now() < deadline, "API never answered");
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    fn type_line(&mut self, line: &str) {
        self.stdin.write_all(line.as_bytes()).unwrap();
        self.stdin.flush().unwrap();
    }

    /// Waits until the console holds `pat` after byte `from`; returns the
    /// time since the spawn.
    fn wait_console(&mut self, pat: &[u8], from: usize) -> Duration {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.console.len() >= from && self.console[from..].windows(pat.len()).any(|w| w == pat) {
                return self.started.elapsed();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no {:?} on the console", String::from_utf8_lossy(pat));
            if let Ok(b) = self.rx.recv_timeout(left) {
                self.console.extend_from_slice(&b);
            }
        }
    }

    /// Types `echo TOKEN` and waits for the shell's answer (the line
    /// `TOKEN` after the typed echo); returns the time since the spawn.
    fn echo(&mut self, token: &str) -> Duration {
        let from = self.console.len();
        self.type_line(&format!("echo {token}\n"));
        self.wait_console(format!("\n{token}\r\n").as_bytes(), from)
    }

    /// CPU time (user + system, every thread) the VMM process has used.
    fn cpu_time(&self) -> Duration {
        let mut ns = 0u64;
        if let Ok(dir) = std::fs::read_dir(format!("/proc/{}/task", self.child.id())) {
            for t in dir.flatten() {
                let s = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
                ns += s.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0);
            }
        }
        Duration::from_nanos(ns)
    }
}

impl Drop for Restored {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.sock);
    }
}

fn bench_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("bench-vmm-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn restore_benches(c: &mut Criterion) {
    let snap = ready_snapshot(1);
    let dir = bench_dir();
    let mut n = 0u32;
    let mut sock = move || {
        n += 1;
        dir.join(format!("r{n}.sock"))
    };
    let mut g = c.benchmark_group("restore");
    g.sample_size(10).measurement_time(Duration::from_secs(8)).warm_up_time(Duration::from_secs(1));
    g.bench_function("restore_fn_in_process", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                let vm = vmm::snapshot::restore(&snap, Box::new(std::io::sink())).expect("restore");
                total += t.elapsed();
                drop(vm);
            }
            total
        })
    });
    g.bench_function("spawn_to_api_answering", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| Restored::spawn(&snap, sock()).wait_api()).sum())
    });
    g.bench_function("spawn_to_shell_answering", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let mut r = Restored::spawn(&snap, sock());
                    r.echo("x")
                })
                .sum()
        })
    });
    g.bench_function("8_guests_spawn_to_all_shells_answering", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let t = Instant::now();
                    let mut guests: Vec<Restored> = (0..8).map(|_| Restored::spawn(&snap, sock())).collect();
                    for r in &mut guests {
                        r.echo("x");
                    }
                    t.elapsed()
                })
                .sum()
        })
    });
    g.finish();
}

/// Where the time of a restore goes, medians of `runs` runs, printed.
fn restore_breakdown(runs: usize) {
    let snap = ready_snapshot(1);
    let dir = bench_dir();
    let mut start = Vec::new();
    let mut restore_fn = Vec::new();
    let mut api = Vec::new();
    let mut api_cpu = Vec::new();
    let mut shell = Vec::new();
    let mut shell_cpu = Vec::new();
    let mut steady = Vec::new();
    let mut steady_cpu = Vec::new();
    for i in 0..runs {
        let t = Instant::now();
        let st = Command::new(BIN).arg("--version").stdout(Stdio::null()).status().unwrap();
        assert!(st.success());
        start.push(t.elapsed());

        let t = Instant::now();
        let vm = vmm::snapshot::restore(&snap, Box::new(std::io::sink())).expect("restore");
        restore_fn.push(t.elapsed());
        drop(vm);

        let mut r = Restored::spawn(&snap, dir.join(format!("b{i}.sock")));
        api.push(r.wait_api());
        let c0 = r.cpu_time();
        api_cpu.push(c0);
        shell.push(r.echo("x"));
        let c1 = r.cpu_time();
        shell_cpu.push(c1);
        // The same round trip once the guest has been running a while:
        // nothing but the guest's own work remains.
        std::thread::sleep(Duration::from_millis(300));
        let c2 = r.cpu_time();
        let t = Instant::now();
        let from = r.console.len();
        r.type_line("echo y\n");
        r.wait_console(b"\ny\r\n", from);
        steady.push(t.elapsed());
        steady_cpu.push(r.cpu_time().saturating_sub(c2));
    }
    let (st, rf, ap, apc, sh, shc, sd, sdc) = (
        median(start),
        median(restore_fn),
        median(api),
        median(api_cpu),
        median(shell),
        median(shell_cpu),
        median(steady),
        median(steady_cpu),
    );
    println!("\nrestore of the ready snapshot (1 vCPU, {runs} runs, medians):");
    println!("  process start and exit (`hyperpatch --version`)   {:>7.1} ms", ms(st));
    println!("  snapshot::restore() in-process                    {:>7.1} ms", ms(rf));
    println!("  spawn -> control socket answers `status`           {:>7.1} ms  (VMM CPU so far {:.1} ms)", ms(ap), ms(apc));
    println!("  spawn -> shell answers `echo x`                    {:>7.1} ms  (VMM CPU so far {:.1} ms)", ms(sh), ms(shc));
    println!("  `echo y` in a guest running for a while            {:>7.1} ms  (VMM CPU {:.1} ms)", ms(sd), ms(sdc));
    println!(
        "  restore to an answering shell minus that round trip {:>6.1} ms",
        ms(sh.saturating_sub(sd))
    );
}

// ---------------------------------------------------------------------------
// Memory

/// kB fields of /proc/PID/smaps_rollup.
#[derive(Clone, Copy, Default, Debug)]
struct Mem {
    rss: u64,
    pss: u64,
    shared_clean: u64,
    private_clean: u64,
    private_dirty: u64,
}

fn parse_mem(text: &str) -> Mem {
    let mut m = Mem::default();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let (Some(k), Some(v)) = (f.next(), f.next().and_then(|v| v.parse::<u64>().ok())) else { continue };
        match k {
            "Rss:" => m.rss += v,
            "Pss:" => m.pss += v,
            "Shared_Clean:" => m.shared_clean += v,
            "Private_Clean:" => m.private_clean += v,
            "Private_Dirty:" => m.private_dirty += v,
            _ => {}
        }
    }
    m
}

/// The whole process (smaps_rollup) and its mapping of `file` alone (smaps).
fn memory_of(pid: u32, file: &Path) -> (Mem, Mem) {
    let rollup = parse_mem(&std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).expect("smaps_rollup"));
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps");
    let name = file.to_string_lossy();
    let mut guest = String::new();
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            inside = line.trim_end().ends_with(name.as_ref());
        } else if inside {
            guest.push_str(line);
            guest.push('\n');
        }
    }
    (rollup, parse_mem(&guest))
}

fn mib(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

fn memory_sharing() {
    let snap = ready_snapshot(1);
    let file = vmm::snapshot::memory_file(&snap).canonicalize().unwrap();
    let dir = bench_dir();
    let settle = |guests: &mut [Restored]| {
        for (i, r) in guests.iter_mut().enumerate() {
            r.echo(&format!("up{i}"));
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let mut one = vec![Restored::spawn(&snap, dir.join("m-one.sock"))];
    settle(&mut one);
    let (alone, alone_guest) = memory_of(one[0].child.id(), &file);
    drop(one);

    let mut eight: Vec<Restored> = (0..8).map(|i| Restored::spawn(&snap, dir.join(format!("m{i}.sock")))).collect();
    settle(&mut eight);
    let each: Vec<(Mem, Mem)> = eight.iter().map(|r| memory_of(r.child.id(), &file)).collect();
    drop(eight);

    let sum = |f: &dyn Fn(&(Mem, Mem)) -> u64| each.iter().map(f).sum::<u64>();
    println!("\nhost memory of restored guests (1 vCPU, shell answered), MiB; `guest RAM` is the mapping of {}:", file.display());
    println!("                          RSS      PSS  shared clean  private dirty   guest RAM: RSS    PSS  shared  private dirty");
    let row = |what: &str, p: Mem, g: Mem| {
        println!(
            "{what:<22} {:>7.1}  {:>7.1}  {:>12.1}  {:>13.1}  {:>15.1}  {:>5.1}  {:>6.1}  {:>13.1}",
            mib(p.rss),
            mib(p.pss),
            mib(p.shared_clean),
            mib(p.private_dirty),
            mib(g.rss),
            mib(g.pss),
            mib(g.shared_clean),
            mib(g.private_dirty)
        )
    };
    row("one guest alone", alone, alone_guest);
    for (i, (p, g)) in each.iter().enumerate() {
        row(&format!("guest {} of 8", i + 1), *p, *g);
    }
    let total = Mem {
        rss: sum(&|m| m.0.rss),
        pss: sum(&|m| m.0.pss),
        shared_clean: sum(&|m| m.0.shared_clean),
        private_clean: sum(&|m| m.0.private_clean),
        private_dirty: sum(&|m| m.0.private_dirty),
    };
    let total_guest = Mem {
        rss: sum(&|m| m.1.rss),
        pss: sum(&|m| m.1.pss),
        shared_clean: sum(&|m| m.1.shared_clean),
        private_clean: sum(&|m| m.1.private_clean),
        private_dirty: sum(&|m| m.1.private_dirty),
    };
    row("8 guests together", total, total_guest);
    println!(
        "8 guests: PSS {:.1} MiB in all = {:.2}x one guest alone ({:.1} MiB), not 8x; each guest's RAM mapping: PSS {:.1} MiB of RSS {:.1} MiB (the rest is shared page cache of the snapshot file)",
        mib(total.pss),
        total.pss as f64 / alone.pss.max(1) as f64,
        mib(alone.pss),
        mib(total_guest.pss) / 8.0,
        mib(total_guest.rss) / 8.0
    );
}

/// Resident memory of a VMM process, minus its guest RAM mapping.
fn vmm_rss_without_guest(pid: u32, guest_bytes: u64) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps");
    let mut total = 0u64;
    let mut skip = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            let mut r = first.split('-');
            let a = u64::from_str_radix(r.next().unwrap_or("0"), 16).unwrap_or(0);
            let b = u64::from_str_radix(r.next().unwrap_or("0"), 16).unwrap_or(0);
            skip = b - a == guest_bytes;
        } else if let Some(v) = line.strip_prefix("Rss:") {
            if !skip {
                total += v.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap_or(0) * 1024;
            }
        }
    }
    total
}

fn restore_vs_cold_boot() {
    let snap = ready_snapshot(1);
    let guest_bytes = std::fs::metadata(vmm::snapshot::memory_file(&snap)).unwrap().len();
    let mut r = Restored::spawn(&snap, bench_dir().join("cold-restore.sock"));
    let restore = r.echo("up");
    let rss = vmm_rss_without_guest(r.child.id(), guest_bytes);
    drop(r);

    let t = Instant::now();
    let mut g = Guest::boot_test_image("bench-cold", 1, &[]);
    g.wait_for(READY, BOOT_TIMEOUT);
    assert_eq!(g.sh("echo up"), "up");
    let cold = t.elapsed();
    drop(g);
    println!("\nrestore to an answering shell: {:.3} s; cold boot to an answering shell: {:.1} s; ratio cold/restore = {:.0}x",
        restore.as_secs_f64(), cold.as_secs_f64(), cold.as_secs_f64() / restore.as_secs_f64());
    println!("VMM resident memory without guest RAM: {:.1} MiB", rss as f64 / (1 << 20) as f64);
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50).measurement_time(Duration::from_secs(3));
    targets = pause_resume, restore_benches
}

fn main() {
    benches();
    restore_breakdown(15);
    memory_sharing();
    restore_vs_cold_boot();
    Criterion::default().configure_from_args().final_summary();
}
