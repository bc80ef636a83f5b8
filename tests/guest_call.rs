//! Guest calls: hyperpatch runs a guest kernel function in process context
//! (a kworker) from outside and reads its result, on an idle guest (every
//! vCPU halted) and a busy one, with 1 and 2 vCPUs; a call may sleep and
//! allocate; a call that never returns is reported as timed out and the
//! guest carries on.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn call(g: &Guest, function: &str, args: Value, timeout: f64) -> Value {
    g.api(json!({"verb": "call", "function": function, "args": args, "timeout_secs": timeout}))
}

fn call_ok(g: &Guest, function: &str, args: Value) -> Value {
    let r = call(g, function, args, 60.0);
    assert_eq!(r["ok"], json!(true), "call {function}: {r}");
    r["result"].clone()
}

/// Calls `function` until one call was queued while every vCPU of the
/// guest ran its idle task (the VMM reports it), bounded.
fn call_when_idle(g: &Guest, function: &str, args: Value) -> Value {
    let deadline = std::time::Instant::now() + CMD_TIMEOUT;
    loop {
        let r = call_ok(g, function, args.clone());
        if r["guest_idle_when_queued"] == json!(true) {
            return r;
        }
        assert!(std::time::Instant::now() < deadline, "the guest was never idle when a call was queued: {r}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn idle_guest_calls(vcpus: u32) {
    let snap = ready_snapshot(vcpus);
    let mut g = Guest::restore(&format!("gcall-idle{vcpus}"), &snap);
    g.wait_api();
    g.sh("echo settled");
    let r = call_when_idle(&g, "int_pow", json!([3, 4]));
    assert_eq!(r["result"], json!(81), "{r}");
    let r = call_when_idle(&g, "gcd", json!([1071, 462]));
    assert_eq!(r["result"], json!(21), "{r}");
    // Process context: it may sleep, allocate (GFP_KERNEL) and take mutexes.
    call_when_idle(&g, "msleep", json!([50]));
    let r = call_ok(&g, "proc_mkdir", json!([format!("hp-call-{vcpus}"), 0]));
    assert!(r["result"].as_i64().unwrap() < 0, "a kernel pointer: {r}");
    assert_eq!(g.sh(&format!("cd /proc/hp-call-{vcpus} && echo there")), "there");
    assert!(!g.console_text().contains("BUG"), "{}", g.tail(3000));
}

#[test]
fn calls_on_an_idle_guest_with_one_vcpu() {
    idle_guest_calls(1);
}

#[test]
fn calls_on_an_idle_guest_with_two_vcpus() {
    idle_guest_calls(2);
}

#[test]
fn calls_on_a_busy_guest_and_a_call_that_never_returns() {
    let snap = ready_snapshot(1);
    let mut g = Guest::restore("gcall-busy", &snap);
    g.wait_api();
    g.send("while :; do :; done &\n");
    // The loop (a forked shell, never sleeping) runs on the vCPU: from then
    // on the single vCPU is never idle.
    let deadline = std::time::Instant::now() + CMD_TIMEOUT;
    loop {
        g.api_ok(json!({"verb": "pause"}));
        let ps = g.api_ok(json!({"verb": "ps"}));
        g.api_ok(json!({"verb": "resume"}));
        if ps.as_array().unwrap().iter().any(|t| t["comm"] == json!("sh") && t["pid"] != json!(1) && !t["running_on"].is_null()) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the busy loop never ran");
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = call_ok(&g, "int_pow", json!([2, 10]));
    assert_eq!(r["result"], json!(1024));
    assert_eq!(r["guest_idle_when_queued"], json!(false), "the busy loop runs: {r}");
    // msleep(~24 days) never returns in time: timed out, the guest lives on.
    let r = call(&g, "msleep", json!([0x7fff_ffff]), 2.0);
    assert_eq!(r["ok"], json!(false), "{r}");
    let e = r["error"].as_str().unwrap();
    assert!(e.contains("did not finish within 2 s"), "{r}");
    let lost: u64 = e.split("slot ").nth(1).and_then(|s| s.split(' ').next()).and_then(|n| n.parse().ok()).expect("slot in the error");
    for _ in 0..3 {
        let r = call_ok(&g, "int_pow", json!([5, 3]));
        assert_eq!(r["result"], json!(125));
        assert_ne!(r["slot"], json!(lost), "the lost slot is reused: {r}");
    }
    g.send("kill %1\n");
    assert_eq!(g.sh("echo alive-$((2+3))"), "alive-5");
    // Bad requests are refused by name.
    let r = call(&g, "no_such_function_here", json!([]), 5.0);
    assert!(r["error"].as_str().unwrap().contains("no_such_function_here"), "{r}");
    let r = call(&g, "int_pow", json!([1, 2, 3, 4, 5, 6, 7]), 5.0);
    assert!(r["error"].as_str().unwrap().contains("at most 6"), "{r}");
}
