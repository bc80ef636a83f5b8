//! Snapshots of a patched guest keep hyperpatch's state: the restored VMM
//! knows the patches, func stacks, saved bytes, region and a running
//! per-task transition, and every patch verb works on them. Two guests
//! restored from one patched snapshot are patched independently. A
//! snapshot of another format version is refused before any guest code runs.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const PATCHED: &str = "this has been live patched";

fn cmdline(g: &mut Guest) -> String {
    g.sh("read l < /proc/cmdline; echo $l")
}

fn site_bytes(g: &Guest) -> Value {
    g.api_ok(json!({"verb": "ftrace", "function": "cmdline_proc_show"}))["bytes"].clone()
}

/// Polls `list` until no operation is pending; returns the last `list`.
fn wait_idle(g: &Guest) -> Value {
    let deadline = Instant::now() + CMD_TIMEOUT;
    loop {
        let l = g.api_ok(json!({"verb": "list"}));
        if l["pending"].is_null() {
            return l;
        }
        assert!(Instant::now() < deadline, "operation never ended: {l}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_patched_snapshot_restores_with_its_patches_and_every_verb_works() {
    let snap = ready_snapshot(1);
    let mut g = Guest::restore("snap-patched-src", &snap);
    g.wait_api();
    let original = cmdline(&mut g);
    assert_ne!(original, PATCHED);
    let before = site_bytes(&g);
    let r = apply(&g, "livepatch-sample.ko", json!({}));
    assert_eq!(r["state"], json!("done"), "{r}");
    assert_eq!(cmdline(&mut g), PATCHED);
    let patched_bytes = site_bytes(&g);
    let listed = g.api_ok(json!({"verb": "list"}));
    let mine = g.dir.join("patched");
    let r = g.api_ok(json!({"verb": "snapshot", "dir": mine}));
    assert_eq!(r["extension_state"], json!(true), "{r}");
    g.api_ok(json!({"verb": "shutdown"}));
    assert!(g.wait_exit(Duration::from_secs(30)).success());

    let mut a = Guest::restore("snap-patched-a", &mine);
    let mut b = Guest::restore("snap-patched-b", &mine);
    a.wait_api();
    b.wait_api();
    for x in [&mut a, &mut b] {
        assert_eq!(cmdline(x), PATCHED);
        let l = x.api_ok(json!({"verb": "list"}));
        assert_eq!(l["patches"], listed["patches"], "restored list differs");
        assert_eq!(l["reserved_used"], listed["reserved_used"]);
        assert_eq!(l["region_mapped"], json!(true));
    }
    // Disable in A brings back the original bytes and output; B keeps its patch.
    let r = a.api_ok(json!({"verb": "disable", "name": "livepatch_sample", "wait": true}));
    assert_eq!(r["state"], json!("done"), "{r}");
    assert_eq!(cmdline(&mut a), original);
    assert_eq!(site_bytes(&a), before);
    assert_eq!(cmdline(&mut b), PATCHED);
    assert_eq!(site_bytes(&b), patched_bytes);
    // enable, disable, remove, and a new apply in A.
    let r = a.api_ok(json!({"verb": "enable", "name": "livepatch_sample", "wait": true}));
    assert_eq!(r["state"], json!("done"), "{r}");
    assert_eq!(cmdline(&mut a), PATCHED);
    a.api_ok(json!({"verb": "disable", "name": "livepatch_sample", "wait": true}));
    let r = a.api_ok(json!({"verb": "remove", "name": "livepatch_sample"}));
    assert_eq!(r["reserved_used"], json!(0), "{r}");
    let l = a.api_ok(json!({"verb": "list"}));
    assert_eq!(l["patches"], json!([]));
    assert_eq!(l["region_mapped"], json!(false), "the region is unmapped when empty");
    assert_eq!(site_bytes(&a), before);
    let r = apply(&a, "livepatch-sample.ko", json!({}));
    assert_eq!(r["state"], json!("done"), "{r}");
    assert_eq!(cmdline(&mut a), PATCHED);
    // B, untouched by all that, disables its own copy.
    let r = b.api_ok(json!({"verb": "disable", "name": "livepatch_sample", "wait": true}));
    assert_eq!(r["state"], json!("done"), "{r}");
    assert_eq!(cmdline(&mut b), original);
    assert_eq!(site_bytes(&b), before);
    for x in [&a, &b] {
        assert!(!x.console_text().contains("Oops"), "{}", x.tail(3000));
    }
}

#[test]
fn a_per_task_transition_held_at_snapshot_time_completes_after_restore() {
    let snap = ready_snapshot(1);
    let mut g = Guest::restore("snap-pertask-src", &snap);
    g.wait_api();
    g.send("cat /proc/hp_sleep &\n");
    let sleeper = wait_for_frame(&g, "frames", "hp_sleep_wait+");
    let r = g.api_ok(json!({"verb": "apply", "path": module("hp_patch_sleep.ko")}));
    assert_eq!(r["state"], json!("per-task transition"), "{r}");
    let mine = g.dir.join("pertask");
    g.api_ok(json!({"verb": "snapshot", "dir": mine}));
    g.api_ok(json!({"verb": "shutdown"}));
    assert!(g.wait_exit(Duration::from_secs(30)).success());

    let mut r = Guest::restore("snap-pertask-restored", &mine);
    r.wait_api();
    let l = r.api_ok(json!({"verb": "list"}));
    assert_eq!(l["pending"]["state"], json!("per-task transition"), "{l}");
    assert_eq!(l["patches"][0]["transition"], json!(true), "{l}");
    // The sleeper is still held in the old code; new tasks get the new code.
    let l = wait_for_check(&r);
    assert_eq!(l["pending"]["blockers"][0]["pid"].as_i64(), Some(sleeper), "{l}");
    assert_eq!(r.sh("cat /proc/hp_sleep"), "woke 7 original");
    // It wakes in the old code and leaves: the transition completes here.
    let from = r.console_len();
    r.sh("echo 1 > /proc/hp_wake");
    r.wait_for_from("woke 0 original", from, CMD_TIMEOUT);
    let l = wait_idle(&r);
    assert_eq!(l["last"]["ok"], json!(true), "{l}");
    assert_eq!(l["patches"][0]["transition"], json!(false));
    let new_addr = l["patches"][0]["functions"][0]["new_addr"].as_u64().unwrap();
    let site = r.api_ok(json!({"verb": "ftrace", "function": "hp_sleep_wait"}));
    assert_eq!(site["insn"]["Jmp"]["target"].as_u64(), Some(new_addr), "{site}");
}

/// Waits until the restored transition has made a check (its blockers are known).
fn wait_for_check(g: &Guest) -> Value {
    let deadline = Instant::now() + CMD_TIMEOUT;
    loop {
        let l = g.api_ok(json!({"verb": "list"}));
        if l["pending"]["blockers"].as_array().is_some_and(|b| !b.is_empty()) {
            return l;
        }
        assert!(Instant::now() < deadline, "the restored transition never checked its tasks: {l}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A copy of snapshot `src` in `dst` whose memory file is a symlink (the
/// state files are rewritten by the tests).
fn copy_snapshot(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        if name == "memory.bin" {
            std::os::unix::fs::symlink(e.path(), dst.join(&name)).unwrap();
        } else {
            std::fs::copy(e.path(), dst.join(&name)).unwrap();
        }
    }
}

fn restore_fails(dir: &Path) -> String {
    let out = Command::new(BIN).args(["run", "--restore", dir.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success(), "restore of {} succeeded", dir.display());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.trim().lines().count(), 1, "one clear line: {err}");
    err
}

#[test]
fn snapshots_of_another_format_version_are_refused() {
    let snap = ready_snapshot(1);
    let base = scratch("snap-versions");
    // The VM's format.
    let old = base.join("old-format");
    copy_snapshot(&snap, &old);
    let state = old.join("state.json");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    v["version"] = json!(1);
    std::fs::write(&state, serde_json::to_vec(&v).unwrap()).unwrap();
    let err = restore_fails(&old);
    assert!(err.contains("format version 1") && err.contains(&format!("only version {}", vmm::snapshot::FORMAT_VERSION)), "{err}");
    // Not a snapshot at all.
    let junk = base.join("junk");
    copy_snapshot(&snap, &junk);
    std::fs::write(junk.join("state.json"), b"{\"hello\": 1}").unwrap();
    let err = restore_fails(&junk);
    assert!(err.contains("not a hyperpatch snapshot"), "{err}");
    // The patcher's state, of another version.
    let ext = base.join("ext-version");
    copy_snapshot(&snap, &ext);
    std::fs::write(ext.join("extension.json"), serde_json::to_vec(&json!({"version": 99, "patcher_version": 1})).unwrap()).unwrap();
    let err = restore_fails(&ext);
    assert!(err.contains("version 99/1"), "{err}");
}
