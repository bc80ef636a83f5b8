//! The host cache of decoded kernel tables (`src/table_cache.rs`): a second
//! VMM of the same kernel takes kallsyms and BTF from the cache only when
//! its guest's own bytes hash to the entry, and then answers exactly what a
//! decode from its guest would.

mod common;

use common::*;
use hyperpatch::guest::SnapshotImage;
use hyperpatch::table_cache::{Origin, TableCache};
use introspect::kernel::Kernel;
use introspect::memory::{PhysMem, VecMemory};
use introspect::AddressSpace;
use serde_json::json;

/// All of the saved guest's RAM in a buffer the test can change.
fn ram_of(mem: &dyn PhysMem) -> VecMemory {
    let mut v = vec![0u8; mem.phys_size() as usize];
    for (i, page) in v.chunks_mut(4096).enumerate() {
        let _ = mem.read_phys(i as u64 * 4096, page);
    }
    VecMemory(v)
}

fn fresh_dir(name: &str) -> std::path::PathBuf {
    let d = scratch(name).join("tables");
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// The names of every symbol, in kallsyms order, with addresses and types.
fn symbols(k: &Kernel<'_>) -> Vec<(String, u64, char)> {
    k.syms.symbols().map(|s| (s.name.clone(), s.addr, s.kind)).collect()
}

#[test]
fn a_hit_answers_what_the_guest_decodes_and_changed_or_corrupt_bytes_are_not_used() {
    let snap = ready_snapshot(1);
    let img = SnapshotImage::open(&snap).unwrap();
    let mut ram = ram_of(&img.mem);
    let cpus = img.cpus.clone();
    let dir = fresh_dir("table-cache-image");
    let cache = TableCache::at(dir.clone());

    let fresh = Kernel::open(&ram, cpus.clone()).unwrap();
    let (first, o1) = cache.open_kernel(&ram, cpus.clone()).unwrap();
    assert_eq!((o1.kallsyms, o1.btf), (Origin::Guest, Origin::Guest), "{o1:?}");
    assert!(o1.notes.is_empty(), "{o1:?}");
    let kkey = o1.kallsyms_key.clone().expect("the run is found on the test kernel");
    for f in [format!("kallsyms-{kkey}.bin"), format!("kallsyms-{kkey}.hint"), format!("btf-{}.bin", o1.btf_key)] {
        assert!(dir.join(&f).is_file(), "{f} written");
    }
    assert_eq!(symbols(&first), symbols(&fresh));

    let (hit, o2) = cache.open_kernel(&ram, cpus.clone()).unwrap();
    assert_eq!((o2.kallsyms, o2.btf), (Origin::Cache, Origin::Cache), "{o2:?}");
    assert_eq!((o2.kallsyms_key.as_deref(), o2.btf_key.as_str()), (Some(kkey.as_str()), o1.btf_key.as_str()));
    // The hit is what a decode of the guest gives.
    assert_eq!(symbols(&hit), symbols(&fresh));
    assert_eq!(hit.syms.tables(), fresh.syms.tables());
    assert_eq!(hit.syms.kernel_range(), fresh.syms.kernel_range());
    assert_eq!(hit.btf.type_count(), fresh.btf.type_count());
    for (ty, field) in [("task_struct", "patch_state"), ("task_struct", "tasks"), ("klp_patch", "objs"), ("module", "arch.orc_unwind")] {
        assert_eq!(hit.off(ty, field).unwrap(), fresh.off(ty, field).unwrap(), "{ty}.{field}");
    }
    assert_eq!(hit.btf.describe_struct("klp_func").unwrap(), fresh.btf.describe_struct("klp_func").unwrap());
    println!("open: decoded {:.0} us, from the cache {:.0} us", o1.open_us, o2.open_us);
    let fresh_syms = symbols(&fresh);
    let t = *fresh.syms.tables().unwrap();
    drop((fresh, first, hit));

    // One changed letter in a kallsyms token: another key, decoded from
    // this guest's bytes, never the cached names.
    let space = AddressSpace::new(&ram, cpus[0].cr3, cpus[0].la57());
    let mut at = t.token_table;
    let letter = loop {
        let pa = space.translate(at).unwrap() as usize;
        let b = ram.0[pa];
        if b.is_ascii_lowercase() && b != b'z' {
            break pa;
        }
        at += 1;
        assert!(at < t.token_index, "a lowercase letter in the token table");
    };
    drop(space);
    ram.0[letter] += 1;
    let (changed, o3) = cache.open_kernel(&ram, cpus.clone()).unwrap();
    assert_eq!((o3.kallsyms, o3.btf), (Origin::Guest, Origin::Cache), "{o3:?}");
    assert_ne!(o3.kallsyms_key.as_deref(), Some(kkey.as_str()));
    let changed_syms = symbols(&changed);
    drop(changed);
    assert_ne!(changed_syms, fresh_syms, "the changed token changes names");
    assert_eq!(changed_syms, symbols(&Kernel::open(&ram, cpus.clone()).unwrap()), "the guest's own decode");
    ram.0[letter] -= 1;

    // A corrupt entry is not used: decoded again, with a note, and written anew.
    let btf_file = dir.join(format!("btf-{}.bin", o1.btf_key));
    let mut bytes = std::fs::read(&btf_file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&btf_file, &bytes).unwrap();
    let (_, o4) = cache.open_kernel(&ram, cpus.clone()).unwrap();
    assert_eq!((o4.kallsyms, o4.btf), (Origin::Cache, Origin::Guest), "{o4:?}");
    assert!(o4.notes.iter().any(|n| n.contains(&o1.btf_key) && n.contains("not an intact entry")), "{:?}", o4.notes);
    let (_, o5) = cache.open_kernel(&ram, cpus.clone()).unwrap();
    assert_eq!(o5.btf, Origin::Cache, "rewritten: {o5:?}");

    // A hint that points elsewhere, or is not a hint, is passed over.
    std::fs::write(dir.join(format!("kallsyms-{}.hint", "0".repeat(64))), br#"{"from_lstar":4096,"len":64,"relative_base_at":8,"probe":[1,2,3]}"#).unwrap();
    std::fs::write(dir.join(format!("kallsyms-{}.hint", "1".repeat(64))), b"not json").unwrap();
    // A corrupt hint naming an absurd run (with a probe that matches the
    // guest) is passed over by name, never read.
    let good_hint: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(format!("kallsyms-{kkey}.hint"))).unwrap()).unwrap();
    let mut huge = good_hint.clone();
    huge["len"] = json!(1u64 << 40);
    std::fs::write(dir.join(format!("kallsyms-{}.hint", "2".repeat(64))), serde_json::to_vec(&huge).unwrap()).unwrap();
    let (k6, o6) = cache.open_kernel(&ram, cpus.clone()).unwrap();
    assert_eq!(o6.kallsyms, Origin::Cache, "{o6:?}");
    assert_eq!(symbols(&k6), fresh_syms);
    assert!(o6.notes.iter().any(|n| n.contains(&"1".repeat(64))), "the bad hint is named: {:?}", o6.notes);
    assert!(o6.notes.iter().any(|n| n.contains(&"2".repeat(64)) && n.contains("passed over")), "the huge hint is named: {:?}", o6.notes);
}

#[test]
fn a_second_guest_of_the_kernel_takes_the_tables_from_the_cache_and_is_patched() {
    let snap = ready_snapshot(1);
    let dir = fresh_dir("table-cache-live");
    let d = dir.to_str().unwrap();
    let s = snap.to_str().unwrap();
    let mut a = Guest::start("table-cache-a", &["--restore", s, "--table-cache", d]);
    a.wait_api();
    let ps_a = a.api_ok(json!({"verb": "ps"}));
    let ta = a.api_ok(json!({"verb": "list"}))["kernel_tables"].clone();
    assert_eq!((ta["kallsyms"].as_str(), ta["btf"].as_str()), (Some("guest"), Some("guest")), "{ta}");

    let mut b = Guest::start("table-cache-b", &["--restore", s, "--table-cache", d]);
    b.wait_api();
    let ps_b = b.api_ok(json!({"verb": "ps"}));
    let tb = b.api_ok(json!({"verb": "list"}))["kernel_tables"].clone();
    assert_eq!((tb["kallsyms"].as_str(), tb["btf"].as_str()), (Some("cache"), Some("cache")), "{tb}");
    assert_eq!((&tb["kallsyms_key"], &tb["btf_key"]), (&ta["kallsyms_key"], &ta["btf_key"]));
    println!("first guest: tables decoded in {} us; second: from the cache in {} us", ta["open_us"], tb["open_us"]);
    // Restored from one snapshot, the two guests have the same tasks.
    let pids = |v: &serde_json::Value| v.as_array().map(|t| t.iter().map(|x| x["pid"].clone()).collect::<Vec<_>>());
    assert_eq!(pids(&ps_a), pids(&ps_b));
    assert!(pids(&ps_b).is_some_and(|p| !p.is_empty()), "{ps_b}");

    apply(&b, "livepatch-sample.ko", json!({}));
    assert_eq!(b.sh("read l < /proc/cmdline; echo $l"), "this has been live patched");
    // The module is parsed once for the kernel build: the first guest to
    // load it parses it, the next takes the parse and links it itself.
    let mb = b.api_ok(json!({"verb": "list"}))["last_module_parse"].clone();
    assert_eq!(mb["origin"], json!("parsed"), "{mb}");
    apply(&a, "livepatch-sample.ko", json!({}));
    assert_eq!(a.sh("read l < /proc/cmdline; echo $l"), "this has been live patched");
    let ma = a.api_ok(json!({"verb": "list"}))["last_module_parse"].clone();
    assert_eq!((&ma["origin"], &ma["key"]), (&json!("cache"), &mb["key"]), "{ma}");
    println!("module: parsed in {} us, from the cache in {} us", mb["parse_us"], ma["parse_us"]);

    // --no-table-cache decodes from the guest.
    let c = Guest::start("table-cache-c", &["--restore", s, "--no-table-cache"]);
    c.wait_api();
    c.api_ok(json!({"verb": "ps"}));
    let tc = c.api_ok(json!({"verb": "list"}))["kernel_tables"].clone();
    assert_eq!((tc["kallsyms"].as_str(), tc["btf"].as_str()), (Some("guest"), Some("guest")), "{tc}");
}
