//! Guest stopped time per apply against the number of sleeping tasks, with
//! the stacks pre-scanned while the guest runs (the default) and without
//! (every stack unwound in the stop). One run; the sleepers are kernel
//! threads started by hp_target (`/proc/hp_spawn`), cheap to create here
//! where every fork costs seconds.
//!
//! The guest boots with 1.5 GiB (a 512 MiB guest's `threads-max`, memory
//! over 8 thread stacks, stops near 4,000 threads) and raises pid_max
//! (4096 under tinyconfig's BASE_SMALL).
//!
//! Also: livepatch-sample applied to 8 guests restored from one snapshot at
//! once (`hyperpatch apply --guest ...`), total wall time and each guest's
//! stopped time, against one guest.
//!
//! Run: `cargo bench --bench scale` (HP_SCALE_TASKS="0 1000 5000" to choose
//! the sleeper counts, reached one after the other in one guest).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn applies(g: &Guest, prescan: bool) -> (f64, Value) {
    let mut stops = Vec::new();
    let mut each = Vec::new();
    let mut last = Value::Null;
    for _ in 0..9 {
        let r = g.api_ok(json!({"verb": "apply", "path": module("livepatch-sample.ko"), "wait": true, "prescan": prescan}));
        stops.push(r["stopped_us"].as_f64().unwrap());
        each.push(json!({"us": r["stopped_us"].as_f64().unwrap().round(), "quiet": r["stacks"]["no_switch_since_prescan"], "retried": r["stacks"]["stops_retried"], "retaken": r["stacks"]["prescans_retaken"]}));
        last = json!({"each": each, "stacks": r["stacks"], "prep_stops_us": r["prep_stops_us"]});
        g.api_ok(json!({"verb": "disable", "name": "livepatch_sample", "wait": true}));
        g.api_ok(json!({"verb": "remove", "name": "livepatch_sample"}));
    }
    (median(stops), last)
}

/// A per-task transition (hp_patch_sleep) while 10 more kernel threads
/// sleep in hp_block_wait, which it changes: the first check's stop, the
/// median stop of the checks while the ten stay there, and the seconds from
/// their leaving to the transition's end.
fn transition(g: &mut Guest) -> (f64, f64, Value, f64) {
    g.sh("echo 'block 10' > /proc/hp_racer");
    wait_for_frames(g, "frames", "hp_block_wait+", 10);
    let r = g.api_ok(json!({"verb": "apply", "path": module("hp_patch_sleep.ko"), "per_task": true}));
    assert_eq!(r["state"], json!("per-task transition"), "{r}");
    let mut first = None;
    let mut checks = Vec::new();
    let mut last_attempt = 0;
    let mut stacks = Value::Null;
    let until = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < until {
        let l = g.api_ok(json!({"verb": "list"}));
        let p = &l["pending"];
        let attempt = p["attempts"].as_u64().unwrap_or(0);
        if attempt != last_attempt {
            if let Some(us) = p["last_stop"]["stopped_us"].as_f64() {
                if attempt == 1 {
                    first = Some(us);
                } else {
                    checks.push(us);
                    stacks = p["last_stop"]["stacks"].clone();
                }
            }
            last_attempt = attempt;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let t = std::time::Instant::now();
    g.sh("echo unblock > /proc/hp_racer");
    loop {
        let l = g.api_ok(json!({"verb": "list"}));
        if l["pending"].is_null() {
            assert_eq!(l["last"]["ok"], json!(true), "{l}");
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let done = t.elapsed().as_secs_f64();
    g.api_ok(json!({"verb": "disable", "name": "hp_patch_sleep", "wait": true}));
    g.api_ok(json!({"verb": "remove", "name": "hp_patch_sleep"}));
    (first.unwrap_or(f64::NAN), if checks.is_empty() { f64::NAN } else { median(checks) }, stacks, done)
}

/// `hyperpatch apply` of livepatch-sample to `n` fresh guests at once, their
/// VMMs sharing the kernel-table cache in `tables`: (wall seconds, each
/// guest's stopped us, each guest's table open us and where its tables came
/// from).
fn apply_to_guests(n: usize, tables: &std::path::Path, tag: &str) -> (f64, Vec<f64>, Vec<(f64, String)>) {
    let snap = ready_snapshot(1);
    let (s, t) = (snap.to_str().unwrap(), tables.to_str().unwrap());
    let guests: Vec<Guest> = (0..n).map(|i| Guest::start(&format!("bench-many-{tag}-{n}-{i}"), &["--restore", s, "--table-cache", t])).collect();
    for g in &guests {
        g.wait_api();
    }
    let mut cmd = std::process::Command::new(BIN);
    cmd.arg("--json").arg("apply").arg(module("livepatch-sample.ko"));
    for g in &guests {
        cmd.arg("--guest").arg(&g.api_sock);
    }
    let t = std::time::Instant::now();
    let out = cmd.output().expect("hyperpatch apply");
    let wall = t.elapsed().as_secs_f64();
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["failed"], json!(0), "{v}");
    let stops = v["guests"].as_array().unwrap().iter().map(|r| r["result"]["stopped_us"].as_f64().unwrap()).collect();
    let opens = guests
        .iter()
        .map(|g| {
            let kt = g.api_ok(json!({"verb": "list"}))["kernel_tables"].clone();
            (kt["open_us"].as_f64().unwrap_or(f64::NAN), format!("{}/{}", kt["kallsyms"].as_str().unwrap_or("?"), kt["btf"].as_str().unwrap_or("?")))
        })
        .collect();
    (wall, stops, opens)
}

fn main() {
    if std::env::var("HP_SCALE_ONLY_GUESTS").is_ok() {
        many_guests();
        return;
    }
    let counts: Vec<u64> = std::env::var("HP_SCALE_TASKS")
        .unwrap_or_else(|_| "0 1000 5000".into())
        .split_whitespace()
        .map(|s| s.parse().expect("HP_SCALE_TASKS: numbers"))
        .collect();
    let mut g = Guest::boot_test_image("bench-scale", 2, &["--mem", "1536"]);
    g.wait_for(READY, BOOT_TIMEOUT);
    g.wait_api();
    // tinyconfig's BASE_SMALL makes pid_max 4096: raise it (its limit is 32768).
    g.sh("echo 32768 > /proc/sys/kernel/pid_max");
    let mut rows = Vec::new();
    let mut spawned = 0;
    for n in counts {
        let mut left = n.saturating_sub(spawned);
        while left > 0 {
            let chunk = left.min(500);
            g.sh_timeout(&format!("echo {chunk} > /proc/hp_spawn"), Duration::from_secs(1800));
            left -= chunk;
        }
        spawned = spawned.max(n);
        assert_eq!(g.sh("cat /proc/hp_spawn"), spawned.to_string());
        let tasks = g.api_ok(json!({"verb": "ps"})).as_array().map(|a| a.len()).unwrap();
        let (with, st) = applies(&g, true);
        let (without, _) = applies(&g, false);
        println!(
            "{tasks} tasks: stopped per apply {with:.0} us with the pre-scan ({st}), {without:.0} us unwinding every stack in the stop (medians of 9)"
        );
        let (first, check, cst, done) = transition(&mut g);
        println!(
            "{tasks} tasks + 10 blocked: per-task transition, first check stopped {first:.0} us, later checks {check:.0} us (median; last {cst}), done {done:.2} s after they left"
        );
        rows.push((tasks, with, without));
    }
    drop(g);
    many_guests();
    if let Some((t0, w0, _)) = rows.first().copied() {
        for (t, w, wo) in &rows {
            println!("  {t} tasks vs {t0}: with pre-scan {:.2}x, without {:.2}x of the plain guest's {w0:.0} us", w / w0, wo / w0);
        }
    }
}

fn many_guests() {
    let tables = scratch("bench-many-tables").join("tables");
    let _ = std::fs::remove_dir_all(&tables);
    let show = |what: &str, (wall, stops, opens): (f64, Vec<f64>, Vec<(f64, String)>)| {
        println!(
            "{what}: {wall:.2} s wall; stopped {:?} us; kernel tables read in {:?} ms ({})",
            stops.iter().map(|s| s.round()).collect::<Vec<_>>(),
            opens.iter().map(|(us, _)| (us / 100.0).round() / 10.0).collect::<Vec<_>>(),
            opens.iter().map(|(_, o)| o.as_str()).collect::<Vec<_>>().join(" ")
        );
    };
    show("8 guests at once, empty table cache", apply_to_guests(8, &tables, "cold"));
    show("8 guests at once, table cache filled", apply_to_guests(8, &tables, "warm"));
    show("one guest, table cache filled", apply_to_guests(1, &tables, "one"));
}
