//! "Correct means: the same answer the guest gives" (issue 3): each test
//! restores the test guest, has it print its own view (/proc/kallsyms,
//! /proc/*/task/*, /proc/PID/stack, tracefs, /sys/kernel/livepatch,
//! /proc/modules) while it is quiet, and compares hyperpatch's outside view
//! (the live API, the CLI, and a dump opened in-process) with it.
//!
//! Guest kernel code is emulated on this machine, so guest commands are few
//! and mostly shell builtins; tests take a lock so their guests do not
//! compete for the host CPUs.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::*;
use introspect::ftrace::SiteInsn;
use introspect::image::DumpImage;
use introspect::kernel::{Kernel, LINK_TEXT_BASE};
use introspect::KernelMemory;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------
// Helpers

/// One guest at a time: they would only slow each other down (2 host CPUs).
static GUEST_LOCK: Mutex<()> = Mutex::new(());

fn one_guest_at_a_time() -> MutexGuard<'static, ()> {
    GUEST_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keeps kernel messages (e.g. "random: crng init done") from landing in
/// the middle of what the guest prints.
fn quiet(g: &mut Guest) {
    g.sh("dmesg -n 1");
}

/// Restores `snap` and waits for its API and shell.
fn restore(name: &str, snap: &Path) -> Guest {
    let mut g = Guest::restore(name, snap);
    g.wait_api();
    assert_eq!(g.sh("echo up-$((20+1))"), "up-21");
    g
}

/// `hyperpatch --api-sock S ARGS --json`, parsed.
fn cli_json(g: &Guest, args: &[&str]) -> Value {
    let out = Command::new(BIN).arg("--api-sock").arg(&g.api_sock).args(args).arg("--json").output().unwrap();
    assert!(out.status.success(), "hyperpatch {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("hyperpatch {args:?}: bad JSON ({e})"))
}

/// `hyperpatch --api-sock S ARGS` (the text view).
fn cli_text(g: &Guest, args: &[&str]) -> String {
    let out = Command::new(BIN).arg("--api-sock").arg(&g.api_sock).args(args).output().unwrap();
    assert!(out.status.success(), "hyperpatch {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `hyperpatch --image DUMP ARGS --json` (offline), parsed.
fn image_json(dump: &Path, args: &[&str]) -> Value {
    let out = Command::new(BIN).arg("--image").arg(dump).args(args).arg("--json").output().unwrap();
    assert!(out.status.success(), "hyperpatch --image {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("hyperpatch --image {args:?}: bad JSON ({e})"))
}

/// Takes a dump of the (briefly paused) guest through the CLI.
fn dump(g: &Guest, name: &str) -> PathBuf {
    let path = g.dir.join(format!("{name}.core"));
    let _ = std::fs::remove_file(&path);
    cli_text(g, &["dump", "--out", path.to_str().unwrap()]);
    assert!(path.exists(), "dump {} missing", path.display());
    path
}

/// Runs `f` on the kernel in a dump file.
fn with_dump<R>(path: &Path, f: impl FnOnce(&Kernel<'_>, &DumpImage) -> R) -> R {
    let img = DumpImage::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let k = Kernel::open(&img, img.cpus.clone()).unwrap_or_else(|e| panic!("opening the kernel in {}: {e}", path.display()));
    f(&k, &img)
}

fn hex(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// The guest loads livepatch-sample.ko itself and waits until its
/// transition has ended.
fn guest_insmod_livepatch_sample(g: &mut Guest) {
    let out = g.sh_timeout(
        "insmod /modules/livepatch-sample.ko; i=0; t=1; \
         while [ $i -lt 300 ]; do t=; read t < /sys/kernel/livepatch/livepatch_sample/transition; \
         [ \"$t\" = 0 ] && break; i=$((i+1)); sleep 1; done; echo transition=$t",
        Duration::from_secs(600),
    );
    assert!(out.ends_with("transition=0"), "livepatch_sample did not finish its transition:\n{out}");
}

/// A snapshot (per test process) of the 1-vCPU test guest after it loaded
/// livepatch-sample.ko itself, with console messages off.
fn livepatched_snapshot() -> PathBuf {
    static SNAP: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut slot = SNAP.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = slot.as_ref() {
        return p.clone();
    }
    let t = Instant::now();
    let mut g = restore("lp-snapshot", &ready_snapshot(1));
    quiet(&mut g);
    guest_insmod_livepatch_sample(&mut g);
    let dir = g.dir.join("snap");
    g.api_ok(json!({"verb": "snapshot", "dir": dir}));
    g.api_ok(json!({"verb": "shutdown"}));
    let _ = g.wait_exit(Duration::from_secs(30));
    println!("livepatched snapshot in {:?}", t.elapsed());
    *slot = Some(dir.clone());
    dir
}

/// md5 of `bytes` (host `md5sum`).
fn md5(bytes: &[u8]) -> String {
    let mut child = Command::new("md5sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("md5sum");
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string()
}

/// Differences between two line lists as a multiset, for failure messages.
fn multiset_diff(ours: &[String], guest: &[String]) -> Vec<String> {
    let mut count: BTreeMap<&str, i64> = BTreeMap::new();
    for l in ours {
        *count.entry(l).or_default() += 1;
    }
    for l in guest {
        *count.entry(l).or_default() -= 1;
    }
    count
        .into_iter()
        .filter(|(_, n)| *n != 0)
        .map(|(l, n)| format!("{} {l:?}", if n > 0 { format!("outside only x{n}") } else { format!("guest only x{}", -n) }))
        .collect()
}

// ---------------------------------------------------------------------------
// /proc/kallsyms

/// /proc/kallsyms as the outside view renders it: vmlinux's kallsyms in
/// kallsyms order (`%px %c %s`), then modules' and ftrace's symbols
/// (`%px %c %s\t[%s]`), as `s_show()` prints them.
fn render_kallsyms(k: &Kernel<'_>) -> Vec<String> {
    let mut lines: Vec<String> = k.syms.symbols().map(|s| format!("{:016x} {} {}", s.addr, s.kind, s.name)).collect();
    let extra = k.extra_kallsyms().expect("module and ftrace symbols");
    lines.extend(extra.iter().map(|s| format!("{:016x} {} {}\t[{}]", s.addr, s.kind, s.name, s.module)));
    lines
}

/// The guest's /proc/kallsyms lines; every line must have the kernel's format.
fn parse_kallsyms(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for l in text.lines() {
        let b = l.as_bytes();
        let ok = b.len() > 19
            && b[..16].iter().all(u8::is_ascii_hexdigit)
            && b[16] == b' '
            && b[17].is_ascii_graphic()
            && b[18] == b' ';
        assert!(ok, "not a /proc/kallsyms line: {l:?}");
        out.push(l.to_string());
    }
    out
}

#[test]
fn kallsyms_every_proc_kallsyms_line_matches() {
    let _lock = one_guest_at_a_time();
    let t0 = Instant::now();
    let mut g = restore("ks", &livepatched_snapshot());
    // The guest's own view of all of it, hashed in the guest (its user mode
    // runs natively); the full text only crosses the (emulated) serial
    // port if the hashes differ.
    let t = Instant::now();
    let guest_md5 = g.sh_timeout("md5sum /proc/kallsyms", Duration::from_secs(600));
    let guest_md5 = guest_md5.split_whitespace().next().unwrap_or_default().to_string();
    println!("guest md5sum /proc/kallsyms: {guest_md5} in {:?}", t.elapsed());
    assert_eq!(guest_md5.len(), 32, "md5sum output {guest_md5:?}");

    let path = dump(&g, "ks");
    let (ours, checks) = with_dump(&path, |k, _| {
        let lines = render_kallsyms(k);
        // The by-name index agrees with the table: every symbol is found by
        // its name, at its place among the symbols of that name.
        let mut seen: HashMap<&str, usize> = HashMap::new();
        let mut bad = Vec::new();
        for s in k.syms.symbols() {
            let nth = seen.entry(s.name.as_str()).or_default();
            let hits = k.syms.lookup_symbols(&s.name);
            if hits.get(*nth).map(|h| (h.addr, h.kind)) != Some((s.addr, s.kind)) {
                bad.push(format!("{} #{nth}: lookup gives {:?}", s.name, hits.iter().map(|h| (h.addr, h.kind)).collect::<Vec<_>>()));
            }
            *nth += 1;
        }
        assert!(bad.is_empty(), "lookup_symbols disagrees with the symbol table:\n{}", bad[..bad.len().min(20)].join("\n"));
        // module_symbols() is module_kallsyms() without the undefined entries.
        for m in k.modules().unwrap() {
            let all = k.module_kallsyms(&m).unwrap();
            for s in k.module_symbols(&m).unwrap() {
                assert!(
                    all.iter().any(|a| a.name == s.name && a.addr == s.addr && a.kind == s.kind),
                    "{} [{}] is a module symbol but not a module kallsyms line",
                    s.name,
                    m.name
                );
            }
        }
        (lines, k.syms.len())
    });
    let mut text = ours.join("\n");
    text.push('\n');
    let ours_md5 = md5(text.as_bytes());
    println!("outside view: {} lines ({checks} vmlinux symbols), md5 {ours_md5}", ours.len());
    assert!(ours.iter().any(|l| l.ends_with("\t[livepatch_sample]")), "no module symbols in the outside view");

    let guest_lines = if ours_md5 == guest_md5 {
        ours.clone()
    } else {
        // Fetch the guest's text once and show what differs.
        let t = Instant::now();
        let text = g.sh_timeout("cat /proc/kallsyms", Duration::from_secs(1200));
        println!("cat /proc/kallsyms: {:?}", t.elapsed());
        let guest = parse_kallsyms(&text);
        let diff = multiset_diff(&ours, &guest);
        let first = ours.iter().zip(&guest).position(|(a, b)| a != b);
        panic!(
            "/proc/kallsyms ({} lines) differs from the outside view ({} lines): {} differing lines, first out-of-order line {:?}:\n{}",
            guest.len(),
            ours.len(),
            diff.len(),
            first.map(|i| (i, &ours[i], &guest[i])),
            diff[..diff.len().min(40)].join("\n")
        );
    };

    // `sym` through the live API and the CLI, by name and by address, for
    // vmlinux text/data/per-CPU symbols, module symbols (defined and
    // undefined), and ftrace's trampoline: the same lines as /proc/kallsyms.
    let by_name = |name: &str| -> BTreeSet<(u64, String, Option<String>)> {
        guest_lines
            .iter()
            .filter_map(|l| {
                let addr = u64::from_str_radix(&l[..16], 16).ok()?;
                let kind = l[17..18].to_string();
                let rest = &l[19..];
                let (n, m) = match rest.split_once('\t') {
                    Some((n, m)) => (n, Some(m.trim_start_matches('[').trim_end_matches(']').to_string())),
                    None => (rest, None),
                };
                (n == name).then_some((addr, kind, m))
            })
            .collect()
    };
    // The per-CPU current task: its own variable in 6.1, in pcpu_hot later.
    let current = if guest_line() == "6.1" { "current_task" } else { "pcpu_hot" };
    for name in [
        "cmdline_proc_show",
        "init_task",
        "entry_SYSCALL_64",
        "_text",
        current,
        "fixed_percpu_data",
        "__per_cpu_offset",
        "klp_enable_patch",
        "livepatch_cmdline_proc_show",
        "__this_module",
        "ftrace_trampoline",
    ] {
        let want = by_name(name);
        assert!(!want.is_empty(), "{name} is not in /proc/kallsyms");
        let got: BTreeSet<(u64, String, Option<String>)> = cli_json(&g, &["sym", name])
            .as_array()
            .unwrap_or_else(|| panic!("sym {name}: not a list"))
            .iter()
            .map(|h| (hex(&h["addr"]), h["type"].as_str().unwrap().to_string(), h["module"].as_str().map(str::to_string)))
            .collect();
        assert_eq!(got, want, "sym {name} vs /proc/kallsyms");
        // The same verb on the dump file.
        assert_eq!(image_json(&path, &["sym", name]), cli_json(&g, &["sym", name]), "sym {name}: --image vs live");
    }
    // The API itself (no CLI) answers the same.
    let r = g.api_ok(json!({"verb": "sym", "query": "init_task"}));
    assert_eq!(hex(&r[0]["addr"]), by_name("init_task").iter().next().unwrap().0);

    // By address: `%pS` semantics, checked against the (verified) table:
    // the first symbol at the highest address <= addr, size to the next
    // higher address.
    let vmlinux: Vec<(u64, &str)> = guest_lines
        .iter()
        .filter(|l| !l.contains('\t') && &l[17..18] != "A" && &l[17..18] != "a")
        .map(|l| (u64::from_str_radix(&l[..16], 16).unwrap(), &l[19..]))
        .collect();
    let mut sorted = vmlinux.clone();
    sorted.sort_by_key(|(a, _)| *a); // stable: aliases keep kallsyms order
    let pct_s = |addr: u64| -> String {
        let i = sorted.partition_point(|(a, _)| *a <= addr) - 1;
        let start = sorted[i].0;
        let first = sorted.partition_point(|(a, _)| *a < start);
        let next = sorted[i + 1..].iter().map(|(a, _)| *a).find(|a| *a > start).unwrap();
        format!("{}+{:#x}/{:#x}", sorted[first].1, addr - start, next - start)
    };
    for (name, off) in [("cmdline_proc_show", 0x10u64), ("schedule", 0), ("init_task", 0x40), ("entry_SYSCALL_64", 3)] {
        let base = by_name(name).iter().next().unwrap().0;
        let r = cli_json(&g, &["sym", &format!("{:#x}", base + off)]);
        assert_eq!(r["symbol"].as_str().unwrap(), pct_s(base + off), "sym {name}+{off:#x}");
        let text = cli_text(&g, &["sym", &format!("{:#x}", base + off)]);
        assert!(text.contains(&pct_s(base + off)), "text view of sym {name}+{off:#x}: {text}");
    }
    // A module address resolves to the module's symbol, the first of its
    // aliases (livepatch_exit, not cleanup_module at the same address).
    let exit = by_name("livepatch_exit").iter().next().unwrap().0;
    let in_sample = |name: &str| {
        by_name(name).into_iter().find(|e| e.2.as_deref() == Some("livepatch_sample")).map(|e| e.0)
    };
    assert_eq!(in_sample("cleanup_module"), Some(exit), "cleanup_module aliases livepatch_exit");
    let r = cli_json(&g, &["sym", &format!("{:#x}", exit + 5)]);
    assert_eq!(r["name"], json!("livepatch_exit"), "{r}");
    assert_eq!((hex(&r["offset"]), r["module"].as_str()), (5, Some("livepatch_sample")), "{r}");
    let tramp = by_name("ftrace_trampoline").iter().next().unwrap().0;
    let r = cli_json(&g, &["sym", &format!("{tramp:#x}")]);
    assert_eq!((r["name"].as_str(), r["module"].as_str()), (Some("ftrace_trampoline"), Some("__builtin__ftrace")), "{r}");
    let _ = std::fs::remove_file(&path);
    println!("kallsyms test: {:?}", t0.elapsed());
}

// ---------------------------------------------------------------------------
// Tasks

/// pid, tgid, comm of every thread as /proc shows it (pid 0 idle tasks are
/// not in /proc).
fn guest_tasks(g: &mut Guest) -> BTreeSet<(i32, i32, String)> {
    let out = g.sh("for t in /proc/[0-9]*/task/*; do c=; IFS= read -r c < $t/comm; p=${t#/proc/}; echo \"T ${t##*/} ${p%%/*} $c\"; done");
    out.lines()
        .filter_map(|l| {
            let mut f = l.strip_prefix("T ")?.splitn(3, ' ');
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?, f.next()?.to_string()))
        })
        .collect()
}

/// One `ps` through the CLI (live API): the threads other than the idle
/// tasks as (pid, tgid, /proc comm). Checks what must always hold: pid 0
/// only for idle tasks (`swapper/N`, one per vCPU at most), no pid twice,
/// exactly one task running on each vCPU.
fn outside_tasks(g: &Guest, vcpus: usize) -> BTreeSet<(i32, i32, String)> {
    let ps = cli_json(g, &["ps"]);
    let mut out = BTreeSet::new();
    let mut per_vcpu = vec![0usize; vcpus];
    let mut idle = BTreeSet::new();
    let mut pids = BTreeSet::new();
    for t in ps.as_array().expect("ps: a list") {
        let pid = t["pid"].as_i64().unwrap() as i32;
        let tgid = t["tgid"].as_i64().unwrap() as i32;
        let comm = t["proc_comm"].as_str().unwrap().to_string();
        if let Some(c) = t["running_on"].as_u64() {
            *per_vcpu.get_mut(c as usize).unwrap_or_else(|| panic!("pid {pid} runs on vCPU {c} of {vcpus}")) += 1;
        }
        if pid == 0 {
            let cpu = comm.strip_prefix("swapper/").and_then(|c| c.parse::<usize>().ok());
            assert!(tgid == 0 && cpu.is_some_and(|c| c < vcpus) && idle.insert(cpu), "unexpected pid 0 task {t}");
            continue;
        }
        assert!(pids.insert(pid), "ps lists pid {pid} twice: {ps}");
        out.insert((pid, tgid, comm));
    }
    assert!(per_vcpu.iter().all(|n| *n == 1), "tasks running per vCPU: {per_vcpu:?}\n{ps}");
    // Running or not: a secondary CPU's idle task is on no task list.
    assert_eq!(idle.len(), vcpus, "every vCPU's idle task is listed: {idle:?}\n{ps}");
    out
}

/// `ps` agrees with /proc: every thread with the same pid, tgid and comm,
/// and nothing invented but the idle tasks. Workqueue workers come and go
/// and their /proc name shows their latest work item ("kworker/0:1-events"
/// one moment, "-mm_percpu_wq" the next), so the guest's listing is taken
/// again (up to five times) until the pids agree and every name the guest
/// printed is one `ps` showed for that pid just after.
fn compare_ps(g: &mut Guest, vcpus: usize) -> usize {
    let mut seen: BTreeMap<i32, BTreeSet<(i32, String)>> = BTreeMap::new();
    let mut last = String::new();
    for attempt in 0..5 {
        let guest = guest_tasks(g);
        let mut outside = outside_tasks(g, vcpus);
        for _ in 0..5 {
            for (pid, tgid, comm) in &outside {
                seen.entry(*pid).or_default().insert((*tgid, comm.clone()));
            }
            if guest.iter().all(|(p, t, c)| seen.get(p).is_some_and(|s| s.contains(&(*t, c.clone())))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
            outside = outside_tasks(g, vcpus);
        }
        let gp: BTreeSet<i32> = guest.iter().map(|t| t.0).collect();
        let op: BTreeSet<i32> = outside.iter().map(|t| t.0).collect();
        let mut problems: Vec<String> = gp.symmetric_difference(&op).map(|p| format!("pid {p} only in {}", if gp.contains(p) { "/proc" } else { "ps" })).collect();
        for (p, t, c) in &guest {
            if !seen.get(p).is_some_and(|s| s.contains(&(*t, c.clone()))) {
                problems.push(format!("/proc: ({p}, {t}, {c:?}); ps showed {:?}", seen.get(p)));
            }
        }
        if problems.is_empty() {
            assert!(guest.len() >= 10, "only {} tasks in /proc?", guest.len());
            println!("ps agrees with /proc on {} tasks (attempt {attempt})", guest.len());
            return guest.len();
        }
        last = problems.join("\n");
        println!("ps vs /proc, attempt {attempt}:\n{last}");
    }
    panic!("ps disagrees with /proc:\n{last}");
}

#[test]
fn ps_matches_proc_task_list() {
    let _lock = one_guest_at_a_time();
    let t0 = Instant::now();
    let mut g = restore("ps", &ready_snapshot(2));
    quiet(&mut g);
    // One more user process, asleep in the kernel.
    g.sh("sleep 1000 & echo $!");
    let n = compare_ps(&mut g, 2);
    // The text view lists the same tasks (taken between two JSON views
    // that agree, as workers come and go).
    // A kworker's name carries the workqueue it last ran ("-wq"), or runs
    // now ("+wq"): that part may change and change back between two views.
    let base = |c: &str| -> String {
        match c.strip_prefix("kworker/") {
            Some(rest) => format!("kworker/{}", rest.split(['-', '+']).next().unwrap_or(rest)),
            None => c.to_string(),
        }
    };
    let pids = |v: Value| -> Vec<(String, String)> {
        v.as_array().unwrap().iter().map(|t| (t["pid"].to_string(), base(t["proc_comm"].as_str().unwrap()))).collect()
    };
    let mut checked = false;
    for _ in 0..5 {
        let before = pids(cli_json(&g, &["ps"]));
        let text = cli_text(&g, &["ps"]);
        if before != pids(cli_json(&g, &["ps"])) {
            continue;
        }
        assert!(text.starts_with("   PID   TGID COMM"), "{text}");
        let rows: Vec<(String, String)> = text
            .lines()
            .skip(1)
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f[0].to_string(), base(f[2]))
            })
            .collect();
        assert_eq!(rows, before, "ps text view vs JSON:\n{text}");
        checked = true;
        break;
    }
    assert!(checked, "the task list kept changing");
    assert!(n >= 10);
    println!("ps test: {:?}", t0.elapsed());
}

// ---------------------------------------------------------------------------
// Stacks

/// pid -> (reliable, /proc/PID/stack lines as the outside view prints them).
fn outside_stacks(g: &Guest) -> BTreeMap<i32, (bool, Vec<String>)> {
    cli_json(g, &["stack", "all"])
        .as_array()
        .expect("stack all: a list")
        .iter()
        .filter(|t| t["pid"].as_i64() != Some(0))
        .map(|t| {
            let lines = t["frames"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| format!("[<0>] {}", f["symbol"].as_str().unwrap()))
                .collect();
            (t["pid"].as_i64().unwrap() as i32, (t["reliable"].as_bool() == Some(true), lines))
        })
        .collect()
}

/// /proc/PID/stack of `pids` (or every thread but the shell itself when
/// None), read with shell builtins.
fn guest_stacks(g: &mut Guest, pids: Option<&[i32]>, skip: &[i32]) -> BTreeMap<i32, Vec<String>> {
    let skip: String = skip.iter().map(|p| format!(" {p}")).collect();
    let list = match pids {
        None => "/proc/[0-9]*/task/*".to_string(),
        Some(p) => p.iter().map(|p| format!("/proc/{p}/task/{p}")).collect::<Vec<_>>().join(" "),
    };
    let out = g.sh(&format!(
        "for t in {list}; do p=${{t##*/}}; case \" $$ {skip} \" in *\" $p \"*) continue;; esac; \
         echo \"== $p\"; while IFS= read -r l; do echo \"$l\"; done < $t/stack; done"
    ));
    let mut map: BTreeMap<i32, Vec<String>> = BTreeMap::new();
    let mut cur = None;
    for l in out.lines() {
        if let Some(p) = l.strip_prefix("== ") {
            cur = p.trim().parse().ok();
            if let Some(p) = cur {
                map.entry(p).or_default();
            }
        } else if let (Some(p), true) = (cur, l.starts_with("[<")) {
            map.entry(p).or_default().push(l.to_string());
        }
    }
    map
}

/// Every sleeping task's /proc/PID/stack equals `stack`'s frames, and that
/// unwind is reliable. The outside view is taken just before and just after
/// the guest reads the stacks. Some tasks move meanwhile: the guest's own
/// reading closes files, whose freeing starts RCU grace periods, so
/// rcu_gp_kthread is in its fqs loop when seen from outside right after the
/// read but idle while the guest reads. Such a task is looked at from
/// outside again for a few seconds (the guest idle) and read again by the
/// guest, up to three rounds; it agrees when a stack the guest printed is
/// one the outside view produced. Returns the stacks that agreed.
fn compare_sleeping_stacks(g: &mut Guest, skip: &[i32]) -> BTreeMap<i32, Vec<String>> {
    let mut pending: Option<Vec<i32>> = None;
    let mut agreed = BTreeMap::new();
    let mut seen_outside: BTreeMap<i32, Vec<(bool, Vec<String>)>> = BTreeMap::new();
    let mut seen_guest: BTreeMap<i32, Vec<Vec<String>>> = BTreeMap::new();
    let mut gone = Vec::new();
    for round in 0..3 {
        let before = outside_stacks(g);
        let guest = guest_stacks(g, pending.as_deref(), skip);
        let after = outside_stacks(g);
        let mut next = Vec::new();
        for (pid, lines) in guest {
            if lines.is_empty() && !after.contains_key(&pid) {
                gone.push(pid); // exited meanwhile
                continue;
            }
            let outs = seen_outside.entry(pid).or_default();
            outs.extend(before.get(&pid).cloned());
            outs.extend(after.get(&pid).cloned());
            let mine = seen_guest.entry(pid).or_default();
            mine.push(lines);
            match mine.iter().find(|gl| outs.iter().any(|(rel, o)| *rel && o == *gl)) {
                Some(gl) => {
                    agreed.insert(pid, gl.clone());
                }
                None => next.push(pid),
            }
        }
        // Look again from outside while the guest is idle.
        for _ in 0..20 {
            if next.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
            let now = outside_stacks(g);
            next.retain(|pid| {
                let outs = seen_outside.entry(*pid).or_default();
                outs.extend(now.get(pid).cloned());
                let hit = seen_guest[pid].iter().find(|gl| outs.iter().any(|(rel, o)| *rel && o == *gl));
                if let Some(gl) = hit {
                    agreed.insert(*pid, gl.clone());
                }
                hit.is_none()
            });
        }
        if next.is_empty() {
            println!("stacks of {} tasks agree (round {round}; exited meanwhile: {gone:?})", agreed.len());
            return agreed;
        }
        println!("round {round}: {} tasks' stacks differ or moved, reading them again: {next:?}", next.len());
        pending = Some(next);
    }
    let report: Vec<String> = pending
        .unwrap_or_default()
        .iter()
        .map(|pid| format!("pid {pid}:\n  guest read:   {:?}\n  outside seen: {:?}", seen_guest.get(pid), seen_outside.get(pid)))
        .collect();
    panic!("/proc/PID/stack and `stack` disagree:\n{}", report.join("\n"));
}

/// pid 1 (the console shell) asleep at its prompt: a background subshell
/// saves /proc/1/stack while the shell waits for input, and the outside
/// view is taken before anything is typed again.
fn compare_shell_at_prompt(g: &mut Guest) {
    let from = g.console_len();
    // The quotes keep the typed echo from matching "BG=". /proc/1/stack is
    // empty while pid 1 runs on another CPU: read it until it is not.
    g.send(
        "(sleep 2; i=0; while [ $i -lt 30 ]; do while IFS= read -r l; do echo \"$l\"; done < /proc/1/stack > /tmp/pid1.stack; \
         [ -s /tmp/pid1.stack ] && break; i=$((i+1)); sleep 1; done) & echo B''G=$!.\n",
    );
    let end = g.wait_for_from("BG=", from, CMD_TIMEOUT);
    let end2 = g.wait_for_from(".", end, CMD_TIMEOUT);
    let bg: i32 = g.console_slice(end, end2 - 1).trim().parse().expect("background pid");
    // Wait until the subshell is gone (or a zombie) without typing.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ps = cli_json(g, &["ps"]);
        let alive = ps.as_array().unwrap().iter().any(|t| t["pid"].as_i64() == Some(bg.into()) && t["state"] != json!("Z"));
        if !alive {
            break;
        }
        assert!(Instant::now() < deadline, "background reader {bg} did not finish");
        std::thread::sleep(Duration::from_millis(500));
    }
    // pid 1 may still be handling its child's exit.
    let mut outside = Value::Null;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(500));
        outside = cli_json(g, &["stack", "1"]);
        if outside[0]["running_on"].is_null() {
            break;
        }
    }
    let t = &outside[0];
    assert!(t["running_on"].is_null(), "pid 1 keeps running: {t}");
    assert_eq!(t["pid"], json!(1));
    assert_eq!(t["reliable"], json!(true), "{t}");
    let ours: Vec<String> =
        t["frames"].as_array().unwrap().iter().map(|f| format!("[<0>] {}", f["symbol"].as_str().unwrap())).collect();
    let guest: Vec<String> = g.sh("while IFS= read -r l; do echo \"$l\"; done < /tmp/pid1.stack").lines().map(str::to_string).collect();
    assert!(!guest.is_empty(), "empty /proc/1/stack");
    assert_eq!(ours, guest, "pid 1 at its prompt: `stack 1` vs /proc/1/stack");
    println!("pid 1 at the prompt: {guest:?}");
}

#[test]
fn stacks_match_proc_pid_stack() {
    let _lock = one_guest_at_a_time();
    let t0 = Instant::now();
    let mut g = restore("stacks", &ready_snapshot(2));
    quiet(&mut g);
    // A workqueue worker asleep in a module function (msleep() in a loop in
    // busymod_work_func while block_transition is set).
    let out = g.sh_timeout("insmod /modules/test_klp_callbacks_busy.ko block_transition=Y; echo rc=$?", Duration::from_secs(300));
    assert!(out.ends_with("rc=0"), "{out}");
    // Two tasks asleep in known places: `cat` opening a FIFO with no writer
    // (fifo_open -> wait_for_partner) and `cat` reading an empty pipe whose
    // writer (the shell, fd 3) stays open (pipe_read). Then a busy loop.
    let out = g.sh(
        "mkfifo /tmp/f1 /tmp/f2; exec 3<>/tmp/f2; cat /tmp/f1 & echo A=$!; cat /tmp/f2 & echo B=$!; \
         (while :; do :; done) & echo C=$!",
    );
    let var = |k: &str| -> i32 {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {k}= in {out:?}"))
    };
    let (open_cat, read_cat, busy) = (var("A"), var("B"), var("C"));
    // Wait (with builtins) until both cats have reached their sleep.
    let w = g.sh(&format!(
        "for p in {open_cat} {read_cat}; do i=0; while [ $i -lt 200 ]; do s=; \
         while IFS= read -r l; do s=\"$s $l\"; done < /proc/$p/stack; \
         case \"$s\" in *wait_for_partner*|*pipe_read*) break;; esac; i=$((i+1)); done; echo \"$p $i\"; done"
    ));
    println!("cats asleep after: {w}");
    // Both reached their sleep (the loop gives up after 200 reads): say so
    // here, with what the guest printed, rather than fail later unclearly.
    for p in [open_cat, read_cat] {
        assert!(
            w.lines().any(|l| l.split_whitespace().next() == Some(&p.to_string()) && !l.ends_with(" 200")),
            "cat {p} never reached its sleep ({w}); guest console:\n{}",
            g.tail(3000)
        );
    }

    let stacks = compare_sleeping_stacks(&mut g, &[busy]);
    let has = |pid: i32, f: &str| stacks.get(&pid).is_some_and(|s| s.iter().any(|l| l.contains(&format!("] {f}+"))));
    assert!(has(open_cat, "wait_for_partner") && has(open_cat, "fifo_open"), "cat opening a FIFO: {:?}", stacks.get(&open_cat));
    assert!(has(read_cat, "pipe_read") && has(read_cat, "ksys_read"), "cat reading a pipe: {:?}", stacks.get(&read_cat));
    assert!(stacks.values().filter(|s| s.iter().any(|l| l.contains("] kthread+"))).count() >= 5, "kernel threads compared");
    let (&worker, worker_stack) = stacks
        .iter()
        .find(|(_, s)| s.iter().any(|l| l.contains("] busymod_work_func+") && l.ends_with(" [test_klp_callbacks_busy]")))
        .unwrap_or_else(|| panic!("no stack through the module's busymod_work_func: {stacks:?}"));
    println!("pid {worker} in the module: {worker_stack:?}");
    // The worker running the module's work is "kworker/N:M+events" ('+':
    // it is inside a work item) in /proc and in ps.
    compare_ps(&mut g, 2);
    let ps = cli_json(&g, &["ps"]);
    let comm = ps.as_array().unwrap().iter().find(|t| t["pid"].as_i64() == Some(worker.into())).map(|t| t["proc_comm"].clone());
    assert!(comm.as_ref().and_then(Value::as_str).is_some_and(|c| c.starts_with("kworker/") && c.ends_with("+events")), "{comm:?}");
    // The text view of one stack prints the same frames.
    let text = cli_text(&g, &["stack", &read_cat.to_string()]);
    for l in &stacks[&read_cat] {
        assert!(text.contains(l.trim_start_matches("[<0>] ")), "{l} not in:\n{text}");
    }

    // The busy loop: listed and running; whenever it is on a vCPU, its
    // stack is what that vCPU's registers say: empty in user mode, from RIP
    // up in kernel mode (a timer interrupt), reliable either way except in
    // the entry code before the stack switch.
    let mut seen_running = 0;
    let mut seen_user = 0;
    for i in 0..6 {
        let path = dump(&g, &format!("busy{i}"));
        with_dump(&path, |k, img| {
            let tasks = k.tasks().unwrap();
            let t = tasks.iter().find(|t| t.pid == busy).unwrap_or_else(|| panic!("busy loop {busy} not listed"));
            assert_eq!((t.tgid, t.proc_comm.as_str()), (busy, "sh"));
            let st = k.task_stacks(&busy.to_string()).unwrap().remove(0);
            if let Some(cpu) = t.running_on {
                seen_running += 1;
                assert_eq!(t.state, 'R', "a task on a vCPU is runnable");
                assert_eq!(k.current_task(cpu).unwrap(), t.addr);
                let regs = img.cpus[cpu];
                // Caught in the entry code between an interrupt from user
                // mode and the move to the task stack (error_entry
                // tail-calls sync_regs, whose frame ORC cannot describe; the
                // kernel's own unwinder stops there too), the stack is
                // unreliable; anywhere else it must be reliable.
                let in_entry = k.syms.resolve(regs.rip).is_some_and(|s| s.name == "sync_regs" || s.name == "error_entry")
                    || k.sym("__entry_text_start").ok().zip(k.sym("__entry_text_end").ok()).is_some_and(|(a, b)| (a..b).contains(&regs.rip));
                if !st.reliable && in_entry {
                    println!("sample {i}: busy loop in the entry code at {:#x}: unreliable ({:?})", regs.rip, st.reason);
                    return;
                }
                assert!(st.reliable, "busy loop on vCPU {cpu}: {:?} {:?}", st.reason, st.all_frames);
                if regs.in_user_mode() {
                    seen_user += 1;
                    assert!(regs.rip < 0x8000_0000_0000, "user RIP {:#x}", regs.rip);
                    assert!(st.frames.is_empty() && st.all_frames.is_empty(), "user mode, yet {:?}", st.all_frames);
                } else {
                    assert_eq!(st.all_frames.first().map(|f| f.ip), Some(regs.rip), "kernel mode: first frame is RIP");
                    assert!(k.syms.resolve(regs.rip).is_some(), "RIP {:#x} in no kernel symbol", regs.rip);
                }
                println!("sample {i}: busy loop on vCPU {cpu}, user mode {}, frames {:?}", regs.in_user_mode(), st.frames);
            } else {
                println!("sample {i}: busy loop not on a vCPU (state {})", t.state);
            }
        });
        let _ = std::fs::remove_file(&path);
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(seen_running >= 2, "the busy loop was on a vCPU in only {seen_running} of 6 samples");
    println!("busy loop: running in {seen_running}/6 samples, in user mode in {seen_user}");
    // The live API agrees on who runs: ps marks it running on a vCPU in
    // most samples.
    let running = (0..5)
        .filter(|_| {
            cli_json(&g, &["ps"]).as_array().unwrap().iter().any(|t| t["pid"].as_i64() == Some(busy.into()) && t["running_on"].is_u64())
        })
        .count();
    assert!(running >= 2, "ps shows the busy loop on a vCPU in {running}/5 samples");
    g.sh(&format!("kill {busy}"));

    compare_shell_at_prompt(&mut g);
    println!("stacks test: {:?}", t0.elapsed());
}

// ---------------------------------------------------------------------------
// ftrace

/// How `print_rec()` prints a record: `%ps` of its ip (`name` or
/// `name [module]`), `__ftrace_invalid_address___<offset>` when the ip is
/// more than FTRACE_MCOUNT_MAX_OFFSET into its symbol (weak functions).
fn print_rec(k: &Kernel<'_>, ip: u64, max_offset: u64) -> String {
    let (name, offset, module) = if let Some(s) = k.syms.resolve(ip) {
        (Some(s.name), s.offset, None)
    } else if let Some(m) = k.module_address_lookup(ip).unwrap() {
        (Some(m.name), m.offset, Some(m.module))
    } else {
        (None, 0, None)
    };
    let mut s = match name {
        Some(n) if offset <= max_offset => n,
        _ => format!("__ftrace_invalid_address___{offset}"),
    };
    if let Some(m) = module {
        s.push_str(&format!(" [{m}]"));
    }
    s
}

#[test]
fn ftrace_matches_tracefs() {
    let _lock = one_guest_at_a_time();
    let t0 = Instant::now();
    // livepatch-sample.ko is loaded: its functions have records and
    // cmdline_proc_show is enabled through klp's ftrace_ops.
    let mut g = restore("ftrace", &livepatched_snapshot());
    let traced = "version_proc_show";
    let t = Instant::now();
    g.sh_timeout(
        &format!("cd /sys/kernel/tracing; echo {traced} > set_ftrace_filter; echo function > current_tracer; cd /"),
        Duration::from_secs(600),
    );
    println!("guest turned on the function tracer for {traced} in {:?}", t.elapsed());
    let t = Instant::now();
    let out = g.sh_timeout(
        "cd /sys/kernel/tracing; echo ==ENABLED; cat enabled_functions; echo ==AVAILABLE; cat available_filter_functions; cd /",
        Duration::from_secs(900),
    );
    println!("guest printed tracefs in {:?}", t.elapsed());
    let (enabled_text, available_text) = out
        .split_once("==AVAILABLE\n")
        .map(|(e, a)| (e.trim_start_matches("==ENABLED").trim_matches('\n'), a))
        .expect("markers");
    let available: Vec<String> = available_text.lines().map(str::to_string).collect();
    let enabled: Vec<&str> = enabled_text.lines().filter(|l| !l.is_empty()).collect();
    assert!(available.len() > 1000, "{} available functions?", available.len());

    // FTRACE_MCOUNT_MAX_OFFSET is ENDBR_INSN_SIZE: 4 with IBT, else 0.
    let config = std::fs::read_to_string(image_dir().join("config")).unwrap_or_default();
    let max_offset = if config.lines().any(|l| l == "CONFIG_X86_KERNEL_IBT=y") { 4 } else { 0 };

    let path = dump(&g, "ftrace");
    let mut flag = std::collections::HashMap::new();
    let (ours, enabled_ours, notrace, dup) = with_dump(&path, |k, _| {
        // The flag bits as this kernel's BTF defines them.
        flag = k.btf.enumerators_with_prefix("FTRACE_FL_").into_iter().map(|(n, v)| (n, v as u64)).collect();
        let records = k.ftrace_records().unwrap();
        let mut lines = Vec::new();
        let mut en = BTreeMap::new();
        let mut wrong_sites = Vec::new();
        for r in records.by_ip.values() {
            let name = print_rec(k, r.ip, max_offset);
            // Every record's site holds the NOP unless the guest's ftrace
            // has it enabled, in which case it calls into ftrace.
            let mut b = [0u8; 5];
            k.mem.read_virt(r.ip, &mut b).unwrap();
            let (insn, text) = introspect::ftrace::decode_site(&b, r.ip);
            let ok = if r.enabled() { matches!(insn, SiteInsn::Call { .. }) } else { insn == SiteInsn::Nop };
            if !ok {
                wrong_sites.push(format!("{name} at {:#x} flags {:#x}: {text}", r.ip, r.flags));
            }
            if r.enabled() {
                en.insert(name.clone(), *r);
            }
            lines.push(name);
        }
        assert!(wrong_sites.is_empty(), "sites that disagree with their records:\n{}", wrong_sites.join("\n"));
        // Functions with no record: text symbols of vmlinux none of whose
        // addresses is a record (notrace), unique names.
        let text = k.syms.text_range().unwrap();
        let traceable: BTreeSet<&str> = available.iter().map(String::as_str).collect();
        let mut notrace: Vec<String> = k
            .syms
            .symbols()
            .filter(|s| matches!(s.kind, 't' | 'T') && text.contains(&s.addr) && !s.name.starts_with(['.', '$']) && !s.name.ends_with(".cold"))
            .filter(|s| k.syms.lookup(&s.name).len() == 1 && !traceable.contains(s.name.as_str()))
            .filter(|s| !records.by_ip.contains_key(&s.addr))
            .map(|s| s.name.clone())
            .collect();
        notrace.sort();
        // A traceable name several functions share (old_sympos territory).
        let dup = k
            .syms
            .symbols()
            .filter(|s| matches!(s.kind, 't' | 'T') && traceable.contains(s.name.as_str()))
            .map(|s| (s.name.clone(), k.syms.lookup(&s.name)))
            .find(|(_, addrs)| addrs.len() >= 2 && addrs.iter().all(|a| records.by_ip.contains_key(a) || records.by_ip.contains_key(&(a + 4))));
        (lines, en, notrace, dup)
    });

    // available_filter_functions, as a set: one record per line.
    let diff = multiset_diff(&ours, &available);
    assert!(
        diff.is_empty(),
        "available_filter_functions ({} lines) vs the outside records ({}): {} differences:\n{}",
        available.len(),
        ours.len(),
        diff.len(),
        diff[..diff.len().min(40)].join("\n")
    );
    assert!(available.iter().any(|l| l == "livepatch_cmdline_proc_show [livepatch_sample]"), "module functions listed");

    // enabled_functions: the same functions, refcounts and flags, and the
    // trampoline each site calls.
    let names: BTreeSet<String> = enabled.iter().map(|l| l.split(" (").next().unwrap().to_string()).collect();
    assert_eq!(names, enabled_ours.keys().cloned().collect::<BTreeSet<_>>(), "enabled_functions:\n{enabled_text}");
    assert!(names.contains(traced) && names.contains("cmdline_proc_show"), "{names:?}");
    for l in &enabled {
        let (name, rest) = l.split_once(" (").unwrap();
        let r = enabled_ours[name];
        let (count, flags) = rest.split_once(')').unwrap();
        assert_eq!(count.parse::<u64>().unwrap(), r.refcount(), "{l}");
        let flags = flags.split('\t').next().unwrap();
        assert_eq!(flags.contains(" R"), r.flags & flag["FTRACE_FL_REGS"] != 0, "{l}");
        assert_eq!(flags.contains(" I"), r.flags & flag["FTRACE_FL_IPMODIFY"] != 0, "{l}");
        let site = cli_json(&g, &["ftrace", name]);
        let rec = &site["record"];
        assert!(rec.is_object(), "ftrace {name}: no record: {site}");
        assert_ne!(hex(&rec["flags"]) & flag["FTRACE_FL_ENABLED"], 0, "{site}");
        assert_eq!(hex(&site["site"]), r.ip, "{site}");
        let target = hex(&site["insn"]["Call"]["target"]);
        // "\ttramp: 0x... (handler)" when the site calls an ops' own trampoline.
        if let Some(t) = l.split("\ttramp: ").nth(1) {
            let t = t.split_whitespace().next().unwrap();
            let want = if let Some(h) = t.strip_prefix("0x") {
                u64::from_str_radix(h, 16).unwrap()
            } else {
                // %pS could name it (never on 6.1: trampolines are not in
                // kallsyms_lookup()).
                hex(&cli_json(&g, &["sym", t.split('+').next().unwrap()])[0]["addr"])
            };
            assert_eq!(target, want, "{name}: call target vs enabled_functions tramp ({l})");
            let s = cli_json(&g, &["sym", &format!("{target:#x}")]);
            assert_eq!((s["name"].as_str(), s["module"].as_str()), (Some("ftrace_trampoline"), Some("__builtin__ftrace")), "{s}");
            let sym = site["target_symbol"].as_str().unwrap_or_default();
            assert!(sym.starts_with("ftrace_trampoline+0x0/") && sym.ends_with(" [__builtin__ftrace]"), "{site}");
        }
        let text = cli_text(&g, &["ftrace", name]);
        assert!(text.contains("(enabled)") && text.contains("call "), "{text}");
    }
    println!("enabled_functions:\n{enabled_text}");

    // A traceable function that is not enabled, and a module function.
    for name in ["schedule_timeout", "livepatch_cmdline_proc_show"] {
        if !available.iter().any(|l| l == name || l.starts_with(&format!("{name} ["))) {
            continue;
        }
        let site = cli_json(&g, &["ftrace", name]);
        assert!(site["record"].is_object(), "{name} has a record: {site}");
        assert_eq!(site["insn"], json!("Nop"), "{site}");
        assert!(cli_text(&g, &["ftrace", name]).contains("(not enabled)"));
    }
    // A name several functions share: ambiguous without --sympos, the N-th
    // in kallsyms order with it.
    let (dup_name, dup_addrs) = dup.expect("a traceable function name that occurs twice");
    let out = Command::new(BIN).arg("--api-sock").arg(&g.api_sock).args(["ftrace", &dup_name]).output().unwrap();
    assert!(!out.status.success(), "ftrace {dup_name} (ambiguous) succeeded");
    assert!(String::from_utf8_lossy(&out.stderr).contains("ambiguous"), "{}", String::from_utf8_lossy(&out.stderr));
    for (i, addr) in dup_addrs.iter().enumerate() {
        let site = cli_json(&g, &["ftrace", &dup_name, "--sympos", &(i + 1).to_string()]);
        assert_eq!(hex(&site["func_addr"]), *addr, "ftrace {dup_name} --sympos {}: {site}", i + 1);
        assert_eq!(hex(&site["record"]["ip"]), hex(&site["site"]), "ftrace {dup_name} --sympos {}: {site}", i + 1);
    }
    println!("{dup_name} occurs {} times: {dup_addrs:x?}", dup_addrs.len());
    // Functions the guest does not list have no record.
    assert!(notrace.len() > 10, "notrace candidates: {notrace:?}");
    for name in notrace.iter().step_by(notrace.len() / 5).take(5) {
        let site = cli_json(&g, &["ftrace", name]);
        assert!(site["record"].is_null(), "notrace {name}: {site}");
        assert!(cli_text(&g, &["ftrace", name]).contains("no ftrace record"), "{name}");
        println!("notrace {name}: {}", site["text"]);
    }
    let _ = std::fs::remove_file(&path);
    println!("ftrace test: {:?}", t0.elapsed());
}

// ---------------------------------------------------------------------------
// Livepatches and modules

#[test]
fn klp_and_mods_match_sysfs_and_proc_modules() {
    let _lock = one_guest_at_a_time();
    let t0 = Instant::now();
    // The guest as booted: no livepatch (and normally no module).
    {
        let mut g = restore("klp-none", &ready_snapshot(1));
        let out = g.sh("for p in /sys/kernel/livepatch/*; do echo \"P $p\"; done; while IFS= read -r l; do echo \"M $l\"; done < /proc/modules");
        let patches: Vec<&str> = out.lines().filter_map(|l| l.strip_prefix("P /sys/kernel/livepatch/")).filter(|p| *p != "*").collect();
        let modules: Vec<&str> = out.lines().filter_map(|l| l.strip_prefix("M ")).collect();
        let klp = cli_json(&g, &["klp"]);
        assert_eq!(klp.as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect::<Vec<_>>(), patches, "{out}");
        let mods = cli_json(&g, &["mods"]);
        assert_eq!(mods.as_array().unwrap().iter().map(|m| m["proc_line"].as_str().unwrap()).collect::<Vec<_>>(), modules, "{out}");
    }
    let mut g = restore("klp", &livepatched_snapshot());
    let out = g.sh(
        "cd /sys/kernel/livepatch; for p in *; do [ -d \"$p\" ] || continue; echo \"P $p\"; \
         for a in enabled transition; do v=; read v < $p/$a; echo \"A $p $a $v\"; done; \
         for o in $p/*; do [ -d \"$o\" ] || continue; v=; read v < $o/patched; echo \"O $o $v\"; \
         for f in $o/*; do [ -d \"$f\" ] && echo \"F $f\"; done; done; done; cd /; \
         while IFS= read -r l; do echo \"M $l\"; done < /proc/modules",
    );
    println!("{out}");
    // /sys/kernel/livepatch as a tree of strings.
    let mut sysfs: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut objects: BTreeMap<String, String> = BTreeMap::new();
    let mut funcs: BTreeSet<String> = BTreeSet::new();
    let mut proc_modules = Vec::new();
    for l in out.lines() {
        let (tag, rest) = l.split_once(' ').unwrap_or((l, ""));
        match tag {
            "P" => {
                sysfs.entry(rest.to_string()).or_default();
            }
            "A" => {
                let mut f = rest.splitn(3, ' ');
                let (p, a, v) = (f.next().unwrap(), f.next().unwrap(), f.next().unwrap_or(""));
                sysfs.entry(p.to_string()).or_default().insert(a.to_string(), v.to_string());
            }
            "O" => {
                let (o, v) = rest.split_once(' ').unwrap();
                objects.insert(o.to_string(), v.to_string());
            }
            "F" => {
                funcs.insert(rest.to_string());
            }
            "M" => proc_modules.push(rest.to_string()),
            _ => {}
        }
    }
    let klp = cli_json(&g, &["klp"]);
    let patches = klp.as_array().unwrap();
    let flag = |b: &Value| if b.as_bool().unwrap() { "1" } else { "0" }.to_string();
    let mut o_sysfs = BTreeMap::new();
    let mut o_objects = BTreeMap::new();
    let mut o_funcs = BTreeSet::new();
    for p in patches {
        let name = p["name"].as_str().unwrap().to_string();
        o_sysfs.insert(
            name.clone(),
            BTreeMap::from([("enabled".to_string(), flag(&p["enabled"])), ("transition".to_string(), flag(&p["transition"]))]),
        );
        for o in p["objects"].as_array().unwrap() {
            let oname = o["name"].as_str().unwrap_or("vmlinux");
            o_objects.insert(format!("{name}/{oname}"), flag(&o["patched"]));
            for f in o["funcs"].as_array().unwrap() {
                // The kobject is "<old_name>,<sympos>", sympos 0 shown as 1.
                let pos = f["old_sympos"].as_u64().unwrap().max(1);
                o_funcs.insert(format!("{name}/{oname}/{},{pos}", f["old_name"].as_str().unwrap()));
                assert_eq!(f["patched"], o["patched"], "{f}");
            }
        }
    }
    assert!(sysfs.contains_key("livepatch_sample"), "{out}");
    assert_eq!(o_sysfs, sysfs, "klp vs /sys/kernel/livepatch/<patch>/{{enabled,transition}}");
    assert_eq!(o_objects, objects, "klp objects vs /sys/kernel/livepatch/<patch>/<object>/patched");
    assert_eq!(o_funcs, funcs, "klp funcs vs /sys/kernel/livepatch/<patch>/<object>/<func,sympos>");
    // The patched function's old address is the kernel's cmdline_proc_show,
    // the new one is in the module.
    let f = &patches[0]["objects"][0]["funcs"][0];
    assert_eq!(hex(&f["old_func"]), hex(&cli_json(&g, &["sym", "cmdline_proc_show"])[0]["addr"]));
    let new = cli_json(&g, &["sym", &format!("{:#x}", hex(&f["new_func"]))]);
    assert_eq!((new["name"].as_str(), new["offset"].as_u64()), (Some("livepatch_cmdline_proc_show"), Some(0)), "{new}");
    let text = cli_text(&g, &["klp"]);
    assert!(text.contains("livepatch_sample enabled=true transition=false"), "{text}");

    // /proc/modules, line for line.
    let mods = cli_json(&g, &["mods"]);
    let ours: Vec<String> = mods.as_array().unwrap().iter().map(|m| m["proc_line"].as_str().unwrap().to_string()).collect();
    assert!(!proc_modules.is_empty(), "{out}");
    assert_eq!(ours, proc_modules, "mods vs /proc/modules");
    assert_eq!(cli_text(&g, &["mods"]).lines().map(str::to_string).collect::<Vec<_>>(), proc_modules);
    println!("klp and mods test: {:?}", t0.elapsed());
}

// ---------------------------------------------------------------------------
// BTF

/// Top-level members of a `pahole -C` struct: name -> (bit offset, size).
fn pahole_members(text: &str) -> BTreeMap<String, (u64, u64)> {
    let mut out = BTreeMap::new();
    for l in text.lines() {
        // Members of the struct itself are indented by exactly one tab.
        let Some(body) = l.strip_prefix('\t') else { continue };
        if body.starts_with('\t') || body.starts_with("/*") || body.starts_with('}') {
            continue;
        }
        let Some((decl, comment)) = body.split_once("/*") else { continue };
        let nums: Vec<&str> = comment.trim_end_matches("*/").split_whitespace().collect();
        // "/* 960 4 */" or, for bitfields, "/* 884: 1 4 */".
        let (byte, bit, size) = match nums.as_slice() {
            [b, s] => (b.parse::<u64>(), Ok(0), s.parse::<u64>()),
            [b, bit, s] if b.ends_with(':') => (b.trim_end_matches(':').parse(), bit.parse::<u64>(), s.parse()),
            _ => continue,
        };
        let (Ok(byte), Ok(bit), Ok(size)) = (byte, bit, size) else { continue };
        let decl = decl.split(" __attribute__").next().unwrap().trim().trim_end_matches(';').trim();
        let name = if let Some(fp) = decl.split_once("(*") {
            fp.1.split(')').next().unwrap().to_string()
        } else {
            let last = decl.rsplit(|c: char| c.is_whitespace() || c == '*').next().unwrap();
            let last = last.split(':').next().unwrap();
            last.split('[').next().unwrap().to_string()
        };
        if !name.is_empty() {
            out.insert(name, (byte * 8 + bit, size));
        }
    }
    out
}

#[test]
fn types_via_live_api_match_pahole() {
    let _lock = one_guest_at_a_time();
    let g = restore("types", &ready_snapshot(1));
    let dir = image_dir().join("pahole");
    let mut checked = 0;
    let mut structs = 0;
    for st in ["task_struct", "thread_struct", "module", "klp_patch", "klp_object", "klp_func", "klp_state", "dyn_ftrace", "ftrace_page"] {
        let Ok(text) = std::fs::read_to_string(dir.join(format!("{st}.txt"))) else {
            assert_ne!(st, "task_struct", "pahole/task_struct.txt missing");
            continue;
        };
        let want = pahole_members(&text);
        let v = g.api_ok(json!({"verb": "types", "struct": st}));
        let size_line = text.lines().find_map(|l| l.trim().strip_prefix("/* size: ")).unwrap();
        let size: u64 = size_line.split(',').next().unwrap().parse().unwrap();
        assert_eq!(hex(&v["size"]), size, "sizeof(struct {st})");
        let got: BTreeMap<String, (u64, u64)> = v["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["depth"] == json!(0) && m["name"].as_str().is_some_and(|n| !n.is_empty()))
            .map(|m| (m["name"].as_str().unwrap().to_string(), (hex(&m["offset_bits"]), hex(&m["size"]))))
            .collect();
        for (name, w) in &want {
            assert_eq!(got.get(name), Some(w), "struct {st}.{name}: types (bit offset, size) vs pahole");
            checked += 1;
        }
        structs += 1;
    }
    let v = cli_json(&g, &["types", "task_struct"]);
    let off = |n: &str| {
        v["members"].as_array().unwrap().iter().find(|m| m["name"] == json!(n) && m["depth"] == json!(0)).map(|m| hex(&m["offset"]))
    };
    let want = pahole_members(&std::fs::read_to_string(dir.join("task_struct.txt")).unwrap());
    for n in ["pid", "tgid", "comm", "tasks", "thread"] {
        assert_eq!(off(n), Some(want[n].0 / 8), "task_struct.{n}");
    }
    println!("types agree with pahole on {checked} members of {structs} structs");
}

// ---------------------------------------------------------------------------
// bzImage with KASLR

#[test]
fn bzimage_with_kaslr_matches_the_guest() {
    let _lock = one_guest_at_a_time();
    let t0 = Instant::now();
    let img = image_dir();
    let cmdline = std::fs::read_to_string(img.join("cmdline")).unwrap_or_default();
    let mut g = Guest::start(
        "introspect-bz",
        &[
            "--kernel",
            img.join("bzImage").to_str().unwrap(),
            "--initrd",
            img.join("initramfs.cpio").to_str().unwrap(),
            "--cmdline",
            cmdline.trim(),
        ],
    );
    g.wait_for(READY, BOOT_TIMEOUT);
    g.wait_api();
    println!("bzImage boot: {:?}", t0.elapsed());
    quiet(&mut g);
    let layout = g.api_ok(json!({"verb": "layout"}));
    let slide = layout["kaslr_slide"].as_i64().unwrap();
    assert_ne!(slide, 0, "KASLR left the kernel at its link address: {layout}");
    println!("KASLR slide {slide:#x}: {layout}");
    assert_eq!(hex(&layout["text_base"]), LINK_TEXT_BASE.wrapping_add(slide as u64), "{layout}");

    let current = if guest_line() == "6.1" { "current_task" } else { "pcpu_hot" };
    let names = ["_text", "cmdline_proc_show", "init_task", "entry_SYSCALL_64", current, "__per_cpu_offset"];
    let out = g.sh_timeout(&format!("grep -E ' ({})$' /proc/kallsyms", names.join("|")), Duration::from_secs(600));
    let lines = parse_kallsyms(&out);
    assert_eq!(lines.len(), names.len(), "{out}");
    for l in &lines {
        let (addr, kind, name) = (u64::from_str_radix(&l[..16], 16).unwrap(), &l[17..18], &l[19..]);
        let hits = cli_json(&g, &["sym", name]);
        let hits = hits.as_array().unwrap();
        assert_eq!(hits.len(), 1, "{name}: {hits:?}");
        assert_eq!((hex(&hits[0]["addr"]), hits[0]["type"].as_str().unwrap()), (addr, kind), "sym {name} vs {l:?}");
        if name == "_text" {
            assert_eq!(addr, hex(&layout["text_base"]), "layout text_base vs /proc/kallsyms _text");
        }
    }
    compare_ps(&mut g, 1);
    let stacks = compare_sleeping_stacks(&mut g, &[]);
    assert!(stacks.len() >= 10, "{} stacks compared", stacks.len());
    compare_shell_at_prompt(&mut g);
    g.send("reboot -f\n");
    assert!(g.wait_exit(CMD_TIMEOUT).success());
    println!("bzImage KASLR test: {:?}", t0.elapsed());
}

/// Four and eight vCPUs: the guest brings every vCPU online, `ps` lists
/// every vCPU's idle task and exactly one task running on each vCPU, and
/// `stack all` unwinds every CPU's idle task reliably, the running ones
/// from their vCPU's registers and the others from their saved frames,
/// while busy loops keep vCPUs away from idle.
#[test]
fn four_and_eight_vcpus_every_idle_task_is_seen_while_others_are_busy() {
    let _lock = one_guest_at_a_time();
    for n in [4usize, 8] {
        let mut g = restore(&format!("vcpus{n}"), &ready_snapshot(n as u32));
        quiet(&mut g);
        assert_eq!(g.sh("grep -c ^processor /proc/cpuinfo"), n.to_string());
        assert_eq!(g.sh("cat /sys/devices/system/cpu/online"), format!("0-{}", n - 1));
        let out = g.sh(&format!("i=0; while [ $i -lt {} ]; do (while :; do :; done) & i=$((i+1)); done; echo started", n / 2));
        assert_eq!(out, "started");
        outside_tasks(&g, n);
        let stacks = cli_json(&g, &["stack", "all"]);
        let mut idle = BTreeSet::new();
        for t in stacks.as_array().expect("stack all: a list") {
            if t["pid"].as_i64() != Some(0) {
                continue;
            }
            let comm = t["comm"].as_str().unwrap_or_default();
            let cpu = comm.strip_prefix("swapper/").and_then(|c| c.parse::<usize>().ok());
            assert!(cpu.is_some_and(|c| c < n), "idle task {comm:?} on a {n}-vCPU guest");
            assert_eq!(t["reliable"], json!(true), "{comm}: {t}");
            let frames = t["frames"].as_array().map(Vec::len).unwrap_or(0);
            assert!(frames > 0, "{comm} has no frames: {t}");
            assert!(idle.insert(cpu), "{comm} twice");
        }
        assert_eq!(idle.len(), n, "every CPU's idle task in `stack all`: {idle:?}");
        println!("{n} vCPUs: {} idle tasks unwound reliably with {} busy loops", idle.len(), n / 2);
        g.api_ok(json!({"verb": "shutdown"}));
    }
}
