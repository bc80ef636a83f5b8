//! Benchmarks of running the module's own code (issue: the module
//! lifecycle from outside), on the real test guest:
//! - guest-call round trip (criterion): a guest kernel function run in a
//!   kworker from outside and its result read, on an idle guest and on one
//!   whose vCPU is busy in user mode;
//! - `apply` of test_klp_callbacks_demo, including its init and its
//!   pre/post-patch callbacks, against the guest's own insmod of the same
//!   module and its transition, in one run (one figure each, then the ratio:
//!   guest kernel code is emulated here).
//!
//! Run: `cargo bench --bench lifecycle`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::json;

fn call(g: &Guest) {
    let r = g.api(json!({"verb": "call", "function": "int_pow", "args": [3, 4]}));
    assert_eq!(r["result"]["result"], json!(81), "{r}");
}

fn guest_calls(c: &mut Criterion) {
    let snap = ready_snapshot(1);
    let mut idle = Guest::restore("bench-call-idle", &snap);
    idle.wait_api();
    idle.sh("echo settled");
    call(&idle); // places the routines
    let mut grp = c.benchmark_group("guest_call");
    grp.sample_size(20).measurement_time(Duration::from_secs(10));
    grp.bench_function("idle guest", |b| b.iter(|| call(&idle)));
    drop(idle);
    let mut busy = Guest::restore("bench-call-busy", &snap);
    busy.wait_api();
    busy.send("while :; do :; done &\n");
    busy.sh("echo started");
    call(&busy);
    grp.bench_function("busy guest (user-mode loop)", |b| b.iter(|| call(&busy)));
    grp.finish();
}

fn apply_against_insmod(_c: &mut Criterion) {
    let snap = ready_snapshot(1);
    let mut g = Guest::restore("bench-lc", &snap);
    g.wait_api();
    let lp = "test_klp_callbacks_demo";
    let t = Instant::now();
    let r = g.api_ok(json!({"verb": "apply", "path": module(&format!("{lp}.ko")), "wait": true}));
    let ours = t.elapsed();
    assert_eq!(r["state"], json!("done"), "{r}");
    g.api_ok(json!({"verb": "disable", "name": lp, "wait": true}));
    g.api_ok(json!({"verb": "remove", "name": lp}));
    // The guest's own: insmod, then its transition until it completes.
    let t = Instant::now();
    g.sh(&format!(
        "insmod /modules/{lp}.ko; while read t < /sys/kernel/livepatch/{lp}/transition && [ \"$t\" != 0 ]; do :; done"
    ));
    let theirs = t.elapsed();
    println!(
        "apply of {lp} with its init and callbacks: hyperpatch {:.1} ms, the guest's own insmod + transition {:.1} ms ({:.1}x)",
        ours.as_secs_f64() * 1e3,
        theirs.as_secs_f64() * 1e3,
        theirs.as_secs_f64() / ours.as_secs_f64()
    );
}

criterion_group!(benches, guest_calls, apply_against_insmod);
criterion_main!(benches);
