//! The guest's own BTF, read from the memory of a saved test guest, agrees
//! with pahole's view of the same kernel build (saved at image build time)
//! for every member of every struct hyperpatch reads.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::Instant;

use hyperpatch::guest::SnapshotImage;
use introspect::btf::Btf;
use introspect::AddressSpace;

/// The structs whose pahole layout the image build saves.
const STRUCTS: &[&str] = &[
    "task_struct",
    "thread_struct",
    "module",
    "klp_patch",
    "klp_object",
    "klp_func",
    "klp_state",
    "dyn_ftrace",
    "ftrace_page",
    "list_head",
    "inactive_task_frame",
    "pcpu_hot",
];
/// Present in every guest kernel hyperpatch supports.
const REQUIRED: &[&str] = &["task_struct", "thread_struct", "module", "list_head", "inactive_task_frame"];

/// Address of `name` in a System.map (this test guest is not relocated).
fn system_map_symbol(map: &str, name: &str) -> u64 {
    map.lines()
        .find_map(|line| {
            let mut f = line.split_whitespace();
            let addr = f.next()?;
            let _kind = f.next()?;
            (f.next()? == name).then(|| u64::from_str_radix(addr, 16).ok()).flatten()
        })
        .unwrap_or_else(|| panic!("{name} not in System.map"))
}

/// One member line of `pahole -C` output.
#[derive(Debug, Clone)]
struct PaholeMember {
    /// Dotted path from the outermost struct (anonymous levels omitted).
    path: String,
    /// Leaf name.
    name: String,
    /// The C declaration without attributes and bitfield width.
    decl: String,
    byte: u64,
    bit: u64,
    size: u64,
    bitfield: u32,
}

#[derive(Debug, Default)]
struct PaholeStruct {
    name: String,
    size: Option<u64>,
    members: Vec<PaholeMember>,
    /// (byte offset, size) of every inline anonymous struct/union.
    anonymous: Vec<(u64, u64)>,
}

/// `/* 884: 0  4 */` -> (884, 0, 4); `/*  1768  16 */` -> (1768, 0, 16).
fn parse_offset_comment(comment: &str) -> Option<(u64, u64, u64)> {
    let body = comment.trim().strip_prefix("/*")?.strip_suffix("*/")?.trim();
    if let Some((byte, rest)) = body.split_once(':') {
        let mut f = rest.split_whitespace();
        let bit = f.next()?.parse().ok()?;
        let size = f.next()?.parse().ok()?;
        f.next().is_none().then_some((byte.trim().parse().ok()?, bit, size))
    } else {
        let mut f = body.split_whitespace();
        let byte = f.next()?.parse().ok()?;
        let size = f.next()?.parse().ok()?;
        f.next().is_none().then_some((byte, 0, size))
    }
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Splits a member declaration into (declaration without attributes and
/// bitfield width, name, bitfield width).
fn split_declaration(decl: &str) -> (String, String, u32) {
    let mut decl = decl.trim().trim_end_matches(';').trim().to_string();
    if let Some(at) = decl.find("__attribute__") {
        decl.truncate(at);
    }
    let mut decl = decl.trim().to_string();
    let mut width = 0;
    if let Some((head, tail)) = decl.rsplit_once(':') {
        if let Ok(w) = tail.trim().parse::<u32>() {
            width = w;
            decl = head.trim().to_string();
        }
    }
    let name = if let Some(at) = decl.find("(*") {
        decl[at..].trim_start_matches(['(', '*']).chars().take_while(|c| is_ident(*c)).collect()
    } else {
        let mut base = decl.as_str();
        while base.ends_with(']') {
            base = base[..base.rfind('[').expect("[ before ]")].trim_end();
        }
        let start = base.rfind(|c: char| !is_ident(c)).map_or(0, |p| p + 1);
        base[start..].to_string()
    };
    (decl, name, width)
}

/// Parses `pahole -C NAME` output: nested inline (anonymous-type) structs
/// and unions carry absolute offsets, and a named one prefixes the paths
/// of the members inside it.
fn parse_pahole(text: &str) -> PaholeStruct {
    struct Frame {
        members: Vec<PaholeMember>,
        anonymous: Vec<(u64, u64)>,
    }
    let mut out = PaholeStruct::default();
    let mut stack: Vec<Frame> = Vec::new();
    for raw in text.lines() {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        if stack.is_empty() {
            if let Some(head) = line.strip_suffix('{') {
                let mut f = head.split_whitespace();
                let _tag = f.next();
                out.name = f.next().unwrap_or("").to_string();
                stack.push(Frame { members: Vec::new(), anonymous: Vec::new() });
            }
            continue;
        }
        if line.starts_with("/*") {
            if stack.len() == 1 && out.size.is_none() {
                if let Some(rest) = line.strip_prefix("/* size:") {
                    let n = rest.trim().split(|c: char| !c.is_ascii_digit()).next().unwrap_or("");
                    out.size = n.parse().ok();
                }
            }
            continue;
        }
        if line.ends_with('{') {
            stack.push(Frame { members: Vec::new(), anonymous: Vec::new() });
            continue;
        }
        let (code, comment) = match line.find("/*") {
            Some(at) => (line[..at].trim(), Some(&line[at..])),
            None => (line, None),
        };
        if let Some(close) = code.strip_prefix('}') {
            let frame = stack.pop().expect("frame");
            if stack.is_empty() {
                out.members = frame.members;
                out.anonymous = frame.anonymous;
                break;
            }
            let (byte, _, size) = parse_offset_comment(comment.expect("closing comment"))
                .unwrap_or_else(|| panic!("bad closing line {line:?}"));
            let (decl, name, _) = split_declaration(close);
            let parent = stack.last_mut().expect("parent");
            if name.is_empty() {
                parent.anonymous.push((byte, size));
                parent.anonymous.extend(frame.anonymous);
                parent.members.extend(frame.members);
            } else {
                // `struct { ... } name[2];` : inner paths go through element 0.
                let dims = decl.matches('[').count();
                let prefix = format!("{name}{}", "[0]".repeat(dims));
                parent.members.push(PaholeMember {
                    path: name.clone(),
                    name,
                    decl: String::new(),
                    byte,
                    bit: 0,
                    size,
                    bitfield: 0,
                });
                parent.anonymous.extend(frame.anonymous);
                for mut m in frame.members {
                    m.path = format!("{prefix}.{}", m.path);
                    parent.members.push(m);
                }
            }
            continue;
        }
        let Some(comment) = comment else { continue }; // e.g. `unsigned int :0;`
        let Some((byte, bit, size)) = parse_offset_comment(comment) else { panic!("unparsed pahole line {line:?}") };
        let (decl, name, bitfield) = split_declaration(code);
        assert!(!name.is_empty(), "no member name in {line:?}");
        stack.last_mut().expect("frame").members.push(PaholeMember {
            path: name.clone(),
            name,
            decl,
            byte,
            bit,
            size,
            bitfield,
        });
    }
    out
}

/// pahole text of each saved struct, generated from the image's vmlinux
/// when the image build did not save it.
fn pahole_texts(image: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for name in STRUCTS {
        let saved = image.join("pahole").join(format!("{name}.txt"));
        let text = match std::fs::read_to_string(&saved) {
            Ok(t) if !t.trim().is_empty() => t,
            _ => {
                let vmlinux = image.join("vmlinux");
                let generated = std::process::Command::new("pahole")
                    .arg("-C")
                    .arg(name)
                    .arg(&vmlinux)
                    .output()
                    .ok()
                    .filter(|o| o.status.success())
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                if generated.trim().is_empty() {
                    eprintln!("pahole: no layout for struct {name} (not in this kernel?)");
                    continue;
                }
                eprintln!("pahole: generated {name} from {}", vmlinux.display());
                generated
            }
        };
        out.push((name.to_string(), text));
    }
    out
}

/// Declarations as pahole spells them, whitespace removed.
fn squeeze(s: &str) -> String {
    s.chars().filter(|c| !c.is_whitespace()).collect()
}

#[test]
fn guest_btf_matches_pahole_for_every_member() {
    let image = common::image_dir();
    let snap = common::ready_snapshot(1);
    let img = SnapshotImage::open(&snap).unwrap();
    let space = AddressSpace::new(&img.mem, img.cpus[0].cr3, img.cpus[0].la57());
    // TODO: take these from the guest's kallsyms once that reader lands.
    let map = std::fs::read_to_string(image.join("System.map")).expect("System.map in the image dir");
    let start = system_map_symbol(&map, "__start_BTF");
    let stop = system_map_symbol(&map, "__stop_BTF");

    let t0 = Instant::now();
    let btf = Btf::from_memory(&space, start, stop).unwrap();
    let elapsed = t0.elapsed();
    eprintln!(
        "guest BTF: {} bytes, {} types, read from guest memory and parsed in {:?}",
        stop - start,
        btf.type_count(),
        elapsed
    );
    let bytes = introspect::KernelMemory::read_bytes(&space, start, (stop - start) as usize).unwrap();
    let t1 = Instant::now();
    let again = Btf::parse(bytes).unwrap();
    eprintln!("guest BTF: parse alone {:?}", t1.elapsed());
    assert_eq!(again.type_count(), btf.type_count());

    let texts = pahole_texts(&image);
    let compared: HashSet<&str> = texts.iter().map(|(n, _)| n.as_str()).collect();
    for required in REQUIRED {
        assert!(compared.contains(required), "no pahole layout for {required}");
    }

    let mut checked_members = 0usize;
    let mut decl_mismatches = Vec::new();
    for (name, text) in &texts {
        let layout = parse_pahole(text);
        assert_eq!(&layout.name, name, "pahole header of {name}");
        assert!(!layout.members.is_empty(), "no members parsed for {name}");
        let size = layout.size.unwrap_or_else(|| panic!("no size comment for {name}"));
        assert_eq!(btf.struct_size(name).unwrap(), size, "sizeof(struct {name})");

        let described = btf.describe_struct(name).unwrap();
        let described_at: HashSet<(&str, u64)> = described.iter().map(|d| (d.name.as_str(), d.offset_bits)).collect();
        let anonymous_at: HashSet<(u64, u64)> =
            described.iter().filter(|d| d.expanded && d.name.is_empty()).map(|d| (d.offset, d.size)).collect();
        for (byte, size) in &layout.anonymous {
            assert!(anonymous_at.contains(&(*byte, *size)), "{name}: anonymous member at {byte} (+{size})");
        }

        for pm in &layout.members {
            let m = btf.member(name, &pm.path).unwrap_or_else(|e| panic!("{name}.{}: {e}", pm.path));
            let want_bits = pm.byte * 8 + pm.bit;
            assert_eq!(m.offset_bits, want_bits, "{name}.{} offset in bits", pm.path);
            assert_eq!(m.bitfield_size, pm.bitfield, "{name}.{} bitfield width", pm.path);
            assert_eq!(m.size, pm.size, "{name}.{} size", pm.path);
            if pm.bitfield == 0 {
                assert_eq!(btf.member_offset(name, &pm.path).unwrap(), pm.byte, "{name}.{}", pm.path);
            } else {
                assert!(btf.member_offset(name, &pm.path).is_err(), "{name}.{} is a bitfield", pm.path);
            }
            assert!(
                described_at.contains(&(pm.name.as_str(), want_bits)),
                "{name}: describe_struct lacks {} at bit {want_bits}",
                pm.path
            );
            if !pm.decl.is_empty() {
                let ours = described
                    .iter()
                    .find(|d| d.name == pm.name && d.offset_bits == want_bits)
                    .map(|d| d.decl.clone())
                    .unwrap_or_default();
                if squeeze(&ours) != squeeze(&pm.decl) {
                    decl_mismatches.push(format!("{name}.{}: ours {ours:?}, pahole {:?}", pm.path, pm.decl));
                }
            }
            checked_members += 1;
        }
        eprintln!("struct {name}: size {size}, {} members agree with pahole", layout.members.len());
    }
    assert!(checked_members > 100, "only {checked_members} members compared");
    assert!(decl_mismatches.is_empty(), "C declarations differ from pahole:\n{}", decl_mismatches.join("\n"));

    // Nested paths compose, anonymous members are transparent.
    let thread = btf.member_offset("task_struct", "thread").unwrap();
    let sp = btf.member_offset("thread_struct", "sp").unwrap();
    assert_eq!(btf.member_offset("task_struct", "thread.sp").unwrap(), thread + sp);
    let se = btf.member_offset("task_struct", "se").unwrap();
    let on_rq = btf.member_offset("sched_entity", "on_rq").unwrap();
    assert_eq!(btf.member_offset("task_struct", "se.on_rq").unwrap(), se + on_rq);
    assert!(btf.member_offset("task_struct", "__state").is_ok());
    assert!(btf.member_offset("task_struct", "no_such_member").is_err());
    let tasks = btf.member("task_struct", "tasks").unwrap();
    assert_eq!(btf.type_name(tasks.type_id).unwrap(), "struct list_head");
    let comm = btf.member("task_struct", "comm").unwrap();
    assert_eq!(btf.array_len(comm.type_id).unwrap(), 16);
    assert_eq!(btf.type_name(comm.type_id).unwrap(), "char [16]");
    let signal = btf.member("task_struct", "signal").unwrap();
    let target = btf.pointer_target(signal.type_id).unwrap();
    assert_eq!(btf.type_name(target).unwrap(), "struct signal_struct");
    assert!(btf.member_in(target, "thread_head").is_ok());
    assert_eq!(btf.enum_value(Some("module_state"), "MODULE_STATE_LIVE").unwrap(), 0);
    assert_eq!(btf.enum_value(None, "MODULE_STATE_UNFORMED").unwrap(), 3);
}
