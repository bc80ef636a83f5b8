//! End-to-end tests of the VMM on the real test guest: boot (PVH vmlinux,
//! bzImage, 1 and 2 vCPUs), console, reboot, pause/resume, snapshot and
//! restore, guest memory access, and bad input.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::json;

fn run_fail(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(!out.status.success(), "expected failure for {args:?}");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.trim().lines().count(), 1, "want one clear line, got: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn bad_input_gives_one_clear_line() {
    let img = image_dir();
    let vmlinux = img.join("vmlinux");
    let initrd = img.join("initramfs.cpio");
    let d = scratch("badinput");
    let e = run_fail(&["run", "--kernel", "/nonexistent/vmlinux"]);
    assert!(e.contains("/nonexistent/vmlinux") && e.contains("does not exist"), "{e}");
    let e = run_fail(&["run", "--kernel", vmlinux.to_str().unwrap(), "--initrd", "/nonexistent/initrd"]);
    assert!(e.contains("/nonexistent/initrd"), "{e}");
    let junk = d.join("junk");
    std::fs::write(&junk, vec![0x5au8; 8192]).unwrap();
    let e = run_fail(&["run", "--kernel", junk.to_str().unwrap()]);
    assert!(e.contains("neither an ELF vmlinux nor a bzImage"), "{e}");
    let e = run_fail(&["run", "--kernel", vmlinux.to_str().unwrap(), "--vcpus", "0"]);
    assert!(e.contains("--vcpus"), "{e}");
    let e = run_fail(&["run", "--kernel", vmlinux.to_str().unwrap(), "--vcpus", "300"]);
    assert!(e.contains("--vcpus"), "{e}");
    let big = d.join("big-initrd");
    std::fs::File::create(&big).unwrap().set_len(64 << 20).unwrap();
    let e = run_fail(&[
        "run",
        "--kernel",
        vmlinux.to_str().unwrap(),
        "--initrd",
        big.to_str().unwrap(),
        "--mem",
        "48",
    ]);
    assert!(e.contains("memory too small"), "{e}");
    let e = run_fail(&["run", "--kernel", vmlinux.to_str().unwrap(), "--mem", "4"]);
    assert!(e.contains("--mem"), "{e}");
    let e = run_fail(&["run", "--kernel", vmlinux.to_str().unwrap(), "--initrd", initrd.to_str().unwrap(), "--mem", "999999999"]);
    assert!(e.contains("--mem"), "{e}");
    let e = run_fail(&["--api-sock", d.join("none.sock").to_str().unwrap(), "status"]);
    assert!(e.contains("connecting"), "{e}");
    let e = run_fail(&["run", "--restore", d.to_str().unwrap()]);
    assert!(e.contains("state.json"), "{e}");
}

#[test]
fn one_vcpu_boots_counts_cpus_and_reboots_cleanly() {
    let snap = ready_snapshot(1);
    let mut g = Guest::restore("onevcpu", &snap);
    assert_eq!(g.sh("grep -c ^processor /proc/cpuinfo"), "1");
    g.send("reboot -f\n");
    let st = g.wait_exit(CMD_TIMEOUT);
    assert!(st.success(), "reboot -f should end the VMM with 0, got {st}; console:\n{}", g.tail(2000));
}

#[test]
fn two_vcpus_boot_and_both_are_online() {
    let snap = ready_snapshot(2);
    let mut g = Guest::restore("twovcpu", &snap);
    assert_eq!(g.sh("grep -c ^processor /proc/cpuinfo"), "2");
    g.wait_api();
    assert_eq!(g.api_ok(json!({"verb": "status"}))["vcpus"], json!(2));
    g.send("reboot -f\n");
    assert!(g.wait_exit(CMD_TIMEOUT).success());
}

#[test]
fn bzimage_boots_with_kaslr() {
    let img = image_dir();
    let cmd = std::fs::read_to_string(img.join("cmdline")).unwrap_or_default();
    let mut g = Guest::start(
        "bzimage",
        &[
            "--kernel",
            img.join("bzImage").to_str().unwrap(),
            "--initrd",
            img.join("initramfs.cpio").to_str().unwrap(),
            "--cmdline",
            cmd.trim(),
        ],
    );
    g.wait_for(READY, BOOT_TIMEOUT);
    assert_eq!(g.sh("echo bz-$((2+3))"), "bz-5");
    g.send("reboot -f\n");
    assert!(g.wait_exit(CMD_TIMEOUT).success());
}

/// The last counter value on a complete console line (the line still being
/// printed may show a prefix of its number).
fn last_tick(text: &str) -> u64 {
    let complete = text.rfind('\n').map_or("", |i| &text[..i]);
    complete
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("tick").and_then(|n| n.trim().parse::<u64>().ok()))
        .unwrap_or(0)
}

#[test]
fn pause_resume_100_times_under_a_printing_loop() {
    let snap = ready_snapshot(1);
    let mut g = Guest::restore("pauseloop", &snap);
    g.wait_api();
    g.sh("echo start");
    g.send("(i=0; while [ $i -lt 1000000 ]; do i=$((i+1)); echo tick$i; done) &\n");
    g.wait_for("tick30", CMD_TIMEOUT);
    let before = last_tick(&g.console_text());
    for i in 0..100 {
        let r = g.api_ok(json!({"verb": "pause"}));
        assert_eq!(r["state"], json!("paused"));
        // Every console byte is written on the vCPU thread before its exit
        // returns, so once paused the VMM's count is final; bytes already in
        // the pipe may still be on their way to our reader.
        let written = r["console_bytes"].as_u64().expect("pause reply has console_bytes");
        g.wait_console_bytes(written, Duration::from_secs(10));
        // Nothing more arrives while paused, and the VMM writes nothing more.
        std::thread::sleep(Duration::from_millis(10));
        assert_eq!(g.console_len() as u64, written, "console output while paused (pause {i})");
        let st = g.api_ok(json!({"verb": "status"}));
        assert_eq!(st["state"], json!("paused"), "{st}");
        assert_eq!(st["console_bytes"].as_u64(), Some(written), "the VMM wrote console bytes while paused (pause {i})");
        assert_eq!(g.console_len() as u64, written, "console output while paused (pause {i})");
        let r = g.api_ok(json!({"verb": "resume"}));
        assert_eq!(r["state"], json!("running"));
        // Running again, the loop prints again (so every pause above stops a
        // guest that is printing).
        std::thread::sleep(Duration::from_millis(20));
        g.wait_for_console_len((written + 1) as usize, CMD_TIMEOUT);
    }
    let after = last_tick(&g.console_text());
    assert!(after > before, "counter did not rise: {before} -> {after}");
    g.send("kill %1\n");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(g.sh("echo alive-$((1+1))"), "alive-2");
    let text = g.console_text();
    for bad in ["soft lockup", "rcu_sched self-detected stall", "RCU stall", "rcu: INFO"] {
        assert!(!text.contains(bad), "console reports {bad:?}:\n{}", g.tail(3000));
    }
}

#[test]
fn restored_guests_keep_state_and_run_side_by_side() {
    let snap = ready_snapshot(1);
    let mut g = Guest::restore("restore-src", &snap);
    g.wait_api();
    g.sh("HPVAR=kept-$((40+2))");
    let mine = g.dir.join("snap");
    g.api_ok(json!({"verb": "snapshot", "dir": mine}));
    g.api_ok(json!({"verb": "shutdown"}));
    assert!(g.wait_exit(Duration::from_secs(30)).success());

    let mut a = Guest::restore("restore-a", &mine);
    let mut b = Guest::restore("restore-b", &mine);
    assert_eq!(a.sh("echo $HPVAR"), "kept-42");
    assert_eq!(b.sh("echo $HPVAR"), "kept-42");
    // They are separate machines: a change in one is not seen by the other.
    a.sh("HPVAR=only-a");
    assert_eq!(b.sh("echo $HPVAR"), "kept-42");
    assert_eq!(a.sh("echo $HPVAR"), "only-a");
}

/// Sections the kernel never rewrites at boot (unlike .text, .rodata with
/// its ro_after_init data, and .data): the metadata introspection reads.
const UNCHANGED_SECTIONS: &[&str] = &[".BTF", "__ex_table", "__ksymtab_strings", ".orc_unwind_ip", ".orc_unwind"];

#[test]
fn paused_guest_memory_equals_the_vmlinux_file() {
    let img = image_dir();
    let elf_bytes = std::fs::read(img.join("vmlinux")).unwrap();
    let elf = goblin::elf::Elf::parse(&elf_bytes).unwrap();
    let snap = ready_snapshot(1);
    let g = Guest::restore("memread", &snap);
    g.wait_api();
    g.api_ok(json!({"verb": "pause"}));
    for name in UNCHANGED_SECTIONS {
        let sec = elf
            .section_headers
            .iter()
            .find(|s| elf.shdr_strtab.get_at(s.sh_name) == Some(*name))
            .unwrap_or_else(|| panic!("{name} section"));
        // Physical address: the section's PT_LOAD segment paddr + offset.
        let seg = elf
            .program_headers
            .iter()
            .find(|p| {
                p.p_type == goblin::elf::program_header::PT_LOAD
                    && p.p_vaddr <= sec.sh_addr
                    && sec.sh_addr < p.p_vaddr + p.p_memsz
            })
            .expect("segment");
        let paddr = seg.p_paddr + (sec.sh_addr - seg.p_vaddr);
        let file = &elf_bytes[sec.sh_offset as usize..(sec.sh_offset + sec.sh_size) as usize];
        let mut guest = Vec::new();
        let mut off = 0u64;
        while off < sec.sh_size {
            let len = (sec.sh_size - off).min(1 << 20);
            let r = g.api_ok(json!({"verb": "read_memory", "addr": paddr + off, "len": len}));
            let hex = r["hex"].as_str().unwrap();
            guest.extend((0..hex.len() / 2).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap()));
            off += len;
        }
        assert_eq!(guest.len(), file.len(), "{name}");
        let differing = guest.iter().zip(file).filter(|(a, b)| a != b).count();
        assert_eq!(differing, 0, "{differing} of {} {name} bytes differ at paddr {paddr:#x}", file.len());
    }
    // Outside RAM is an error reply, not a crash.
    let r = g.api(json!({"verb": "read_memory", "addr": 0xffff_0000_0000u64, "len": 16}));
    assert_eq!(r["ok"], json!(false));
    g.api_ok(json!({"verb": "resume"}));
}

#[test]
fn api_survives_garbage_and_serves_two_clients() {
    let snap = ready_snapshot(1);
    let mut g = Guest::restore("apigarbage", &snap);
    g.wait_api();
    let first = UnixStream::connect(&g.api_sock).unwrap();
    let mut r1 = BufReader::new(first.try_clone().unwrap());
    let mut w1 = first;
    for junk in ["this is not json", "[1,2,3]", "{\"noverb\":1}", "{\"verb\":\"fly\"}", "{\"verb\":\"snapshot\"}", "\u{1}\u{2}\u{3}"] {
        w1.write_all(junk.as_bytes()).unwrap();
        w1.write_all(b"\n").unwrap();
        let mut line = String::new();
        r1.read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ok"], json!(false), "{junk} -> {line}");
        assert!(v["error"].as_str().unwrap().len() > 5);
    }
    // A second client while the first stays connected.
    let s = g.api_ok(json!({"verb": "status"}));
    assert_eq!(s["state"], json!("running"));
    w1.write_all(b"{\"verb\":\"status\"}\n").unwrap();
    let mut line = String::new();
    r1.read_line(&mut line).unwrap();
    assert!(line.contains("\"ok\":true"), "{line}");
    // The guest still answers.
    assert_eq!(g.sh("echo ok-$((3*3))"), "ok-9");
    // The CLI's table and JSON views.
    let out = Command::new(BIN).args(["--api-sock", g.api_sock.to_str().unwrap(), "status", "--json"]).output().unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["vcpus"], json!(1));
    let out = Command::new(BIN).args(["--api-sock", g.api_sock.to_str().unwrap(), "status"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("running"));
}
