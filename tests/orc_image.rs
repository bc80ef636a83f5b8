//! ORC unwinding on a dump of the test guest taken while it is quiet (driven
//! there by the test: the shell has answered a command and sleeps at its
//! prompt, every vCPU is in its idle task, checked while paused): vCPU 0
//! (idle, kernel mode) unwinds reliably to the boot code, and every sleeping
//! task (the shell, PID 1, blocked reading the console, and the kernel
//! threads) unwinds reliably to its end of stack. Symbols come from the
//! image's System.map (this guest is not relocated) and struct offsets from
//! pahole, in this test only: the library takes every offset as a parameter.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use introspect::image::DumpImage;
use introspect::orc::{
    Frame, FrameKind, InactiveTaskFrameLayout, OrcTables, PtRegsLayout, Stack, StackBounds, SymbolAddrs, UnwindStart,
};
use introspect::{AddressSpace, KernelMemory};

/// THREAD_SIZE and IRQ_STACK_SIZE of the test kernel (x86_64, no KASAN).
const THREAD_SIZE: u64 = 0x4000;
const MAX_FRAMES: usize = 100;

/// System.map: every symbol by name, and text symbols sorted for symbolizing.
struct SystemMap {
    by_name: HashMap<String, u64>,
    text: Vec<(u64, String)>,
}

impl SystemMap {
    fn load(path: &Path) -> SystemMap {
        let text = std::fs::read_to_string(path).unwrap();
        let mut by_name = HashMap::new();
        let mut funcs = Vec::new();
        for line in text.lines() {
            let mut f = line.split_whitespace();
            let (Some(addr), Some(kind), Some(name)) = (f.next(), f.next(), f.next()) else { continue };
            let Ok(addr) = u64::from_str_radix(addr, 16) else { continue };
            by_name.entry(name.to_string()).or_insert(addr);
            if matches!(kind, "t" | "T" | "w" | "W") {
                funcs.push((addr, name.to_string()));
            }
        }
        funcs.sort();
        SystemMap { by_name, text: funcs }
    }

    fn addr(&self, name: &str) -> u64 {
        *self.by_name.get(name).unwrap_or_else(|| panic!("{name} not in System.map"))
    }

    /// `func+0xoff/0xsize` the way the kernel's `%pB` prints a frame: the
    /// symbol of `ip - 1` for return addresses, the offset of `ip` itself.
    fn symbolize(&self, f: &Frame) -> String {
        let key = if f.is_return_address() { f.ip.saturating_sub(1) } else { f.ip };
        let i = self.text.partition_point(|(a, _)| *a <= key);
        if i == 0 {
            return format!("{:#x}", f.ip);
        }
        let (start, name) = &self.text[i - 1];
        let size = self.text.get(i).map(|(a, _)| a - start).unwrap_or(0);
        format!("{name}+{:#x}/{size:#x}", f.ip - start)
    }

    fn name(&self, f: &Frame) -> String {
        self.symbolize(f).split('+').next().unwrap_or("").to_string()
    }
}

/// Member offsets of one struct from `pahole -C` output.
fn pahole_offsets(text: &str) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let (Some(semi), Some(comment)) = (line.find(';'), line.find("/*")) else { continue };
        if semi > comment {
            continue;
        }
        let decl = &line[..semi];
        let decl = decl.split(" __attribute__").next().unwrap();
        let Some(name) = decl.split_whitespace().last() else { continue };
        let name = name.trim_start_matches('*');
        let name = name.split('[').next().unwrap();
        let inner = line[comment + 2..].trim();
        let Some(off) = inner.split([' ', ':']).next().and_then(|s| s.parse::<u64>().ok()) else { continue };
        out.entry(name.to_string()).or_insert(off);
    }
    out
}

fn pahole_size(text: &str) -> u64 {
    let at = text.find("/* size: ").expect("pahole size line");
    text[at + 9..].split(',').next().unwrap().trim().parse().unwrap()
}

struct Layouts {
    task_tasks: u64,
    task_pid: u64,
    task_comm: u64,
    task_stack: u64,
    task_on_cpu: u64,
    task_thread_sp: u64,
    frame: InactiveTaskFrameLayout,
    pt_regs: PtRegsLayout,
}

fn layouts(image: &Path) -> Layouts {
    let read = |s: &str| std::fs::read_to_string(image.join("pahole").join(format!("{s}.txt"))).unwrap();
    let task = pahole_offsets(&read("task_struct"));
    let thread = pahole_offsets(&read("thread_struct"));
    let frame_text = read("inactive_task_frame");
    let frame = pahole_offsets(&frame_text);
    // pt_regs is not among the saved structs: ask pahole (BTF of vmlinux).
    let out = Command::new("pahole")
        .arg("-C")
        .arg("pt_regs")
        .arg(image.join("vmlinux"))
        .output()
        .expect("run pahole");
    let regs_text = String::from_utf8(out.stdout).unwrap();
    let regs = pahole_offsets(&regs_text);
    let r = |n: &str| regs[n];
    Layouts {
        task_tasks: task["tasks"],
        task_pid: task["pid"],
        task_comm: task["comm"],
        task_stack: task["stack"],
        task_on_cpu: task["on_cpu"],
        task_thread_sp: task["thread"] + thread["sp"],
        frame: InactiveTaskFrameLayout { size: pahole_size(&frame_text), ret_addr: frame["ret_addr"], bp: frame["bp"] },
        pt_regs: PtRegsLayout {
            size: pahole_size(&regs_text),
            ip: r("ip"),
            sp: r("sp"),
            bp: r("bp"),
            cs: r("cs"),
            di: r("di"),
            dx: r("dx"),
            r10: r("r10"),
            r13: r("r13"),
        },
    }
}

fn print_stack(title: &str, map: &SystemMap, tables: &OrcTables, st: &Stack, micros: f64) {
    println!(
        "== {title}: {} frames, reliable={} {}({micros:.1} us)",
        st.frames.len(),
        st.reliable,
        st.reason.as_deref().map(|r| format!("reason={r:?} ")).unwrap_or_default()
    );
    for f in &st.frames {
        let hidden = if tables.in_sched_functions(f.ip) { "  (sched: hidden in /proc/PID/stack)" } else { "" };
        println!("   {:#018x} sp={:#018x} {:?} {}{hidden}", f.ip, f.sp, f.kind, map.symbolize(f));
    }
}

/// Unwinds `start`, timing the host side.
fn timed_unwind(
    tables: &OrcTables,
    mem: &dyn KernelMemory,
    start: UnwindStart,
    regs: &PtRegsLayout,
) -> (Stack, f64) {
    let t = Instant::now();
    let st = tables.unwind(mem, start, regs, MAX_FRAMES);
    (st, t.elapsed().as_secs_f64() * 1e6)
}

/// A task read from the guest's task list.
struct Task {
    pid: u32,
    comm: String,
    on_cpu: bool,
    stack: u64,
    thread_sp: u64,
}

/// Walks `init_task.tasks` (bounded).
fn tasks(space: &AddressSpace, map: &SystemMap, lay: &Layouts) -> Vec<Task> {
    let init_task = map.addr("init_task");
    let head = init_task + lay.task_tasks;
    let mut task = init_task;
    let mut out = Vec::new();
    loop {
        out.push(Task {
            pid: space.read_u32(task + lay.task_pid).unwrap(),
            comm: space.read_cstr(task + lay.task_comm, 16).unwrap(),
            on_cpu: space.read_u32(task + lay.task_on_cpu).unwrap() != 0,
            stack: space.read_u64(task + lay.task_stack).unwrap(),
            thread_sp: space.read_u64(task + lay.task_thread_sp).unwrap(),
        });
        let next = space.read_u64(task + lay.task_tasks).unwrap();
        if next == head {
            return out;
        }
        task = next - lay.task_tasks;
        assert!(out.len() < 10_000, "task list does not end");
    }
}

fn sleeping_start(t: &Task, lay: &Layouts) -> UnwindStart {
    UnwindStart::Sleeping {
        thread_sp: t.thread_sp,
        frame: lay.frame,
        stack: StackBounds { low: t.stack, high: t.stack + THREAD_SIZE },
    }
}

/// What `/proc/PID/stack` prints for this stack (`[<0>] func+off/size`).
fn proc_lines(map: &SystemMap, tables: &OrcTables, st: &Stack) -> Vec<String> {
    tables
        .proc_pid_stack(st)
        .iter()
        .map(|&ip| format!("[<0>] {}", map.symbolize(&Frame { ip, sp: 0, kind: FrameKind::Call, reliable_so_far: true })))
        .collect()
}

fn load_tables(space: &AddressSpace, map: &SystemMap) -> OrcTables {
    let syms = SymbolAddrs::from_lookup(|n| map.by_name.get(n).copied()).unwrap();
    let t = Instant::now();
    let btf = introspect::btf::Btf::from_memory(space, map.by_name["__start_BTF"], map.by_name["__stop_BTF"]).unwrap();
    let format = introspect::orc_format::OrcFormat::from_btf(&btf).unwrap();
    let tables = OrcTables::load(space, &syms, format).unwrap();
    println!(
        "ORC tables: {} vmlinux entries, fast lookup={}, loaded in {:.1} ms",
        tables.vmlinux_entries(),
        tables.uses_fast_lookup(),
        t.elapsed().as_secs_f64() * 1e3
    );
    assert!(tables.uses_fast_lookup(), "orc_lookup should be initialized after boot");
    tables
}

/// pid -> vCPU for the tasks `ps` (taken in the same pause as the dump)
/// shows running.
fn running_in(ps: &serde_json::Value) -> Vec<(u32, u64)> {
    ps.as_array()
        .unwrap()
        .iter()
        .filter_map(|t| Some((t["pid"].as_u64()? as u32, t["running_on"].as_u64()?)))
        .collect()
}

#[test]
fn unwinds_idle_vcpu_and_sleeping_tasks_reliably() {
    let image = common::image_dir();
    let snap = common::ready_snapshot(1);
    let mut g = common::Guest::restore("orc-idle", &snap);
    let (dump, ps) = g.quiet_dump("quiet");
    drop(g);
    println!("dump taken while quiet; running per ps: {:?}", running_in(&ps));
    let img = DumpImage::open(&dump).unwrap();
    let space = AddressSpace::new(&img, img.cpus[0].cr3, img.cpus[0].la57());
    let map = SystemMap::load(&image.join("System.map"));
    let lay = layouts(&image);
    let tables = load_tables(&space, &map);

    // The guest's orc_lookup agrees with a full binary search everywhere.
    let (text, etext) = (map.addr("_stext"), map.addr("_etext"));
    let mut checked = 0;
    for ip in (text..etext).step_by(3) {
        assert_eq!(tables.find(ip), tables.find_by_full_search(ip), "ORC entry for {ip:#x}");
        checked += 1;
    }
    println!("orc_lookup agrees with the full search at {checked} text addresses");

    // vCPU 0: kernel mode (idle). Its stacks: the current task's stack and
    // the CPU's IRQ stack (per-CPU pointers through GS base).
    let cpu = img.cpus[0];
    println!("vCPU 0: rip={:#x} rsp={:#x} cs={:#x} gs_base={:#x}", cpu.rip, cpu.rsp, cpu.cs, cpu.gs_base);
    let gs = cpu.kernel_gs();
    // A hot per-CPU variable: its own symbol (6.1) or a member of pcpu_hot
    // (6.2+), at the offset pahole gives.
    let hot = |name: &str| -> u64 {
        if map.by_name.contains_key(name) {
            return map.addr(name);
        }
        let text = std::fs::read_to_string(common::image_dir().join("pahole").join("pcpu_hot.txt")).expect("pahole pcpu_hot.txt");
        map.addr("pcpu_hot") + pahole_offsets(&text)[name]
    };
    let current = space.read_u64(gs + hot("current_task")).unwrap();
    let cur_stack = space.read_u64(current + lay.task_stack).unwrap();
    let cur_pid = space.read_u32(current + lay.task_pid).unwrap();
    let cur_comm = space.read_cstr(current + lay.task_comm, 16).unwrap();
    let irq_top = space.read_u64(gs + hot("hardirq_stack_ptr")).unwrap() + 8;
    let stacks = vec![
        StackBounds { low: cur_stack, high: cur_stack + THREAD_SIZE },
        StackBounds { low: irq_top - THREAD_SIZE, high: irq_top },
    ];
    let (st, us) = timed_unwind(&tables, &space, UnwindStart::Running { regs: cpu, stacks }, &lay.pt_regs);
    print_stack(&format!("vCPU 0 (current: pid {cur_pid} {cur_comm})"), &map, &tables, &st, us);
    // The guest was driven to idle: vCPU 0 runs its idle task (pid 0), in
    // kernel mode; ps in the same pause said so too.
    assert_eq!(running_in(&ps), vec![(0, 0)], "ps: {ps}");
    assert_eq!(cur_pid, 0, "vCPU 0 runs pid {cur_pid} {cur_comm}, not its idle task");
    assert!(!cpu.in_user_mode(), "the idle task in user mode? rip {:#x}", cpu.rip);
    assert!(st.reliable, "vCPU 0 stack unreliable: {:?}", st.reason);
    let names: Vec<String> = st.frames.iter().map(|f| map.name(f)).collect();
    for want in ["do_idle", "cpu_startup_entry"] {
        assert!(names.iter().any(|n| n == want), "idle stack lacks {want}: {names:?}");
    }
    let last = names.last().unwrap();
    assert!(last.contains("startup_64"), "idle stack should end in the boot code, ends in {last}");

    // Every task that is not on a CPU: from task->thread.sp.
    let mut seen = 0;
    let mut saw_shell = false;
    let mut total_us = 0.0;
    let mut unreliable = Vec::new();
    for t in tasks(&space, &map, &lay).iter().filter(|t| !t.on_cpu) {
        let (st, us) = timed_unwind(&tables, &space, sleeping_start(t, &lay), &lay.pt_regs);
        total_us += us;
        seen += 1;
        print_stack(&format!("pid {} {}", t.pid, t.comm), &map, &tables, &st, us);
        println!("   /proc/{}/stack would show: {:?}", t.pid, proc_lines(&map, &tables, &st));
        if !st.reliable {
            unreliable.push(format!("pid {} {}: {:?}", t.pid, t.comm, st.reason));
        }
        if t.pid == 1 {
            // busybox sh waits for console input in poll() (line editing)
            // or read(); the syscall arrives through the page-fault entry
            // on this platform (guest-images/patches), else entry_SYSCALL_64.
            let names: Vec<String> = st.frames.iter().map(|f| map.name(f)).collect();
            let has = |n: &str| names.iter().any(|x| x == n);
            assert!(st.reliable, "pid 1 stack unreliable: {:?}", st.reason);
            assert!(has("do_sys_poll") || has("ksys_read"), "pid 1 not in poll/read: {names:?}");
            assert!(has("do_syscall_64"), "pid 1 stack lacks do_syscall_64: {names:?}");
            let entry = names.last().unwrap();
            assert!(
                entry == "asm_exc_page_fault" || entry.starts_with("entry_SYSCALL_64"),
                "pid 1 stack should end at the syscall entry, ends at {entry}"
            );
            saw_shell = true;
        }
    }
    println!("{seen} sleeping tasks unwound, {:.1} us per unwind on average", total_us / seen.max(1) as f64);
    assert!(saw_shell, "did not find pid 1 (the shell) sleeping");
    assert!(unreliable.is_empty(), "unreliable stacks: {unreliable:#?}");
    let _ = std::fs::remove_file(&dump);
}

/// Threads that sleep until something specific happens (not kworkers,
/// ksoftirqd or the RCU threads, which wake on timers), unwound from a
/// quiet dump: pid -> (comm, /proc/PID/stack lines).
fn stable_thread_stacks(image: &Path, dump: &Path) -> Vec<(u32, String, Vec<String>)> {
    let stable = ["kthreadd", "oom_reaper", "kswapd0", "kdevtmpfs", "cpuhp/0", "migration/0", "mm_percpu_wq"];
    let img = DumpImage::open(dump).unwrap();
    let space = AddressSpace::new(&img, img.cpus[0].cr3, img.cpus[0].la57());
    let map = SystemMap::load(&image.join("System.map"));
    let lay = layouts(image);
    let tables = load_tables(&space, &map);
    let mut out = Vec::new();
    for t in tasks(&space, &map, &lay).iter().filter(|t| stable.contains(&t.comm.as_str())) {
        assert!(!t.on_cpu, "pid {} {} on a CPU in a quiet guest", t.pid, t.comm);
        let st = tables.unwind(&space, sleeping_start(t, &lay), &lay.pt_regs, MAX_FRAMES);
        assert!(st.reliable, "pid {} {}: {:?}", t.pid, t.comm, st.reason);
        out.push((t.pid, t.comm.clone(), proc_lines(&map, &tables, &st)));
    }
    assert!(!out.is_empty(), "none of {stable:?} found");
    out
}

/// The guest's own `/proc/PID/stack` matches the outside unwind for kernel
/// threads that stay asleep. The outside view comes from dumps of the same
/// guest taken while it is quiet, just before and just after it reads the
/// files (with shell builtins only); each thread's stack as the guest printed
/// it must be one of the two.
#[test]
fn proc_pid_stack_matches_the_guest() {
    let image = common::image_dir();
    let snap = common::ready_snapshot(1);
    let mut g = common::Guest::restore("orcproc", &snap);
    let (dump, _) = g.quiet_dump("before");
    let before = stable_thread_stacks(&image, &dump);
    let files: Vec<String> = before.iter().map(|(pid, _, _)| format!("/proc/{pid}/stack")).collect();
    // Shell builtins only (no fork+exec): a separator line, then each file.
    let script = format!("for f in {}; do echo ==; while read l; do echo \"$l\"; done < $f; done", files.join(" "));
    let t = Instant::now();
    let out = g.sh(&script);
    println!("guest side: {:.1} s to read the files", t.elapsed().as_secs_f64());
    let (dump2, _) = g.quiet_dump("after");
    let after = stable_thread_stacks(&image, &dump2);
    let inside: Vec<Vec<String>> = out
        .split("==\n")
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect())
        .collect();
    assert_eq!(inside.len(), before.len(), "guest output:\n{out}");
    for ((pid, comm, ours), theirs) in before.iter().zip(&inside) {
        println!("pid {pid} {comm}: guest {theirs:?}");
        let later = after.iter().find(|(p, _, _)| p == pid).map(|(_, _, l)| l);
        assert!(
            ours == theirs || later == Some(theirs),
            "pid {pid} {comm}: the guest printed {theirs:?}; outside before: {ours:?}, after: {later:?}"
        );
    }
    let _ = std::fs::remove_file(&dump);
    let _ = std::fs::remove_file(&dump2);
}
