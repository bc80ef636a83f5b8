//! Stacks read while the guest runs (the pre-scan), and the stop that
//! re-checks only what may have changed since: a task that is switched out
//! and has not run keeps its pre-scan stack; a task that ran, or is new, is
//! unwound in the stop. The races are driven, not waited for: the apply is
//! held after its pre-scan (`hold_after_prescan`), the test moves a task
//! into a changed function, then releases it.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn wait_list(g: &Guest, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + CMD_TIMEOUT;
    loop {
        let l = g.api_ok(json!({"verb": "list"}));
        if ok(&l) {
            return l;
        }
        assert!(Instant::now() < deadline, "{what} never happened: {l}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Applies livepatch-sample until a stop finds that no task switched since
/// its pre-scan (each attempt stops again up to three times when one did;
/// an idle guest switches rarely), up to 5 applies; returns that apply's
/// stack counts and the task count.
fn quiet_apply(g: &Guest) -> (Value, u64) {
    let count = || g.api_ok(json!({"verb": "ps"})).as_array().map(|a| a.len()).unwrap() as u64;
    for _ in 0..5 {
        let before = count();
        let r = apply(g, "livepatch-sample.ko", json!({}));
        assert_eq!(r["state"], json!("done"), "{r}");
        let st = r["stacks"].clone();
        // A kworker may come or go between a `ps` and the pre-scan: compare
        // with the smaller of the counts before and after.
        let tasks = before.min(count());
        let pre = st["prescanned"].as_u64().unwrap();
        assert!(pre + 1 >= tasks && pre > 0, "every task is pre-scanned: {st} vs {tasks} tasks");
        g.api_ok(json!({"verb": "disable", "name": "livepatch_sample", "wait": true}));
        g.api_ok(json!({"verb": "remove", "name": "livepatch_sample"}));
        if st["no_switch_since_prescan"] == json!(true) {
            return (st, tasks);
        }
    }
    panic!("no apply of 5 found the guest without a switch since its pre-scan");
}

#[test]
fn a_stop_after_a_quiet_prescan_reads_only_the_tasks_that_may_have_run() {
    let snap = ready_snapshot(1);
    let g = Guest::restore("prescan-reuse", &snap);
    g.wait_api();
    let (st, tasks) = quiet_apply(&g);
    let n = |k: &str| st[k].as_u64().unwrap();
    // The vCPU's task is read and unwound in the stop; so is a task that
    // was on a CPU at the pre-scan. No other task is read: none has a frame
    // in cmdline_proc_show, and none ran.
    assert!(n("unwound_in_stop") >= 1, "the vCPU's task is unwound in the stop: {st}");
    assert_eq!(n("reused"), 0, "no pre-scanned stack is in the changed function: {st}");
    assert!(n("tasks_read_in_stop") >= 1 && n("tasks_read_in_stop") * 4 < tasks, "{st} vs {tasks} tasks");
}

#[test]
fn a_per_task_transition_checks_only_the_tasks_still_to_move() {
    transition_checks_only_the_tasks_still_to_move(1);
}

/// With two vCPUs the second CPU's idle task, on no task list, moves too,
/// and its mark is cleared at the end: a per-task transition can start
/// again (it refuses while any task has a mark).
#[test]
fn a_per_task_transition_on_two_vcpus_leaves_no_mark() {
    let mut g = transition_checks_only_the_tasks_still_to_move(2);
    let r = g.api_ok(json!({"verb": "disable", "name": "hp_patch_sleep", "per_task": true, "wait": true}));
    assert_eq!(r["state"], json!("done"), "{r}");
    // The guest's own livepatch checks every task, idle ones too.
    let from = g.console_len();
    g.sh("insmod /modules/livepatch-sample.ko");
    assert_eq!(g.sh("read l < /proc/cmdline; echo $l"), "this has been live patched");
    let log = g.console_text().get(from..).unwrap_or_default().to_string();
    assert!(!log.contains("WARNING") && !log.contains("BUG"), "{log}");
}

fn transition_checks_only_the_tasks_still_to_move(vcpus: u32) -> Guest {
    let snap = ready_snapshot(vcpus);
    let mut g = Guest::restore(&format!("prescan-transition{vcpus}"), &snap);
    g.wait_api();
    g.sh("echo 'block 10' > /proc/hp_racer");
    // All ten asleep in hp_block_wait.
    assert_eq!(wait_for_frames(&g, "frames", "hp_block_wait+", 10).len(), 10);
    let tasks = g.api_ok(json!({"verb": "ps"})).as_array().map(|a| a.len()).unwrap() as u64;
    let r = g.api_ok(json!({"verb": "apply", "path": module("hp_patch_sleep.ko"), "per_task": true}));
    assert_eq!(r["state"], json!("per-task transition"), "{r}");
    // Every other task moved at the first check; the later checks look at
    // the ten (and the vCPU's task), not at every task.
    let l = wait_list(&g, "a quiet check with the ten blocked", |l| {
        let p = &l["pending"];
        p["tasks_remaining"] == json!(10)
            && p["attempts"].as_u64().unwrap_or(0) >= 2
            && p["last_stop"]["stacks"]["no_switch_since_prescan"] == json!(true)
    });
    let st = &l["pending"]["last_stop"]["stacks"];
    let n = |k: &str| st[k].as_u64().unwrap();
    assert_eq!(n("reused"), 10, "the ten blocked stacks come from the pre-scan: {st}");
    assert!(n("tasks_read_in_stop") * 4 < tasks, "a check reads only the tasks that may have run: {st} vs {tasks} tasks");
    let blockers = l["pending"]["blockers"].as_array().unwrap();
    assert_eq!(blockers.len(), 10, "{l}");
    assert!(blockers.iter().all(|b| b["function"] == json!("hp_block_wait")), "{l}");
    // They leave it together: the transition completes.
    g.sh("echo unblock > /proc/hp_racer");
    let l = wait_list(&g, "the transition ending", |l| l["pending"].is_null());
    assert_eq!(l["last"]["ok"], json!(true), "{l}");
    let l = g.api_ok(json!({"verb": "list"}));
    let f = l["patches"][0]["functions"].as_array().unwrap().iter().find(|f| f["old_name"] == json!("hp_block_wait")).cloned().unwrap();
    let site = g.api_ok(json!({"verb": "ftrace", "function": "hp_block_wait"}));
    assert_eq!(site["insn"]["Jmp"]["target"], f["new_addr"], "the site jumps straight to the patch: {site}");
    g
}

/// Holds an apply of hp_patch_sleep after its pre-scan; returns when held.
fn hold_apply(g: &Guest) {
    let r = g.api_ok(json!({"verb": "apply", "path": module("hp_patch_sleep.ko"), "per_task": false, "hold_after_prescan": true}));
    assert_eq!(r["state"], json!("held after its pre-scan"), "{r}");
}

/// Releases the held apply and checks that the stop saw `pid` in
/// hp_sleep_wait and switched nothing; then wakes it and the apply ends.
fn release_and_expect_blocked_by(g: &mut Guest, pid: i64) {
    g.api_ok(json!({"verb": "release"}));
    let l = wait_list(g, "a stop after the release", |l| l["pending"]["attempts"].as_u64().unwrap_or(0) >= 1);
    let b = &l["pending"]["blockers"];
    assert_eq!(l["pending"]["state"], json!("waiting for a safe point"), "{l}");
    assert!(
        b.as_array().unwrap().iter().any(|x| x["pid"].as_i64() == Some(pid) && x["function"] == json!("hp_sleep_wait")),
        "pid {pid} in hp_sleep_wait must hold the switch back: {l}"
    );
    let site = g.api_ok(json!({"verb": "ftrace", "function": "hp_sleep_wait"}));
    assert_eq!(site["insn"], json!("Nop"), "nothing switched: {site}");
    g.sh("echo 1 > /proc/hp_wake");
    let l = wait_list(g, "the apply ending", |l| l["pending"].is_null());
    assert_eq!(l["last"]["ok"], json!(true), "{l}");
    assert_eq!(g.sh("cat /proc/hp_sleep"), "woke 7 original");
}

#[test]
fn a_task_that_enters_a_changed_function_after_the_prescan_is_caught() {
    let snap = ready_snapshot(1);
    let mut g = Guest::restore("prescan-wake", &snap);
    g.wait_api();
    g.sh("echo start > /proc/hp_racer");
    let racer = wait_for_frame(&g, "all_frames", "hp_racer_fn+");
    hold_apply(&g);
    // The racer was pre-scanned asleep outside every changed function; now
    // it wakes and sleeps inside one.
    g.sh("echo enter > /proc/hp_racer");
    assert_eq!(wait_for_frame(&g, "frames", "hp_sleep_wait+"), racer);
    release_and_expect_blocked_by(&mut g, racer);
}

#[test]
fn a_task_forked_after_the_prescan_into_a_changed_function_is_caught() {
    let snap = ready_snapshot(1);
    let mut g = Guest::restore("prescan-fork", &snap);
    g.wait_api();
    hold_apply(&g);
    g.sh("echo fork > /proc/hp_racer");
    let forked = wait_for_frame(&g, "frames", "hp_sleep_wait+");
    release_and_expect_blocked_by(&mut g, forked);
}
