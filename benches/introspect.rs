//! Introspection benchmarks on the real test guest (host time only: these
//! read guest memory, the guest does not run):
//! - kallsyms: cold load (`Kallsyms::locate`, and `Kernel::open` with BTF),
//!   then lookups per second by name (`lookup_unique`) and by address
//!   (`resolve`), criterion plus a plain timed loop;
//! - full scan: every task and every stack (`Kernel::task_stacks("all")`),
//!   host time per task, on the saved image (~20 tasks) and on a dump of
//!   the guest after its shell started hundreds of sleeping background
//!   shells (each `read x < FIFO &` is one fork, no exec; as many as fit in
//!   ~3 minutes of guest time). The dump is cached next to the snapshot.
//!
//! Run: `cargo bench --bench introspect`. `HP_BENCH_TASKS=N` sets the
//! number of background shells wanted (default 500); `HP_BENCH_FORK_BUDGET`
//! the guest seconds to spend on them (default 180).

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use criterion::{black_box, Criterion};
use hyperpatch::guest::SnapshotImage;
use introspect::image::DumpImage;
use introspect::kallsyms::Kallsyms;
use introspect::kernel::Kernel;
use introspect::memory::{PhysMem, VecMemory};
use introspect::stacks::Symbolizer;
use introspect::{AddressSpace, CpuState};
use serde_json::json;

const TARGET_PER_TASK_US: f64 = 20.0;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// All of guest RAM in host memory (what a live VM's mapping gives).
fn ram_of(mem: &dyn PhysMem) -> VecMemory {
    let size = mem.phys_size() as usize;
    let mut v = vec![0u8; size];
    // Page by page: a dump may have holes between its segments.
    for (i, page) in v.chunks_mut(4096).enumerate() {
        let _ = mem.read_phys(i as u64 * 4096, page);
    }
    VecMemory(v)
}

fn cold_load(mem: &VecMemory, cpus: &[CpuState]) {
    let cpu = cpus[0];
    let mut locate = Vec::new();
    let mut open = Vec::new();
    let mut first = None;
    for _ in 0..7 {
        let space = AddressSpace::new(mem, cpu.cr3, cpu.la57());
        let t = Instant::now();
        let k = Kallsyms::locate(&space, cpu.lstar).expect("kallsyms");
        let d = t.elapsed();
        first.get_or_insert((d, k.len()));
        locate.push(d);
        let t = Instant::now();
        let k = Kernel::open(mem, cpus.to_vec()).expect("open");
        open.push(t.elapsed());
        black_box(k.btf.type_count());
    }
    let (first, n) = first.unwrap();
    println!(
        "\nkallsyms cold load ({n} symbols, tables found by scanning guest memory from LSTAR): first {:.1} ms, median of 7 {:.1} ms",
        first.as_secs_f64() * 1e3,
        median(locate).as_secs_f64() * 1e3
    );
    println!("Kernel::open (kallsyms + BTF parse): median of 7 {:.1} ms", median(open).as_secs_f64() * 1e3);
}

fn symbol_lookups(c: &mut Criterion, k: &Kernel<'_>) {
    // Every 7th symbol's name and address, as the workload.
    let all: Vec<_> = k.syms.symbols().collect();
    let names: Vec<String> = all.iter().step_by(7).map(|s| s.name.clone()).collect();
    let text = k.syms.text_range().expect("text range");
    let addrs: Vec<u64> = all.iter().step_by(7).map(|s| s.addr).filter(|a| text.contains(a)).map(|a| a + 3).collect();

    let rounds = 20;
    let t = Instant::now();
    let mut hits = 0usize;
    for _ in 0..rounds {
        for n in &names {
            hits += k.syms.lookup(black_box(n)).len();
        }
    }
    let by_name = (rounds * names.len()) as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..rounds {
        for a in &addrs {
            hits += usize::from(k.syms.resolve(black_box(*a)).is_some());
        }
    }
    let by_addr = (rounds * addrs.len()) as f64 / t.elapsed().as_secs_f64();
    black_box(hits);
    println!(
        "symbol lookups after the cold load: by name {:.2} M/s ({} names), by address {:.2} M/s ({} addresses, symbol+offset/size)",
        by_name / 1e6,
        names.len(),
        by_addr / 1e6,
        addrs.len()
    );

    let mut i = 0usize;
    c.bench_function("kallsyms/lookup_unique", |b| {
        b.iter(|| {
            i = (i + 1) % names.len();
            black_box(k.syms.lookup_unique(&names[i]).ok())
        })
    });
    let mut j = 0usize;
    c.bench_function("kallsyms/resolve", |b| {
        b.iter(|| {
            j = (j + 1) % addrs.len();
            black_box(k.syms.resolve(addrs[j]))
        })
    });
}

/// Times the full scan on `k`: the whole `task_stacks("all")`, and its
/// parts (task list; ORC tables, modules and symbolizer loaded once per
/// stop; unwinding and symbolizing each task).
fn full_scan(label: &str, k: &Kernel<'_>) -> (usize, f64) {
    let runs = 15;
    let mut whole = Vec::new();
    let mut list = Vec::new();
    let mut setup = Vec::new();
    let mut per_task = Vec::new();
    let mut n = 0;
    let mut reliable = 0;
    for _ in 0..runs {
        let t = Instant::now();
        let stacks = k.task_stacks("all").expect("task_stacks");
        whole.push(t.elapsed());
        n = stacks.len();
        reliable = stacks.iter().filter(|s| s.reliable).count();

        let t = Instant::now();
        let tasks = k.tasks().expect("tasks");
        list.push(t.elapsed());
        let t = Instant::now();
        let modules = k.modules().expect("modules");
        let u = k.unwinder(&modules).expect("unwinder");
        let sym = Symbolizer::new(k, &modules);
        setup.push(t.elapsed());
        let t = Instant::now();
        for task in &tasks {
            let st = k.unwind_task(&u, task);
            for f in &st.frames {
                black_box(if f.is_return_address() { sym.return_address(f.ip) } else { sym.exact(f.ip) });
            }
        }
        per_task.push(t.elapsed() / tasks.len().max(1) as u32);
    }
    let whole = median(whole);
    let total_per_task = us(whole) / n.max(1) as f64;
    println!(
        "full scan, {label}: {n} tasks ({reliable} reliable stacks): {:.2} ms per scan = {:.1} us per task (target {TARGET_PER_TASK_US} us: {}); \
         parts: task list {:.0} us, ORC/modules/symbolizer setup {:.0} us, unwind+symbolize {:.1} us per task (medians of {runs})",
        whole.as_secs_f64() * 1e3,
        total_per_task,
        if total_per_task < TARGET_PER_TASK_US { "met" } else { "MISSED" },
        us(median(list)),
        us(median(setup)),
        us(median(per_task)),
    );
    (n, total_per_task)
}

/// A dump of the test guest with many more tasks: background shells
/// blocked opening a FIFO (`read x < /hp_fifo &`, a fork each, no exec).
fn many_task_dump() -> PathBuf {
    let snap = ready_snapshot(1);
    let want: usize = std::env::var("HP_BENCH_TASKS").ok().and_then(|v| v.parse().ok()).unwrap_or(500);
    let budget = Duration::from_secs(std::env::var("HP_BENCH_FORK_BUDGET").ok().and_then(|v| v.parse().ok()).unwrap_or(180));
    let name = format!("{}-many-tasks-{want}.core", snap.file_name().unwrap().to_string_lossy());
    let path = snap.parent().unwrap().join(name);
    if path.exists() {
        return path;
    }
    let mut g = Guest::restore("bench-many-tasks", &snap);
    g.wait_api();
    let t = Instant::now();
    g.sh("mkfifo /hp_fifo");
    println!("\nguest: mkfifo (one fork+exec) took {:.1} s", t.elapsed().as_secs_f64());
    let probe = 10;
    let t = Instant::now();
    g.sh(&format!("i=0; while [ $i -lt {probe} ]; do read x < /hp_fifo & i=$((i+1)); done"));
    let per = t.elapsed() / probe;
    let rest = want.saturating_sub(probe as usize).min((budget.as_secs_f64() / per.as_secs_f64()) as usize);
    println!("guest: {probe} background shells took {:.1} s ({:.2} s each); starting {rest} more", (per * probe).as_secs_f64(), per.as_secs_f64());
    let t = Instant::now();
    if rest > 0 {
        g.sh_timeout(
            &format!("i=0; while [ $i -lt {rest} ]; do read x < /hp_fifo & i=$((i+1)); done"),
            budget * 3 + Duration::from_secs(120),
        );
    }
    // The last children may still be on their way into open(): let them block.
    let out = g.sh("echo settled");
    assert_eq!(out, "settled");
    std::thread::sleep(Duration::from_secs(5));
    println!("guest: {} background shells in all ({:.0} s)", probe as usize + rest, t.elapsed().as_secs_f64());
    let tmp = path.with_extension("tmp");
    g.api_ok(json!({"verb": "dump", "out": tmp}));
    std::fs::rename(&tmp, &path).expect("rename dump");
    g.api_ok(json!({"verb": "shutdown"}));
    let _ = g.wait_exit(Duration::from_secs(30));
    path
}

fn scan_dump(path: &Path) {
    let img = DumpImage::open(path).expect("open dump");
    // As `--image` reads it: straight from the file.
    let k = Kernel::open(&img, img.cpus.clone()).expect("open kernel in dump");
    let (_, file_per_task) = full_scan("many-task dump, read from the dump file", &k);
    drop(k);
    // As a live VM reads it: guest RAM mapped in host memory.
    let ram = ram_of(&img);
    let k = Kernel::open(&ram, img.cpus.clone()).expect("open kernel");
    let (n, per_task) = full_scan("many-task dump, in memory (as on a live VM)", &k);
    let sleeping = k.tasks().unwrap().iter().filter(|t| t.comm == "sh" && t.state == 'S').count();
    println!(
        "many-task guest: {n} tasks ({sleeping} sleeping shells): {per_task:.1} us per task in memory, {file_per_task:.1} us from the file"
    );
}

fn main() {
    let snap = ready_snapshot(1);
    let img = SnapshotImage::open(&snap).expect("snapshot");
    let ram = ram_of(&img.mem);
    cold_load(&ram, &img.cpus);
    let k = Kernel::open(&ram, img.cpus.clone()).expect("open");
    let mut c = Criterion::default().configure_from_args().sample_size(50).measurement_time(Duration::from_secs(2));
    symbol_lookups(&mut c, &k);
    full_scan("saved test guest", &k);
    drop(k);
    if std::env::var_os("HP_BENCH_SKIP_MANY").is_none() {
        scan_dump(&many_task_dump());
    }
    c.final_summary();
}
