//! kallsyms decoded from the test guest's memory agrees with the build's
//! System.map. The PVH-booted guest is not relocated, so every address must
//! match exactly.

mod common;

use std::collections::HashMap;
use std::time::Instant;

use hyperpatch::guest::SnapshotImage;
use introspect::kallsyms::Kallsyms;
use introspect::AddressSpace;

/// System.map: name -> every (address, type) it lists for that name.
fn system_map() -> HashMap<String, Vec<(u64, char)>> {
    let path = common::image_dir().join("System.map");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut map: HashMap<String, Vec<(u64, char)>> = HashMap::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let (Some(addr), Some(kind), Some(name)) = (f.next(), f.next(), f.next()) else { continue };
        let addr = u64::from_str_radix(addr, 16).unwrap_or_else(|e| panic!("bad line {line:?}: {e}"));
        let kind = kind.chars().next().unwrap();
        map.entry(name.to_string()).or_default().push((addr, kind));
    }
    map
}

#[test]
fn kallsyms_from_guest_memory_matches_system_map() {
    let snap = common::ready_snapshot(1);
    let img = SnapshotImage::open(&snap).unwrap();
    let cpu = img.cpus[0];
    let space = AddressSpace::new(&img.mem, cpu.cr3, cpu.la57());
    let t = Instant::now();
    let k = Kallsyms::locate(&space, cpu.lstar).unwrap();
    let took = t.elapsed();
    println!("Kallsyms::locate: {took:?} for {} symbols; tables {:#x?}", k.len(), k.tables());

    assert_eq!(k.lookup("entry_SYSCALL_64"), vec![cpu.lstar]);
    assert_eq!(k.lookup_unique("entry_SYSCALL_64").unwrap(), cpu.lstar);

    // kallsyms -> System.map: every decoded symbol is listed with the same
    // address and type. Per-CPU symbols are stored as type 'A' by
    // scripts/kallsyms.c (System.map keeps nm's letter).
    let map = system_map();
    let sysmap_count: usize = map.values().map(Vec::len).sum();
    let mut missing = Vec::new();
    for s in k.symbols() {
        let found =
            map.get(&s.name).is_some_and(|v| v.iter().any(|&(a, t)| a == s.addr && (t == s.kind || s.kind == 'A')));
        if !found {
            missing.push(format!("{:016x} {} {} (System.map: {:x?})", s.addr, s.kind, s.name, map.get(&s.name)));
        }
    }
    assert!(
        missing.is_empty(),
        "{} decoded symbols disagree with System.map, e.g.:\n{}",
        missing.len(),
        missing[..missing.len().min(20)].join("\n")
    );
    // System.map also lists what kallsyms leaves out (absolute symbols,
    // the kallsyms_* tables themselves): a few dozen at most.
    println!("kallsyms {} symbols, System.map {sysmap_count}", k.len());
    assert!(
        k.len() <= sysmap_count && sysmap_count - k.len() < 100,
        "kallsyms {} vs System.map {sysmap_count}",
        k.len()
    );

    // Every System.map name that occurs several times comes out in the
    // same order (kallsyms order is address order).
    for (name, entries) in &map {
        let got = k.lookup(name);
        if got.len() > 1 {
            let mut want: Vec<u64> = entries.iter().map(|e| e.0).collect();
            want.sort();
            assert_eq!(got, want, "{name}");
            assert!(k.lookup_unique(name).is_err(), "{name} is ambiguous");
            assert_eq!(k.address_of(name, got.len() as u32).unwrap(), *got.last().unwrap());
            assert!(k.address_of(name, got.len() as u32 + 1).is_err());
        }
    }

    // resolve(): offsets inside functions, the function's own start, and the
    // vCPU's RIP (a kernel-mode idle vCPU at the prompt).
    let text = k.text_range().expect("_stext/_etext");
    assert!(text.contains(&cpu.lstar), "text {text:x?}");
    let at = k.resolve(cpu.lstar).unwrap();
    assert_eq!((at.name.as_str(), at.offset), ("entry_SYSCALL_64", 0));
    assert!(at.size > 0);
    let at = k.resolve(cpu.lstar + 5).unwrap();
    assert!(at.format().starts_with("entry_SYSCALL_64+0x5/0x"), "{}", at.format());
    let sched = k.lookup_unique("schedule").unwrap();
    let next = k.symbols_by_addr().map(|s| s.addr).find(|&a| a > sched).unwrap();
    let at = k.resolve(sched + 0x10).unwrap();
    assert_eq!(at.format(), format!("schedule+0x10/{:#x}", next - sched));
    let init_task = k.lookup_unique("init_task").unwrap();
    assert_eq!(k.resolve(init_task + 8).unwrap().name, "init_task");
    if !cpu.in_user_mode() {
        let rip = k.resolve(cpu.rip).unwrap();
        println!("vCPU 0 RIP {:#x} = {}", cpu.rip, rip.format());
    }
    assert_eq!(k.resolve(0x1000), None);
}
