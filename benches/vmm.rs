//! VMM benchmarks on the real test guest:
//! - pause-all + resume with 1, 2 and 4 vCPUs (criterion, plus median/p99
//!   over 2,000 samples printed as a table);
//! - restore from a snapshot to a shell that answers, against a cold boot
//!   (ratio, one run each: a cold boot takes tens of seconds here);
//! - VMM resident memory not counting guest RAM.
//!
//! Run: `cargo bench --bench vmm`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use criterion::{criterion_group, Criterion};

fn restore_in_process(vcpus: u32) -> vmm::Vm {
    let snap = ready_snapshot(vcpus);
    vmm::snapshot::restore(&snap, Box::new(std::io::sink())).expect("restore")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn pause_resume(c: &mut Criterion) {
    let mut table = Vec::new();
    for vcpus in [1u32, 2, 4] {
        let vm = restore_in_process(vcpus);
        std::thread::sleep(Duration::from_millis(300));
        let mut samples = Vec::with_capacity(2000);
        for _ in 0..2000 {
            let t = Instant::now();
            let p = vm.pause().expect("pause");
            drop(p);
            samples.push(t.elapsed());
            std::thread::sleep(Duration::from_micros(200));
        }
        samples.sort();
        table.push((vcpus, percentile(&samples, 0.5), percentile(&samples, 0.99)));
        c.bench_function(&format!("pause_resume/{vcpus}vcpu"), |b| {
            b.iter(|| drop(vm.pause().expect("pause")))
        });
    }
    println!("\npause-all + resume (2000 samples each)");
    println!("vcpus  median      p99");
    for (v, m, p) in table {
        println!("{v:>5}  {:>8.1}us  {:>8.1}us", m.as_secs_f64() * 1e6, p.as_secs_f64() * 1e6);
    }
}

/// Resident memory of a VMM process, minus its guest RAM mapping.
fn vmm_rss_without_guest(pid: u32, guest_bytes: u64) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps");
    let mut total = 0u64;
    let mut skip = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            let mut r = first.split('-');
            let a = u64::from_str_radix(r.next().unwrap_or("0"), 16).unwrap_or(0);
            let b = u64::from_str_radix(r.next().unwrap_or("0"), 16).unwrap_or(0);
            skip = b - a == guest_bytes;
        } else if let Some(v) = line.strip_prefix("Rss:") {
            if !skip {
                total += v.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap_or(0) * 1024;
            }
        }
    }
    total
}

fn restore_vs_cold_boot() {
    let snap = ready_snapshot(1);
    let t = Instant::now();
    let mut g = Guest::restore("bench-restore", &snap);
    assert_eq!(g.sh("echo up"), "up");
    let restore = t.elapsed();
    let rss = vmm_rss_without_guest(g.child.id(), (512 + 16) << 20);
    drop(g);

    let t = Instant::now();
    let mut g = Guest::boot_test_image("bench-cold", 1, &[]);
    g.wait_for(READY, BOOT_TIMEOUT);
    assert_eq!(g.sh("echo up"), "up");
    let cold = t.elapsed();
    drop(g);
    println!("\nrestore to an answering shell: {:.3} s; cold boot to an answering shell: {:.1} s; ratio cold/restore = {:.0}x",
        restore.as_secs_f64(), cold.as_secs_f64(), cold.as_secs_f64() / restore.as_secs_f64());
    println!("VMM resident memory without guest RAM: {:.1} MiB", rss as f64 / (1 << 20) as f64);
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50).measurement_time(Duration::from_secs(3));
    targets = pause_resume
}

fn main() {
    benches();
    restore_vs_cold_boot();
    Criterion::default().configure_from_args().final_summary();
}
