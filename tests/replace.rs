//! Atomic replace with cumulative patches, and system-state tracking, on the
//! real test guest with the kernel tree's modules.

mod common;

use common::*;
use serde_json::json;



fn line(g: &mut Guest, file: &str) -> String {
    g.sh(&format!("read l < {file}; echo \"$l\""))
}

#[test]
fn replace_nops_other_functions_and_drops_replaced_patches() {
    let snap = ready_snapshot(1);
    let mut g = Guest::restore("replace", &snap);
    g.wait_api();
    let cmd_orig = line(&mut g, "/proc/cmdline");
    let mem_orig = line(&mut g, "/proc/meminfo");
    let site_orig = g.api_ok(json!({"verb": "ftrace", "function": "cmdline_proc_show"}))["bytes"].clone();
    apply(&g, "livepatch-sample.ko", json!({}));
    assert_eq!(line(&mut g, "/proc/cmdline"), "this has been live patched");
    // A replacing patch that changes a different function.
    apply(&g, "test_klp_atomic_replace.ko", json!({"params": ["replace=1"]}));
    assert_eq!(line(&mut g, "/proc/cmdline"), cmd_orig, "the nop sends cmdline_proc_show to the original code");
    assert_eq!(line(&mut g, "/proc/meminfo"), "test_klp_atomic_replace: this has been live patched");
    let l = g.api_ok(json!({"verb": "list"}));
    let names: Vec<&str> = l["patches"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["test_klp_atomic_replace"]);
    assert_eq!(g.api_ok(json!({"verb": "ftrace", "function": "cmdline_proc_show"}))["bytes"], site_orig);
    // Disabling the cumulative patch returns everything to the original code.
    g.api_ok(json!({"verb": "disable", "name": "test_klp_atomic_replace", "wait": true}));
    assert_eq!(line(&mut g, "/proc/meminfo"), mem_orig);
    assert_eq!(line(&mut g, "/proc/cmdline"), cmd_orig);
    assert_eq!(g.api_ok(json!({"verb": "ftrace", "function": "meminfo_proc_show"}))["bytes"], json!([15, 31, 68, 0, 0]));
    g.api_ok(json!({"verb": "remove", "name": "test_klp_atomic_replace"}));
    assert_eq!(g.api_ok(json!({"verb": "list"}))["reserved_used"], json!(0));
}

#[test]
fn non_replacing_patches_stack() {
    let snap = ready_snapshot(1);
    let mut g = Guest::restore("noreplace", &snap);
    g.wait_api();
    apply(&g, "livepatch-sample.ko", json!({}));
    apply(&g, "test_klp_atomic_replace.ko", json!({"params": ["replace=0"]}));
    assert_eq!(line(&mut g, "/proc/cmdline"), "this has been live patched");
    assert_eq!(line(&mut g, "/proc/meminfo"), "test_klp_atomic_replace: this has been live patched");
    assert_eq!(g.api_ok(json!({"verb": "list"}))["patches"].as_array().unwrap().len(), 2);
}

#[test]
fn states_compatible_replacements_accepted_incompatible_refused() {
    let snap = ready_snapshot(1);
    let g = Guest::restore("states", &snap);
    g.wait_api();
    // States only (their callbacks are tests/selftests.rs's test-state.sh
    // port): applied without callbacks, an explicit choice.
    let skip = json!({"skip_callbacks": true});
    apply(&g, "test_klp_state.ko", skip.clone()); // state 1, version 1
    let l = g.api_ok(json!({"verb": "list"}));
    assert_eq!(l["patches"][0]["states"], json!([{"id": 1, "version": 1}]));
    apply(&g, "test_klp_state2.ko", skip.clone()); // replace, version 2
    let l = g.api_ok(json!({"verb": "list"}));
    assert_eq!(l["patches"].as_array().unwrap().len(), 1);
    assert_eq!(l["patches"][0]["states"], json!([{"id": 1, "version": 2}]));
    let before = g.api_ok(json!({"verb": "read_memory", "addr": g.api_ok(json!({"verb": "status"}))["reserved_region"]["start"], "len": 4096}));
    // Going back to version 1 is refused, and nothing changes.
    let r = g.api(json!({"verb": "apply", "path": module("test_klp_state.ko"), "skip_callbacks": true, "wait": true}));
    assert_eq!(r["ok"], json!(false));
    let e = r["error"].as_str().unwrap();
    assert!(e.contains("state id 1") && e.contains("version 1") && e.contains("version 2"), "{e}");
    let after = g.api_ok(json!({"verb": "read_memory", "addr": g.api_ok(json!({"verb": "status"}))["reserved_region"]["start"], "len": 4096}));
    assert_eq!(before, after);
    assert_eq!(g.api_ok(json!({"verb": "list"}))["patches"][0]["name"], json!("test_klp_state2"));
    // Same version again (state3 carries version 2): accepted.
    apply(&g, "test_klp_state3.ko", skip);
    assert_eq!(g.api_ok(json!({"verb": "list"}))["patches"][0]["name"], json!("test_klp_state3"));
}
