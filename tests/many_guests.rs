//! `hyperpatch apply` to several guests at once: every guest is patched in
//! parallel and reported on its own; one guest's refusal names it and does
//! not stop the others.

mod common;

use std::process::Command;

use common::*;
use serde_json::{json, Value};

#[test]
fn four_guests_from_one_snapshot_three_patched_one_refused_each_named() {
    let snap = ready_snapshot(1);
    let mut guests: Vec<Guest> = (0..4).map(|i| Guest::restore(&format!("many-{i}"), &snap)).collect();
    for g in &guests {
        g.wait_api();
    }
    // The third guest traces the function the patch changes.
    guests[2].sh("echo cmdline_proc_show > /sys/kernel/tracing/set_ftrace_filter; echo function > /sys/kernel/tracing/current_tracer");
    let mut cmd = Command::new(BIN);
    cmd.arg("--json").arg("apply").arg(module("livepatch-sample.ko"));
    for g in &guests {
        cmd.arg("--guest").arg(&g.api_sock);
    }
    let out = cmd.output().expect("run hyperpatch apply");
    assert!(!out.status.success(), "one guest failed, so the command fails");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(v["failed"], json!(1), "{v}");
    let results = v["guests"].as_array().unwrap();
    assert_eq!(results.len(), 4);
    for (i, (g, r)) in guests.iter_mut().zip(results).enumerate() {
        assert_eq!(r["guest"].as_str(), g.api_sock.to_str(), "reported in order, by socket: {v}");
        let cmdline = g.sh("read l < /proc/cmdline; echo $l");
        if i == 2 {
            assert_eq!(r["ok"], json!(false), "{r}");
            let e = r["error"].as_str().unwrap();
            assert!(e.contains("cmdline_proc_show") && e.contains("ftrace"), "the refusal names the site: {e}");
            assert_ne!(cmdline, "this has been live patched");
            assert_eq!(g.api_ok(json!({"verb": "list"}))["patches"], json!([]), "nothing applied there");
        } else {
            assert_eq!(r["ok"], json!(true), "{r}");
            assert_eq!(r["result"]["state"], json!("done"), "{r}");
            assert_eq!(cmdline, "this has been live patched");
        }
    }
}
