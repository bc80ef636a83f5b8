//! Patching from outside on the real test guest: the kernel tree's livepatch
//! modules applied by hyperpatch without the guest loading them.

mod common;

use common::*;
use serde_json::json;


fn cmdline_orig(g: &mut Guest) -> String {
    g.sh("read l < /proc/cmdline; echo \"$l\"")
}

fn read_cmdline(g: &mut Guest) -> String {
    g.sh("read l < /proc/cmdline; echo \"$l\"")
}

fn read_meminfo_first(g: &mut Guest) -> String {
    g.sh("read l < /proc/meminfo; echo \"$l\"")
}

fn site_bytes(g: &Guest, func: &str) -> (u64, String) {
    let r = g.api_ok(json!({"verb": "ftrace", "function": func}));
    let bytes: Vec<String> = r["bytes"].as_array().unwrap().iter().map(|b| format!("{:02x}", b.as_u64().unwrap())).collect();
    (r["site"].as_u64().unwrap(), bytes.join(""))
}

/// Guest-physical bytes around a function (its first 64 bytes).
fn code_around(g: &Guest, func: &str) -> String {
    let (site, _) = site_bytes(g, func);
    let r = g.api_ok(json!({"verb": "sym", "query": func}));
    let _ = r;
    // Kernel text is mapped linearly from _text at its physical load address.
    let layout = g.api_ok(json!({"verb": "layout"}));
    let text = layout["text_base"].as_u64().unwrap();
    let phys = 0x100_0000 + (site - text);
    g.api_ok(json!({"verb": "read_memory", "addr": phys - 16, "len": 96}))["hex"].as_str().unwrap().to_string()
}


#[test]
fn sample_apply_disable_enable_remove_restores_every_byte() {
    let snap = ready_snapshot(1);
    let mut g = Guest::restore("patch-sample", &snap);
    g.wait_api();
    let orig = cmdline_orig(&mut g);
    assert!(orig.contains("console=ttyS0"), "{orig}");
    let before_site = site_bytes(&g, "cmdline_proc_show");
    assert_eq!(before_site.1, "0f1f440000");
    let before_code = code_around(&g, "cmdline_proc_show");

    let r = apply(&g, "livepatch-sample.ko", json!({}));
    assert_eq!(r["sites"], json!(1));
    assert_eq!(read_cmdline(&mut g), "this has been live patched");
    let (_, now) = site_bytes(&g, "cmdline_proc_show");
    assert!(now.starts_with("e9"), "site should be a jmp: {now}");
    let list = g.api_ok(json!({"verb": "list"}));
    assert_eq!(list["patches"][0]["name"], json!("livepatch_sample"));
    assert_eq!(list["patches"][0]["enabled"], json!(true));
    assert!(list["reserved_used"].as_u64().unwrap() > 0);

    g.api_ok(json!({"verb": "disable", "name": "livepatch_sample", "wait": true}));
    assert_eq!(read_cmdline(&mut g), orig);
    assert_eq!(site_bytes(&g, "cmdline_proc_show"), before_site);
    assert_eq!(code_around(&g, "cmdline_proc_show"), before_code);

    g.api_ok(json!({"verb": "enable", "name": "livepatch_sample", "wait": true}));
    assert_eq!(read_cmdline(&mut g), "this has been live patched");

    g.api_ok(json!({"verb": "disable", "name": "livepatch_sample", "wait": true}));
    let r = g.api_ok(json!({"verb": "remove", "name": "livepatch_sample"}));
    assert_eq!(r["reserved_used"], json!(0));
    let list = g.api_ok(json!({"verb": "list"}));
    assert_eq!(list["patches"], json!([]));
    assert_eq!(list["region_mapped"], json!(false));
    // The reserved region is all zeros again.
    let st = g.api_ok(json!({"verb": "status"}));
    let start = st["reserved_region"]["start"].as_u64().unwrap();
    let hex = g.api_ok(json!({"verb": "read_memory", "addr": start, "len": 65536}))["hex"].as_str().unwrap().to_string();
    assert!(hex.chars().all(|c| c == '0'), "reserved region not zeroed");
    assert_eq!(site_bytes(&g, "cmdline_proc_show"), before_site);
    assert_eq!(code_around(&g, "cmdline_proc_show"), before_code);
    assert_eq!(read_cmdline(&mut g), orig);
}

#[test]
fn func_stack_newest_enabled_wins_in_every_order() {
    let snap = ready_snapshot(1);
    let mut g = Guest::restore("patch-stack", &snap);
    g.wait_api();
    let orig = cmdline_orig(&mut g);
    let sample = "this has been live patched";
    let test = "test_klp_livepatch: this has been live patched";
    // Two patches of different functions: both apply.
    let mem_orig = read_meminfo_first(&mut g);
    apply(&g, "livepatch-sample.ko", json!({}));
    apply(&g, "test_klp_atomic_replace.ko", json!({"params": ["replace=0"]}));
    assert_eq!(read_cmdline(&mut g), sample);
    assert_eq!(read_meminfo_first(&mut g), "test_klp_atomic_replace: this has been live patched");
    g.api_ok(json!({"verb": "disable", "name": "test_klp_atomic_replace", "wait": true}));
    assert_eq!(read_meminfo_first(&mut g), mem_orig);
    assert_eq!(read_cmdline(&mut g), sample);
    g.api_ok(json!({"verb": "remove", "name": "test_klp_atomic_replace"}));

    // Two patches of the same function: the newest enabled wins.
    apply(&g, "test_klp_livepatch.ko", json!({}));
    assert_eq!(read_cmdline(&mut g), test);
    // Disable the older one: the newer still wins.
    g.api_ok(json!({"verb": "disable", "name": "livepatch_sample", "wait": true}));
    assert_eq!(read_cmdline(&mut g), test);
    // Disable the newer: nothing left.
    g.api_ok(json!({"verb": "disable", "name": "test_klp_livepatch", "wait": true}));
    assert_eq!(read_cmdline(&mut g), orig);
    // Enable the older: it wins.
    g.api_ok(json!({"verb": "enable", "name": "livepatch_sample", "wait": true}));
    assert_eq!(read_cmdline(&mut g), sample);
    // Enable the newer: it wins again.
    g.api_ok(json!({"verb": "enable", "name": "test_klp_livepatch", "wait": true}));
    assert_eq!(read_cmdline(&mut g), test);
    // Disable the newer: the older shows through.
    g.api_ok(json!({"verb": "disable", "name": "test_klp_livepatch", "wait": true}));
    assert_eq!(read_cmdline(&mut g), sample);
    g.api_ok(json!({"verb": "disable", "name": "livepatch_sample", "wait": true}));
    assert_eq!(read_cmdline(&mut g), orig);
    assert_eq!(site_bytes(&g, "cmdline_proc_show").1, "0f1f440000");
    g.api_ok(json!({"verb": "remove", "name": "livepatch_sample"}));
    g.api_ok(json!({"verb": "remove", "name": "test_klp_livepatch"}));
    assert_eq!(g.api_ok(json!({"verb": "list"}))["reserved_used"], json!(0));
}

#[test]
fn apply_works_with_guest_module_loading_disabled() {
    let snap = ready_snapshot(1);
    let mut g = Guest::restore("patch-nomod", &snap);
    g.wait_api();
    g.sh("echo 1 > /proc/sys/kernel/modules_disabled");
    assert_eq!(g.sh("read v < /proc/sys/kernel/modules_disabled; echo $v"), "1");
    apply(&g, "livepatch-sample.ko", json!({}));
    assert_eq!(read_cmdline(&mut g), "this has been live patched");
}

/// `bytes` with every occurrence of `from` replaced by `to` (the same
/// length); there must be one.
fn replace_all(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let mut out = bytes.to_vec();
    let at: Vec<usize> = bytes.windows(from.len()).enumerate().filter(|(_, w)| *w == from).map(|(i, _)| i).collect();
    assert!(!at.is_empty(), "{:?} is not in the module", String::from_utf8_lossy(from));
    for i in at {
        out[i..i + to.len()].copy_from_slice(to);
    }
    out
}

#[test]
fn bad_input_is_refused_and_leaves_the_guest_untouched() {
    let snap = ready_snapshot(1);
    let mut g = Guest::restore("patch-bad", &snap);
    g.wait_api();
    let st = g.api_ok(json!({"verb": "status"}));
    let start = st["reserved_region"]["start"].as_u64().unwrap();
    let before_site = site_bytes(&g, "cmdline_proc_show");
    let d = g.dir.clone();
    let err = |g: &Guest, path: &str| -> String {
        let r = g.api(json!({"verb": "apply", "path": path}));
        assert_eq!(r["ok"], json!(false), "{path} should be refused: {r}");
        r["error"].as_str().unwrap().to_string()
    };
    // Not an ELF.
    let junk = d.join("junk.ko");
    std::fs::write(&junk, b"not an elf file at all").unwrap();
    assert!(err(&g, junk.to_str().unwrap()).contains("not an ELF"));
    // An ELF that is not a livepatch module.
    assert!(err(&g, &module("livepatch-shadow-mod.ko")).contains("not a livepatch module"));
    assert!(err(&g, "/bin/true").contains("not a livepatch module"));
    // Truncated and corrupted modules.
    let good = std::fs::read(module("livepatch-sample.ko")).unwrap();
    for cut in [64usize, 1000, good.len() / 2] {
        let p = d.join(format!("cut{cut}.ko"));
        std::fs::write(&p, &good[..cut]).unwrap();
        let e = err(&g, p.to_str().unwrap());
        assert!(!e.is_empty());
    }
    // A module whose old function does not exist (another kernel): rename it.
    let mut other = good.clone();
    let pos = other.windows(17).position(|w| w == b"cmdline_proc_show").unwrap();
    other[pos..pos + 17].copy_from_slice(b"cmdline_proc_shoX");
    let p = d.join("other.ko");
    std::fs::write(&p, &other).unwrap();
    let e = err(&g, p.to_str().unwrap());
    assert!(e.contains("cmdline_proc_shoX"), "{e}");
    // A symbol the new code needs is missing: seq_printf renamed.
    let nosym = replace_all(&good, b"\0seq_printf\0", b"\0seq_printX\0");
    let p = d.join("nosym.ko");
    std::fs::write(&p, &nosym).unwrap();
    let e = err(&g, p.to_str().unwrap());
    assert!(e.contains("seq_printX"), "{e}");
    // A section the module loader processes and hyperpatch does not:
    // .exit.data renamed to __ex_table (the same length).
    let extable = replace_all(&good, b".exit.data\0", b"__ex_table\0");
    let p = d.join("extable.ko");
    std::fs::write(&p, &extable).unwrap();
    let e = err(&g, p.to_str().unwrap());
    assert!(e.contains("section __ex_table is not processed") && e.contains("exception-table"), "{e}");
    // A site the guest traces.
    g.sh("echo cmdline_proc_show > /sys/kernel/tracing/set_ftrace_filter; echo function > /sys/kernel/tracing/current_tracer");
    let e = err(&g, &module("livepatch-sample.ko"));
    assert!(e.contains("ftrace") || e.contains("not the ftrace NOP"), "{e}");
    g.sh("echo nop > /sys/kernel/tracing/current_tracer; echo > /sys/kernel/tracing/set_ftrace_filter");
    // Nothing was left behind.
    assert_eq!(site_bytes(&g, "cmdline_proc_show"), before_site);
    let hex = g.api_ok(json!({"verb": "read_memory", "addr": start, "len": 65536}))["hex"].as_str().unwrap().to_string();
    assert!(hex.chars().all(|c| c == '0'), "reserved region touched");
    assert_eq!(g.api_ok(json!({"verb": "list"}))["region_mapped"], json!(false));
    // And it still works afterwards.
    apply(&g, "livepatch-sample.ko", json!({}));
    assert_eq!(read_cmdline(&mut g), "this has been live patched");
}

#[test]
fn busy_guest_patched_and_unpatched_200_times() {
    let snap = ready_snapshot(1);
    let mut g = Guest::restore("patch-busy", &snap);
    g.wait_api();
    let orig = cmdline_orig(&mut g);
    // A loop of shell builtins reading the patched path, checking every read.
    g.send(&format!(
        "(n=0; bad=0; while [ -e /proc/self ]; do read l < /proc/cmdline; case \"$l\" in \"{orig}\"|\"this has been live patched\") ;; *) bad=$((bad+1)); echo \"BA\"\"D:$l\";; esac; n=$((n+1)); [ $((n % 50)) -eq 0 ] && echo reads=$n; done) &\n"
    ));
    g.wait_for("reads=50", CMD_TIMEOUT);
    apply(&g, "livepatch-sample.ko", json!({}));
    for i in 0..200 {
        let verb = if i % 2 == 0 { "disable" } else { "enable" };
        g.api_ok(json!({"verb": verb, "name": "livepatch_sample", "wait": true}));
    }
    let seen = g.console_len();
    g.wait_for_from("reads=", seen, CMD_TIMEOUT);
    g.send("kill %1\n");
    let text = g.console_text();
    let bad: Vec<&str> = text.lines().filter(|l| l.contains("BAD:")).collect();
    assert!(bad.is_empty(), "a read returned something else: {bad:?}");
    for bad in ["Oops", "BUG:", "general protection", "Kernel panic"] {
        assert!(!text.contains(bad), "guest reported {bad}:\n{}", g.tail(3000));
    }
    assert_eq!(g.sh("echo alive"), "alive");
}

#[test]
fn a_task_sleeping_in_a_changed_function_holds_the_switch_until_it_leaves() {
    let snap = ready_snapshot(1);
    let mut g = Guest::restore("patch-safepoint", &snap);
    g.wait_api();
    // A task sleeps inside hp_sleep_wait() (guest-images/modules/hp_target.c).
    g.send("cat /proc/hp_sleep &\n");
    let sleeper = wait_for_frame(&g, "frames", "hp_sleep_wait+");
    // The apply waits: the API says which task and frame hold it.
    let r = g.api_ok(json!({"verb": "apply", "path": module("hp_patch_sleep.ko"), "timeout_secs": 120, "per_task": false}));
    assert_eq!(r["state"], json!("waiting for a safe point"), "{r}");
    assert_eq!(r["blockers"][0]["pid"].as_i64(), Some(sleeper), "{r}");
    assert!(r["blockers"][0]["frame"].as_str().unwrap().starts_with("hp_sleep_wait"), "{r}");
    std::thread::sleep(std::time::Duration::from_secs(1));
    let l = g.api_ok(json!({"verb": "list"}));
    assert_eq!(l["pending"]["blockers"][0]["pid"].as_i64(), Some(sleeper), "{l}");
    assert_eq!(l["patches"], json!([]), "nothing may be switched while the task sleeps there");
    // Wake it: it leaves hp_sleep_wait and the switch completes.
    g.sh("echo 1 > /proc/hp_wake");
    let deadline = std::time::Instant::now() + CMD_TIMEOUT;
    loop {
        let l = g.api_ok(json!({"verb": "list"}));
        if l["pending"].is_null() {
            assert_eq!(l["last"]["ok"], json!(true), "{l}");
            assert_eq!(l["patches"][0]["name"], json!("hp_patch_sleep"));
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the switch never completed: {l}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // The new code runs: a read no longer sleeps.
    assert_eq!(g.sh("cat /proc/hp_sleep"), "woke 7 original");
    // --force switches at once even with a sleeper: disable with a new sleeper inside the new code is
    // not possible (the new code never sleeps), so force an apply over a fresh sleeper instead.
    g.api_ok(json!({"verb": "disable", "name": "hp_patch_sleep", "wait": true}));
    g.api_ok(json!({"verb": "remove", "name": "hp_patch_sleep"}));
    g.send("cat /proc/hp_sleep &\n");
    // The new sleeper is inside hp_sleep_wait (the first one left it above).
    wait_for_frame(&g, "frames", "hp_sleep_wait+");
    let r = g.api_ok(json!({"verb": "apply", "path": module("hp_patch_sleep.ko"), "force": true, "per_task": false}));
    assert_eq!(r["state"], json!("done"), "{r}");
    assert_eq!(r["forced"], json!(true), "{r}");
    let l = g.api_ok(json!({"verb": "list"}));
    assert_eq!(l["patches"][0]["forced"], json!(true));
    g.sh("echo 1 > /proc/hp_wake");
}

#[test]
fn module_functions_and_a_20_function_patch() {
    let snap = ready_snapshot(1);
    let mut g = Guest::restore("patch-module", &snap);
    g.wait_api();
    assert_eq!(g.sh("cat /proc/hp_target"), "original");
    assert_eq!(g.sh("cat /proc/hp_many"), "20");
    apply(&g, "hp_patch_target.ko", json!({}));
    apply(&g, "hp_patch_many.ko", json!({}));
    assert_eq!(g.sh("cat /proc/hp_target"), "patched");
    assert_eq!(g.sh("cat /proc/hp_many"), "40");
    let l = g.api_ok(json!({"verb": "list"}));
    assert_eq!(l["patches"][1]["functions"].as_array().unwrap().len(), 20);
    g.api_ok(json!({"verb": "disable", "name": "hp_patch_many", "wait": true}));
    assert_eq!(g.sh("cat /proc/hp_many"), "20");
    assert_eq!(g.sh("cat /proc/hp_target"), "patched");
}

#[test]
fn a_vcpu_running_in_a_changed_function_is_stepped_out() {
    // Two vCPUs: the patch module's init runs in a kworker on the one the
    // kernel loop leaves free (the test kernel does not preempt in-kernel).
    let snap = ready_snapshot(2);
    let mut g = Guest::restore("patch-stepout", &snap);
    g.wait_api();
    // The vCPU spends its time calling hp_bench_target() in a kernel loop.
    g.send("echo 3000000 > /proc/hp_bench &\n");
    // Wait until it is past the baseline loop and calls hp_bench_target().
    wait_for_frame(&g, "all_frames", "hp_bench_target+");
    // Each switching stop finds the vCPU inside the function or not; cycle
    // (at least 4 times, at most 40) until one did.
    let mut stepped = 0;
    for cycle in 0..40 {
        if cycle >= 4 && stepped > 0 {
            break;
        }
        let r = g.api_ok(json!({"verb": "apply", "path": module("hp_patch_target.ko"), "per_task": false, "wait": true}));
        assert_eq!(r["state"], json!("done"), "{r}");
        stepped += r["stepped_instructions"].as_u64().unwrap_or(0);
        let r = g.api_ok(json!({"verb": "disable", "name": "hp_patch_target", "per_task": false, "wait": true}));
        stepped += r["stepped_instructions"].as_u64().unwrap_or(0);
        g.api_ok(json!({"verb": "remove", "name": "hp_patch_target"}));
    }
    assert!(stepped > 0, "the vCPU was never found inside the changed function");
    let text = g.console_text();
    for bad in ["Oops", "BUG:", "general protection"] {
        assert!(!text.contains(bad), "{}", g.tail(2000));
    }
}

/// A patch applied while vCPU 0 runs user code. On a guest with page-table
/// isolation (the 6.12 line boots `pti=on`) that vCPU's CR3 is then the
/// user copy, which does not map the kernel's data: the patch must still
/// be read, placed and switched through the kernel's own tables. The guest
/// is driven there: a busy shell loop keeps vCPU 0 in user mode most of
/// the time, and apply/disable repeat (bounded) until the switching stop
/// found it in user mode.
#[test]
fn a_patch_applied_while_vcpu_0_runs_user_code() {
    let snap = ready_snapshot(1);
    let mut g = Guest::restore("patch-user-mode", &snap);
    g.wait_api();
    let orig = cmdline_orig(&mut g);
    // X86_FEATURE_PTI shows as "pti" in the cpuinfo flags (the meltdown
    // file says "Not affected" on a CPU without the bug, pti=on or not).
    let flags = g.sh("while read k v; do case $k in flags) echo \"$v\"; break;; esac; done < /proc/cpuinfo");
    let pti = flags.split_whitespace().any(|f| f == "pti");
    println!("{}: PTI {pti}", guest_line());
    if guest_line() == "6.12" {
        assert!(pti, "the 6.12 line boots pti=on, yet the cpuinfo flags are {flags:?}");
    }
    g.send("(while :; do :; done) &\n");
    let mut caught = None;
    for attempt in 1..=30 {
        let r = if attempt == 1 {
            apply(&g, "livepatch-sample.ko", json!({}))
        } else {
            g.api_ok(json!({"verb": "enable", "name": "livepatch_sample", "wait": true}))
        };
        let cpu0 = &r["vcpus_at_switch"][0];
        assert!(cpu0["user_mode"].is_boolean(), "no vCPU state in {r}");
        if cpu0["user_mode"] == json!(true) {
            caught = Some((attempt, r.clone()));
            break;
        }
        g.api_ok(json!({"verb": "disable", "name": "livepatch_sample", "wait": true}));
    }
    let (attempt, r) = caught.expect("vCPU 0 was in kernel mode at every one of 30 switches");
    let cr3 = r["vcpus_at_switch"][0]["cr3"].as_u64().unwrap();
    if pti {
        assert_ne!(cr3 & 0x1000, 0, "user mode under PTI runs on the user copy (bit 12 of CR3), CR3 {cr3:#x}");
    }
    assert_eq!(read_cmdline(&mut g), "this has been live patched", "switched at attempt {attempt}: {r}");
    g.send("kill %1\n");
    g.api_ok(json!({"verb": "disable", "name": "livepatch_sample", "wait": true}));
    assert_eq!(read_cmdline(&mut g), orig);
    let text = g.console_text();
    for bad in ["Oops", "BUG:", "WARNING:", "general protection", "Kernel panic"] {
        assert!(!text.contains(bad), "guest reported {bad}:\n{}", g.tail(3000));
    }
    println!("vCPU 0 in user mode (CR3 {cr3:#x}, PTI {pti}) at switch {attempt}");
}
