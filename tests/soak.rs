//! Soak: apply / replace / disable cycles under load on every vCPU, with the
//! guest checking its own output on every read. 200 cycles by default;
//! `HYPERPATCH_SOAK_CYCLES=2000` for the long run (see README).

mod common;

use common::*;
use serde_json::json;


#[test]
fn soak_apply_replace_disable_under_load_on_every_vcpu() {
    let cycles: usize = std::env::var("HYPERPATCH_SOAK_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let snap = ready_snapshot(2);
    let mut g = Guest::restore("soak", &snap);
    g.wait_api();
    let orig = g.sh("read l < /proc/cmdline; echo \"$l\"");
    let mem_orig = g.sh("read l < /proc/meminfo; echo \"$l\"");
    // One reader per vCPU, each checking every read of both patched files.
    for i in 0..2 {
        g.send(&format!(
            "(n=0; while [ -e /proc/self ]; do read l < /proc/cmdline; case \"$l\" in \"{orig}\"|\"this has been live patched\") ;; *) echo \"BA\"\"D{i}:$l\";; esac; read m < /proc/meminfo; case \"$m\" in \"{mem_orig}\"|\"test_klp_atomic_replace: this has been live patched\") ;; *) echo \"BA\"\"D{i}:$m\";; esac; n=$((n+1)); [ $((n % 200)) -eq 0 ] && echo r{i}=$n; done) &\n"
        ));
    }
    // The readers' first 200 rounds are guest work (emulated here): on a
    // loaded host they take minutes, so the bound is a cold boot's.
    g.wait_for("r0=200", BOOT_TIMEOUT);
    g.wait_for("r1=200", BOOT_TIMEOUT);
    let w = |v: serde_json::Value| {
        let mut v = v;
        v["wait"] = json!(true);
        v["timeout_secs"] = json!(120);
        v
    };
    for c in 0..cycles {
        g.api_ok(w(json!({"verb": "apply", "path": module("livepatch-sample.ko")})));
        g.api_ok(w(json!({"verb": "apply", "path": module("test_klp_atomic_replace.ko"), "params": ["replace=1"]})));
        let l = g.api_ok(json!({"verb": "list"}));
        assert_eq!(l["patches"].as_array().unwrap().len(), 1, "cycle {c}: {l}");
        g.api_ok(w(json!({"verb": "disable", "name": "test_klp_atomic_replace"})));
        g.api_ok(json!({"verb": "remove", "name": "test_klp_atomic_replace"}));
        let l = g.api_ok(json!({"verb": "list"}));
        assert_eq!(l["reserved_used"], json!(0), "cycle {c}: {l}");
        assert!(g.child.try_wait().unwrap().is_none(), "VMM died at cycle {c}");
    }
    let seen = g.console_len();
    g.wait_for_from("r0=", seen, CMD_TIMEOUT);
    g.wait_for_from("r1=", seen, CMD_TIMEOUT);
    let text = g.console_text();
    let bad: Vec<&str> = text.lines().filter(|l| l.contains("BAD")).collect();
    assert!(bad.is_empty(), "wrong output: {bad:?}");
    for oops in ["Oops", "BUG:", "general protection", "Kernel panic", "WARNING:"] {
        assert!(!text.contains(oops), "guest reported {oops}:\n{}", g.tail(3000));
    }
    let l = g.api_ok(json!({"verb": "list"}));
    assert_eq!(l["patches"], json!([]));
    // The guest-call routines go once no kworker is inside them: the last
    // remove may find one still returning from them, and a later idle tick
    // releases them.
    let deadline = std::time::Instant::now() + CMD_TIMEOUT;
    while g.api_ok(json!({"verb": "list"}))["region_mapped"] != json!(false) {
        assert!(std::time::Instant::now() < deadline, "the region stays mapped with nothing in it");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    eprintln!("soak: {cycles} cycles of apply / replace / disable / remove done");
}
