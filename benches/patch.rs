//! Patching benchmarks on the real test guest, one run each, reported as
//! figures and ratios (guest kernel code is emulated here, so guest-side
//! numbers are only meaningful as ratios within one run):
//! - guest stopped time per apply: 1 function and a 20-function patch, on 1
//!   and 4 vCPUs (against the pause-resume round trip);
//! - per-call cost of a patched function measured inside the guest kernel
//!   (hp_target's TSC loop): unpatched, hyperpatch's direct jmp, and the
//!   guest's own livepatch (ftrace handler) loading the same module;
//! - time from apply to transition complete, against the guest's own insmod.
//!
//! Run: `cargo bench --bench patch`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use common::*;
use serde_json::json;


fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn stopped_times(vcpus: u32) {
    let snap = ready_snapshot(vcpus);
    let g = Guest::restore(&format!("bench-stop{vcpus}"), &snap);
    g.wait_api();
    let mut one = Vec::new();
    let mut many = Vec::new();
    for _ in 0..5 {
        let r = g.api_ok(json!({"verb": "apply", "path": module("livepatch-sample.ko"), "wait": true}));
        one.push(r["stopped_us"].as_f64().unwrap());
        g.api_ok(json!({"verb": "disable", "name": "livepatch_sample", "wait": true}));
        g.api_ok(json!({"verb": "remove", "name": "livepatch_sample"}));
        let r = g.api_ok(json!({"verb": "apply", "path": module("hp_patch_many.ko"), "wait": true}));
        many.push(r["stopped_us"].as_f64().unwrap());
        g.api_ok(json!({"verb": "disable", "name": "hp_patch_many", "wait": true}));
        g.api_ok(json!({"verb": "remove", "name": "hp_patch_many"}));
    }
    println!(
        "guest stopped per apply, {vcpus} vCPU(s): 1 function {:.0} us, 20 functions {:.0} us (medians of 5)",
        median(one),
        median(many)
    );
}

/// Cycles per call of hp_bench_target (loop overhead subtracted): a warm-up
/// run, then the median of 5.
fn per_call(g: &mut Guest, n: u64) -> f64 {
    let mut runs = Vec::new();
    for i in 0..6 {
        let out = g.sh(&format!("echo {n} > /proc/hp_bench; read a b c < /proc/hp_bench; echo $a $b $c"));
        let v: Vec<f64> = out.split_whitespace().map(|x| x.parse().unwrap()).collect();
        if i > 0 {
            runs.push((v[1] - v[2]) / v[0]);
        }
    }
    median(runs)
}

fn call_cost_and_apply_time() {
    let snap = ready_snapshot(1);
    let mut g = Guest::restore("bench-call", &snap);
    g.wait_api();
    let n = 20_000;
    let unpatched = per_call(&mut g, n);
    let t = Instant::now();
    g.api_ok(json!({"verb": "apply", "path": module("hp_patch_target.ko"), "wait": true}));
    let hp_apply = t.elapsed().as_secs_f64();
    assert_eq!(g.sh("cat /proc/hp_target"), "patched");
    let hp = per_call(&mut g, n);
    g.api_ok(json!({"verb": "disable", "name": "hp_patch_target", "wait": true}));
    g.api_ok(json!({"verb": "remove", "name": "hp_patch_target"}));
    // The guest's own livepatch with the same module.
    let t = Instant::now();
    g.sh("insmod /modules/hp_patch_target.ko; while read t < /sys/kernel/livepatch/hp_patch_target/transition && [ \"$t\" = 1 ]; do :; done");
    let klp_apply = t.elapsed().as_secs_f64();
    assert_eq!(g.sh("cat /proc/hp_target"), "patched");
    let klp = per_call(&mut g, n);
    println!(
        "per call (TSC cycles, {n} calls, loop overhead subtracted): unpatched {unpatched:.0}, hyperpatch jmp {hp:.0} ({:.3}x), guest livepatch {klp:.0} ({:.3}x)",
        hp / unpatched,
        klp / unpatched
    );
    println!(
        "apply to transition complete: hyperpatch {:.3} s, guest insmod + transition {:.1} s ({:.0}x)",
        hp_apply,
        klp_apply,
        klp_apply / hp_apply
    );
}

/// Transition time with one task held in a changed function for 2 s.
fn held_transition() {
    let snap = ready_snapshot(1);
    let mut g = Guest::restore("bench-held", &snap);
    g.wait_api();
    let wait_sleeper = |g: &Guest| wait_for_frame(g, "frames", "hp_sleep_wait+");
    // hyperpatch, per-task.
    g.send("cat /proc/hp_sleep &\n");
    wait_sleeper(&g);
    let t = Instant::now();
    let r = g.api_ok(json!({"verb": "apply", "path": module("hp_patch_sleep.ko")}));
    assert_eq!(r["state"], json!("per-task transition"));
    std::thread::sleep(std::time::Duration::from_secs(2));
    g.send("echo 1 > /proc/hp_wake\n");
    loop {
        if g.api_ok(json!({"verb": "list"}))["pending"].is_null() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let hp = t.elapsed().as_secs_f64();
    g.api_ok(json!({"verb": "disable", "name": "hp_patch_sleep", "wait": true}));
    g.api_ok(json!({"verb": "remove", "name": "hp_patch_sleep"}));
    // The guest's own livepatch with the same module.
    g.send("cat /proc/hp_sleep &\n");
    wait_sleeper(&g);
    g.sh("echo 0 > /dev/null");
    let t = Instant::now();
    g.send("insmod /modules/hp_patch_sleep.ko &\n");
    std::thread::sleep(std::time::Duration::from_secs(2));
    g.send("echo 1 > /proc/hp_wake\n");
    g.sh("while read v < /sys/kernel/livepatch/hp_patch_sleep/transition && [ \"$v\" = 1 ]; do :; done 2>/dev/null; until [ -e /sys/kernel/livepatch/hp_patch_sleep ]; do :; done; while read v < /sys/kernel/livepatch/hp_patch_sleep/transition && [ \"$v\" = 1 ]; do :; done");
    let klp = t.elapsed().as_secs_f64();
    println!(
        "transition with a task held 2 s in the changed function: hyperpatch per-task {hp:.2} s, guest livepatch {klp:.2} s (guest/hyperpatch {:.2})",
        klp / hp
    );
}

fn main() {
    held_transition();
    call_cost_and_apply_time();
    stopped_times(1);
    stopped_times(4);
}
