//! The kernel's own livepatch selftests (tools/testing/selftests/livepatch
//! of the linux-source package), ported to patches applied from outside:
//! every scenario of test-callbacks.sh, and the callback-free scenarios of
//! test-livepatch.sh and test-state.sh. Where the selftest runs
//! `modprobe LIVEPATCH`, `echo 0 > .../enabled` and `rmmod LIVEPATCH`,
//! hyperpatch runs apply, disable and remove; the target modules are loaded
//! and unloaded by the guest itself. The lines the test modules print
//! (callbacks, module init and exit) are compared in the selftests' exact
//! order; the kernel's own `livepatch:` lines are not printed (the guest's
//! livepatch core does not run).

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const LP: &str = "test_klp_callbacks_demo";
const LP2: &str = "test_klp_callbacks_demo2";
const TARGET: &str = "test_klp_callbacks_mod";
const BUSY: &str = "test_klp_callbacks_busy";

/// The module lines of the kernel log since the last call (and clears it).
fn klog(g: &mut Guest) -> Vec<String> {
    let out = g.sh("dmesg -c");
    out.lines()
        .map(|l| match l.find("] ") {
            Some(i) if l.starts_with('[') => l[i + 2..].to_string(),
            _ => l.to_string(),
        })
        .filter(|l| [LP, LP2, TARGET, BUSY, "test_klp_livepatch", "test_klp_state"].iter().any(|p| l.starts_with(&format!("{p}:")) || l.starts_with(&format!("{p}2:")) || l.starts_with(&format!("{p}3:"))))
        .collect()
}

fn guest(name: &str) -> Guest {
    let snap = ready_snapshot(1);
    let mut g = Guest::restore(name, &snap);
    g.wait_api();
    g.sh("dmesg -c > /dev/null");
    g
}

fn load_lp(g: &Guest, m: &str, params: &[&str]) -> Value {
    let r = g.api(json!({"verb": "apply", "path": module(&format!("{m}.ko")), "params": params, "wait": true}));
    assert_eq!(r["ok"], json!(true), "apply {m}: {r}");
    r["result"].clone()
}

fn disable_lp(g: &Guest, m: &str) {
    g.api_ok(json!({"verb": "disable", "name": m, "wait": true}));
}

fn unload_lp(g: &Guest, m: &str) {
    g.api_ok(json!({"verb": "remove", "name": m}));
}

fn load_mod(g: &mut Guest, m: &str, params: &str) {
    let out = g.sh(&format!("insmod /modules/{m}.ko {params}; echo rc=$?"));
    assert!(out.ends_with("rc=0"), "insmod {m}: {out}\n[VMM stderr] {}", g.stderr_text());
}

fn unload_mod(g: &mut Guest, m: &str) {
    let out = g.sh(&format!("rmmod {m}; echo rc=$?"));
    assert!(out.ends_with("rc=0"), "rmmod {m}: {out}");
}

fn check(g: &mut Guest, expected: &str, lp: &str) {
    let want: Vec<String> = expected.trim().lines().map(|l| l.trim().replace("$LP2", LP2).replace("$LP", lp).replace("$TARGET", TARGET).replace("$BUSY", BUSY)).collect();
    assert_eq!(klog(g), want);
    assert!(!g.console_text().contains("Oops"), "{}", g.tail(3000));
}

const LIVE: &str = "[MODULE_STATE_LIVE] Normal state";
const COMING: &str = "[MODULE_STATE_COMING] Full formed, running module_init";
const GOING: &str = "[MODULE_STATE_GOING] Going away";

fn s(t: &str) -> String {
    t.replace("{LIVE}", LIVE).replace("{COMING}", COMING).replace("{GOING}", GOING)
}

#[test]
fn callbacks_target_module_before_livepatch() {
    let mut g = guest("st-cb1");
    load_mod(&mut g, TARGET, "");
    load_lp(&g, LP, &[]);
    disable_lp(&g, LP);
    unload_lp(&g, LP);
    unload_mod(&mut g, TARGET);
    check(&mut g, &s("
        $TARGET: test_klp_callbacks_mod_init
        $LP: pre_patch_callback: vmlinux
        $LP: pre_patch_callback: $TARGET -> {LIVE}
        $LP: post_patch_callback: vmlinux
        $LP: post_patch_callback: $TARGET -> {LIVE}
        $LP: pre_unpatch_callback: vmlinux
        $LP: pre_unpatch_callback: $TARGET -> {LIVE}
        $LP: post_unpatch_callback: vmlinux
        $LP: post_unpatch_callback: $TARGET -> {LIVE}
        $TARGET: test_klp_callbacks_mod_exit"), LP);
}

#[test]
fn callbacks_module_coming_notifier() {
    let mut g = guest("st-cb2");
    load_lp(&g, LP, &[]);
    load_mod(&mut g, TARGET, "");
    disable_lp(&g, LP);
    unload_lp(&g, LP);
    unload_mod(&mut g, TARGET);
    check(&mut g, &s("
        $LP: pre_patch_callback: vmlinux
        $LP: post_patch_callback: vmlinux
        $LP: pre_patch_callback: $TARGET -> {COMING}
        $LP: post_patch_callback: $TARGET -> {COMING}
        $TARGET: test_klp_callbacks_mod_init
        $LP: pre_unpatch_callback: vmlinux
        $LP: pre_unpatch_callback: $TARGET -> {LIVE}
        $LP: post_unpatch_callback: vmlinux
        $LP: post_unpatch_callback: $TARGET -> {LIVE}
        $TARGET: test_klp_callbacks_mod_exit"), LP);
}

#[test]
fn callbacks_module_going_notifier() {
    let mut g = guest("st-cb3");
    load_mod(&mut g, TARGET, "");
    load_lp(&g, LP, &[]);
    unload_mod(&mut g, TARGET);
    disable_lp(&g, LP);
    unload_lp(&g, LP);
    check(&mut g, &s("
        $TARGET: test_klp_callbacks_mod_init
        $LP: pre_patch_callback: vmlinux
        $LP: pre_patch_callback: $TARGET -> {LIVE}
        $LP: post_patch_callback: vmlinux
        $LP: post_patch_callback: $TARGET -> {LIVE}
        $TARGET: test_klp_callbacks_mod_exit
        $LP: pre_unpatch_callback: $TARGET -> {GOING}
        $LP: post_unpatch_callback: $TARGET -> {GOING}
        $LP: pre_unpatch_callback: vmlinux
        $LP: post_unpatch_callback: vmlinux"), LP);
}

#[test]
fn callbacks_module_coming_and_going_notifiers() {
    let mut g = guest("st-cb4");
    load_lp(&g, LP, &[]);
    load_mod(&mut g, TARGET, "");
    unload_mod(&mut g, TARGET);
    disable_lp(&g, LP);
    unload_lp(&g, LP);
    check(&mut g, &s("
        $LP: pre_patch_callback: vmlinux
        $LP: post_patch_callback: vmlinux
        $LP: pre_patch_callback: $TARGET -> {COMING}
        $LP: post_patch_callback: $TARGET -> {COMING}
        $TARGET: test_klp_callbacks_mod_init
        $TARGET: test_klp_callbacks_mod_exit
        $LP: pre_unpatch_callback: $TARGET -> {GOING}
        $LP: post_unpatch_callback: $TARGET -> {GOING}
        $LP: pre_unpatch_callback: vmlinux
        $LP: post_unpatch_callback: vmlinux"), LP);
}

#[test]
fn callbacks_target_module_not_present() {
    let mut g = guest("st-cb5");
    load_lp(&g, LP, &[]);
    disable_lp(&g, LP);
    unload_lp(&g, LP);
    check(&mut g, "
        $LP: pre_patch_callback: vmlinux
        $LP: post_patch_callback: vmlinux
        $LP: pre_unpatch_callback: vmlinux
        $LP: post_unpatch_callback: vmlinux", LP);
}

#[test]
fn callbacks_pre_patch_enodev() {
    let mut g = guest("st-cb6");
    let before = g.api_ok(json!({"verb": "list"}));
    load_mod(&mut g, TARGET, "");
    let r = g.api(json!({"verb": "apply", "path": module(&format!("{LP}.ko")), "params": ["pre_patch_ret=-19"], "wait": true}));
    assert_eq!(r["ok"], json!(false), "{r}");
    let e = r["error"].as_str().unwrap();
    assert!(e.contains("pre-patch callback failed for object 'vmlinux' with -19 (ENODEV)") && e.contains("init failed with -19"), "{e}");
    unload_mod(&mut g, TARGET);
    check(&mut g, "
        $TARGET: test_klp_callbacks_mod_init
        $LP: pre_patch_callback: vmlinux
        $TARGET: test_klp_callbacks_mod_exit", LP);
    // Nothing is left: the patch list and the region are as before.
    let after = g.api_ok(json!({"verb": "list"}));
    assert_eq!(after["patches"], before["patches"]);
    assert_eq!(after["reserved_used"], json!(0));
    assert_eq!(after["region_mapped"], json!(false));
}

#[test]
fn callbacks_module_coming_pre_patch_enodev() {
    let mut g = guest("st-cb7");
    load_lp(&g, LP, &[]);
    g.api_ok(json!({"verb": "set_param", "name": LP, "param": "pre_patch_ret=-19"}));
    let out = g.sh(&format!("insmod /modules/{TARGET}.ko; echo rc=$?"));
    assert!(out.contains("No such device") && !out.ends_with("rc=0"), "the load must fail with ENODEV: {out}\n[VMM stderr] {}", g.stderr_text());
    disable_lp(&g, LP);
    unload_lp(&g, LP);
    // busybox's insmod tries a failed finit_module() again with
    // init_module() (kmod's modprobe in the selftest does not): the load,
    // and its pre-patch callback, come twice.
    check(&mut g, &s("
        $LP: pre_patch_callback: vmlinux
        $LP: post_patch_callback: vmlinux
        $LP: pre_patch_callback: $TARGET -> {COMING}
        $LP: pre_patch_callback: $TARGET -> {COMING}
        $LP: pre_unpatch_callback: vmlinux
        $LP: post_unpatch_callback: vmlinux"), LP);
}

#[test]
fn callbacks_multiple_target_modules() {
    let mut g = guest("st-cb8");
    load_mod(&mut g, BUSY, "block_transition=N");
    load_lp(&g, LP, &[]);
    load_mod(&mut g, TARGET, "");
    unload_mod(&mut g, TARGET);
    disable_lp(&g, LP);
    unload_lp(&g, LP);
    unload_mod(&mut g, BUSY);
    check(&mut g, &s("
        $BUSY: test_klp_callbacks_busy_init
        $BUSY: busymod_work_func enter
        $BUSY: busymod_work_func exit
        $LP: pre_patch_callback: vmlinux
        $LP: pre_patch_callback: $BUSY -> {LIVE}
        $LP: post_patch_callback: vmlinux
        $LP: post_patch_callback: $BUSY -> {LIVE}
        $LP: pre_patch_callback: $TARGET -> {COMING}
        $LP: post_patch_callback: $TARGET -> {COMING}
        $TARGET: test_klp_callbacks_mod_init
        $TARGET: test_klp_callbacks_mod_exit
        $LP: pre_unpatch_callback: $TARGET -> {GOING}
        $LP: post_unpatch_callback: $TARGET -> {GOING}
        $LP: pre_unpatch_callback: vmlinux
        $LP: pre_unpatch_callback: $BUSY -> {LIVE}
        $LP: post_unpatch_callback: vmlinux
        $LP: post_unpatch_callback: $BUSY -> {LIVE}
        $BUSY: test_klp_callbacks_busy_exit"), LP);
}

#[test]
fn callbacks_busy_target_module() {
    let mut g = guest("st-cb9");
    load_mod(&mut g, BUSY, "block_transition=Y");
    // The busy module's work sleeps in the function the patch changes.
    let r = g.api_ok(json!({"verb": "apply", "path": module(&format!("{LP}.ko"))}));
    assert_eq!(r["state"], json!("per-task transition"), "the transition must stall: {r}");
    load_mod(&mut g, TARGET, "");
    unload_mod(&mut g, TARGET);
    // Disabling a patch in transition reverses it.
    g.api_ok(json!({"verb": "disable", "name": LP}));
    let deadline = Instant::now() + CMD_TIMEOUT;
    loop {
        let l = g.api_ok(json!({"verb": "list"}));
        if l["pending"].is_null() {
            assert_eq!(l["last"]["ok"], json!(true), "{l}");
            assert_eq!(l["patches"], json!([]), "{l}");
            break;
        }
        assert!(Instant::now() < deadline, "the reversal never completed: {l}");
        std::thread::sleep(Duration::from_millis(100));
    }
    unload_mod(&mut g, BUSY);
    check(&mut g, &s("
        $BUSY: test_klp_callbacks_busy_init
        $BUSY: busymod_work_func enter
        $LP: pre_patch_callback: vmlinux
        $LP: pre_patch_callback: $BUSY -> {LIVE}
        $LP: pre_patch_callback: $TARGET -> {COMING}
        $TARGET: test_klp_callbacks_mod_init
        $TARGET: test_klp_callbacks_mod_exit
        $LP: post_unpatch_callback: $TARGET -> {GOING}
        $LP: post_unpatch_callback: vmlinux
        $LP: post_unpatch_callback: $BUSY -> {LIVE}
        $BUSY: busymod_work_func exit
        $BUSY: test_klp_callbacks_busy_exit"), LP);
}

#[test]
fn callbacks_multiple_livepatches() {
    let mut g = guest("st-cb10");
    load_lp(&g, LP, &[]);
    load_lp(&g, LP2, &[]);
    disable_lp(&g, LP2);
    disable_lp(&g, LP);
    unload_lp(&g, LP2);
    unload_lp(&g, LP);
    check(&mut g, "
        $LP: pre_patch_callback: vmlinux
        $LP: post_patch_callback: vmlinux
        $LP2: pre_patch_callback: vmlinux
        $LP2: post_patch_callback: vmlinux
        $LP2: pre_unpatch_callback: vmlinux
        $LP2: post_unpatch_callback: vmlinux
        $LP: pre_unpatch_callback: vmlinux
        $LP: post_unpatch_callback: vmlinux", LP);
}

#[test]
fn callbacks_atomic_replace() {
    let mut g = guest("st-cb11");
    load_lp(&g, LP, &[]);
    load_lp(&g, LP2, &["replace=1"]);
    disable_lp(&g, LP2);
    unload_lp(&g, LP2);
    // The replaced patch left the stack when the replacement completed.
    let l = g.api_ok(json!({"verb": "list"}));
    assert_eq!(l["patches"], json!([]), "{l}");
    check(&mut g, "
        $LP: pre_patch_callback: vmlinux
        $LP: post_patch_callback: vmlinux
        $LP2: pre_patch_callback: vmlinux
        $LP2: post_patch_callback: vmlinux
        $LP2: pre_unpatch_callback: vmlinux
        $LP2: post_unpatch_callback: vmlinux", LP);
}

/// Every kernel log line since the last call (timestamps cut), and clears it.
fn klog_all(g: &mut Guest) -> Vec<String> {
    g.sh("dmesg -c")
        .lines()
        .map(|l| match l.find("] ") {
            Some(i) if l.starts_with('[') => l[i + 2..].to_string(),
            _ => l.to_string(),
        })
        .collect()
}

/// The patched lines of /proc/cmdline and /proc/meminfo (the selftest's
/// `grep 'live patched'`), with shell builtins only.
fn live_patched(g: &mut Guest) -> Vec<String> {
    let out = g.sh("for f in /proc/cmdline /proc/meminfo; do while read -r l; do case \"$l\" in *'live patched'*) echo \"$l\";; esac; done < $f; done");
    out.lines().map(str::to_string).filter(|l| !l.is_empty()).collect()
}

#[test]
fn livepatch_basic_function_patching() {
    let mut g = guest("st-lp1");
    load_lp(&g, "test_klp_livepatch", &[]);
    assert_eq!(live_patched(&mut g), vec!["test_klp_livepatch: this has been live patched"]);
    disable_lp(&g, "test_klp_livepatch");
    unload_lp(&g, "test_klp_livepatch");
    assert!(live_patched(&mut g).is_empty());
}

#[test]
fn livepatch_multiple_livepatches() {
    let mut g = guest("st-lp2");
    load_lp(&g, "test_klp_livepatch", &[]);
    assert_eq!(live_patched(&mut g), vec!["test_klp_livepatch: this has been live patched"]);
    load_lp(&g, "test_klp_atomic_replace", &["replace=0"]);
    assert_eq!(
        live_patched(&mut g),
        vec!["test_klp_livepatch: this has been live patched", "test_klp_atomic_replace: this has been live patched"]
    );
    disable_lp(&g, "test_klp_atomic_replace");
    unload_lp(&g, "test_klp_atomic_replace");
    assert_eq!(live_patched(&mut g), vec!["test_klp_livepatch: this has been live patched"]);
    disable_lp(&g, "test_klp_livepatch");
    unload_lp(&g, "test_klp_livepatch");
    assert!(live_patched(&mut g).is_empty());
}

#[test]
fn livepatch_atomic_replace() {
    let mut g = guest("st-lp3");
    load_lp(&g, "test_klp_livepatch", &[]);
    assert_eq!(live_patched(&mut g), vec!["test_klp_livepatch: this has been live patched"]);
    load_lp(&g, "test_klp_atomic_replace", &["replace=1"]);
    assert_eq!(live_patched(&mut g), vec!["test_klp_atomic_replace: this has been live patched"]);
    // The selftest's `rmmod test_klp_livepatch`: the replaced patch left
    // the stack and its module was unloaded (exit run, memory freed) when
    // the replacement completed.
    let l = g.api_ok(json!({"verb": "list"}));
    let names: Vec<&str> = l["patches"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["test_klp_atomic_replace"]);
    assert_eq!(live_patched(&mut g), vec!["test_klp_atomic_replace: this has been live patched"]);
    disable_lp(&g, "test_klp_atomic_replace");
    unload_lp(&g, "test_klp_atomic_replace");
    assert!(live_patched(&mut g).is_empty());
}

/// The `check_result "..."` block of a selftest script in the installed
/// linux-source package (what the test compares against, never copied).
fn selftest_expectation(script: &str, vars: &[(&str, &str)]) -> Vec<String> {
    selftest_expectations(script, vars).into_iter().next().expect("one check_result")
}

/// Every `check_result "..."` block of the script, in order.
fn selftest_expectations(script: &str, vars: &[(&str, &str)]) -> Vec<Vec<String>> {
    // The scripts of the guest's own kernel line (6.1's and 6.12's differ).
    let tar = std::path::PathBuf::from(format!("/usr/src/linux-source-{}.tar.xz", common::guest_line()));
    assert!(tar.exists(), "{} (installed by guest-images/build)", tar.display());
    let out = std::process::Command::new("tar")
        .args(["-xOJf", tar.to_str().unwrap(), "--wildcards", &format!("*/tools/testing/selftests/livepatch/{script}")])
        .output()
        .unwrap();
    assert!(out.status.success(), "tar: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut blocks = Vec::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("check_result \"") {
        let body = &rest[i + "check_result \"".len()..];
        let end = body.find('"').expect("a closed check_result");
        blocks.push(
            body[..end]
                .lines()
                // What the shell prints is not dmesg: 6.1's script loads with
                // modprobe, 6.12's with insmod, and each reports a refused
                // load (the tests check hyperpatch's refusal themselves).
                .filter(|l| !l.starts_with("% ") && !l.starts_with("livepatch:") && !l.starts_with("modprobe:") && !l.starts_with("insmod:"))
                .map(|l| vars.iter().fold(l.to_string(), |acc, (k, v)| acc.replace(k, v)))
                .collect(),
        );
        rest = &body[end + 1..];
    }
    assert!(!blocks.is_empty(), "no check_result in {script}");
    blocks
}

#[test]
fn shadow_vars_basic_api() {
    // test-shadow-vars.sh: the guest loads and unloads the plain test module.
    let mut g = guest("st-shadow");
    load_mod(&mut g, "test_klp_shadow_vars", "");
    unload_mod(&mut g, "test_klp_shadow_vars");
    let got: Vec<String> = klog_all(&mut g).into_iter().filter(|l| l.starts_with("test_klp_shadow_vars:")).collect();
    assert_eq!(got, selftest_expectation("test-shadow-vars.sh", &[("$MOD_TEST", "test_klp_shadow_vars")]));
}

/// Waits until the kernel log has a line containing `pat`; returns the log
/// read so far.
fn wait_klog(g: &mut Guest, pat: &str, seen: &mut Vec<String>) {
    let deadline = Instant::now() + CMD_TIMEOUT;
    loop {
        seen.extend(klog_all(g));
        if seen.iter().any(|l| l.contains(pat)) {
            return;
        }
        assert!(Instant::now() < deadline, "no {pat:?} in the kernel log: {seen:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn shadow_fix1_applied_before_its_module_loads_patches_every_load() {
    let mut g = guest("st-fix1");
    // The patch names livepatch_shadow_mod, which is not loaded: accepted.
    let r = load_lp(&g, "livepatch-shadow-fix1", &[]);
    assert_eq!(r["state"], json!("done"), "{r}");
    let l = g.api_ok(json!({"verb": "list"}));
    assert_eq!(l["patches"][0]["functions"], json!([]), "nothing to patch yet: {l}");
    for round in 0..2 {
        let mut seen = Vec::new();
        load_mod(&mut g, "livepatch-shadow-mod", "");
        // Patched before its init ran: its allocations are the fix's.
        let l = g.api_ok(json!({"verb": "list"}));
        let funcs: Vec<&str> = l["patches"][0]["functions"].as_array().unwrap().iter().map(|f| f["old_name"].as_str().unwrap()).collect();
        assert_eq!(funcs, vec!["dummy_alloc", "dummy_free"], "round {round}: {l}");
        wait_klog(&mut g, "livepatch_fix1_dummy_alloc: dummy @", &mut seen);
        assert!(!seen.iter().any(|l| l.starts_with("dummy_alloc:")), "the original ran: {seen:?}");
        // Unloading frees the dummies through the fixed free (no leak), and
        // the patch leaves the module before its text goes.
        unload_mod(&mut g, "livepatch_shadow_mod");
        seen.extend(klog_all(&mut g));
        assert!(seen.iter().any(|l| l.contains("livepatch_fix1_dummy_leak_dtor: dummy @") && l.contains("prevented leak")), "{seen:?}");
        let l = g.api_ok(json!({"verb": "list"}));
        assert_eq!(l["patches"][0]["functions"], json!([]), "round {round}: {l}");
    }
    disable_lp(&g, "livepatch_shadow_fix1");
    let r = g.api_ok(json!({"verb": "remove", "name": "livepatch_shadow_fix1"}));
    assert_eq!(r["exit_ran"], json!(true), "{r}");
    assert!(!g.console_text().contains("Oops"), "{}", g.tail(3000));
}

const STATE_VARS: &[(&str, &str)] =
    &[("$MOD_LIVEPATCH3", "test_klp_state3"), ("$MOD_LIVEPATCH2", "test_klp_state2"), ("$MOD_LIVEPATCH", "test_klp_state")];

fn state_lines(g: &mut Guest) -> Vec<String> {
    klog_all(g).into_iter().filter(|l| l.starts_with("test_klp_state")).collect()
}

/// test-state.sh, every scenario. Where the selftest rmmods a module whose
/// patch was replaced, hyperpatch has nothing left to do: the replaced
/// patch left the stack and its module's exit ran when the replacement
/// completed (its exit prints nothing).
#[test]
fn state_scenarios() {
    let want = selftest_expectations("test-state.sh", STATE_VARS);
    assert_eq!(want.len(), 4, "test-state.sh has 4 scenarios");
    // system state modification
    let mut g = guest("st-state1");
    load_lp(&g, "test_klp_state", &[]);
    disable_lp(&g, "test_klp_state");
    unload_lp(&g, "test_klp_state");
    assert_eq!(state_lines(&mut g), want[0], "system state modification");
    // taking over system state modification
    let mut g = guest("st-state2");
    load_lp(&g, "test_klp_state", &[]);
    load_lp(&g, "test_klp_state2", &[]);
    disable_lp(&g, "test_klp_state2");
    unload_lp(&g, "test_klp_state2");
    assert_eq!(state_lines(&mut g), want[1], "taking over system state modification");
    // compatible cumulative livepatches
    let mut g = guest("st-state3");
    load_lp(&g, "test_klp_state2", &[]);
    load_lp(&g, "test_klp_state3", &[]);
    load_lp(&g, "test_klp_state2", &[]);
    disable_lp(&g, "test_klp_state2");
    unload_lp(&g, "test_klp_state2");
    assert_eq!(state_lines(&mut g), want[2], "compatible cumulative livepatches");
    // incompatible cumulative livepatches
    let mut g = guest("st-state4");
    load_lp(&g, "test_klp_state2", &[]);
    let r = g.api(json!({"verb": "apply", "path": module("test_klp_state.ko"), "wait": true}));
    assert_eq!(r["ok"], json!(false), "a lower state version must be refused: {r}");
    disable_lp(&g, "test_klp_state2");
    unload_lp(&g, "test_klp_state2");
    assert_eq!(state_lines(&mut g), want[3], "incompatible cumulative livepatches");
}
