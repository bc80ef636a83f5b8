//! Hostile guest memory: every introspection verb on the saved test guest
//! with corrupted memory returns an answer or an error, within a deadline,
//! without panicking and without unbounded allocation.
//!
//! - `random_corruption_never_panics_or_hangs`: 30 rounds of random page
//!   corruption (random bytes, 0xff, zeros, self-pointers, pointers to
//!   each other, sparse pointer edits, and edits of the exact list and
//!   count fields), most of it aimed at the pages that matter (task list,
//!   task structs and stacks, kallsyms, BTF, ORC, ftrace pages, module and
//!   livepatch lists, per-CPU data, page tables), then `Kernel::open` and
//!   every verb, each in a worker thread with a deadline. `HOSTILE_SEED`
//!   and `HOSTILE_ROUNDS` change the seed and the number of rounds.
//! - `crafted_hostile_structures_fail_fast`: loops in the task list, list
//!   heads pointing into each other or outside RAM, absurd counts (ftrace
//!   page index 0x7fffffff, module num_symtab), huge rings, shared thread
//!   lists, runaway livepatch states; each must give an error or a bounded
//!   answer quickly.
//!
//! A counting allocator measures, per call, the largest single allocation
//! and the peak heap of the worker thread.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyperpatch::guest::SnapshotImage;
use hyperpatch::inspect::run_verb;
use introspect::btf::Btf;
use introspect::kallsyms::Kallsyms;
use introspect::kernel::Kernel;
use introspect::memory::{PhysMem, VecMemory};
use introspect::{AddressSpace, CpuState, KernelMemory};
use serde_json::{json, Value};

/// Longest one call may take (debug build, nothing else running).
const DEADLINE: Duration = Duration::from_secs(10);
/// Largest heap one call may hold at once (the guest RAM copy is not
/// counted: it is allocated outside the worker).
const MAX_PEAK_HEAP: i64 = 256 << 20;
const ROUNDS: usize = 30;
const PAGE: u64 = 0x1000;

// ---- allocation accounting ---------------------------------------------------

struct Counting;

thread_local! {
    static LIVE: Cell<i64> = const { Cell::new(0) };
    static PEAK: Cell<i64> = const { Cell::new(0) };
    static BIGGEST: Cell<usize> = const { Cell::new(0) };
}

fn note_alloc(size: usize) {
    let _ = LIVE.try_with(|l| {
        let v = l.get() + size as i64;
        l.set(v);
        let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
    });
    let _ = BIGGEST.try_with(|b| b.set(b.get().max(size)));
}

fn note_free(size: usize) {
    let _ = LIVE.try_with(|l| l.set(l.get() - size as i64));
}

// SAFETY: forwards to the system allocator; the bookkeeping only touches
// const-initialized thread-locals (no allocation inside).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note_free(layout.size());
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_free(layout.size());
        note_alloc(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Starts measuring this thread's heap from zero.
fn reset_heap_stats() {
    LIVE.with(|l| l.set(0));
    PEAK.with(|p| p.set(0));
    BIGGEST.with(|b| b.set(0));
}

fn heap_stats() -> (i64, usize) {
    (PEAK.with(Cell::get), BIGGEST.with(Cell::get))
}

// ---- a small seeded RNG (splitmix64) -----------------------------------------

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

// ---- running the verbs under a deadline ----------------------------------------

#[derive(Debug, Clone)]
enum Outcome {
    Ok(String),
    Err(String),
    Panic(String),
}

impl Outcome {
    fn is_err(&self) -> bool {
        matches!(self, Outcome::Err(_))
    }
}

#[derive(Debug, Clone)]
struct CallReport {
    call: String,
    took: Duration,
    outcome: Outcome,
    peak_heap: i64,
    biggest_alloc: usize,
}

enum Msg {
    Start(String),
    Done(CallReport),
    Finished,
}

/// Every verb the CLI has, with the arguments the tests use.
fn verb_calls(lstar: u64) -> Vec<(&'static str, &'static str, Value)> {
    vec![
        ("ps", "ps", json!({})),
        ("stack all", "stack", json!({"target": "all"})),
        ("stack 1", "stack", json!({"target": "1"})),
        ("sym schedule", "sym", json!({"query": "schedule"})),
        ("sym missing name", "sym", json!({"query": "no_such_symbol_anywhere"})),
        ("sym lstar", "sym", json!({"query": format!("{lstar:#x}")})),
        ("sym module address", "sym", json!({"query": "0xffffffffc0001000"})),
        ("types task_struct", "types", json!({"struct": "task_struct"})),
        ("ftrace cmdline_proc_show", "ftrace", json!({"function": "cmdline_proc_show"})),
        ("mods", "mods", json!({})),
        ("klp", "klp", json!({})),
        ("layout", "layout", json!({})),
    ]
}

fn summarize(v: &Value) -> String {
    let s = v.to_string();
    match v {
        Value::Array(a) => format!("{} items, {} bytes", a.len(), s.len()),
        _ => s.chars().take(120).collect(),
    }
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
}

/// Runs `f` measured, reporting through `tx`.
fn call<F: FnOnce() -> Outcome>(tx: &Sender<Msg>, name: &str, f: F) -> Outcome {
    let _ = tx.send(Msg::Start(name.to_string()));
    reset_heap_stats();
    let t = Instant::now();
    let outcome = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(o) => o,
        Err(p) => Outcome::Panic(panic_text(p)),
    };
    let took = t.elapsed();
    let (peak_heap, biggest_alloc) = heap_stats();
    let _ = tx.send(Msg::Done(CallReport { call: name.to_string(), took, outcome: outcome.clone(), peak_heap, biggest_alloc }));
    outcome
}

fn verb_outcome(r: anyhow::Result<Value>) -> Outcome {
    match r {
        Ok(v) => Outcome::Ok(summarize(&v)),
        Err(e) => Outcome::Err(format!("{e:#}")),
    }
}

/// The worker: `Kernel::open` on the (corrupted) memory and every verb on
/// it, then every verb on a kernel built from the clean kallsyms and BTF
/// over the same corrupted memory (so the verbs still run when the
/// corruption hit kallsyms or BTF).
fn exercise(mem: &VecMemory, cpus: &[CpuState], syms: &Kallsyms, btf_bytes: Vec<u8>, tx: &Sender<Msg>) {
    let lstar = cpus.first().map(|c| c.lstar).unwrap_or(0);
    let mut opened = None;
    call(tx, "Kernel::open", || match Kernel::open(mem, cpus.to_vec()) {
        Ok(k) => {
            let n = k.syms.len();
            opened = Some(k);
            Outcome::Ok(format!("{n} symbols"))
        }
        Err(e) => Outcome::Err(e.to_string()),
    });
    if let Some(k) = &opened {
        for (name, verb, req) in verb_calls(lstar) {
            call(tx, &format!("open/{name}"), || verb_outcome(run_verb(k, verb, &req)));
        }
    }
    drop(opened);
    let btf = Btf::parse(btf_bytes).expect("clean BTF parses");
    // The kernel's own page-table root is found through the (possibly
    // corrupted) page tables: no root that maps it is an error, not a panic.
    let mut clean_kernel = None;
    call(tx, "Kernel::from_parts", || match Kernel::from_parts(mem, cpus.to_vec(), syms.clone(), btf) {
        Ok(k) => {
            clean_kernel = Some(k);
            Outcome::Ok("opened".into())
        }
        Err(e) => Outcome::Err(e.to_string()),
    });
    let Some(k) = clean_kernel else { return };
    for (name, verb, req) in verb_calls(lstar) {
        call(tx, &format!("clean-syms/{name}"), || verb_outcome(run_verb(&k, verb, &req)));
    }
}

/// Runs [`exercise`] in a worker thread; every call must finish within
/// [`DEADLINE`], none may panic or hold more than [`MAX_PEAK_HEAP`].
fn guarded(label: &str, mem: &Arc<VecMemory>, clean: &Clean) -> Vec<CallReport> {
    let (tx, rx) = channel();
    let mem2 = Arc::clone(mem);
    let cpus = clean.cpus.clone();
    let syms = clean.syms.clone();
    let btf_bytes = clean.btf_bytes.clone();
    let worker = std::thread::Builder::new()
        .name(format!("hostile-{label}"))
        .stack_size(64 << 20)
        .spawn(move || {
            // `Btf` is not `Clone`: the clean blob travels as bytes.
            exercise(&mem2, &cpus, &syms, btf_bytes, &tx);
            drop(mem2);
            let _ = tx.send(Msg::Finished);
        })
        .expect("spawn worker");
    let mut reports = Vec::new();
    let mut current = String::from("(start)");
    loop {
        match rx.recv_timeout(DEADLINE) {
            Ok(Msg::Start(name)) => current = name,
            Ok(Msg::Done(r)) => {
                if let Outcome::Panic(p) = &r.outcome {
                    panic!("{label}: {} panicked: {p}", r.call);
                }
                assert!(r.took < DEADLINE, "{label}: {} took {:?}", r.call, r.took);
                assert!(
                    r.peak_heap < MAX_PEAK_HEAP,
                    "{label}: {} held {} MiB of heap at once",
                    r.call,
                    r.peak_heap >> 20
                );
                reports.push(r);
            }
            Ok(Msg::Finished) => break,
            Err(RecvTimeoutError::Timeout) => panic!("{label}: {current} did not finish within {DEADLINE:?}"),
            Err(RecvTimeoutError::Disconnected) => panic!("{label}: worker died during {current}"),
        }
    }
    worker.join().expect("worker ends after reporting");
    reports
}

// ---- the clean image and what matters in it ------------------------------------

/// A named range of guest-virtual memory worth corrupting.
#[derive(Clone, Debug)]
struct Hot {
    what: String,
    va: u64,
    len: u64,
}

/// A pointer or count field: (what, guest-virtual address, width).
#[derive(Clone, Debug)]
struct Field {
    what: String,
    va: u64,
    width: usize,
}

struct Clean {
    bytes: Arc<VecMemory>,
    cpus: Vec<CpuState>,
    syms: Kallsyms,
    btf_bytes: Vec<u8>,
    page_offset_base: u64,
    hot: Vec<Hot>,
    fields: Vec<Field>,
    /// Addresses to plant as pointers (list nodes, heads, and addresses
    /// outside RAM or not canonical).
    pointers: Vec<u64>,
    /// Physical pages of page tables on the kernel's walks.
    table_pages: Vec<u64>,
    /// Offsets (bytes) of the fields the crafted cases edit.
    off: Offsets,
}

#[derive(Clone, Copy, Debug)]
struct Offsets {
    task_size: u64,
    tasks: u64,
    signal: u64,
    thread_node: u64,
    signal_thread_head: u64,
    ftrace_next: u64,
    ftrace_records: u64,
    ftrace_index: u64,
    module_size: u64,
    module_list: u64,
    module_name: u64,
    module_kallsyms: u64,
    core_base: u64,
    core_size: u64,
    core_text_size: u64,
    arch_orc_ip: u64,
    arch_orc: u64,
    arch_num_orcs: u64,
    mk_symtab: u64,
    mk_num_symtab: u64,
    mk_strtab: u64,
    mk_typetab: u64,
    klp_list: u64,
    klp_obj_list: u64,
    klp_states: u64,
    klp_mod: u64,
    klp_obj_node: u64,
    klp_obj_func_list: u64,
}

fn load_clean() -> Clean {
    let snap = common::ready_snapshot(1);
    let img = SnapshotImage::open(&snap).expect("snapshot opens");
    let size = usize::try_from(img.mem.phys_size()).expect("RAM size");
    let mut ram = vec![0u8; size];
    img.mem.read_phys(0, &mut ram).expect("read all of RAM");
    let bytes = Arc::new(VecMemory(ram));
    let cpus = img.cpus.clone();
    let k = Kernel::open(&*bytes, cpus.clone()).expect("clean image opens");
    let start = k.sym("__start_BTF").unwrap();
    let stop = k.sym("__stop_BTF").unwrap();
    let btf_bytes = k.mem.read_bytes(start, (stop - start) as usize).unwrap();
    let o = |t: &str, p: &str| k.off(t, p).unwrap_or_else(|e| panic!("{t}.{p}: {e}"));
    let core_field = |f: &str| {
        if k.btf.member("module", "core_layout").is_ok() {
            o("module", &format!("core_layout.{f}"))
        } else {
            let text = k.btf.enum_value(Some("mod_mem_type"), "MOD_TEXT").unwrap();
            o("module", &format!("mem[{text}].{f}"))
        }
    };
    let off = Offsets {
        task_size: k.btf.struct_size("task_struct").unwrap(),
        tasks: o("task_struct", "tasks"),
        signal: o("task_struct", "signal"),
        thread_node: o("task_struct", "thread_node"),
        signal_thread_head: o("signal_struct", "thread_head"),
        ftrace_next: o("ftrace_page", "next"),
        ftrace_records: o("ftrace_page", "records"),
        ftrace_index: o("ftrace_page", "index"),
        module_size: k.btf.struct_size("module").unwrap(),
        module_list: o("module", "list"),
        module_name: o("module", "name"),
        module_kallsyms: o("module", "kallsyms"),
        // 6.1: core_layout; 6.4+: mem[MOD_TEXT], whose size is the text size.
        core_base: core_field("base"),
        core_size: core_field("size"),
        core_text_size: if k.btf.member("module", "core_layout").is_ok() { core_field("text_size") } else { core_field("size") },
        arch_orc_ip: o("module", "arch.orc_unwind_ip"),
        arch_orc: o("module", "arch.orc_unwind"),
        arch_num_orcs: o("module", "arch.num_orcs"),
        mk_symtab: o("mod_kallsyms", "symtab"),
        mk_num_symtab: o("mod_kallsyms", "num_symtab"),
        mk_strtab: o("mod_kallsyms", "strtab"),
        mk_typetab: o("mod_kallsyms", "typetab"),
        klp_list: o("klp_patch", "list"),
        klp_obj_list: o("klp_patch", "obj_list"),
        klp_states: o("klp_patch", "states"),
        klp_mod: o("klp_patch", "mod"),
        klp_obj_node: o("klp_object", "node"),
        klp_obj_func_list: o("klp_object", "func_list"),
    };
    let layout = k.layout().unwrap();
    let pob = layout.page_offset_base;
    let mut hot = Vec::new();
    let mut fields = Vec::new();
    let mut pointers: BTreeSet<u64> = BTreeSet::new();
    let mut add = |what: &str, va: u64, len: u64| hot.push(Hot { what: what.to_string(), va, len: len.max(1) });
    let mut field = |what: &str, va: u64, width: usize| fields.push(Field { what: what.to_string(), va, width });

    let init = k.sym("init_task").unwrap();
    add("init_task", init, off.task_size);
    let tasks = k.tasks().unwrap();
    for t in &tasks {
        add(&format!("task {}", t.pid), t.addr, off.task_size);
        add(&format!("stack of {}", t.pid), t.thread_sp & !(PAGE - 1), PAGE);
        add(&format!("whole stack of {}", t.pid), t.stack, 16 << 10);
        field(&format!("task {} tasks.next", t.pid), t.addr + off.tasks, 8);
        field(&format!("task {} tasks.prev", t.pid), t.addr + off.tasks + 8, 8);
        field(&format!("task {} signal", t.pid), t.addr + off.signal, 8);
        field(&format!("task {} thread_node.next", t.pid), t.addr + off.thread_node, 8);
        field(&format!("task {} stack", t.pid), t.addr + o("task_struct", "stack"), 8);
        field(&format!("task {} thread.sp", t.pid), t.addr + o("task_struct", "thread.sp"), 8);
        pointers.insert(t.addr + off.tasks);
        pointers.insert(t.addr + off.thread_node);
        pointers.insert(t.addr);
        if let Ok(sig) = k.read_ptr(t.addr, off.signal) {
            if sig != 0 {
                add(&format!("signal of {}", t.pid), sig, k.btf.struct_size("signal_struct").unwrap());
                field(&format!("signal of {} thread_head.next", t.pid), sig + off.signal_thread_head, 8);
                pointers.insert(sig + off.signal_thread_head);
            }
        }
    }
    if let Some(t) = k.syms.tables() {
        add("kallsyms tables", t.offsets, t.token_index + 512 - t.offsets);
        field("kallsyms_num_syms", t.num_syms_addr, 4);
        field("kallsyms_relative_base", t.relative_base_addr, 8);
    }
    add("BTF", start, stop - start);
    for (a, b) in [("__start_orc_unwind_ip", "__stop_orc_unwind_ip"), ("__start_orc_unwind", "__stop_orc_unwind"), ("orc_lookup", "orc_lookup_end")] {
        let (a, b) = (k.sym(a).unwrap(), k.sym(b).unwrap());
        add("ORC", a, b - a);
    }
    let fps = k.sym("ftrace_pages_start").unwrap();
    add("ftrace_pages_start", fps, 8);
    field("ftrace_pages_start", fps, 8);
    let mut page = k.mem.read_u64(fps).unwrap();
    let mut n = 0;
    while page != 0 && n < 64 {
        add("ftrace_page", page, 32);
        field("ftrace_page.next", page + off.ftrace_next, 8);
        field("ftrace_page.index", page + off.ftrace_index, 4);
        field("ftrace_page.records", page + off.ftrace_records, 8);
        pointers.insert(page);
        let records = k.read_ptr(page, off.ftrace_records).unwrap();
        let count = k.mem.read_u32(page + off.ftrace_index).unwrap() as u64;
        add("ftrace records", records, count * 16);
        page = k.read_ptr(page, off.ftrace_next).unwrap();
        n += 1;
    }
    for (name, len) in [("modules", 16), ("klp_patches", 16), ("klp_transition_patch", 8), ("__per_cpu_offset", 8 * cpus.len() as u64)] {
        if let Ok(a) = k.sym(name) {
            add(name, a, len);
            field(name, a, 8);
            pointers.insert(a);
        }
    }
    for name in ["current_task", "hardirq_stack_ptr", "pcpu_hot"] {
        if let Ok(a) = k.per_cpu(name, 0) {
            add(name, a, 16);
            field(name, a, 8);
        }
    }
    // Page tables on the walks to kernel text, the direct map and the stacks.
    let cr3 = cpus[0].cr3 & 0x000f_ffff_ffff_f000;
    let mut table_pages = BTreeSet::new();
    for va in [cpus[0].lstar, init, tasks.last().map(|t| t.addr).unwrap_or(init), tasks[1].stack, start] {
        let mut table = cr3;
        for shift in [39u32, 30, 21, 12] {
            table_pages.insert(table);
            let mut b = [0u8; 8];
            if bytes.read_phys(table + ((va >> shift) & 0x1ff) * 8, &mut b).is_err() {
                break;
            }
            let entry = u64::from_le_bytes(b);
            if entry & 1 == 0 || entry & 0x80 != 0 {
                break;
            }
            table = entry & 0x000f_ffff_ffff_f000;
        }
    }
    let ram = bytes.0.len() as u64;
    pointers.extend([
        init + off.tasks,
        k.sym("modules").unwrap(),
        k.sym("init_task").unwrap(),
        pob,                               // start of the direct map
        pob + ram + 0x10_0000,             // just past RAM in the direct map
        pob + (1 << 40),                   // far past RAM
        0xdead_0000_0000_0000,             // not canonical
        0x0000_8000_0000_0000,             // not canonical either
        0xffff_c900_4000_0000,             // vmalloc, not mapped
        cpus[0].lstar,                     // kernel text
        u64::MAX - 7,
        0,
        8,
    ]);
    let syms = k.syms.clone();
    drop(k);
    Clean {
        bytes,
        cpus,
        syms,
        btf_bytes,
        page_offset_base: pob,
        hot,
        fields,
        pointers: pointers.into_iter().collect(),
        table_pages: table_pages.into_iter().collect(),
        off,
    }
}

/// Guest-physical address of `va` in the clean image.
fn phys_of(clean: &Clean, va: u64) -> Option<u64> {
    AddressSpace::new(&*clean.bytes, clean.cpus[0].cr3, clean.cpus[0].la57()).translate(va).ok()
}

/// Guest memory with undo: every write saves the bytes it replaces.
struct Scratch {
    mem: Arc<VecMemory>,
    saved: Vec<(usize, Vec<u8>)>,
}

impl Scratch {
    fn new(clean: &Clean) -> Scratch {
        Scratch { mem: Arc::new(VecMemory(clean.bytes.0.clone())), saved: Vec::new() }
    }

    fn ram(&mut self) -> &mut Vec<u8> {
        &mut Arc::get_mut(&mut self.mem).expect("no worker holds the memory").0
    }

    fn write(&mut self, pa: u64, data: &[u8]) {
        let at = pa as usize;
        let Some(end) = at.checked_add(data.len()).filter(|e| *e <= self.mem.0.len()) else { return };
        let old = self.mem.0[at..end].to_vec();
        self.saved.push((at, old));
        self.ram()[at..end].copy_from_slice(data);
    }

    /// Writes through the clean page tables (page by page).
    fn write_va(&mut self, clean: &Clean, va: u64, data: &[u8]) {
        let mut done = 0usize;
        while done < data.len() {
            let at = va + done as u64;
            let n = ((PAGE - (at & (PAGE - 1))) as usize).min(data.len() - done);
            if let Some(pa) = phys_of(clean, at) {
                self.write(pa, &data[done..done + n]);
            }
            done += n;
        }
    }

    fn write_u64(&mut self, clean: &Clean, va: u64, v: u64) {
        self.write_va(clean, va, &v.to_le_bytes());
    }

    fn restore(&mut self) {
        while let Some((at, old)) = self.saved.pop() {
            let end = at + old.len();
            self.ram()[at..end].copy_from_slice(&old);
        }
    }
}

// ---- random corruption ------------------------------------------------------------

/// Values a corrupted pointer or count field gets.
fn interesting(rng: &mut Rng, clean: &Clean, self_va: u64, old: u64) -> u64 {
    match rng.below(9) {
        0 | 1 => *rng.pick(&clean.pointers),
        2 => self_va,
        3 => old.wrapping_add(rng.below(64)).wrapping_sub(32),
        4 => *rng.pick(&[0, 1, u64::MAX, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff, 1 << 20, (1 << 20) + 1]),
        5 => rng.pick(&clean.pointers).wrapping_add(rng.below(0x2000)).wrapping_sub(0x1000),
        6 => clean.page_offset_base + rng.below(clean.bytes.0.len() as u64 * 2),
        7 => rng.next(),
        _ => old ^ (1 << rng.below(64)),
    }
}

fn read_u64_at(mem: &VecMemory, pa: u64) -> u64 {
    let mut b = [0u8; 8];
    let _ = mem.read_phys(pa, &mut b);
    u64::from_le_bytes(b)
}

/// Corrupts one page (or field) chosen at random; returns what it did.
fn corrupt_one(rng: &mut Rng, clean: &Clean, s: &mut Scratch) -> String {
    let ram = clean.bytes.0.len() as u64;
    // A field: the exact pointers and counts the walks follow.
    if rng.chance(35) {
        let f = rng.pick(&clean.fields).clone();
        let old = phys_of(clean, f.va).map(|pa| read_u64_at(&clean.bytes, pa)).unwrap_or(0);
        let v = interesting(rng, clean, f.va, old);
        s.write_va(clean, f.va, &v.to_le_bytes()[..f.width]);
        return format!("field {} = {v:#x}", f.what);
    }
    // A page: of a hot range, a page table, or anywhere in RAM.
    let (what, va, pa) = match rng.below(10) {
        0..=6 => {
            let h = rng.pick(&clean.hot).clone();
            let va = (h.va + rng.below(h.len)) & !(PAGE - 1);
            let Some(pa) = phys_of(clean, va) else { return format!("{} unmapped", h.what) };
            (h.what, va, pa)
        }
        7 => {
            let pa = *rng.pick(&clean.table_pages);
            ("page table".to_string(), clean.page_offset_base + pa, pa)
        }
        _ => {
            let pa = rng.below(ram) & !(PAGE - 1);
            ("random page".to_string(), clean.page_offset_base + pa, pa)
        }
    };
    let mut page = clean.bytes.0[pa as usize..(pa + PAGE) as usize].to_vec();
    let how = match rng.below(8) {
        0 => {
            page.iter_mut().for_each(|b| *b = rng.next() as u8);
            "random bytes"
        }
        1 => {
            page.fill(0xff);
            "0xff"
        }
        2 => {
            page.fill(0);
            "zeros"
        }
        3 => {
            for (i, w) in page.chunks_exact_mut(8).enumerate() {
                w.copy_from_slice(&(va + i as u64 * 8).to_le_bytes());
            }
            "self-pointers"
        }
        4 => {
            for w in page.chunks_exact_mut(8) {
                w.copy_from_slice(&rng.pick(&clean.pointers).to_le_bytes());
            }
            "pointers to each other"
        }
        _ => {
            for _ in 0..1 + rng.below(16) {
                let i = rng.below(PAGE / 8) as usize * 8;
                let old = u64::from_le_bytes(page[i..i + 8].try_into().unwrap());
                let v = interesting(rng, clean, va + i as u64, old);
                page[i..i + 8].copy_from_slice(&v.to_le_bytes());
            }
            "sparse pointer edits"
        }
    };
    s.write(pa, &page);
    format!("{what} page {va:#x} (pa {pa:#x}): {how}")
}

#[test]
fn random_corruption_never_panics_or_hangs() {
    let clean = load_clean();
    let mut s = Scratch::new(&clean);
    let seed = std::env::var("HOSTILE_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5eed_1234_u64);
    let rounds = std::env::var("HOSTILE_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(ROUNDS);
    let mut rng = Rng(seed);
    println!("seed {seed:#x}; {} hot ranges, {} fields, {} pointers", clean.hot.len(), clean.fields.len(), clean.pointers.len());

    // The uncorrupted image first: everything answers.
    let base = guarded("clean", &s.mem, &clean);
    for r in &base {
        // The lookup of a name the guest does not have fails (and an address
        // in module space does unless a module sits there); the rest answer.
        if r.call.ends_with("sym module address") {
            continue;
        }
        let should_fail = r.call.ends_with("sym missing name");
        assert_eq!(r.outcome.is_err(), should_fail, "clean image: {}: {:?}", r.call, r.outcome);
    }

    let mut slowest: Option<CallReport> = None;
    let mut biggest_heap: Option<CallReport> = None;
    let (mut oks, mut errs) = (0usize, 0usize);
    let t = Instant::now();
    for round in 0..rounds {
        let n = 1 + rng.below(24);
        let what: Vec<String> = (0..n).map(|_| corrupt_one(&mut rng, &clean, &mut s)).collect();
        let label = format!("round {round}");
        let reports = guarded(&label, &s.mem, &clean);
        let failed: Vec<&str> = reports.iter().filter(|r| r.outcome.is_err()).map(|r| r.call.as_str()).collect();
        println!("{label}: {n} corruptions; {} calls, {} errors ({})", reports.len(), failed.len(), failed.join(", "));
        for w in what.iter().take(6) {
            println!("    {w}");
        }
        for r in reports {
            if r.outcome.is_err() {
                errs += 1;
            } else {
                oks += 1;
            }
            if slowest.as_ref().is_none_or(|x| r.took > x.took) {
                slowest = Some(r.clone());
            }
            if biggest_heap.as_ref().is_none_or(|x| r.peak_heap > x.peak_heap) {
                biggest_heap = Some(r);
            }
        }
        s.restore();
    }
    let slowest = slowest.unwrap();
    let heap = biggest_heap.unwrap();
    println!(
        "{rounds} rounds in {:?}: {oks} answers, {errs} errors, no panic; slowest call {} ({:?}); largest heap {} ({} MiB peak, {} MiB largest allocation)",
        t.elapsed(),
        slowest.call,
        slowest.took,
        heap.call,
        heap.peak_heap >> 20,
        heap.biggest_alloc >> 20
    );
}

// ---- crafted cases ------------------------------------------------------------------

/// Physical pages `[start, start + len)` that are all zero in the clean
/// image, within the direct map: room for fake structures.
fn free_area(clean: &Clean, len: u64) -> u64 {
    let ram = clean.bytes.0.len() as u64;
    let limit = ram.min(512 << 20);
    let mut end = limit;
    let mut pa = limit;
    while pa >= PAGE {
        pa -= PAGE;
        let page = &clean.bytes.0[pa as usize..(pa + PAGE) as usize];
        if page.iter().any(|b| *b != 0) {
            end = pa;
            continue;
        }
        if end - pa >= len {
            return pa;
        }
    }
    panic!("no {len:#x} bytes of free RAM");
}

fn outcome<'a>(reports: &'a [CallReport], call: &str) -> &'a Outcome {
    &reports.iter().find(|r| r.call == call).unwrap_or_else(|| panic!("{call} did not run")).outcome
}

fn expect_err(label: &str, reports: &[CallReport], call: &str, contains: &str) {
    expect_err_any(label, reports, call, &[contains]);
}

fn expect_err_any(label: &str, reports: &[CallReport], call: &str, any: &[&str]) {
    match outcome(reports, call) {
        Outcome::Err(e) if any.iter().any(|c| e.contains(c)) => {}
        other => panic!("{label}: {call} should fail with one of {any:?}, got {other:?}"),
    }
}

fn expect_ok(label: &str, reports: &[CallReport], call: &str) -> String {
    match outcome(reports, call) {
        Outcome::Ok(s) => s.clone(),
        other => panic!("{label}: {call} should answer, got {other:?}"),
    }
}

fn show(label: &str, reports: &[CallReport]) {
    let slowest = reports.iter().max_by_key(|r| r.took).unwrap();
    let heap = reports.iter().max_by_key(|r| r.peak_heap).unwrap();
    println!(
        "{label}: slowest {} {:?}, peak heap {} MiB ({})",
        slowest.call,
        slowest.took,
        heap.peak_heap >> 20,
        heap.call
    );
    for r in reports.iter().filter(|r| r.call.starts_with("clean-syms/")) {
        let o = match &r.outcome {
            Outcome::Ok(s) => format!("ok: {s}"),
            Outcome::Err(e) => format!("ERR: {}", e.chars().take(140).collect::<String>()),
            Outcome::Panic(p) => format!("PANIC: {p}"),
        };
        println!("    {:<42} {:>10.1?}  {o}", r.call, r.took);
    }
}

#[test]
fn crafted_hostile_structures_fail_fast() {
    let clean = load_clean();
    let mut s = Scratch::new(&clean);
    let o = clean.off;
    let k = Kernel::from_parts(&*clean.bytes, clean.cpus.clone(), clean.syms.clone(), Btf::parse(clean.btf_bytes.clone()).unwrap()).unwrap();
    let init = k.sym("init_task").unwrap();
    let head = init + o.tasks;
    let tasks = k.tasks().unwrap();
    let modules_head = k.sym("modules").unwrap();
    let pob = clean.page_offset_base;
    let ram = clean.bytes.0.len() as u64;
    // Free RAM for fake structures, addressed through the direct map.
    let free_pa = free_area(&clean, 48 << 20);
    let free = pob + free_pa;
    println!("free area at pa {free_pa:#x}; {} tasks", tasks.len());

    let run = |label: &str, s: &mut Scratch, check: &dyn Fn(&str, &[CallReport])| {
        let reports = guarded(label, &s.mem, &clean);
        show(label, &reports);
        check(label, &reports);
        s.restore();
    };

    // 1. The task list loops back into itself and never reaches the head.
    let last = tasks.iter().rev().find(|t| t.addr != init).unwrap();
    s.write_u64(&clean, last.addr + o.tasks, tasks[2].addr + o.tasks);
    run("task list loops back (not to the head)", &mut s, &|l, r| {
        expect_err(l, r, "clean-syms/ps", "loop");
        expect_err(l, r, "clean-syms/stack all", "loop");
        expect_ok(l, r, "clean-syms/sym schedule");
    });

    // 2. A task whose next is itself.
    s.write_u64(&clean, tasks[3].addr + o.tasks, tasks[3].addr + o.tasks);
    run("task list self-loop", &mut s, &|l, r| expect_err(l, r, "clean-syms/ps", "loop"));

    // 3. Two list heads pointing into each other.
    s.write_u64(&clean, head, modules_head);
    s.write_u64(&clean, modules_head, head);
    run("task and module list heads point into each other", &mut s, &|_, _| {});

    // 4. List pointers outside RAM and not canonical.
    s.write_u64(&clean, tasks[2].addr + o.tasks, pob + ram + 0x10_0000);
    run("task list leaves RAM", &mut s, &|l, r| {
        expect_err_any(l, r, "clean-syms/ps", &["outside guest memory", "not mapped"])
    });
    s.write_u64(&clean, tasks[2].addr + o.tasks, 0xdead_0000_0000_0000);
    run("task list pointer not canonical", &mut s, &|l, r| expect_err(l, r, "clean-syms/ps", "not canonical"));
    s.write_u64(&clean, modules_head, 0xffff_c900_4000_0000);
    run("module list into unmapped vmalloc", &mut s, &|l, r| expect_err(l, r, "clean-syms/mods", "not mapped"));

    // 5. A ring of 70000 distinct task nodes (past MAX_TASKS).
    let nodes = 70_000u64;
    let mut ring = vec![0u8; (nodes * 16) as usize];
    for i in 0..nodes {
        let next = if i + 1 == nodes { head } else { free + (i + 1) * 16 };
        ring[(i * 16) as usize..(i * 16 + 8) as usize].copy_from_slice(&next.to_le_bytes());
    }
    s.write(free_pa, &ring);
    s.write_u64(&clean, head, free);
    run("task ring of 70000 nodes", &mut s, &|l, r| expect_err(l, r, "clean-syms/ps", "exceeded"));

    // 6. Every process shares one signal_struct whose thread list has 60000
    //    nodes, and the process list has 60000 leaders too: the thread list
    //    must be walked once, not once per leader (3.6e9 steps).
    let delta = o.signal as i64 - o.tasks as i64;
    let stride = [32i64, 64, 128, 256, 512].into_iter().find(|st| delta.rem_euclid(*st) >= 16).unwrap();
    let leaders = 60_000i64;
    let first = (delta.abs() / stride + 1) * stride; // room for task->signal before node 0
    let fake_signal = first + leaders * stride + 0x1000;
    let thread_nodes = fake_signal + 0x1000;
    let mut area = vec![0u8; (thread_nodes + 60_000 * 16) as usize];
    let put = |area: &mut Vec<u8>, at: i64, v: u64| area[at as usize..at as usize + 8].copy_from_slice(&v.to_le_bytes());
    let va = |rel: i64| free + rel as u64;
    for i in 0..leaders {
        let node = first + i * stride;
        let next = if i + 1 == leaders { head } else { va(node + stride) };
        put(&mut area, node, next);
        // task->signal of this node's task lands between the nodes.
        put(&mut area, node + delta, va(fake_signal));
    }
    put(&mut area, fake_signal + o.signal_thread_head as i64, va(thread_nodes));
    for i in 0..60_000i64 {
        let next = if i + 1 == 60_000 { va(fake_signal) + o.signal_thread_head } else { va(thread_nodes + (i + 1) * 16) };
        put(&mut area, thread_nodes + i * 16, next);
    }
    s.write(free_pa, &area);
    s.write_u64(&clean, head, va(first));
    run("60000 leaders sharing a 60000-thread list", &mut s, &|l, r| {
        expect_err(l, r, "clean-syms/ps", "exceeded");
    });

    // 7. ftrace: absurd page index, negative index, a page list that loops,
    //    and a huge (but plausible) record count over real memory.
    let fps = k.sym("ftrace_pages_start").unwrap();
    let first_page = k.mem.read_u64(fps).unwrap();
    s.write_va(&clean, first_page + o.ftrace_index, &0x7fff_ffffu32.to_le_bytes());
    run("ftrace page index 0x7fffffff", &mut s, &|l, r| {
        expect_err(l, r, "clean-syms/ftrace cmdline_proc_show", "ftrace records");
    });
    s.write_va(&clean, first_page + o.ftrace_index, &(-5i32).to_le_bytes());
    run("ftrace page index negative", &mut s, &|l, r| {
        expect_err(l, r, "clean-syms/ftrace cmdline_proc_show", "index -5");
    });
    s.write_u64(&clean, first_page + o.ftrace_next, first_page);
    run("ftrace page list loops to itself", &mut s, &|l, r| {
        expect_err(l, r, "clean-syms/ftrace cmdline_proc_show", "loops");
    });
    // 1M - 1 zeroed records (one distinct IP) in a ring of pages that is the
    // same page: without loop detection that was 65536 reads of 16 MiB.
    s.write_va(&clean, first_page + o.ftrace_index, &((1u32 << 20) - 1).to_le_bytes());
    s.write_u64(&clean, first_page + o.ftrace_records, free);
    s.write_u64(&clean, first_page + o.ftrace_next, first_page);
    run("ftrace page ring with 1M records", &mut s, &|l, r| {
        expect_err(l, r, "clean-syms/ftrace cmdline_proc_show", "loops");
    });

    // 8. A fake module whose kallsyms claims 0xffffffff symbols and whose
    //    ORC table claims 0xffffffff entries.
    let fake_mod = free;
    let ks = free + 0x4000;
    let mut m = vec![0u8; 0x5000];
    let putm = |m: &mut Vec<u8>, at: u64, v: &[u8]| m[at as usize..at as usize + v.len()].copy_from_slice(v);
    putm(&mut m, o.module_list, &modules_head.to_le_bytes());
    putm(&mut m, o.module_list + 8, &modules_head.to_le_bytes());
    putm(&mut m, o.module_name, b"evil\0");
    putm(&mut m, o.module_kallsyms, &ks.to_le_bytes());
    putm(&mut m, o.core_base, &0xffff_ffff_c000_0000u64.to_le_bytes());
    putm(&mut m, o.core_size, &0x1_0000u32.to_le_bytes());
    putm(&mut m, o.core_text_size, &0x8000u32.to_le_bytes());
    putm(&mut m, o.arch_orc_ip, &pob.to_le_bytes());
    putm(&mut m, o.arch_orc, &pob.to_le_bytes());
    putm(&mut m, o.arch_num_orcs, &u32::MAX.to_le_bytes());
    putm(&mut m, 0x4000 + o.mk_symtab, &pob.to_le_bytes());
    putm(&mut m, 0x4000 + o.mk_num_symtab, &u32::MAX.to_le_bytes());
    putm(&mut m, 0x4000 + o.mk_strtab, &pob.to_le_bytes());
    putm(&mut m, 0x4000 + o.mk_typetab, &pob.to_le_bytes());
    assert!(o.module_size < 0x4000);
    s.write(free_pa, &m);
    s.write_u64(&clean, modules_head, fake_mod + o.module_list);
    s.write_u64(&clean, modules_head + 8, fake_mod + o.module_list);
    run("module claiming 0xffffffff symbols and ORC entries", &mut s, &|l, r| {
        for call in ["clean-syms/mods", "clean-syms/sym missing name", "clean-syms/stack all", "clean-syms/sym module address"] {
            expect_err(l, r, call, "claim 4294967295 symbols");
        }
    });
    // The same module with no symbols: listed, and its ORC count refused.
    s.write(free_pa, &m);
    s.write_va(&clean, ks + o.mk_num_symtab, &0u32.to_le_bytes());
    s.write_u64(&clean, modules_head, fake_mod + o.module_list);
    s.write_u64(&clean, modules_head + 8, fake_mod + o.module_list);
    run("module claiming 0xffffffff ORC entries", &mut s, &|l, r| {
        let mods = expect_ok(l, r, "clean-syms/mods");
        assert!(mods.starts_with("1 items"), "{l}: {mods}");
        expect_err(l, r, "clean-syms/stack all", "ORC entries");
        expect_err(l, r, "clean-syms/sym missing name", "not found");
    });

    // 9. Fake modules sharing one symbol table of half the symbols all
    //    modules together may claim, over real RAM. Sixteen of them claim
    //    too many: every module reader refuses the list at once instead of
    //    reading 4M symbols per call. Two of them stay within the total:
    //    the worst accepted case, bounded.
    let n_syms = introspect::modules::MAX_TOTAL_MODULE_SYMS / 2 - 1;
    let symtab_pa = free_pa + 0x20_0000;
    let strtab_pa = symtab_pa + n_syms * 24;
    let typetab_pa = strtab_pa + PAGE;
    // symtab entries: st_name 1, st_shndx 1, value = a module address; strtab "\0x\0".
    let mut symtab = vec![0u8; (n_syms * 24) as usize];
    for i in 0..n_syms as usize {
        symtab[i * 24..i * 24 + 4].copy_from_slice(&1u32.to_le_bytes());
        symtab[i * 24 + 6..i * 24 + 8].copy_from_slice(&1u16.to_le_bytes());
        symtab[i * 24 + 8..i * 24 + 16].copy_from_slice(&(0xffff_ffff_c000_0000u64 + i as u64).to_le_bytes());
    }
    let fake_modules = |count: u64| -> Vec<u8> {
        let mut area = vec![0u8; (count * 0x4000 + 0x1000) as usize];
        let ks_rel = count * 0x4000;
        for i in 0..count {
            let base = i * 0x4000;
            let next = if i + 1 == count { modules_head } else { free + (i + 1) * 0x4000 + o.module_list };
            let prev = if i == 0 { modules_head } else { free + (i - 1) * 0x4000 + o.module_list };
            putm(&mut area, base + o.module_list, &next.to_le_bytes());
            putm(&mut area, base + o.module_list + 8, &prev.to_le_bytes());
            putm(&mut area, base + o.module_name, format!("big{i}\0").as_bytes());
            putm(&mut area, base + o.module_kallsyms, &(free + ks_rel).to_le_bytes());
            putm(&mut area, base + o.core_base, &(0xffff_ffff_c000_0000u64 + i * 0x10_0000).to_le_bytes());
            putm(&mut area, base + o.core_size, &0x1_0000u32.to_le_bytes());
            putm(&mut area, base + o.core_text_size, &0x8000u32.to_le_bytes());
        }
        putm(&mut area, ks_rel + o.mk_symtab, &(pob + symtab_pa).to_le_bytes());
        putm(&mut area, ks_rel + o.mk_num_symtab, &(n_syms as u32).to_le_bytes());
        putm(&mut area, ks_rel + o.mk_strtab, &(pob + strtab_pa).to_le_bytes());
        putm(&mut area, ks_rel + o.mk_typetab, &(pob + typetab_pa).to_le_bytes());
        area
    };
    for (count, label) in [(16u64, "16 modules of 256k symbols each"), (2, "2 modules of 256k symbols each")] {
        s.write(free_pa, &fake_modules(count));
        s.write(symtab_pa, &symtab);
        s.write(strtab_pa, b"\0x\0");
        s.write(typetab_pa, &vec![b't'; n_syms as usize]);
        s.write_u64(&clean, modules_head, free + o.module_list);
        s.write_u64(&clean, modules_head + 8, free + (count - 1) * 0x4000 + o.module_list);
        if count == 16 {
            run(label, &mut s, &|l, r| {
                for call in ["clean-syms/mods", "clean-syms/stack all", "clean-syms/sym schedule", "clean-syms/sym module address"] {
                    expect_err(l, r, call, "symbols and exports in all");
                }
            });
        } else {
            run(label, &mut s, &|l, r| {
                let mods = expect_ok(l, r, "clean-syms/mods");
                assert!(mods.starts_with("2 items"), "{l}: {mods}");
                expect_ok(l, r, "clean-syms/stack all");
                expect_ok(l, r, "clean-syms/sym module address");
            });
        }
    }

    // 10. Livepatches: a patch whose states never end (1024 nonzero ids),
    //     then one object with a ring of 30000 funcs.
    if let Ok(klp_head) = k.sym("klp_patches") {
        let patch = free;
        let mut area = vec![0u8; 0x2000];
        putm(&mut area, o.klp_list, &klp_head.to_le_bytes());
        putm(&mut area, o.klp_list + 8, &klp_head.to_le_bytes());
        putm(&mut area, o.klp_obj_list, &(patch + o.klp_obj_list).to_le_bytes());
        putm(&mut area, o.klp_obj_list + 8, &(patch + o.klp_obj_list).to_le_bytes());
        putm(&mut area, o.klp_mod, &0u64.to_le_bytes());
        putm(&mut area, o.klp_states, &pob.to_le_bytes()); // RAM start: no zero id soon
        s.write(free_pa, &area);
        s.write(0, &[0x55; 0x10000]);
        s.write_u64(&clean, klp_head, patch + o.klp_list);
        s.write_u64(&clean, klp_head + 8, patch + o.klp_list);
        run("livepatch with endless states", &mut s, &|l, r| expect_err(l, r, "clean-syms/klp", "klp states"));

        let object = free + 0x1000;
        let funcs = free + 0x2000;
        let n_funcs = 30_000u64;
        let node_off = k.off("klp_func", "node").unwrap();
        let func_stride = k.btf.struct_size("klp_func").unwrap().next_multiple_of(8);
        let mut area = vec![0u8; (0x2000 + n_funcs * func_stride) as usize];
        putm(&mut area, o.klp_list, &klp_head.to_le_bytes());
        putm(&mut area, o.klp_list + 8, &klp_head.to_le_bytes());
        putm(&mut area, o.klp_obj_list, &(object + o.klp_obj_node).to_le_bytes());
        putm(&mut area, 0x1000 + o.klp_obj_node, &(patch + o.klp_obj_list).to_le_bytes());
        putm(&mut area, 0x1000 + o.klp_obj_func_list, &(funcs + node_off).to_le_bytes());
        for i in 0..n_funcs {
            let next = if i + 1 == n_funcs { object + o.klp_obj_func_list } else { funcs + (i + 1) * func_stride + node_off };
            putm(&mut area, 0x2000 + i * func_stride + node_off, &next.to_le_bytes());
        }
        s.write(free_pa, &area);
        s.write_u64(&clean, klp_head, patch + o.klp_list);
        s.write_u64(&clean, klp_head + 8, patch + o.klp_list);
        run("livepatch object with 30000 funcs", &mut s, &|l, r| {
            let klp = expect_ok(l, r, "clean-syms/klp");
            assert!(klp.starts_with("1 items"), "{l}: {klp}");
        });
    }

    // 11. Per-CPU offsets and the current task pointer outside RAM.
    if let Ok(pco) = k.sym("__per_cpu_offset") {
        s.write_u64(&clean, pco, 0x7fff_ffff_0000_0000);
        run("__per_cpu_offset[0] absurd", &mut s, &|l, r| {
            expect_ok(l, r, "clean-syms/ps");
        });
    }
    // 12. The page table root full of self-references.
    let cr3 = clean.cpus[0].cr3 & 0x000f_ffff_ffff_f000;
    let table: Vec<u8> = (0..512u64).flat_map(|_| (cr3 | 0x63).to_le_bytes()).collect();
    s.write(cr3, &table);
    run("PML4 entries all pointing at the PML4", &mut s, &|l, r| {
        expect_err(l, r, "Kernel::open", "");
    });
}
