//! BTF: `Btf::parse` on fuzz bytes, then queries (struct lookup, nested
//! member paths, struct descriptions, type names, enums).
//!
//! First byte = mode: 0 = the rest is the blob; otherwise a valid blob
//! edited by the rest (13-byte edits).
#![no_main]

use introspect::btf::Btf;
use introspect_fuzz::{btf_blob, mutate, BTF_PATHS, BTF_STRUCTS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let blob = if mode % 2 == 0 {
        rest.to_vec()
    } else {
        let mut b = btf_blob();
        mutate(&mut b, rest);
        b
    };
    let Ok(btf) = Btf::parse(blob) else { return };
    for name in BTF_STRUCTS {
        let _ = btf.find_struct(name);
        let _ = btf.struct_size(name);
        if let Ok(desc) = btf.describe_struct(name) {
            assert!(desc.len() <= 1 << 16);
        }
        for path in BTF_PATHS {
            let _ = btf.member(name, path);
            let _ = btf.member_offset(name, path);
        }
    }
    let count = btf.type_count() as u32;
    for id in (0..count.min(256)).chain([count, count + 1, u32::MAX]) {
        let _ = btf.kind(id);
        let _ = btf.raw_name(id);
        let _ = btf.type_name(id);
        let _ = btf.declaration(id, "x");
        let _ = btf.type_size(id);
        let _ = btf.resolve_type(id);
        let _ = btf.array_len(id);
        let _ = btf.array_elem(id);
        let _ = btf.pointer_target(id);
        let _ = btf.int_info(id);
        let _ = btf.member_in(id, "thread.sp");
        let _ = btf.member_in(id, "pids[1].next");
    }
    let _ = btf.enum_value(None, "MODULE_STATE_LIVE");
    let _ = btf.enum_value(Some("wide"), "WIDE_TOP");
    let _ = btf.ids_by_name("int");
});
