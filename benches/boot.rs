//! Boot to `HYPERPATCH-READY` of the test image: hyperpatch against qemu
//! (default machine and `-M microvm`), same kernel and initramfs, one run
//! each in one process, reported as ratios. A boot takes tens of seconds to
//! minutes here (guest kernel code is emulated), so this is not a criterion
//! loop. Needs Debian's qemu-system-x86 (installed if missing).
//!
//! Run: `cargo bench --bench boot`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn qemu_boot(machine: &str) -> Option<Duration> {
    let img = image_dir();
    // Plain qemu cannot deliver int3 at CPL0 on this machine's KVM, so the
    // test kernel's boot-time int3 self-test is skipped (a test-image option).
    let cmdline = format!(
        "console=ttyS0 reboot=k panic=-1 no_int3_selftest {}",
        std::fs::read_to_string(img.join("cmdline")).unwrap_or_default().trim()
    );
    let mut args: Vec<String> = vec![
        "-enable-kvm".into(),
        "-cpu".into(),
        "host,-arch-capabilities,kvm-pv-ipi=off,kvm-pv-unhalt=off,kvm-pv-sched-yield=off".into(),
        "-m".into(),
        "512".into(),
        "-nographic".into(),
        "-no-reboot".into(),
        "-kernel".into(),
        img.join("vmlinux").display().to_string(),
        "-initrd".into(),
        img.join("initramfs.cpio").display().to_string(),
        "-append".into(),
        cmdline,
    ];
    if !machine.is_empty() {
        args.push("-M".into());
        args.push(machine.into());
    }
    let t = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut out = child.stdout.take()?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let mut result = None;
    while Instant::now() < deadline {
        match out.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                seen.extend_from_slice(&buf[..n]);
                if seen.windows(READY.len()).any(|w| w == READY.as_bytes()) {
                    result = Some(t.elapsed());
                    break;
                }
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn hyperpatch_boot() -> Duration {
    let t = Instant::now();
    let mut g = Guest::boot_test_image("bench-boot", 1, &[]);
    g.wait_for(READY, BOOT_TIMEOUT);
    t.elapsed()
}

fn main() {
    if Command::new("qemu-system-x86_64").arg("--version").output().is_err() {
        let _ = Command::new("apt-get").args(["install", "-y", "--no-install-recommends", "qemu-system-x86"]).status();
    }
    let hp = hyperpatch_boot();
    println!("hyperpatch (PVH direct boot): {:.1} s to {READY}", hp.as_secs_f64());
    for (name, machine) in [("qemu default machine", ""), ("qemu -M microvm", "microvm,acpi=off")] {
        match qemu_boot(machine) {
            Some(q) => println!(
                "{name}: {:.1} s to {READY}; qemu/hyperpatch = {:.2}",
                q.as_secs_f64(),
                q.as_secs_f64() / hp.as_secs_f64()
            ),
            None => println!("{name}: did not reach {READY}"),
        }
    }
}
