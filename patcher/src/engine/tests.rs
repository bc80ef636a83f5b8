//! The engine off the VM: a fake stopped guest built in memory (kernel
//! text with ftrace NOPs, ftrace records, task structs with stacks the test
//! sets, the reserved region), and the engine's writers run against it:
//! rollback, reverse, replace, force.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

use introspect::ftrace::NOP5;

use super::guest_view::{states_of_all, GuestMem, GuestTasks, StackFrame, TaskFrames, TaskRef, TaskStates};
use super::resolve::ResolvedFunc;
use super::transition::{STUB_SIZE, TASK_MIGRATED, TASK_UNDEFINED};
use super::*;
use crate::addr::{GuestPhys, GuestVirt};
use crate::module::{FuncSpec, ObjectSpec};
use crate::placement::AreaKind;

const TEXT_VIRT: u64 = 0xffff_ffff_8100_0000;
const TEXT_PHYS: u64 = 0x0100_0000;
const DATA_VIRT: u64 = 0xffff_8880_0000_0000;
const DATA_PHYS: u64 = 0x0200_0000;
const REGION_VIRT: u64 = 0xffff_ffff_a000_0000;
const REGION_PHYS: u64 = 0x0400_0000;
const REGION_SIZE: u64 = 6 << 20;
const PATCH_STATE_OFF: u64 = 0x40;
const CURRENT_TASK: u64 = 0x1fdc0;
const TASK_SIZE: u64 = 0x100;
/// 6.1's dyn_ftrace flag bits, as its BTF gives them.
const FLAG_BITS: introspect::ftrace::FtraceFlagBits =
    introspect::ftrace::FtraceFlagBits { enabled: 1 << 31, disabled: 1 << 25, ref_mask: (1 << 23) - 1 };
const TASKS_AT: u64 = 0x10_0000;
const FUNC_SIZE: u64 = 0x80;

/// A task of the fake guest: its stack is what the test says it is.
struct FakeTask {
    pid: i32,
    addr: u64,
    frames: Vec<u64>,
    reliable: bool,
}

/// A stopped guest in host memory, built by [`FakeGuest::new`] and the
/// `with_*` methods. Memory is sparse and zero-filled; three linear
/// mappings stand in for the page tables.
struct FakeGuest {
    phys: RefCell<BTreeMap<u64, u8>>,
    tasks: RefCell<Vec<FakeTask>>,
    /// The n-th physical write from now fails (0 = the next one).
    fail_write: Cell<Option<usize>>,
    writes: Cell<usize>,
    guest_klp_busy: Cell<bool>,
    /// As a quiet pre-scanned stop: only these pids may have a
    /// `patch_state` to look at (the others are known to be done).
    partial: RefCell<Option<Vec<i32>>>,
}

impl FakeGuest {
    /// Kernel text with `funcs` functions, each starting with the ftrace
    /// NOP, an ftrace record per function, and no tasks.
    fn new(funcs: usize) -> FakeGuest {
        let g = FakeGuest {
            phys: RefCell::new(BTreeMap::new()),
            tasks: RefCell::new(Vec::new()),
            fail_write: Cell::new(None),
            writes: Cell::new(0),
            guest_klp_busy: Cell::new(false),
            partial: RefCell::new(None),
        };
        for i in 0..funcs {
            let f = func(i);
            g.poke(f, &NOP5);
            g.poke(f + 5, &[0x55, 0x48, 0x89, 0xe5, 0xc3]); // push rbp; mov rbp, rsp; ret
        }
        g
    }

    /// A task with pid `pid` whose stack holds `frames` (return addresses).
    fn with_task(self, pid: i32, frames: &[u64]) -> FakeGuest {
        let addr = DATA_VIRT + TASKS_AT + TASK_SIZE * self.tasks.borrow().len() as u64;
        self.poke(addr + PATCH_STATE_OFF, &TASK_UNDEFINED.to_le_bytes());
        self.tasks.borrow_mut().push(FakeTask { pid, addr, frames: frames.to_vec(), reliable: true });
        self
    }

    fn set_frames(&self, pid: i32, frames: &[u64]) {
        if let Some(t) = self.tasks.borrow_mut().iter_mut().find(|t| t.pid == pid) {
            t.frames = frames.to_vec();
        }
    }

    fn set_unreliable(&self, pid: i32) {
        if let Some(t) = self.tasks.borrow_mut().iter_mut().find(|t| t.pid == pid) {
            t.reliable = false;
        }
    }

    fn patch_state(&self, pid: i32) -> i32 {
        let addr = self.tasks.borrow().iter().find(|t| t.pid == pid).map(|t| t.addr).expect("task");
        self.read_i32(GuestVirt(addr + PATCH_STATE_OFF)).expect("patch_state")
    }

    fn to_phys(va: u64) -> Option<u64> {
        [(TEXT_VIRT, TEXT_PHYS, 1 << 20), (DATA_VIRT, DATA_PHYS, 2 << 20), (REGION_VIRT, REGION_PHYS, REGION_SIZE)]
            .iter()
            .find(|(v, _, len)| va >= *v && va - v < *len)
            .map(|(v, p, _)| p + (va - v))
    }

    fn poke(&self, va: u64, bytes: &[u8]) {
        let pa = Self::to_phys(va).expect("mapped");
        let mut m = self.phys.borrow_mut();
        for (i, b) in bytes.iter().enumerate() {
            m.insert(pa + i as u64, *b);
        }
    }

    fn peek(&self, va: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.read(GuestVirt(va), &mut b).expect("mapped");
        b
    }

    /// Every non-zero byte of guest memory: equal snapshots mean nothing
    /// changed.
    fn image(&self) -> BTreeMap<u64, u8> {
        self.phys.borrow().iter().filter(|(_, v)| **v != 0).map(|(k, v)| (*k, *v)).collect()
    }
}

fn func(i: usize) -> u64 {
    TEXT_VIRT + 0x1000 + 0x100 * i as u64
}

fn record(i: usize) -> u64 {
    DATA_VIRT + 0x8 * i as u64
}

impl GuestMem for FakeGuest {
    fn read(&self, at: GuestVirt, buf: &mut [u8]) -> Result<()> {
        for (i, b) in buf.iter_mut().enumerate() {
            let pa = Self::to_phys(at.0 + i as u64)
                .ok_or(PatchError::Guest(introspect::IntrospectError::NotMapped { va: at.0 + i as u64, level: 4 }))?;
            *b = self.phys.borrow().get(&pa).copied().unwrap_or(0);
        }
        Ok(())
    }
    fn read_phys(&self, at: GuestPhys, buf: &mut [u8]) -> Result<()> {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = self.phys.borrow().get(&(at.0 + i as u64)).copied().unwrap_or(0);
        }
        Ok(())
    }
    fn translate(&self, at: GuestVirt) -> Result<GuestPhys> {
        Self::to_phys(at.0).map(GuestPhys).ok_or(PatchError::Guest(introspect::IntrospectError::NotMapped { va: at.0, level: 4 }))
    }
    fn write_phys(&self, at: GuestPhys, data: &[u8]) -> Result<()> {
        if let Some(n) = self.fail_write.get() {
            if n == 0 {
                self.fail_write.set(None);
                return Err(PatchError::Vm(format!("injected write failure at {at}")));
            }
            self.fail_write.set(Some(n - 1));
        }
        self.writes.set(self.writes.get() + 1);
        let mut m = self.phys.borrow_mut();
        for (i, b) in data.iter().enumerate() {
            m.insert(at.0 + i as u64, *b);
        }
        Ok(())
    }
}

impl GuestTasks for FakeGuest {
    fn tasks(&self) -> Result<Vec<TaskRef>> {
        Ok(self
            .tasks
            .borrow()
            .iter()
            .map(|t| TaskRef { pid: t.pid, comm: format!("task{}", t.pid), addr: GuestVirt(t.addr), running_on: None })
            .collect())
    }
    fn tasks_in_state(&self, ps_off: u64, wanted: &dyn Fn(i32) -> bool) -> Result<TaskStates> {
        let all = states_of_all(self, ps_off, wanted)?;
        Ok(match self.partial.borrow().as_ref() {
            Some(pids) => all.into_iter().filter(|(t, _)| pids.contains(&t.pid)).collect(),
            None => all,
        })
    }
    fn stack(&self, t: &TaskRef) -> TaskFrames {
        let tasks = self.tasks.borrow();
        let Some(ft) = tasks.iter().find(|x| x.addr == t.addr.0) else {
            return TaskFrames { reliable: false, reason: Some("gone".into()), frames: Vec::new() };
        };
        TaskFrames {
            reliable: ft.reliable,
            reason: (!ft.reliable).then(|| "unknown frame".to_string()),
            frames: ft.frames.iter().map(|ip| StackFrame { ip: *ip, is_return: true }).collect(),
        }
    }
    fn describe(&self, f: StackFrame) -> String {
        format!("{:#x}", f.ip)
    }
    fn patch_state_offset(&self) -> Result<u64> {
        Ok(PATCH_STATE_OFF)
    }
    fn current_task_slot(&self) -> Result<u64> {
        Ok(CURRENT_TASK)
    }
    fn guest_klp_in_transition(&self) -> Result<bool> {
        Ok(self.guest_klp_busy.get())
    }
}

/// A patcher with its region planned.
fn patcher() -> Patcher {
    let mut p = Patcher::new(REGION_PHYS, REGION_SIZE);
    p.region = Some(Region::new(REGION_PHYS, REGION_SIZE, REGION_VIRT).expect("region"));
    p
}

/// Stages module `name` replacing functions `funcs` (indices of the fake
/// guest's functions) with new code placed in the region, as `stage` and
/// the init's `klp_enable_patch` would, and resolves it as `apply` would.
fn stage(p: &mut Patcher, name: &str, funcs: &[usize], replace: bool, states: &[(u64, u32)]) -> (Vec<ResolvedFunc>, Vec<SiteState>) {
    let region = p.region.as_mut().expect("region");
    let code = region.alloc(AreaKind::Text, 0x100 * funcs.len() as u64, 16).expect("room");
    let specs: Vec<FuncSpec> = funcs
        .iter()
        .enumerate()
        .map(|(j, i)| FuncSpec {
            old_name: format!("func{i}"),
            old_sympos: 0,
            new_section: 1,
            new_offset: 0x100 * j as u64,
            new_symbol: format!("{name}_func{i}"),
            new_size: 0x40,
            addr: 0,
        })
        .collect();
    let spec = PatchSpec {
        replace,
        objects: vec![ObjectSpec { name: None, funcs: specs.clone(), callbacks: Default::default(), addr: 0, post_unpatch_enabled: false }],
        states: states.iter().map(|(id, version)| StateSpec { id: *id, version: *version, addr: 0 }).collect(),
        addr: 0,
        skip_callbacks: false,
    };
    let linked = LinkedModule {
        allocations: vec![code],
        section_base: [(1usize, code.virt)].into_iter().collect(),
        images: Vec::new(),
        orc: None,
    };
    p.staged = Some(Staged {
        name: name.into(),
        path: format!("{name}.ko"),
        linked,
        this_module: 0,
        init: None,
        exit: None,
        spec: Some(spec),
        init_ok: true,
        params: Vec::new(),
    });
    let resolved = funcs
        .iter()
        .zip(specs)
        .map(|(i, spec)| ResolvedFunc { spec, object: None, old_addr: func(*i), old_size: FUNC_SIZE, site: func(*i) })
        .collect();
    let new_sites = funcs
        .iter()
        .filter(|i| !p.sites.contains_key(&func(**i)))
        .map(|i| SiteState { function: format!("func{i}"), site: func(*i), original: NOP5, record: Some((record(*i), 0)), flag_bits: FLAG_BITS, active: None })
        .collect();
    (resolved, new_sites)
}

fn apply(p: &mut Patcher, g: &FakeGuest, name: &str, funcs: &[usize], replace: bool, per_task: bool) -> Result<Outcome> {
    let (r, s) = stage(p, name, funcs, replace, &[]);
    p.apply_resolved(g, r, s, ApplyOptions { per_task, ..Default::default() })
}

fn new_addr(p: &Patcher, name: &str, i: usize) -> u64 {
    p.patches.iter().chain(p.retired.iter()).find(|x| x.name == name).and_then(|x| x.funcs.iter().find(|f| f.site == func(i))).expect("func").new_addr
}

fn jumps_to(g: &FakeGuest, i: usize, target: u64) -> bool {
    g.peek(func(i), 5) == sites::jmp_bytes(func(i), target).expect("reach")
}

/// The target of the `jmp rel32` at the site of function `i`.
fn site_target(g: &FakeGuest, i: usize) -> Option<u64> {
    let b = g.peek(func(i), 5);
    (b[0] == 0xe9).then(|| {
        let rel = i32::from_le_bytes([b[1], b[2], b[3], b[4]]);
        (func(i) as i64 + 5 + i64::from(rel)) as u64
    })
}

#[test]
fn apply_switches_every_site_and_hands_the_records_over() {
    let g = FakeGuest::new(2).with_task(1, &[TEXT_VIRT + 0x9000]);
    let mut p = patcher();
    let out = apply(&mut p, &g, "p1", &[0, 1], false, false).expect("apply");
    assert!(matches!(out, Outcome::Switched { sites: 2, forced: false }), "{out:?}");
    for i in 0..2 {
        assert!(jumps_to(&g, i, new_addr(&p, "p1", i)));
        assert_eq!(g.read_u64(GuestVirt(record(i))).unwrap(), FLAG_BITS.disabled);
    }
    assert!(p.staged.is_none());
    // Disable: the original bytes and the records' flags come back.
    let out = p.set_enabled_on(&g, "p1", false, false, false).expect("disable");
    assert!(matches!(out, Outcome::Switched { sites: 2, .. }), "{out:?}");
    for i in 0..2 {
        assert_eq!(g.peek(func(i), 5), NOP5);
        assert_eq!(g.read_u64(GuestVirt(record(i))).unwrap(), 0);
    }
}

#[test]
fn a_failed_write_rolls_the_whole_switch_back() {
    let g = FakeGuest::new(3);
    let mut p = patcher();
    let before = g.image();
    // Three sites and three records: the fourth write fails.
    g.fail_write.set(Some(3));
    let err = apply(&mut p, &g, "p1", &[0, 1, 2], false, false).expect_err("must fail");
    assert!(err.to_string().contains("injected"), "{err}");
    assert_eq!(g.image(), before, "the guest is exactly as before");
    assert!(p.patches.is_empty() && p.sites.is_empty());
    assert!(p.staged.is_some(), "the module stays staged for its exit to run");
    // The same apply works once the writes do.
    let out = apply(&mut p, &g, "p1", &[0, 1, 2], false, false).expect("apply");
    assert!(matches!(out, Outcome::Switched { sites: 3, .. }), "{out:?}");
}

#[test]
fn a_site_changed_behind_our_back_refuses_the_whole_plan() {
    let g = FakeGuest::new(2);
    let mut p = patcher();
    apply(&mut p, &g, "p1", &[0, 1], false, false).expect("apply");
    // Something else writes the second site.
    g.poke(func(1), &[0xcc; 5]);
    let before = g.image();
    let err = p.set_enabled_on(&g, "p1", false, false, false).expect_err("refused");
    assert!(matches!(&err, PatchError::Site { name, .. } if name == "func1"), "{err}");
    assert_eq!(g.image(), before, "the first site was not written either");
    assert!(p.patches[0].enabled);
}

#[test]
fn a_task_in_a_changed_function_blocks_and_nothing_changes() {
    let g = FakeGuest::new(2).with_task(7, &[func(1) + 0x10]);
    let mut p = patcher();
    let before = g.image();
    let out = apply(&mut p, &g, "p1", &[0, 1], false, false).expect("apply");
    let Outcome::Blocked(b) = out else { panic!("{out:?}") };
    assert_eq!((b.len(), b[0].pid, b[0].function.as_str()), (1, 7, "func1"));
    assert_eq!(g.image(), before);
    assert!(p.patches.is_empty() && p.sites.is_empty());
    // A return address just past a function's end is still in it.
    g.set_frames(7, &[func(1) + FUNC_SIZE]);
    assert!(matches!(apply(&mut p, &g, "p1", &[0, 1], false, false).unwrap(), Outcome::Blocked(_)));
    g.set_frames(7, &[func(1) + FUNC_SIZE + 1]);
    assert!(matches!(apply(&mut p, &g, "p1", &[0, 1], false, false).unwrap(), Outcome::Switched { .. }));
}

#[test]
fn per_task_transition_migrates_safe_tasks_then_completes() {
    let g = FakeGuest::new(1).with_task(1, &[]).with_task(2, &[func(0) + 0x20]);
    let mut p = patcher();
    let used_before_stubs = {
        let (r, s) = stage(&mut p, "p1", &[0], false, &[]);
        let used = p.reserved_used();
        let out = p.apply_resolved(&g, r, s, ApplyOptions { per_task: true, ..Default::default() }).expect("apply");
        assert!(matches!(&out, Outcome::InTransition { remaining: 1, blockers } if blockers[0].pid == 2), "{out:?}");
        used
    };
    assert_eq!(p.in_transition(), Some("p1"));
    assert_eq!(p.transition_state(), Some(TransitionState::Patching));
    assert_eq!((g.patch_state(1), g.patch_state(2)), (TASK_MIGRATED, TASK_UNDEFINED));
    // The site jumps to a stub that sends migrated tasks to the new code and
    // the others to the old function's body.
    let stub = site_target(&g, 0).expect("jmp");
    assert_ne!(stub, new_addr(&p, "p1", 0));
    let code = g.peek(stub, STUB_SIZE as usize);
    let want = dispatch_stub(stub, CURRENT_TASK, PATCH_STATE_OFF, new_addr(&p, "p1", 0), func(0) + 5).unwrap();
    assert_eq!(&code[..want.len()], &want[..]);
    assert_eq!(g.read_u64(GuestVirt(record(0))).unwrap(), FLAG_BITS.disabled);
    // Still in the old function: still held.
    assert!(matches!(p.advance_on(&g).unwrap(), Outcome::InTransition { remaining: 1, .. }));
    g.set_frames(2, &[]);
    let out = p.advance_on(&g).expect("advance");
    assert!(matches!(out, Outcome::Switched { sites: 1, forced: false }), "{out:?}");
    assert!(p.in_transition().is_none());
    assert!(jumps_to(&g, 0, new_addr(&p, "p1", 0)));
    assert_eq!(g.peek(stub, STUB_SIZE as usize), vec![0u8; STUB_SIZE as usize], "stub zeroed");
    assert_eq!((g.patch_state(1), g.patch_state(2)), (TASK_UNDEFINED, TASK_UNDEFINED));
    assert_eq!(p.reserved_used(), used_before_stubs, "stubs freed");
    assert!(!p.patches[0].forced);
}

#[test]
fn a_transition_step_looks_only_at_the_tasks_a_view_names_and_completes_over_all() {
    // Five tasks migrate at the first step; one stays in the old function.
    let mut g = FakeGuest::new(1).with_task(2, &[func(0) + 0x20]);
    for pid in [1, 3, 4, 5, 6] {
        g = g.with_task(pid, &[]);
    }
    let mut p = patcher();
    let (r, s) = stage(&mut p, "p1", &[0], false, &[]);
    let out = p.apply_resolved(&g, r, s, ApplyOptions { per_task: true, ..Default::default() }).expect("apply");
    assert!(matches!(&out, Outcome::InTransition { remaining: 1, blockers } if blockers[0].pid == 2), "{out:?}");
    // A quiet pre-scanned stop names only the task not yet migrated. A
    // task forked since (unmigrated, never run) is not named.
    *g.partial.borrow_mut() = Some(vec![2]);
    let g = g.with_task(7, &[]);
    let out = p.advance_on(&g).expect("advance");
    assert!(matches!(&out, Outcome::InTransition { remaining: 1, .. }), "{out:?}");
    assert_eq!(g.patch_state(7), TASK_UNDEFINED, "a task the view leaves out is not touched");
    g.set_frames(2, &[]);
    let out = p.advance_on(&g).expect("advance");
    assert!(matches!(out, Outcome::Switched { sites: 1, forced: false }), "{out:?}");
    for pid in 1..=7 {
        assert_eq!(g.patch_state(pid), TASK_UNDEFINED, "pid {pid}: every task's mark is cleared at completion");
    }
}

#[test]
fn reversing_a_transition_puts_the_guest_back_as_it_was() {
    let g = FakeGuest::new(2).with_task(1, &[]).with_task(2, &[func(0) + 0x20]);
    let mut p = patcher();
    let before = g.image();
    let out = apply(&mut p, &g, "p1", &[0, 1], false, true).expect("apply");
    assert!(matches!(out, Outcome::InTransition { remaining: 1, .. }), "{out:?}");
    // Task 1 was migrated and now sleeps in the new code: it holds the reversal.
    g.set_frames(1, &[new_addr(&p, "p1", 1) + 4]);
    let out = p.reverse_on(&g).expect("reverse");
    assert!(matches!(&out, Outcome::InTransition { remaining: 1, blockers } if blockers[0].pid == 1), "{out:?}");
    assert_eq!(p.transition_state(), Some(TransitionState::Reversing));
    // Reversed twice: forward again, then back again.
    p.reverse_on(&g).expect("forward");
    assert_eq!(p.transition_state(), Some(TransitionState::Patching));
    p.reverse_on(&g).expect("back");
    g.set_frames(1, &[]);
    let out = p.advance_on(&g).expect("advance");
    assert!(matches!(out, Outcome::Switched { forced: false, .. }), "{out:?}");
    assert_eq!(g.image(), before, "sites, records, stubs and marks as before");
    assert!(p.patches.is_empty() && p.sites.is_empty() && p.transition.is_none());
    let retired = p.take_retired();
    assert_eq!(retired.len(), 1);
    assert!(!retired[0].forced, "reversed safely: its memory may be freed after its exit");
}

#[test]
fn a_failed_step_after_the_stubs_leaves_the_patch_in_its_transition() {
    let g = FakeGuest::new(1).with_task(1, &[]).with_task(2, &[func(0) + 0x20]);
    let mut p = patcher();
    // Start writes stub, site and record (3 writes); the first mark fails.
    g.fail_write.set(Some(3));
    let err = apply(&mut p, &g, "p1", &[0], false, true).expect_err("mark write fails");
    assert!(err.to_string().contains("injected"), "{err}");
    // The site jumps through a stub into the patch: it is on the stack,
    // in its transition, never unwound under the guest.
    assert_eq!(p.in_transition(), Some("p1"));
    assert_eq!(p.patches.len(), 1);
    assert!(p.staged.is_none());
    let stub = site_target(&g, 0).expect("stub");
    assert_ne!(g.peek(stub, 4), vec![0u8; 4]);
    assert_eq!((g.patch_state(1), g.patch_state(2)), (TASK_UNDEFINED, TASK_UNDEFINED));
    g.set_frames(2, &[]);
    assert!(matches!(p.advance_on(&g).unwrap(), Outcome::Switched { sites: 1, .. }));
    assert!(jumps_to(&g, 0, new_addr(&p, "p1", 0)));
}

#[test]
fn a_failed_transition_start_writes_nothing_and_frees_its_stubs() {
    let g = FakeGuest::new(2).with_task(2, &[func(0) + 0x20]);
    let mut p = patcher();
    let (r, s) = stage(&mut p, "p1", &[0, 1], false, &[]);
    let used = p.reserved_used();
    let before = g.image();
    // Two stubs, then the sites: the first site's write fails.
    g.fail_write.set(Some(2));
    let err = p.apply_resolved(&g, r, s, ApplyOptions { per_task: true, ..Default::default() }).expect_err("fails");
    assert!(err.to_string().contains("injected"), "{err}");
    assert_eq!(g.image(), before);
    assert_eq!(p.reserved_used(), used, "no stub leaked");
    assert!(p.patches.is_empty() && p.sites.is_empty() && p.transition.is_none());
}

#[test]
fn a_guest_livepatch_transition_refuses_a_per_task_transition() {
    let g = FakeGuest::new(1).with_task(2, &[func(0) + 0x20]);
    g.guest_klp_busy.set(true);
    let mut p = patcher();
    let before = g.image();
    let err = apply(&mut p, &g, "p1", &[0], false, true).expect_err("refused");
    assert!(err.to_string().contains("guest's own livepatch"), "{err}");
    assert_eq!(g.image(), before);
}

#[test]
fn atomic_replace_nops_what_it_drops_and_retires_the_others() {
    let g = FakeGuest::new(3);
    let mut p = patcher();
    apply(&mut p, &g, "p1", &[0, 1], false, false).expect("p1");
    apply(&mut p, &g, "p2", &[2], false, false).expect("p2");
    let out = apply(&mut p, &g, "p3", &[1], true, false).expect("p3");
    // func1 goes to p3; func0 and func2 get nop functions (their original code).
    assert!(matches!(out, Outcome::Switched { sites: 3, .. }), "{out:?}");
    assert!(jumps_to(&g, 1, new_addr(&p, "p3", 1)));
    assert_eq!(g.peek(func(0), 5), NOP5);
    assert_eq!(g.peek(func(2), 5), NOP5);
    assert_eq!(g.read_u64(GuestVirt(record(0))).unwrap(), 0, "record flags back for the nop'ed site");
    assert_eq!(p.patches.iter().map(|x| x.name.as_str()).collect::<Vec<_>>(), ["p3"]);
    let retired: Vec<String> = p.take_retired().into_iter().map(|x| x.name).collect();
    assert_eq!(retired, ["p1", "p2"]);
    assert_eq!(p.sites.keys().copied().collect::<Vec<_>>(), [func(1)]);
}

#[test]
fn func_stack_falls_back_to_the_next_enabled_patch() {
    let g = FakeGuest::new(1);
    let mut p = patcher();
    apply(&mut p, &g, "p1", &[0], false, false).expect("p1");
    apply(&mut p, &g, "p2", &[0], false, false).expect("p2");
    assert!(jumps_to(&g, 0, new_addr(&p, "p2", 0)));
    p.set_enabled_on(&g, "p2", false, false, false).expect("disable p2");
    assert!(jumps_to(&g, 0, new_addr(&p, "p1", 0)));
    p.set_enabled_on(&g, "p1", false, false, false).expect("disable p1");
    assert_eq!(g.peek(func(0), 5), NOP5);
    p.set_enabled_on(&g, "p2", true, false, false).expect("enable p2");
    assert!(jumps_to(&g, 0, new_addr(&p, "p2", 0)));
}

#[test]
fn force_completes_over_unreliable_stacks_and_keeps_the_code_forever() {
    let g = FakeGuest::new(1).with_task(1, &[]).with_task(2, &[]);
    g.set_unreliable(2);
    let mut p = patcher();
    let out = apply(&mut p, &g, "p1", &[0], false, true).expect("apply");
    assert!(matches!(&out, Outcome::InTransition { blockers, .. } if blockers[0].unreliable), "{out:?}");
    let out = p.force_on(&g).expect("force");
    assert!(matches!(out, Outcome::Switched { forced: true, .. }), "{out:?}");
    assert!(p.transition.is_none());
    assert!(jumps_to(&g, 0, new_addr(&p, "p1", 0)));
    assert!(p.patches.iter().all(|x| x.forced), "a forced patch is never freed");
}

#[test]
fn a_forced_reversal_keeps_the_reversed_patch_forever() {
    let g = FakeGuest::new(1).with_task(1, &[]).with_task(2, &[func(0) + 0x20]);
    let mut p = patcher();
    apply(&mut p, &g, "p1", &[0], false, true).expect("apply");
    // Task 1 is migrated and sits in the new code; force the way back.
    g.set_frames(1, &[new_addr(&p, "p1", 0) + 4]);
    assert!(matches!(p.reverse_on(&g).unwrap(), Outcome::InTransition { .. }));
    assert_eq!(p.force_on(&g).unwrap_or_else(|e| panic!("{e}")).clone_forced(), Some(true));
    let retired = p.take_retired();
    assert_eq!(retired.len(), 1);
    assert!(retired[0].forced, "task 1 may still run its code: never freed");
    assert_eq!(g.peek(func(0), 5), NOP5);
}

#[test]
fn states_follow_klp_is_patch_compatible() {
    let g = FakeGuest::new(2);
    let mut p = patcher();
    let (r, s) = stage(&mut p, "p1", &[0], false, &[(7, 2)]);
    p.apply_resolved(&g, r, s, ApplyOptions::default()).expect("p1");
    // Lower version: refused.
    let (r, s) = stage(&mut p, "p2", &[1], false, &[(7, 1)]);
    let err = p.apply_resolved(&g, r, s, ApplyOptions::default()).expect_err("lower");
    assert!(err.to_string().contains("lower than version 2"), "{err}");
    // A replacing patch must carry the state.
    let (r, s) = stage(&mut p, "p3", &[1], true, &[]);
    let err = p.apply_resolved(&g, r, s, ApplyOptions::default()).expect_err("missing");
    assert!(err.to_string().contains("does not carry its state id 7"), "{err}");
    let (r, s) = stage(&mut p, "p4", &[1], true, &[(7, 3)]);
    p.apply_resolved(&g, r, s, ApplyOptions::default()).expect("p4");
    assert_eq!(p.patches.len(), 1);
}

impl Outcome {
    /// `Some(forced)` for a switch.
    fn clone_forced(&self) -> Option<bool> {
        match self {
            Outcome::Switched { forced, .. } => Some(*forced),
            _ => None,
        }
    }
}

#[test]
fn a_forced_transition_cannot_be_sent_back() {
    assert!(TransitionState::ForcedPatching.reverse().is_err());
    assert_eq!(TransitionState::Reversing.force(), TransitionState::ForcedReversing);
    assert_eq!(TransitionState::Patching.reverse().unwrap(), TransitionState::Reversing);
}

#[test]
fn a_transition_whose_module_went_meanwhile_completes_and_frees_its_stub() {
    let g = FakeGuest::new(2).with_task(2, &[func(0) + 0x20]);
    let mut p = patcher();
    let (r, s) = stage(&mut p, "p1", &[0, 1], false, &[]);
    let used = p.reserved_used();
    p.apply_resolved(&g, r, s, ApplyOptions { per_task: true, ..Default::default() }).expect("apply");
    let stub1 = site_target(&g, 1).expect("stub");
    // func1's module goes (as unpatch_going_module leaves it: the site is
    // forgotten, its text is about to be freed).
    p.patches[0].funcs.retain(|f| f.site != func(1));
    p.sites.remove(&func(1));
    g.set_frames(2, &[]);
    let out = p.advance_on(&g).expect("completes");
    assert!(matches!(out, Outcome::Switched { sites: 1, .. }), "{out:?}");
    assert!(jumps_to(&g, 0, new_addr(&p, "p1", 0)));
    assert_eq!(g.peek(stub1, STUB_SIZE as usize), vec![0u8; STUB_SIZE as usize], "its stub is zeroed");
    assert_eq!(p.reserved_used(), used, "and freed");
}
