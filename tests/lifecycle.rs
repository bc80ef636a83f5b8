//! A livepatch module's own code runs in the guest: its init (which builds
//! the klp_patch, statically or with kzalloc, and calls klp_enable_patch),
//! its parameters set as insmod sets them, its exit at remove. Bad inits
//! and parameters are refused with one clear error and the guest as before.

mod common;

use common::*;
use serde_json::{json, Value};

const PATCHED: &str = "hp_patch_kzalloc: this has been live patched";

fn cmdline(g: &mut Guest) -> String {
    g.sh("read l < /proc/cmdline; echo $l")
}

/// The lines of the kernel log that start with `prefix` (timestamps cut),
/// then clears the log.
pub fn klog(g: &mut Guest, prefix: &str) -> Vec<String> {
    let out = g.sh("dmesg -c");
    out.lines()
        .map(|l| match l.find("] ") {
            Some(i) if l.starts_with('[') => l[i + 2..].to_string(),
            _ => l.to_string(),
        })
        .filter(|l| l.starts_with(prefix))
        .collect()
}

fn region_is_zero(g: &Guest) {
    let l = g.api_ok(json!({"verb": "list"}));
    assert_eq!(l["reserved_used"], json!(0), "{l}");
    assert_eq!(l["region_mapped"], json!(false), "{l}");
    let st = g.api_ok(json!({"verb": "status"}));
    let start = st["reserved_region"]["start"].as_u64().unwrap();
    let hex = g.api_ok(json!({"verb": "read_memory", "addr": start, "len": 65536}))["hex"].as_str().unwrap().to_string();
    assert!(hex.chars().all(|c| c == '0'), "reserved region not zeroed");
}

fn apply_err(g: &Guest, m: &str, params: Value) -> String {
    let r = g.api(json!({"verb": "apply", "path": module(m), "params": params, "wait": true}));
    assert_eq!(r["ok"], json!(false), "{m} {params} was applied: {r}");
    r["error"].as_str().unwrap().to_string()
}

#[test]
fn a_kzalloc_built_patch_is_applied_and_its_exit_frees_it() {
    let snap = ready_snapshot(1);
    let mut g = Guest::restore("lc-kzalloc", &snap);
    g.wait_api();
    let orig = cmdline(&mut g);
    assert_eq!(g.sh("cat /proc/hp_target"), "original");
    klog(&mut g, "");
    let r = apply(&g, "hp_patch_kzalloc.ko", json!({}));
    assert_eq!(r["state"], json!("done"), "{r}");
    assert_eq!(cmdline(&mut g), PATCHED);
    assert_eq!(g.sh("cat /proc/hp_target"), "kzalloc");
    assert_eq!(klog(&mut g, "hp_patch_kzalloc:"), vec!["hp_patch_kzalloc: init built 2 objects"]);
    let l = g.api_ok(json!({"verb": "list"}));
    let funcs: Vec<&str> = l["patches"][0]["functions"].as_array().unwrap().iter().map(|f| f["old_name"].as_str().unwrap()).collect();
    assert_eq!(funcs, vec!["cmdline_proc_show", "hp_target_message"], "{l}");
    g.api_ok(json!({"verb": "disable", "name": "hp_patch_kzalloc", "wait": true}));
    assert_eq!(cmdline(&mut g), orig);
    assert_eq!(g.sh("cat /proc/hp_target"), "original");
    let r = g.api_ok(json!({"verb": "remove", "name": "hp_patch_kzalloc"}));
    assert_eq!(r["exit_ran"], json!(true), "{r}");
    assert_eq!(klog(&mut g, "hp_patch_kzalloc:"), vec!["hp_patch_kzalloc: exit freed the patch"]);
    region_is_zero(&g);
}

#[test]
fn parameters_are_set_as_insmod_sets_them_and_refused_as_it_refuses() {
    let snap = ready_snapshot(1);
    let mut g = Guest::restore("lc-params", &snap);
    g.wait_api();
    let orig = cmdline(&mut g);
    // Defaults.
    apply(&g, "hp_patch_params.ko", json!({}));
    assert_eq!(cmdline(&mut g), "hp_patch_params i=-1 u=1 l=-2 b=0 c=none s=empty");
    g.api_ok(json!({"verb": "disable", "name": "hp_patch_params", "wait": true}));
    g.api_ok(json!({"verb": "remove", "name": "hp_patch_params"}));
    // Every type.
    apply(&g, "hp_patch_params.ko", json!({"params": ["ival=-42", "uval=0x10", "lval=-9000000000", "bval", "cval=hello", "sval=abc"]}));
    assert_eq!(cmdline(&mut g), "hp_patch_params i=-42 u=16 l=-9000000000 b=1 c=hello s=abc");
    g.api_ok(json!({"verb": "disable", "name": "hp_patch_params", "wait": true}));
    g.api_ok(json!({"verb": "remove", "name": "hp_patch_params"}));
    klog(&mut g, "");
    // Refused as insmod refuses: nothing runs, nothing is left.
    let e = apply_err(&g, "hp_patch_params.ko", json!(["nosuch=1"]));
    assert!(e.contains("unknown parameter `nosuch'"), "{e}");
    let e = apply_err(&g, "hp_patch_params.ko", json!(["ival=abc"]));
    assert!(e.contains("`abc' invalid for parameter `ival'"), "{e}");
    let e = apply_err(&g, "hp_patch_params.ko", json!(["uval=-1"]));
    assert!(e.contains("invalid for parameter `uval'"), "{e}");
    let e = apply_err(&g, "hp_patch_params.ko", json!(["sval=toolongvalue"]));
    assert!(e.contains("too long"), "{e}");
    let e = apply_err(&g, "hp_patch_params.ko", json!(["bval=maybe"]));
    assert!(e.contains("invalid for parameter `bval'"), "{e}");
    assert!(klog(&mut g, "hp_patch_params:").is_empty(), "an init ran for a refused parameter");
    assert_eq!(cmdline(&mut g), orig);
    region_is_zero(&g);
}

#[test]
fn bad_inits_are_refused_with_the_guest_as_before() {
    let snap = ready_snapshot(1);
    let mut g = Guest::restore("lc-badinit", &snap);
    g.wait_api();
    let orig = cmdline(&mut g);
    let site = g.api_ok(json!({"verb": "ftrace", "function": "cmdline_proc_show"}))["bytes"].clone();
    klog(&mut g, "");
    // An init that fails with -ENODEV: no exit runs (as the kernel's loader).
    let e = apply_err(&g, "hp_patch_params.ko", json!(["mode=1"]));
    assert!(e.contains("init failed with -19 (ENODEV)"), "{e}");
    assert_eq!(klog(&mut g, "hp_patch_params:"), vec!["hp_patch_params: init mode=1"]);
    // An init that never calls klp_enable_patch: its exit runs.
    let e = apply_err(&g, "hp_patch_params.ko", json!(["mode=2"]));
    assert!(e.contains("without calling klp_enable_patch()"), "{e}");
    assert_eq!(klog(&mut g, "hp_patch_params:"), vec!["hp_patch_params: init mode=2", "hp_patch_params: exit"]);
    // An init that calls it twice: the second call gets -EBUSY, the load is refused.
    let e = apply_err(&g, "hp_patch_params.ko", json!(["mode=3"]));
    assert!(e.contains("klp_enable_patch() 2 times"), "{e}");
    assert_eq!(
        klog(&mut g, "hp_patch_params:"),
        vec!["hp_patch_params: init mode=3", "hp_patch_params: second klp_enable_patch() returned -16", "hp_patch_params: exit"]
    );
    assert_eq!(cmdline(&mut g), orig);
    assert_eq!(g.api_ok(json!({"verb": "ftrace", "function": "cmdline_proc_show"}))["bytes"], site);
    region_is_zero(&g);
    // And a good one works afterwards.
    apply(&g, "hp_patch_params.ko", json!({"params": ["ival=7"]}));
    assert_eq!(cmdline(&mut g), "hp_patch_params i=7 u=1 l=-2 b=0 c=none s=empty");
}
