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

#[test]
fn stacks_read_while_the_guest_runs_are_reused_in_the_stop() {
    let snap = ready_snapshot(1);
    let g = Guest::restore("prescan-reuse", &snap);
    g.wait_api();
    let count = || g.api_ok(json!({"verb": "ps"})).as_array().map(|a| a.len()).unwrap() as u64;
    let before = count();
    let r = apply(&g, "livepatch-sample.ko", json!({}));
    assert_eq!(r["state"], json!("done"), "{r}");
    let st = &r["stacks"];
    let (pre, reused, unwound) = (st["prescanned"].as_u64().unwrap(), st["reused"].as_u64().unwrap(), st["unwound_in_stop"].as_u64().unwrap());
    // A kworker may come or go between a `ps` and the pre-scan: compare with
    // the smaller of the counts before and after.
    let tasks = before.min(count());
    // Every task was pre-scanned; the one on the vCPU is unwound in the stop
    // (the shell and kworkers may have run since, and are unwound too).
    assert!(pre + 1 >= tasks && pre > 0, "{st} vs {tasks} tasks");
    assert!(unwound >= 1, "the running task is unwound in the stop: {st}");
    assert!(reused > 0 && reused <= pre, "{st}");
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
