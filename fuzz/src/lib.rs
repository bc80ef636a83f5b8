//! Shared helpers of the fuzz targets: guest memory behind a fixed page
//! table, a valid kallsyms blob and a valid BTF blob to mutate, and a
//! mutation format that lets libFuzzer edit those blobs in place (so it
//! explores corruptions of well-formed tables, not only random bytes that
//! never get past the first check).

use introspect::error::{IntrospectError, Result};
use introspect::memory::VecMemory;
use introspect::KernelMemory;

/// Link-time kernel text base; the fake kernel lives there.
pub const TEXT: u64 = 0xffff_ffff_8100_0000;
/// Physical address of the PML4 of the fixed page table.
pub const PML4: u64 = 0x1000;
/// Physical address of the first data page (TEXT maps here).
pub const DATA: u64 = 0x10000;

/// Reads a little-endian integer of `N` bytes from `data` at `at`
/// (missing bytes are zero).
pub fn le<const N: usize>(data: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    for (i, slot) in b.iter_mut().enumerate().take(N) {
        *slot = data.get(at + i).copied().unwrap_or(0);
    }
    u64::from_le_bytes(b)
}

/// One fuzzer-chosen edit of a buffer: `op` (1 byte), `offset` (4 bytes,
/// taken modulo the buffer length) and `value` (8 bytes).
pub const MUTATION_LEN: usize = 13;

/// Applies the edits encoded in `edits` (13 bytes each, see
/// [`MUTATION_LEN`]) to `buf`.
pub fn mutate(buf: &mut [u8], edits: &[u8]) {
    if buf.is_empty() {
        return;
    }
    let len = buf.len();
    for e in edits.chunks_exact(MUTATION_LEN) {
        let op = e[0];
        let at = (le::<4>(e, 1) as usize) % len;
        let value = le::<8>(e, 5);
        let put = |buf: &mut [u8], bytes: &[u8]| {
            for (i, b) in bytes.iter().enumerate() {
                if let Some(slot) = buf.get_mut(at + i) {
                    *slot = *b;
                }
            }
        };
        match op % 8 {
            0 => put(buf, &[value as u8]),
            1 => put(buf, &(value as u32).to_le_bytes()),
            2 => put(buf, &value.to_le_bytes()),
            3 => buf[at] ^= value as u8,
            4 => {
                // Fill up to 256 bytes.
                let n = (value >> 8) as usize % 256;
                let end = (at + n).min(len);
                buf[at..end].fill(value as u8);
            }
            5 => {
                // Copy up to 256 bytes from elsewhere in the buffer.
                let from = ((value >> 16) as usize) % len;
                let n = (value as usize % 256).min(len - at).min(len - from);
                buf.copy_within(from..from + n, at);
            }
            6 => put(buf, &(value as u16).to_le_bytes()),
            _ => {
                // Small signed nudge of a u32 (lengths, counts, offsets).
                let old = le::<4>(buf, at) as u32;
                let new = old.wrapping_add((value as i8) as i32 as u32);
                put(buf, &new.to_le_bytes());
            }
        }
    }
}

fn put64(m: &mut [u8], at: u64, v: u64) {
    let at = at as usize;
    m[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Physical memory with a 4-level page table at [`PML4`] that maps
/// `TEXT + i * 4K` to `DATA + i * 4K` for each of `pages` pages, except
/// the pages listed in `holes`, followed by `data` at [`DATA`].
pub fn mapped_memory(data: &[u8], holes: &[usize]) -> VecMemory {
    let pages = data.len().div_ceil(0x1000).max(1);
    assert!(pages <= 512 * 4, "at most 8 MiB of fuzz memory");
    let mut m = vec![0u8; DATA as usize + pages * 0x1000];
    let (i4, i3, i2) = ((TEXT >> 39) & 0x1ff, (TEXT >> 30) & 0x1ff, (TEXT >> 21) & 0x1ff);
    put64(&mut m, PML4 + i4 * 8, 0x2000 | 3);
    put64(&mut m, 0x2000 + i3 * 8, 0x3000 | 3);
    // Up to four page tables (8 MiB) at 0x4000..0x8000.
    for pt in 0..pages.div_ceil(512) as u64 {
        put64(&mut m, 0x3000 + (i2 + pt) * 8, (0x4000 + pt * 0x1000) | 3);
    }
    for p in 0..pages {
        if !holes.contains(&p) {
            put64(&mut m, 0x4000 + p as u64 * 8, (DATA + p as u64 * 0x1000) | 3);
        }
    }
    m[DATA as usize..DATA as usize + data.len()].copy_from_slice(data);
    VecMemory(m)
}

/// Guest-virtual memory as one flat region (no page tables), for readers
/// that only need [`KernelMemory`].
pub struct FlatMemory {
    pub base: u64,
    pub bytes: Vec<u8>,
}

impl KernelMemory for FlatMemory {
    fn read_virt(&self, va: u64, buf: &mut [u8]) -> Result<()> {
        let miss = IntrospectError::NotMapped { va, level: 1 };
        let off = va.checked_sub(self.base).ok_or(IntrospectError::NotMapped { va, level: 1 })?;
        let off = usize::try_from(off).map_err(|_| IntrospectError::NotMapped { va, level: 1 })?;
        let end = off.checked_add(buf.len()).ok_or(IntrospectError::NotMapped { va, level: 1 })?;
        let src = self.bytes.get(off..end).ok_or(miss)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

// ---- a valid kallsyms blob -------------------------------------------------

/// The symbols of the fake kernel, in address order: (type, name, address,
/// per-CPU).
pub fn fake_symbols() -> Vec<(u8, String, u64, bool)> {
    let mut s: Vec<(u8, String, u64, bool)> = vec![
        (b'A', "fixed_percpu_data".into(), 0, true),
        (b'A', "current_task".into(), 0x20, true),
        (b'T', "_text".into(), TEXT, false),
        (b'T', "_stext".into(), TEXT, false),
        (b't', "dup".into(), TEXT + 0x10, false),
        (b'T', "entry_SYSCALL_64".into(), TEXT + 0x40, false),
        (b't', "dup".into(), TEXT + 0x80, false),
        (b'T', "schedule".into(), TEXT + 0xc0, false),
    ];
    for i in 0..300u64 {
        s.push((b't', format!("gen_{i}"), TEXT + 0x200 + i * 0x10, false));
    }
    s.push((b'T', "_etext".into(), TEXT + 0x4000, false));
    s.push((b'D', "init_task".into(), TEXT + 0x5000, false));
    s.push((b'B', "_end".into(), TEXT + 0x7000, false));
    s
}

fn pad8(v: &mut Vec<u8>) {
    while !v.len().is_multiple_of(8) {
        v.push(0);
    }
}

/// The kallsyms tables as `scripts/kallsyms.c` lays them out (absolute
/// per-CPU offsets), with a trivial token table: token `i` is the byte `i`
/// for printable ASCII, a filler string otherwise.
pub fn kallsyms_blob() -> Vec<u8> {
    static BLOB: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BLOB.get_or_init(build_kallsyms_blob).clone()
}

fn build_kallsyms_blob() -> Vec<u8> {
    let syms = fake_symbols();
    let tokens: Vec<Vec<u8>> = (0..256usize)
        .map(|i| if (0x20..=0x7e).contains(&i) { vec![i as u8] } else { format!("~{i:02x}").into_bytes() })
        .collect();
    let relative_base = syms.iter().find(|s| !s.3).map(|s| s.2).unwrap_or(TEXT);
    let mut v = Vec::new();
    for (_, _, addr, percpu) in &syms {
        let off: i32 = if *percpu { *addr as i32 } else { (relative_base as i64 - *addr as i64 - 1) as i32 };
        v.extend_from_slice(&off.to_le_bytes());
    }
    pad8(&mut v);
    v.extend_from_slice(&relative_base.to_le_bytes());
    v.extend_from_slice(&(syms.len() as u32).to_le_bytes());
    pad8(&mut v);
    let mut markers = Vec::new();
    let mut off = 0u32;
    for (i, (kind, name, _, _)) in syms.iter().enumerate() {
        if i % 256 == 0 {
            markers.push(off);
        }
        let mut full = vec![*kind];
        full.extend_from_slice(name.as_bytes());
        v.push(full.len() as u8);
        v.extend_from_slice(&full);
        off += 1 + full.len() as u32;
    }
    pad8(&mut v);
    for m in &markers {
        v.extend_from_slice(&m.to_le_bytes());
    }
    pad8(&mut v);
    let mut order: Vec<usize> = (0..syms.len()).collect();
    order.sort_by(|&x, &y| syms[x].1.cmp(&syms[y].1).then(syms[x].2.cmp(&syms[y].2)).then(x.cmp(&y)));
    for seq in order {
        v.extend_from_slice(&(seq as u32).to_be_bytes()[1..]);
    }
    pad8(&mut v);
    let table = v.len();
    let mut index = Vec::new();
    for t in &tokens {
        index.push((v.len() - table) as u16);
        v.extend_from_slice(t);
        v.push(0);
    }
    pad8(&mut v);
    for i in index {
        v.extend_from_slice(&i.to_le_bytes());
    }
    v
}

/// Kernel image for [`kallsyms_blob`]: one text page holding `swapgs` at
/// LSTAR = `TEXT + 0x40`, one unmapped page, then the blob.
pub fn kallsyms_image(blob: &[u8]) -> (Vec<u8>, Vec<usize>) {
    let mut data = vec![0u8; 0x2000];
    data[0x40..0x43].copy_from_slice(&[0x0f, 0x01, 0xf8]);
    data.extend_from_slice(blob);
    (data, vec![1])
}

// ---- a valid BTF blob -------------------------------------------------------

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_CONST: u32 = 10;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;

/// Writes BTF the way pahole does.
pub struct BtfBuilder {
    types: Vec<u32>,
    strings: Vec<u8>,
    next_id: u32,
}

impl Default for BtfBuilder {
    fn default() -> Self {
        BtfBuilder { types: Vec::new(), strings: vec![0], next_id: 1 }
    }
}

impl BtfBuilder {
    fn s(&mut self, name: &str) -> u32 {
        if name.is_empty() {
            return 0;
        }
        let off = self.strings.len() as u32;
        self.strings.extend_from_slice(name.as_bytes());
        self.strings.push(0);
        off
    }

    fn raw(&mut self, name: &str, kind: u32, vlen: u32, kflag: bool, size_or_type: u32, extra: &[u32]) -> u32 {
        let name_off = self.s(name);
        let info = (u32::from(kflag) << 31) | (kind << 24) | vlen;
        self.types.extend_from_slice(&[name_off, info, size_or_type]);
        self.types.extend_from_slice(extra);
        self.next_id += 1;
        self.next_id - 1
    }

    fn int(&mut self, name: &str, size: u32, signed: bool) -> u32 {
        let enc = if signed { 1u32 << 24 } else { 0 };
        self.raw(name, KIND_INT, 0, false, size, &[enc | (size * 8)])
    }

    fn composite(&mut self, name: &str, union: bool, size: u32, members: &[(&str, u32, u32, u32)]) -> u32 {
        let kflag = members.iter().any(|m| m.3 != 0);
        let mut extra = Vec::new();
        for (n, t, off, bits) in members {
            let name_off = self.s(n);
            let off = if kflag { (bits << 24) | off } else { *off };
            extra.extend_from_slice(&[name_off, *t, off]);
        }
        let kind = if union { KIND_UNION } else { KIND_STRUCT };
        self.raw(name, kind, members.len() as u32, kflag, size, &extra)
    }

    /// The blob with the standard 24-byte header.
    pub fn build(&self) -> Vec<u8> {
        let type_len = (self.types.len() * 4) as u32;
        let hdr = [0xeb9f | (1 << 16), 24, 0, type_len, type_len, self.strings.len() as u32];
        let mut out = Vec::new();
        for w in hdr.iter().chain(&self.types) {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&self.strings);
        out
    }
}

/// Struct names in [`btf_blob`], for queries.
pub const BTF_STRUCTS: &[&str] =
    &["task_struct", "list_head", "thread_struct", "sched_entity", "atomic_t", "only_declared", "struct task_struct"];
/// Member paths to query in every struct.
pub const BTF_PATHS: &[&str] = &[
    "tasks", "tasks.prev", "thread.sp", "se.on_rq", "__state", "b", "comm[3]", "pids[1].next", "on_cpu", "counter",
    "missing", "fn",
];

/// A small kernel-like type graph: anonymous nesting, bitfields, typedef
/// chains, arrays, function pointers, a forward declaration.
pub fn btf_blob() -> Vec<u8> {
    static BLOB: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BLOB.get_or_init(build_btf_blob).clone()
}

fn build_btf_blob() -> Vec<u8> {
    let mut b = BtfBuilder::default();
    let int = b.int("int", 4, true);
    let uint = b.int("unsigned int", 4, false);
    let ulong = b.int("long unsigned int", 8, false);
    let chr = b.int("char", 1, true);
    let u8t = b.int("unsigned char", 1, false);
    let fwd = b.raw("list_head", KIND_FWD, 0, false, 0, &[]);
    let fwd_ptr = b.raw("", KIND_PTR, 0, false, fwd, &[]);
    let list = b.composite("list_head", false, 16, &[("next", fwd_ptr, 0, 0), ("prev", fwd_ptr, 64, 0)]);
    let u32t = b.raw("u32", KIND_TYPEDEF, 0, false, uint, &[]);
    let const_u32 = b.raw("", KIND_CONST, 0, false, u32t, &[]);
    let comm = b.raw("", KIND_ARRAY, 0, false, 0, &[chr, int, 16]);
    let pids = b.raw("", KIND_ARRAY, 0, false, 0, &[list, int, 2]);
    let proto = b.raw("", KIND_FUNC_PROTO, 2, false, int, &[0, int, 0, 0]);
    let fn_ptr = b.raw("", KIND_PTR, 0, false, proto, &[]);
    b.raw("main", KIND_FUNC, 1, false, proto, &[]);
    let thread = b.composite("thread_struct", false, 16, &[("es", u32t, 0, 0), ("sp", ulong, 64, 0)]);
    let se = b.composite("sched_entity", false, 8, &[("on_rq", uint, 0, 0), ("x", uint, 32, 0)]);
    let state = b.raw("", KIND_ENUM, 2, false, 4, &[0, 0, 0, 2]);
    let inner = b.composite("", false, 2, &[("a", u8t, 0, 0), ("b", u8t, 8, 0)]);
    let anon = b.composite("", true, 4, &[("__state", uint, 0, 0), ("", inner, 0, 0)]);
    b.composite(
        "task_struct",
        false,
        128,
        &[
            ("", anon, 0, 0),
            ("flags", const_u32, 32, 0),
            ("tasks", list, 64, 0),
            ("on_cpu", uint, 192, 1),
            ("in_iowait", uint, 193, 3),
            ("comm", comm, 224, 0),
            ("thread", thread, 384, 0),
            ("se", se, 512, 0),
            ("fn", fn_ptr, 576, 0),
            ("pids", pids, 640, 0),
            ("state", state, 896, 0),
        ],
    );
    let counter = b.composite("", false, 4, &[("counter", int, 0, 0)]);
    b.raw("atomic_t", KIND_TYPEDEF, 0, false, counter, &[]);
    b.raw("only_declared", KIND_FWD, 0, true, 0, &[]);
    b.build()
}
