//! The patch-module reader on corrupted livepatch modules: a real
//! `livepatch-sample.ko` from the test image, edited by the fuzzer, parsed
//! with the test kernel's own BTF (from its vmlinux). It must return Ok or
//! an error: no panic, no hang, no unbounded allocation.
#![no_main]

use std::sync::OnceLock;

use introspect::btf::Btf;
use libfuzzer_sys::fuzz_target;

struct Inputs {
    module: Vec<u8>,
    btf: Btf,
}

fn inputs() -> &'static Option<Inputs> {
    static INPUTS: OnceLock<Option<Inputs>> = OnceLock::new();
    INPUTS.get_or_init(|| {
        let dir = std::env::var("HYPERPATCH_IMAGE_DIR").ok().or_else(|| {
            let out = std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../guest-images/build"))
                .arg("--print-dir")
                .output()
                .ok()?;
            Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
        })?;
        let module = std::fs::read(format!("{dir}/modules/livepatch-sample.ko")).ok()?;
        let vmlinux = std::fs::read(format!("{dir}/vmlinux")).ok()?;
        let elf = goblin::elf::Elf::parse(&vmlinux).ok()?;
        let sh = elf.section_headers.iter().find(|s| elf.shdr_strtab.get_at(s.sh_name) == Some(".BTF"))?;
        let blob = vmlinux.get(sh.sh_offset as usize..(sh.sh_offset + sh.sh_size) as usize)?.to_vec();
        Some(Inputs { module, btf: Btf::parse(blob).ok()? })
    })
}

fuzz_target!(|data: &[u8]| {
    let Some(inp) = inputs() else { return };
    let mut m = inp.module.clone();
    introspect_fuzz::mutate(&mut m, data);
    if data.first() == Some(&0xff) {
        // Also truncations.
        let cut = (introspect_fuzz::le::<4>(data, 1) as usize) % (m.len() + 1);
        m.truncate(cut);
    }
    let _ = patcher::PatchModule::parse("fuzz.ko", &m, &inp.btf);
});
