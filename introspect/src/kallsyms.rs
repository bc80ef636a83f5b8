//! The guest kernel's own symbol table (kallsyms), decoded from guest memory
//! with no System.map, so symbols are right for whatever kernel is running
//! and wherever KASLR put it.
//!
//! `scripts/kallsyms.c` (Linux 6.1, `CONFIG_KALLSYMS_BASE_RELATIVE=y`)
//! emits into `.rodata`, each table 8-byte aligned and in this order:
//! `kallsyms_offsets` (s32 per symbol), `kallsyms_relative_base` (u64),
//! `kallsyms_num_syms` (u32), `kallsyms_names` (length-prefixed token
//! strings), `kallsyms_markers` (u32 offset of every 256th name),
//! `kallsyms_seqs_of_names` (3-byte big-endian index per symbol, sorted by
//! name), `kallsyms_token_table` (256 NUL-terminated tokens) and
//! `kallsyms_token_index` (256 u16 offsets into the token table).
//!
//! [`Kallsyms::locate`] finds them the way vmlinux-to-elf does: it scans the
//! kernel image forward from the 2 MiB boundary at or below LSTAR for the
//! single-digit tokens `"0\0" .. "9\0"` (tokens 0x30..0x39), checks the
//! token index that follows, then walks backwards through the other tables,
//! checking each against the next. Every read is bounded by the scanned
//! image, every walk by a count, and every mismatch is an error value.

use crate::name_index::NameIndex;
use std::fmt;
use std::ops::Range;

use crate::error::{IntrospectError, Result};
use crate::translate::KernelMemory;

/// `_text` is aligned to this (CONFIG_PHYSICAL_ALIGN on x86_64), so the
/// image starts at a multiple of it at or below LSTAR.
const KERNEL_ALIGN: u64 = 2 << 20;
/// How far past that boundary the kallsyms tables may lie (text, the
/// text/rodata gap and rodata of even a large kernel fit well within).
const SCAN_SPAN: u64 = 64 << 20;
/// How much of the image is read at a time.
const CHUNK: u64 = 1 << 20;
const PAGE: u64 = 0x1000;
/// Upper bound on the token table's size (real ones are ~1-2 KiB).
const MAX_TOKEN_TABLE: usize = 32 << 10;
/// Bytes a signature hit needs after it before it can be judged.
const TOKEN_LOOKAHEAD: usize = MAX_TOKEN_TABLE + 512 + 8;
/// Upper bound on offsets + relative base + names + markers + seqs before
/// the token table (~5 MiB for a 250k-symbol distribution kernel).
const MAX_TABLES_BEFORE_TOKENS: u64 = 16 << 20;
/// `kallsyms_seqs_of_names` entries are 3 bytes wide.
const MAX_SYMS: u32 = 1 << 24;
/// Longest name the kernel accepts (KSYM_NAME_LEN), plus the type char.
const MAX_NAME: usize = 512;
/// Candidate `kallsyms_num_syms` positions per token table that pass the
/// cheap checks and get a full (up to 16 MiB) decode.
const MAX_FULL_DECODES: usize = 8;
/// Signature hits examined before giving up (each is cheap to reject).
const MAX_HITS: usize = 1 << 16;
/// Well-formed token tables tried before giving up (each costs a backward
/// scan of the tables before it).
const MAX_TOKEN_TABLES: usize = 16;
/// Index of the token "0" in a token table: single-character tokens sit at
/// their own byte value.
const DIGIT_ZERO_TOKEN: usize = b'0' as usize;
/// `"0\0" "1\0" ... "9\0"`: tokens 0x30..0x39 as laid out in the table.
const DIGIT_TOKENS: [u8; 20] =
    [b'0', 0, b'1', 0, b'2', 0, b'3', 0, b'4', 0, b'5', 0, b'6', 0, b'7', 0, b'8', 0, b'9', 0];

fn kerr(msg: impl Into<String>) -> IntrospectError {
    IntrospectError::Kallsyms(msg.into())
}

fn align_up(v: u64, a: u64) -> Option<u64> {
    let mask = a.checked_sub(1)?;
    Some(v.checked_add(mask)? & !mask)
}

/// One kernel symbol as kallsyms knows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Symbol {
    pub name: String,
    /// Runtime (post-KASLR) address; per-CPU symbols are offsets into the
    /// per-CPU area.
    pub addr: u64,
    /// `nm`-style type: `T`/`t` text, `D`/`d` data, `R`/`r` rodata, `B`/`b`
    /// bss, `W`/`w` weak; per-CPU symbols are `A` (absolute).
    pub kind: char,
}

/// An address as `symbol+offset/size`, like the kernel's `%pS`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SymbolAt {
    pub name: String,
    /// Start of the symbol.
    pub addr: u64,
    /// Distance of the resolved address from `addr`.
    pub offset: u64,
    /// Distance from `addr` to the next symbol at a higher address.
    pub size: u64,
}

impl SymbolAt {
    /// `name+0x1a/0x40`, the form kernel stack traces use.
    pub fn format(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for SymbolAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}+{:#x}/{:#x}", self.name, self.offset, self.size)
    }
}

/// Where the kallsyms tables were found (guest-virtual addresses), for
/// diagnostics and for cross-checking other decoders.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KallsymsTables {
    /// `kallsyms_offsets`, one s32 per symbol.
    pub offsets: u64,
    /// Address of `kallsyms_relative_base`.
    pub relative_base_addr: u64,
    /// Value of `kallsyms_relative_base` (the runtime address symbol
    /// offsets are relative to).
    pub relative_base: u64,
    /// Address and value of `kallsyms_num_syms`.
    pub num_syms_addr: u64,
    pub num_syms: u32,
    /// The remaining tables, in the order they are laid out.
    pub names: u64,
    pub markers: u64,
    pub seqs_of_names: u64,
    pub token_table: u64,
    pub token_index: u64,
    /// Per-CPU symbols are stored as absolute values (non-negative offsets)
    /// and all others relative to `relative_base - 1` (negative offsets).
    pub absolute_percpu: bool,
}

/// The guest kernel's symbols, indexed by name and by address. Built once;
/// lookups are hash-map or binary-search fast. Serializable with its
/// indexes, so a host-side cache keyed by the tables' bytes can skip the
/// scan and the decode (see [`Kallsyms::extent`] and [`Kallsyms::rebased`]).
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct Kallsyms {
    /// Kallsyms order (sorted by address as the kernel stores it).
    symbols: Vec<Symbol>,
    /// Indices into `symbols`, sorted by address; symbols at the same
    /// address stay in kallsyms order.
    by_addr: Vec<usize>,
    /// Indices into `symbols` with that name, in kallsyms order.
    by_name: NameIndex<usize>,
    /// Addresses `resolve` answers for (the kernel's `is_kernel()`).
    kernel: Range<u64>,
    /// `_end`: the kernel uses it as the end of the last symbol.
    end_of_image: Option<u64>,
    text: Option<Range<u64>>,
    tables: Option<KallsymsTables>,
}

impl fmt::Debug for Kallsyms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kallsyms")
            .field("symbols", &self.symbols.len())
            .field("kernel", &self.kernel)
            .field("text", &self.text)
            .field("tables", &self.tables)
            .finish()
    }
}

impl Kallsyms {
    /// Finds and decodes the kallsyms tables in the kernel image around
    /// `lstar` (MSR_LSTAR = runtime `entry_SYSCALL_64`, so this works with
    /// or without KASLR). Fails if no consistent set of tables is found.
    pub fn locate(mem: &dyn KernelMemory, lstar: u64) -> Result<Kallsyms> {
        Kallsyms::locate_with_run(mem, lstar).map(|(k, _)| k)
    }

    /// [`Kallsyms::locate`], also giving the bytes of the table run
    /// ([`Kallsyms::extent`]) exactly as the decoder read them: a cache
    /// keyed by them holds what those very bytes decode to, even if the
    /// guest rewrites its memory meanwhile. `None` when there is no extent.
    pub fn locate_with_run(mem: &dyn KernelMemory, lstar: u64) -> Result<(Kallsyms, Option<Vec<u8>>)> {
        let base = lstar & !(KERNEL_ALIGN - 1);
        let limit = base.saturating_add(SCAN_SPAN) & !(PAGE - 1);
        let mut scan = ImageScan::new(mem, base, limit);
        let mut search = SearchState::default();
        loop {
            let growth = scan.grow();
            let len = scan.region.bytes.len();
            let to = if growth == Growth::More { len.saturating_sub(TOKEN_LOOKAHEAD) } else { len };
            if let Some(k) = search.run(&scan.region, to, lstar, growth != Growth::More)? {
                let run = k.extent().and_then(|e| scan.region.slice(e.start, e.len, "").ok().map(<[u8]>::to_vec));
                return Ok((k, run));
            }
            match growth {
                Growth::More => {}
                Growth::SegmentEnd => {
                    scan.next_segment();
                    search.next = 0;
                }
                Growth::Finished => break,
            }
        }
        Err(search.not_found(base, scan.cursor))
    }

    /// Builds the indexes over symbols in kallsyms order (used by
    /// [`Kallsyms::locate`]; also lets tests and other symbol sources share
    /// the lookup code).
    pub fn from_symbols(symbols: Vec<Symbol>) -> Kallsyms {
        let mut by_addr: Vec<usize> = (0..symbols.len()).collect();
        // Stable: aliases keep kallsyms order, as the kernel's own table does.
        by_addr.sort_by_key(|&i| symbols.get(i).map_or(0, |s| s.addr));
        let name_of = |i: &usize| symbols.get(*i).map_or(&[][..], |s| s.name.as_bytes());
        let by_name = NameIndex::build((0..symbols.len()).collect(), name_of);
        let first = |name: &str| by_name.get(name.as_bytes(), name_of).next().and_then(|&i| symbols.get(i)).map(|s| s.addr);
        let lowest_kernel = symbols.iter().filter(|s| s.kind != 'A').map(|s| s.addr).min();
        let highest = symbols.iter().map(|s| s.addr).max();
        let start = first("_stext").or(first("_text")).or(lowest_kernel).unwrap_or(0);
        let end_of_image = first("_end");
        let end = end_of_image.or(highest.map(|h| h.saturating_add(1))).unwrap_or(0);
        let text_start = first("_stext").or(first("_text"));
        let text = match (text_start, first("_etext")) {
            (Some(s), Some(e)) if s <= e => Some(s..e),
            _ => None,
        };
        Kallsyms { symbols, by_addr, by_name, kernel: start..end, end_of_image, text, tables: None }
    }

    /// All addresses of `name`, in kallsyms order: livepatch's `old_sympos`
    /// N (1-based) is the N-th. Empty if the kernel has no such symbol.
    pub fn lookup(&self, name: &str) -> Vec<u64> {
        self.lookup_symbols(name).into_iter().map(|s| s.addr).collect()
    }

    /// All symbols named `name`, in kallsyms order (with their types).
    pub fn lookup_symbols(&self, name: &str) -> Vec<&Symbol> {
        let name_of = |i: &usize| self.symbols.get(*i).map_or(&[][..], |s| s.name.as_bytes());
        self.by_name.get(name.as_bytes(), name_of).filter_map(|&i| self.symbols.get(i)).collect()
    }

    /// The address of a name that must be unique (sympos 0).
    pub fn lookup_unique(&self, name: &str) -> Result<u64> {
        self.address_of(name, 0)
    }

    /// Livepatch's `klp_find_object_symbol()` for vmlinux: `sympos` 0 means
    /// the name must be unique, N >= 1 picks the N-th occurrence in kallsyms
    /// order and fails if there are fewer.
    pub fn address_of(&self, name: &str, sympos: u32) -> Result<u64> {
        let addrs = self.lookup(name);
        let count = addrs.len();
        if count == 0 {
            return Err(IntrospectError::NoSymbol(name.to_string()));
        }
        if sympos == 0 {
            return match addrs.as_slice() {
                [only] => Ok(*only),
                _ => Err(kerr(format!(
                    "symbol {name:?} is ambiguous: {count} symbols have this name (give sympos 1..={count})"
                ))),
            };
        }
        let index = usize::try_from(sympos - 1).map_err(|_| kerr("sympos does not fit in usize"))?;
        addrs.get(index).copied().ok_or_else(|| {
            kerr(format!("symbol position {sympos} for symbol {name:?} not found ({count} occurrence(s))"))
        })
    }

    /// `symbol+offset/size` for an address inside the kernel image, as the
    /// kernel's `get_symbol_pos()` computes it: the first of several aliases
    /// at the same address wins, and the size runs to the next symbol at a
    /// higher address (or `_end` for the last one).
    pub fn resolve(&self, addr: u64) -> Option<SymbolAt> {
        if !self.kernel.contains(&addr) {
            return None;
        }
        let sym = |pos: usize| self.by_addr.get(pos).and_then(|&i| self.symbols.get(i));
        let above = self.by_addr.partition_point(|&i| self.symbols.get(i).is_some_and(|s| s.addr <= addr));
        let start = sym(above.checked_sub(1)?)?.addr;
        let first_alias = self.by_addr.partition_point(|&i| self.symbols.get(i).is_some_and(|s| s.addr < start));
        let found = sym(first_alias)?;
        let end = match sym(above) {
            Some(next) => next.addr,
            None => self.end_of_image.filter(|e| *e >= start).unwrap_or(start),
        };
        Some(SymbolAt { name: found.name.clone(), addr: start, offset: addr - start, size: end - start })
    }

    /// Symbols in kallsyms order.
    pub fn symbols(&self) -> impl Iterator<Item = &Symbol> + '_ {
        self.symbols.iter()
    }

    /// Symbols sorted by address (aliases in kallsyms order).
    pub fn symbols_by_addr(&self) -> impl Iterator<Item = &Symbol> + '_ {
        self.by_addr.iter().filter_map(|&i| self.symbols.get(i))
    }

    /// Number of symbols (kallsyms_num_syms).
    pub fn len(&self) -> usize {
        self.symbols.len()
    }

    /// True only for an index built from no symbols.
    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }

    /// Kernel text, `_stext` (or `_text`) to `_etext`, if both are known.
    pub fn text_range(&self) -> Option<Range<u64>> {
        self.text.clone()
    }

    /// Addresses `resolve` answers for: `_stext` (or the lowest non-per-CPU
    /// symbol) to `_end`.
    pub fn kernel_range(&self) -> Range<u64> {
        self.kernel.clone()
    }

    /// Where the tables were found (None when built by `from_symbols`).
    pub fn tables(&self) -> Option<&KallsymsTables> {
        self.tables.as_ref()
    }

    /// The guest memory the decoded symbols came from: one run holding
    /// every table, from `kallsyms_offsets` to the end of
    /// `kallsyms_token_index` (6.1 order) or from `kallsyms_num_syms` to the
    /// end of `kallsyms_seqs_of_names` (6.12 order). Two guests whose runs
    /// are byte-identical, apart from `kallsyms_relative_base` (which KASLR
    /// relocates), decode to the same symbols shifted by the difference of
    /// their relative bases. `None` when the tables were not found in
    /// memory or are laid out in neither order.
    pub fn extent(&self) -> Option<TablesExtent> {
        let t = self.tables.as_ref()?;
        let seqs_end = t.seqs_of_names.checked_add(3 * u64::from(t.num_syms))?;
        let index_end = t.token_index.checked_add(TOKEN_INDEX_LEN)?;
        let offsets_first = t.offsets < t.relative_base_addr
            && t.relative_base_addr < t.num_syms_addr
            && t.num_syms_addr < t.names
            && t.names < t.markers
            && t.markers < t.seqs_of_names
            && t.seqs_of_names < t.token_table
            && t.token_table < t.token_index;
        let tokens_first = t.num_syms_addr < t.names
            && t.names < t.markers
            && t.markers < t.token_table
            && t.token_table < t.token_index
            && t.token_index < t.offsets
            && t.offsets < t.relative_base_addr
            && t.relative_base_addr < t.seqs_of_names;
        let (start, end) = if offsets_first {
            (t.offsets, index_end)
        } else if tokens_first {
            (t.num_syms_addr, seqs_end)
        } else {
            return None;
        };
        let len = end.checked_sub(start)?;
        (len <= MAX_EXTENT).then_some(TablesExtent { start, len, relative_base_at: t.relative_base_addr - start })
    }

    /// Fails unless the decoded kernel, from the relative base to its
    /// highest symbol, contains `lstar` (the guest's syscall entry): the
    /// check that tells the guest's own tables from a stray copy.
    pub fn check_contains(&self, lstar: u64) -> Result<()> {
        let t = self.tables.as_ref().ok_or_else(|| kerr("symbols not decoded from guest tables"))?;
        let highest = self.symbols.iter().map(|s| s.addr).max().unwrap_or(0);
        if lstar < t.relative_base || lstar > highest {
            return Err(kerr(format!(
                "tables at {:#x} describe {:#x}..{highest:#x}, which does not contain LSTAR {lstar:#x}",
                t.token_table, t.relative_base
            )));
        }
        Ok(())
    }

    /// The same tables in a guest whose `kallsyms_relative_base` is
    /// `relative_base`: every kernel address moves by the difference, the
    /// absolute per-CPU offsets stay. For a cached decode checked against
    /// the other guest's bytes (see [`Kallsyms::extent`]).
    pub fn rebased(mut self, relative_base: u64) -> Result<Kallsyms> {
        let Some(mut t) = self.tables else {
            return Err(kerr("symbols that were not decoded from guest tables cannot be rebased"));
        };
        let delta = relative_base.wrapping_sub(t.relative_base) as i64;
        let shift = |a: u64| -> Result<u64> {
            a.checked_add_signed(delta)
                .ok_or_else(|| kerr(format!("{a:#x} moved by {delta:#x} to relative base {relative_base:#x} overflows")))
        };
        for s in &mut self.symbols {
            // Absolute per-CPU offsets are non-negative s32 values; every
            // other symbol is at or above the relative base.
            if !(t.absolute_percpu && s.addr <= i32::MAX as u64) {
                s.addr = shift(s.addr)?;
            }
        }
        self.kernel = shift(self.kernel.start)?..shift(self.kernel.end)?;
        self.end_of_image = self.end_of_image.map(shift).transpose()?;
        self.text = match self.text.take() {
            Some(r) => Some(shift(r.start)?..shift(r.end)?),
            None => None,
        };
        t.offsets = shift(t.offsets)?;
        t.relative_base_addr = shift(t.relative_base_addr)?;
        t.relative_base = relative_base;
        t.num_syms_addr = shift(t.num_syms_addr)?;
        t.names = shift(t.names)?;
        t.markers = shift(t.markers)?;
        t.seqs_of_names = shift(t.seqs_of_names)?;
        t.token_table = shift(t.token_table)?;
        t.token_index = shift(t.token_index)?;
        self.tables = Some(t);
        Ok(self)
    }
}

/// `kallsyms_token_index`: 256 u16 offsets.
const TOKEN_INDEX_LEN: u64 = 512;
/// The largest table run [`Kallsyms::extent`] describes (a distro kernel's
/// is a few MiB).
pub const MAX_EXTENT: u64 = 64 << 20;

/// Where a guest's kallsyms tables lie, for a cache keyed by their bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TablesExtent {
    /// Guest-virtual address of `kallsyms_offsets`.
    pub start: u64,
    pub len: u64,
    /// Offset of the 8 bytes of `kallsyms_relative_base` inside the run.
    pub relative_base_at: u64,
}

/// A contiguous run of mapped guest-virtual memory starting at `base`.
struct Region {
    base: u64,
    bytes: Vec<u8>,
}

impl Region {
    fn index(&self, va: u64) -> Option<usize> {
        usize::try_from(va.checked_sub(self.base)?).ok()
    }

    fn va(&self, index: usize) -> Result<u64> {
        self.base.checked_add(index as u64).ok_or(IntrospectError::Overflow(self.base))
    }

    /// `len` bytes at `va`, or an error naming `what` if they are not all in
    /// the region.
    fn slice(&self, va: u64, len: u64, what: &str) -> Result<&[u8]> {
        let outside = || kerr(format!("{what} at {va:#x} (+{len:#x}) lies outside the scanned kernel image"));
        let start = self.index(va).ok_or_else(outside)?;
        let len = usize::try_from(len).map_err(|_| outside())?;
        let end = start.checked_add(len).ok_or_else(outside)?;
        self.bytes.get(start..end).ok_or_else(outside)
    }

    fn u32_at(&self, va: u64, what: &str) -> Result<u32> {
        let b = self.slice(va, 4, what)?;
        Ok(u32::from_le_bytes(b.try_into().map_err(|_| kerr("short read"))?))
    }

    fn u64_at(&self, va: u64, what: &str) -> Result<u64> {
        let b = self.slice(va, 8, what)?;
        Ok(u64::from_le_bytes(b.try_into().map_err(|_| kerr("short read"))?))
    }
}

/// Reads the kernel image chunk by chunk into contiguous mapped segments
/// (the kallsyms tables lie within one: they are contiguous in `.rodata`).
/// Unmapped pages (freed init memory, the text/rodata gap) end a segment,
/// and a not-present upper-level entry skips its whole range at once.
struct ImageScan<'a> {
    mem: &'a dyn KernelMemory,
    /// The current segment; `region.end()` is where reading resumes while
    /// the segment is open.
    region: Region,
    /// Next address to read.
    cursor: u64,
    limit: u64,
    /// Read buffer reused across chunks: a sparse image must not cost one
    /// fresh 1 MiB allocation per unmapped page.
    chunk: Vec<u8>,
}

/// What one [`ImageScan::grow`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Growth {
    /// The segment got longer and may continue.
    More,
    /// The segment ended at an unmapped page; reading resumes after the hole.
    SegmentEnd,
    /// Nothing more to read.
    Finished,
}

/// Bytes covered by one entry at a page-table level (1 = PTE).
fn level_span(level: u8) -> u64 {
    match level {
        2 => 1 << 21,
        3 => 1 << 30,
        4 => 1 << 39,
        5 => 1 << 48,
        _ => PAGE,
    }
}

impl<'a> ImageScan<'a> {
    fn new(mem: &'a dyn KernelMemory, base: u64, limit: u64) -> ImageScan<'a> {
        ImageScan { mem, region: Region { base, bytes: Vec::new() }, cursor: base, limit, chunk: Vec::new() }
    }

    /// Starts a new, empty segment at the cursor.
    fn next_segment(&mut self) {
        self.region = Region { base: self.cursor, bytes: Vec::new() };
    }

    /// Reads the next chunk into the current segment, skipping holes while
    /// the segment is still empty. Every iteration advances the cursor, and
    /// the cursor never passes `limit`.
    fn grow(&mut self) -> Growth {
        loop {
            if self.cursor >= self.limit {
                return Growth::Finished;
            }
            if self.region.bytes.is_empty() {
                self.region.base = self.cursor;
            }
            let start = self.cursor;
            let Ok(want) = usize::try_from((self.limit - start).min(CHUNK)) else { return Growth::Finished };
            // Only bytes a read succeeded on are used: no need to zero.
            let mut buf = std::mem::take(&mut self.chunk);
            buf.resize(want, 0);
            if self.mem.read_virt(start, &mut buf).is_ok() {
                self.region.bytes.extend_from_slice(&buf);
                self.chunk = buf;
                self.cursor = start + want as u64;
                return Growth::More;
            }
            // Something in this chunk is unmapped: keep the pages before it.
            let mut good = 0usize;
            let mut resume = None;
            while good < want {
                let va = start + good as u64;
                let n = (PAGE as usize).min(want - good);
                let Some(page) = buf.get_mut(good..good + n) else { break };
                match self.mem.read_virt(va, page) {
                    Ok(()) => good += n,
                    Err(e) => {
                        resume = Some(self.resume_after_hole(va, &e));
                        break;
                    }
                }
            }
            self.region.bytes.extend_from_slice(buf.get(..good).unwrap_or(&[]));
            self.chunk = buf;
            match resume {
                None => {
                    // The page-by-page retry read everything after all.
                    self.cursor = start + good as u64;
                    return Growth::More;
                }
                Some(next) => {
                    self.cursor = next;
                    if !self.region.bytes.is_empty() {
                        return Growth::SegmentEnd;
                    }
                }
            }
        }
    }

    /// Where to resume after failing to read the (page-aligned, below
    /// `limit`) page at `va`: past the whole range a not-present entry
    /// covers, past one page for other failures, and nowhere (the limit)
    /// when the address space ends. Always beyond `va`.
    fn resume_after_hole(&self, va: u64, err: &IntrospectError) -> u64 {
        let next = match err {
            IntrospectError::NotMapped { level, .. } => va.checked_add(1).and_then(|v| align_up(v, level_span(*level))),
            IntrospectError::NonCanonical(_) | IntrospectError::Overflow(_) => None,
            _ => va.checked_add(PAGE),
        };
        next.map_or(self.limit, |n| n.min(self.limit))
    }
}

/// First `s` in `from..to` where the digit tokens `"0\0".."9\0"` start
/// (preceded by the NUL ending token 0x2f). Looks at one byte in 20: any
/// occurrence covers exactly one index `i` with `i % 20 == 19`, and the byte
/// there tells where the occurrence must start.
fn find_digit_tokens(bytes: &[u8], from: usize, to: usize) -> Option<usize> {
    let n = DIGIT_TOKENS.len();
    let mut i = from.checked_add((2 * n - 1 - from % n) % n)?;
    let stop = to.saturating_add(n - 1).min(bytes.len());
    while i < stop {
        let b = *bytes.get(i)?;
        let start = if b.is_ascii_digit() {
            i.checked_sub(2 * usize::from(b - b'0'))
        } else if b == 0 {
            match i.checked_sub(1).and_then(|p| bytes.get(p)) {
                Some(d) if d.is_ascii_digit() => i.checked_sub(1 + 2 * usize::from(d - b'0')),
                _ => None,
            }
        } else {
            None
        };
        if let Some(s) = start {
            let matches = bytes.get(s..s + n) == Some(&DIGIT_TOKENS[..])
                && s.checked_sub(1).and_then(|p| bytes.get(p)) == Some(&0);
            if s >= from && s < to && matches {
                return Some(s);
            }
        }
        i = i.checked_add(n)?;
    }
    None
}

/// `kallsyms_token_table` + `kallsyms_token_index`, checked and expanded.
struct TokenTable {
    addr: u64,
    index_addr: u64,
    tokens: Vec<Vec<u8>>,
}

/// Reads the token table whose digit tokens start at region index
/// `digits_at`: skips forward over tokens 0x30..0xff to the table's end,
/// reads the index (8-aligned after it) and checks that it describes
/// exactly the strings found.
fn parse_token_table(region: &Region, digits_at: usize) -> Result<TokenTable> {
    let digits_va = region.va(digits_at)?;
    let mut remaining = 256 - DIGIT_ZERO_TOKEN;
    let mut pos = digits_at;
    let walk_end = digits_at.saturating_add(MAX_TOKEN_TABLE);
    while remaining > 0 {
        if pos >= walk_end {
            return Err(kerr(format!("token table at {digits_va:#x}: tokens 0x30..0xff do not end within bounds")));
        }
        let b = *region
            .bytes
            .get(pos)
            .ok_or_else(|| kerr(format!("token table at {digits_va:#x} runs past the scanned image")))?;
        if b == 0 {
            remaining -= 1;
        }
        pos += 1;
    }
    let table_end = region.va(pos)?;
    let index_addr = align_up(table_end, 8).ok_or(IntrospectError::Overflow(table_end))?;
    let raw = region.slice(index_addr, 512, "kallsyms_token_index")?;
    let index: Vec<u16> = raw.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
    let zero_at = u64::from(*index.get(DIGIT_ZERO_TOKEN).ok_or_else(|| kerr("short token index"))?);
    let addr = digits_va
        .checked_sub(zero_at)
        .ok_or_else(|| kerr(format!("token index at {index_addr:#x} points before address 0")))?;
    let bad = |why: &str| kerr(format!("token index at {index_addr:#x} (table {addr:#x}): {why}"));
    if !addr.is_multiple_of(8) {
        return Err(bad("table start is not 8-byte aligned"));
    }
    if index.first() != Some(&0) {
        return Err(bad("first offset is not 0"));
    }
    let table_len = table_end - addr;
    let table = region.slice(addr, table_len, "kallsyms_token_table")?;
    let mut tokens = Vec::with_capacity(256);
    for i in 0..256usize {
        let start = usize::from(*index.get(i).ok_or_else(|| bad("short"))?);
        let end = match index.get(i + 1) {
            Some(&next) if i + 1 < 256 => usize::from(next),
            _ => table.len(),
        };
        if end <= start {
            return Err(bad(&format!("offsets not strictly increasing at token {i:#x}")));
        }
        let token = table.get(start..end - 1).ok_or_else(|| bad(&format!("token {i:#x} out of the table")))?;
        if table.get(end - 1) != Some(&0) || token.contains(&0) {
            return Err(bad(&format!("token {i:#x} is not one NUL-terminated string")));
        }
        tokens.push(token.to_vec());
    }
    Ok(TokenTable { addr, index_addr, tokens })
}

/// One entry of `kallsyms_names`: where its token bytes are and where the
/// next entry starts (offsets into the names table).
fn name_entry(names: &[u8], off: usize) -> Option<(Range<usize>, usize)> {
    let first = *names.get(off)?;
    let (len, header) = if first & 0x80 != 0 {
        let second = *names.get(off.checked_add(1)?)?;
        if second & 0x80 != 0 {
            return None; // only two-byte ULEB128 lengths exist
        }
        ((usize::from(first & 0x7f)) | (usize::from(second) << 7), 2)
    } else {
        (usize::from(first), 1)
    };
    if len == 0 {
        return None;
    }
    let data = off.checked_add(header)?;
    let next = data.checked_add(len)?;
    if next > names.len() {
        return None;
    }
    Some((data..next, next))
}

/// Expands one compressed name into its type char and name (`out` is
/// scratch space, reused across names).
fn expand_name(tokens: &[Vec<u8>], compressed: &[u8], out: &mut Vec<u8>) -> Result<(char, String)> {
    out.clear();
    for &b in compressed {
        let token = tokens.get(usize::from(b)).ok_or_else(|| kerr("token table has fewer than 256 tokens"))?;
        out.extend_from_slice(token);
        if out.len() > MAX_NAME + 1 {
            return Err(kerr(format!("symbol name longer than {MAX_NAME} bytes")));
        }
    }
    let (&kind, name) = out.split_first().ok_or_else(|| kerr("symbol expands to nothing"))?;
    if name.is_empty() {
        return Err(kerr("symbol has a type but no name"));
    }
    Ok((char::from(kind), String::from_utf8_lossy(name).into_owned()))
}

/// Converts `kallsyms_offsets` to runtime addresses as the kernel's
/// `kallsyms_sym_address()` does. With absolute per-CPU symbols (any
/// negative offset), non-negative offsets are absolute values and negative
/// ones count down from `relative_base - 1`; otherwise every offset is an
/// unsigned distance from `relative_base`. The tool that wrote the table
/// took `relative_base` from the lowest relative symbol, so an offset of -1
/// (resp. 0) must occur, and addresses come out sorted.
fn symbol_addresses(offsets: &[i32], relative_base: u64) -> Result<(Vec<u64>, bool)> {
    let absolute_percpu = offsets.iter().any(|&o| o < 0);
    let mut addrs = Vec::with_capacity(offsets.len());
    for &o in offsets {
        let addr = if !absolute_percpu {
            relative_base.checked_add(u64::from(o as u32))
        } else if o >= 0 {
            Some(o as u64)
        } else {
            // relative_base - 1 - o, with -1 - o >= 0
            relative_base.checked_add((-1i64 - i64::from(o)) as u64)
        };
        addrs.push(addr.ok_or_else(|| {
            kerr(format!("offset {o:#x} from relative base {relative_base:#x} overflows the address space"))
        })?);
    }
    let base_mark = if absolute_percpu { -1 } else { 0 };
    if !offsets.contains(&base_mark) {
        return Err(kerr(format!("no symbol sits at the relative base {relative_base:#x} (offset {base_mark})")));
    }
    let inversions = addrs.windows(2).filter(|w| w[1] < w[0]).count();
    if inversions.saturating_mul(100) > addrs.len() {
        return Err(kerr(format!("{inversions} of {} addresses are out of order", addrs.len())));
    }
    Ok((addrs, absolute_percpu))
}

/// The order `scripts/kallsyms.c` emits the tables in. It is not a
/// compile-time option but differs between kernel lines, so the decoder
/// tries both and keeps the one that decodes consistently (markers, seqs
/// permutation, sorted addresses, LSTAR inside).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TableOrder {
    /// offsets, relative_base, num_syms, names, markers, seqs_of_names,
    /// token_table, token_index (the 6.1 line).
    OffsetsFirst,
    /// num_syms, names, markers, token_table, token_index, offsets,
    /// relative_base, seqs_of_names (the 6.12 line).
    TokensBeforeOffsets,
}

const TABLE_ORDERS: [TableOrder; 2] = [TableOrder::OffsetsFirst, TableOrder::TokensBeforeOffsets];

/// Where every table would be if `kallsyms_num_syms` were at
/// `num_syms_addr` and the tables came in `order`. Every position follows
/// from the count and the token table: each table starts 8-aligned
/// (`.balign 8` before every label), the names start right after the count.
#[derive(Clone, Copy, Debug)]
struct Layout {
    order: TableOrder,
    num_syms: u32,
    num_syms_addr: u64,
    names: u64,
    names_len: u64,
    markers: u64,
    markers_count: u64,
    seqs: u64,
    offsets: u64,
    relative_base_addr: u64,
}

impl Layout {
    /// One past the last byte of the tables that follow the token index
    /// (the region must reach it before the layout can be decoded).
    fn end(&self) -> Option<u64> {
        match self.order {
            TableOrder::OffsetsFirst => None,
            TableOrder::TokensBeforeOffsets => self.seqs.checked_add(3 * u64::from(self.num_syms)),
        }
    }
}

/// Cheap test of a `kallsyms_num_syms` candidate: plausible count with a
/// zero pad word, markers[0] == 0 and the first 256 names ending where
/// markers[1] (or the markers table) says.
fn candidate_layout(region: &Region, tt: &TokenTable, num_syms_addr: u64, order: TableOrder) -> Option<Layout> {
    let num_syms = region.u32_at(num_syms_addr, "").ok()?;
    let pad = region.u32_at(num_syms_addr.checked_add(4)?, "").ok()?;
    if num_syms == 0 || num_syms > MAX_SYMS || pad != 0 {
        return None;
    }
    let n = u64::from(num_syms);
    let names = num_syms_addr.checked_add(8)?;
    let markers_count = n.div_ceil(256);
    let markers_len = align_up(4 * markers_count, 8)?;
    let offsets_len = align_up(4 * n, 8)?;
    let (markers, seqs, offsets, relative_base_addr) = match order {
        TableOrder::OffsetsFirst => {
            let seqs = tt.addr.checked_sub(align_up(3 * n, 8)?)?;
            let relative_base_addr = num_syms_addr.checked_sub(8)?;
            (seqs.checked_sub(markers_len)?, seqs, relative_base_addr.checked_sub(offsets_len)?, relative_base_addr)
        }
        TableOrder::TokensBeforeOffsets => {
            let offsets = align_up(tt.index_addr.checked_add(TOKEN_INDEX_LEN)?, 8)?;
            let relative_base_addr = offsets.checked_add(offsets_len)?;
            (tt.addr.checked_sub(markers_len)?, relative_base_addr.checked_add(8)?, offsets, relative_base_addr)
        }
    };
    let names_len = markers.checked_sub(names)?;
    if names_len < 2 * n {
        return None;
    }
    if region.u32_at(markers, "").ok()? != 0 {
        return None;
    }
    // Names come right before the markers; a cheap slice of them.
    let names_bytes = region.slice(names, names_len, "").ok()?;
    let mut off = 0usize;
    for _ in 0..num_syms.min(256) {
        off = name_entry(names_bytes, off)?.1;
    }
    if num_syms > 256 {
        let second = region.u32_at(markers.checked_add(4)?, "").ok()?;
        if usize::try_from(second).ok()? != off {
            return None;
        }
    } else if align_up(names.checked_add(off as u64)?, 8)? != markers {
        return None;
    }
    Some(Layout {
        order,
        num_syms,
        num_syms_addr,
        names,
        names_len,
        markers,
        markers_count,
        seqs,
        offsets,
        relative_base_addr,
    })
}

/// Full decode of a candidate layout: every name against the markers, the
/// seqs as a permutation, the offsets into sorted addresses.
fn decode_layout(region: &Region, tt: &TokenTable, l: &Layout) -> Result<(Vec<Symbol>, KallsymsTables)> {
    let n = usize::try_from(l.num_syms).map_err(|_| kerr("symbol count does not fit"))?;
    let names = region.slice(l.names, l.names_len, "kallsyms_names")?;
    let markers_raw = region.slice(l.markers, 4 * l.markers_count, "kallsyms_markers")?;
    let markers: Vec<u32> = markers_raw.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let mut decoded = Vec::with_capacity(n);
    let mut scratch = Vec::with_capacity(MAX_NAME + 64);
    let mut off = 0usize;
    for i in 0..n {
        if i % 256 == 0 {
            let marker = markers.get(i / 256).copied().ok_or_else(|| kerr("too few kallsyms_markers"))?;
            if usize::try_from(marker).ok() != Some(off) {
                return Err(kerr(format!("kallsyms_markers[{}] = {marker:#x}, but name {i} is at {off:#x}", i / 256)));
            }
        }
        let (data, next) = name_entry(names, off)
            .ok_or_else(|| kerr(format!("kallsyms_names entry {i} at offset {off:#x} is malformed or truncated")))?;
        let compressed = names.get(data).ok_or_else(|| kerr("name out of range"))?;
        decoded.push(expand_name(&tt.tokens, compressed, &mut scratch).map_err(|e| kerr(format!("name {i}: {e}")))?);
        off = next;
    }
    let names_end = l.names.checked_add(off as u64).ok_or(IntrospectError::Overflow(l.names))?;
    if align_up(names_end, 8) != Some(l.markers) {
        return Err(kerr(format!(
            "kallsyms_names ends at {names_end:#x}, not just before the markers at {:#x}",
            l.markers
        )));
    }

    let seqs = region.slice(l.seqs, 3 * u64::from(l.num_syms), "kallsyms_seqs_of_names")?;
    let mut seen = vec![0u64; n.div_ceil(64)];
    for c in seqs.chunks_exact(3) {
        let seq = (usize::from(c[0]) << 16) | (usize::from(c[1]) << 8) | usize::from(c[2]);
        let word = seen.get_mut(seq / 64).ok_or_else(|| kerr(format!("kallsyms_seqs_of_names: {seq} out of range")))?;
        if *word & (1 << (seq % 64)) != 0 {
            return Err(kerr(format!("kallsyms_seqs_of_names: {seq} appears twice")));
        }
        *word |= 1 << (seq % 64);
    }

    let relative_base_addr = l.relative_base_addr;
    let relative_base = region.u64_at(relative_base_addr, "kallsyms_relative_base")?;
    let offsets_len = 4 * u64::from(l.num_syms);
    let offsets_addr = l.offsets;
    let offsets_raw = region.slice(offsets_addr, offsets_len, "kallsyms_offsets")?;
    let offsets: Vec<i32> = offsets_raw.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let (addrs, absolute_percpu) = symbol_addresses(&offsets, relative_base)?;

    let symbols = decoded.into_iter().zip(addrs).map(|((kind, name), addr)| Symbol { name, addr, kind }).collect();
    let tables = KallsymsTables {
        offsets: offsets_addr,
        relative_base_addr,
        relative_base,
        num_syms_addr: l.num_syms_addr,
        num_syms: l.num_syms,
        names: l.names,
        markers: l.markers,
        seqs_of_names: l.seqs,
        token_table: tt.addr,
        token_index: tt.index_addr,
        absolute_percpu,
    };
    Ok((symbols, tables))
}

/// What [`decode_around_tokens`] found.
enum TokensOutcome {
    Decoded(Box<Kallsyms>),
    /// A layout whose tables continue past the region's end, which is not
    /// yet final: decode again once the region has grown.
    NeedsMore,
}

/// Decodes the kallsyms tables around token table `tt`, checking that
/// `lstar` falls inside the decoded kernel. Tries every 8-aligned
/// `kallsyms_num_syms` position before the token table, nearest first, in
/// each [`TableOrder`]. `region_final` says the region will not grow.
fn decode_around_tokens(region: &Region, tt: &TokenTable, lstar: u64, region_final: bool) -> Result<TokensOutcome> {
    // kallsyms_num_syms is 8-aligned and at least a pad word, a name and
    // the markers (8 bytes each at least) before the token table.
    let lowest = region.base.max(tt.addr.saturating_sub(MAX_TABLES_BEFORE_TOKENS));
    let mut at = tt.addr.checked_sub(24).map(|a| a & !7);
    let region_end = region.va(region.bytes.len())?;
    let mut last_err = None;
    let mut full_decodes = 0usize;
    while let Some(x) = at.filter(|x| *x >= lowest) {
        for order in TABLE_ORDERS {
            let Some(layout) = candidate_layout(region, tt, x, order) else { continue };
            if layout.end().is_some_and(|e| e > region_end) && !region_final {
                return Ok(TokensOutcome::NeedsMore);
            }
            full_decodes += 1;
            if full_decodes > MAX_FULL_DECODES {
                break;
            }
            match decode_layout(region, tt, &layout) {
                Ok((symbols, tables)) => {
                    let mut k = Kallsyms::from_symbols(symbols);
                    k.tables = Some(tables);
                    k.check_contains(lstar)?;
                    return Ok(TokensOutcome::Decoded(Box::new(k)));
                }
                Err(e) => last_err = Some(e),
            }
        }
        if full_decodes > MAX_FULL_DECODES {
            break;
        }
        at = x.checked_sub(8);
    }
    Err(last_err.unwrap_or_else(|| {
        kerr(format!("token table at {:#x} has no kallsyms_num_syms/names/markers before it", tt.addr))
    }))
}

/// Progress of the signature search over a growing region.
#[derive(Default)]
struct SearchState {
    next: usize,
    hits: usize,
    token_tables: usize,
    /// Why the last well-formed token table led nowhere (the interesting error).
    table_err: Option<IntrospectError>,
    /// Why the last signature hit was not a token table.
    token_err: Option<IntrospectError>,
}

impl SearchState {
    /// Tries every signature hit starting in `next..to`; Some on success.
    /// A hit whose tables continue past the region (not yet `region_final`)
    /// is tried again after the region grows.
    fn run(&mut self, region: &Region, to: usize, lstar: u64, region_final: bool) -> Result<Option<Kallsyms>> {
        while let Some(hit) = find_digit_tokens(&region.bytes, self.next, to) {
            self.next = hit + 1;
            self.hits += 1;
            if self.hits > MAX_HITS || self.token_tables >= MAX_TOKEN_TABLES {
                return Err(kerr(format!(
                    "gave up after {} signature hits and {} token tables without a consistent kallsyms{}",
                    self.hits - 1,
                    self.token_tables,
                    self.last_err().map(|e| format!(" (last: {e})")).unwrap_or_default()
                )));
            }
            let tt = match parse_token_table(region, hit) {
                Ok(tt) => tt,
                Err(e) => {
                    self.token_err = Some(e);
                    continue;
                }
            };
            match decode_around_tokens(region, &tt, lstar, region_final) {
                Ok(TokensOutcome::Decoded(k)) => return Ok(Some(*k)),
                Ok(TokensOutcome::NeedsMore) => {
                    // Not counted as a tried token table: the same hit is
                    // judged again with more of the image read.
                    self.next = hit;
                    self.hits -= 1;
                    return Ok(None);
                }
                Err(e) => {
                    self.token_tables += 1;
                    self.table_err = Some(e);
                }
            }
        }
        self.next = self.next.max(to);
        Ok(None)
    }

    fn last_err(&self) -> Option<&IntrospectError> {
        self.table_err.as_ref().or(self.token_err.as_ref())
    }

    fn not_found(&self, base: u64, end: u64) -> IntrospectError {
        kerr(format!(
            "no kallsyms tables found in {base:#x}..{end:#x} ({} signature hits, {} token tables{})",
            self.hits,
            self.token_tables,
            self.last_err().map(|e| format!("; last candidate: {e}")).unwrap_or_default()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::VecMemory;
    use crate::translate::AddressSpace;

    const TEXT: u64 = 0xffff_ffff_8100_0000;

    /// A symbol for the fake kernel; `percpu` ones get absolute offsets.
    #[derive(Clone)]
    struct Fake {
        kind: u8,
        name: String,
        addr: u64,
        percpu: bool,
    }

    fn fake(kind: u8, name: &str, addr: u64) -> Fake {
        Fake { kind, name: name.to_string(), addr, percpu: false }
    }

    fn percpu(name: &str, addr: u64) -> Fake {
        Fake { kind: b'A', name: name.to_string(), addr, percpu: true }
    }

    /// Tokens: printable ASCII stands for itself, a few merged tokens
    /// (including one that swallows the type char), filler elsewhere.
    fn tokens() -> Vec<Vec<u8>> {
        (0..256usize)
            .map(|i| match i {
                0x20..=0x7e => vec![i as u8],
                0x01 => b"sys_".to_vec(),
                0x02 => b"do_".to_vec(),
                0x03 => b"Tentry_".to_vec(),
                0x04 => b"__".to_vec(),
                0x80 => b"percpu".to_vec(),
                _ => format!("~{i:02x}").into_bytes(),
            })
            .collect()
    }

    /// Greedy longest-token compression (any valid encoding decodes the same).
    fn compress(tokens: &[Vec<u8>], s: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < s.len() {
            let (idx, len) = tokens
                .iter()
                .enumerate()
                .filter(|(_, t)| !t.is_empty() && s[at..].starts_with(t))
                .map(|(i, t)| (i, t.len()))
                .max_by_key(|&(_, l)| l)
                .expect("every printable char is a token");
            out.push(idx as u8);
            at += len;
        }
        out
    }

    fn pad8(v: &mut Vec<u8>) {
        while !v.len().is_multiple_of(8) {
            v.push(0);
        }
    }

    /// Where `build` put each table, as offsets into the blob.
    #[derive(Debug, Default)]
    struct Blob {
        bytes: Vec<u8>,
        offsets: usize,
        relative_base: usize,
        num_syms: usize,
        names: usize,
        markers: usize,
        seqs: usize,
        token_table: usize,
    }

    /// The tables exactly as scripts/kallsyms.c `write_src()` lays them out
    /// (symbols already in address order).
    fn build(syms: &[Fake], absolute_percpu: bool) -> Blob {
        let toks = tokens();
        let relative_base =
            syms.iter().find(|s| !(absolute_percpu && s.percpu)).map(|s| s.addr).expect("a relative symbol");
        let mut b = Blob::default();
        let v = &mut b.bytes;
        b.offsets = v.len();
        for s in syms {
            let off: i32 = if !absolute_percpu {
                (s.addr - relative_base) as u32 as i32
            } else if s.percpu {
                s.addr as i32
            } else {
                (relative_base as i64 - s.addr as i64 - 1) as i32
            };
            v.extend_from_slice(&off.to_le_bytes());
        }
        pad8(v);
        b.relative_base = v.len();
        v.extend_from_slice(&relative_base.to_le_bytes());
        b.num_syms = v.len();
        v.extend_from_slice(&(syms.len() as u32).to_le_bytes());
        pad8(v);
        b.names = v.len();
        let mut markers = Vec::new();
        let mut off = 0u32;
        for (i, s) in syms.iter().enumerate() {
            if i % 256 == 0 {
                markers.push(off);
            }
            let mut full = vec![s.kind];
            full.extend_from_slice(s.name.as_bytes());
            let c = compress(&toks, &full);
            if c.len() <= 0x7f {
                v.push(c.len() as u8);
                off += 1;
            } else {
                v.push((c.len() & 0x7f) as u8 | 0x80);
                v.push((c.len() >> 7) as u8);
                off += 2;
            }
            off += c.len() as u32;
            v.extend_from_slice(&c);
        }
        pad8(v);
        b.markers = v.len();
        for m in &markers {
            v.extend_from_slice(&m.to_le_bytes());
        }
        pad8(v);
        b.seqs = v.len();
        let mut order: Vec<usize> = (0..syms.len()).collect();
        order.sort_by(|&x, &y| syms[x].name.cmp(&syms[y].name).then(syms[x].addr.cmp(&syms[y].addr)).then(x.cmp(&y)));
        for seq in order {
            v.extend_from_slice(&(seq as u32).to_be_bytes()[1..]);
        }
        pad8(v);
        b.token_table = v.len();
        let mut index = Vec::new();
        for t in &toks {
            index.push((v.len() - b.token_table) as u16);
            v.extend_from_slice(t);
            v.push(0);
        }
        pad8(v);
        for i in index {
            v.extend_from_slice(&i.to_le_bytes());
        }
        b
    }

    /// A fake kernel: PML4/PDPT/PD/PT for the text mapping at `TEXT`,
    /// one text page (LSTAR inside), an unmapped page, then `pages` pages
    /// holding `junk` + the blob.
    fn memory_with(blob: &[u8], junk: usize) -> (VecMemory, u64) {
        memory_at(TEXT, blob, junk)
    }

    /// The fake kernel's text page at `text` (2 MiB aligned), then `junk`
    /// bytes and the blob.
    fn memory_at(text: u64, blob: &[u8], junk: usize) -> (VecMemory, u64) {
        let data_pages = (junk + blob.len()).div_ceil(0x1000) + 1;
        let mut m = vec![0u8; 0x10000 + (data_pages + 2) * 0x1000];
        let put = |m: &mut Vec<u8>, at: usize, v: u64| m[at..at + 8].copy_from_slice(&v.to_le_bytes());
        let (i4, i3, i2) = ((text >> 39) & 0x1ff, (text >> 30) & 0x1ff, (text >> 21) & 0x1ff);
        put(&mut m, 0x1000 + i4 as usize * 8, 0x2000 | 3);
        put(&mut m, 0x2000 + i3 as usize * 8, 0x3000 | 3);
        put(&mut m, 0x3000 + i2 as usize * 8, 0x4000 | 3);
        put(&mut m, 0x4000, 0x10000 | 3); // text page; page 1 stays unmapped
        for p in 0..data_pages {
            put(&mut m, 0x4000 + (2 + p) * 8, (0x11000 + p * 0x1000) as u64 | 3);
        }
        m[0x10000..0x10003].copy_from_slice(&[0x0f, 0x01, 0xf8]);
        for (i, b) in m[0x11000..0x11000 + junk].iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        m[0x11000 + junk..0x11000 + junk + blob.len()].copy_from_slice(blob);
        (VecMemory(m), text + 0x2000 + junk as u64)
    }

    fn kernel_syms() -> Vec<Fake> {
        let mut s = vec![
            percpu("fixed_percpu_data", 0),
            percpu("cpu_number", 0x20),
            percpu("current_task", 0x20),
            fake(b'T', "_text", TEXT),
            fake(b'T', "_stext", TEXT),
            fake(b'T', "startup_64", TEXT),
            fake(b't', "dup", TEXT + 0x10),
            fake(b'T', "entry_SYSCALL_64", TEXT + 0x40),
            fake(b't', "dup", TEXT + 0x80),
            fake(b'T', "__x64_sys_read", TEXT + 0xc0),
            fake(b'W', "weak_alias_of_read", TEXT + 0xc0),
            fake(b'T', "do_thing", TEXT + 0x100),
        ];
        for i in 0..600u64 {
            s.push(fake(b't', &format!("gen_{i}"), TEXT + 0x200 + i * 0x10));
        }
        s.push(fake(b't', &"q".repeat(200), TEXT + 0x3000));
        s.push(fake(b't', "dup", TEXT + 0x3100));
        s.push(fake(b'T', "_etext", TEXT + 0x4000));
        s.push(fake(b'D', "some_data", TEXT + 0x5000));
        s.push(fake(b'b', "some_bss", TEXT + 0x6000));
        s.push(fake(b'B', "_end", TEXT + 0x7000));
        s
    }

    /// Text page with a decoy signature at `TEXT`, nothing mapped in the
    /// next 2 MiB (a not-present PD entry), the blob at `TEXT + 4 MiB`.
    fn far_memory_with(blob: &[u8]) -> (VecMemory, u64) {
        let data_pages = blob.len().div_ceil(0x1000);
        let mut m = vec![0u8; 0x20000 + data_pages * 0x1000];
        let put = |m: &mut Vec<u8>, at: usize, v: u64| m[at..at + 8].copy_from_slice(&v.to_le_bytes());
        let (i4, i3, i2) = ((TEXT >> 39) & 0x1ff, (TEXT >> 30) & 0x1ff, (TEXT >> 21) & 0x1ff);
        put(&mut m, 0x1000 + i4 as usize * 8, 0x2000 | 3);
        put(&mut m, 0x2000 + i3 as usize * 8, 0x3000 | 3);
        put(&mut m, 0x3000 + i2 as usize * 8, 0x4000 | 3);
        put(&mut m, 0x3000 + (i2 as usize + 2) * 8, 0x5000 | 3);
        put(&mut m, 0x4000, 0x10000 | 3);
        for p in 0..data_pages {
            put(&mut m, 0x5000 + p * 8, (0x20000 + p * 0x1000) as u64 | 3);
        }
        m[0x10100] = 0;
        m[0x10101..0x10101 + DIGIT_TOKENS.len()].copy_from_slice(&DIGIT_TOKENS);
        m[0x20000..0x20000 + blob.len()].copy_from_slice(blob);
        (VecMemory(m), TEXT + (4 << 20))
    }

    fn locate_blob(blob: &[u8], junk: usize) -> Result<Kallsyms> {
        let (mem, _) = memory_with(blob, junk);
        let space = AddressSpace::new(&mem, 0x1000, false);
        Kallsyms::locate(&space, TEXT + 0x40)
    }

    #[test]
    fn expands_tokens_into_type_and_name() {
        let toks = tokens();
        let buf = &mut Vec::new();
        let c = compress(&toks, b"Tentry_SYSCALL_64");
        assert_eq!(c[0], 0x03, "type char merged into the first token");
        assert_eq!(expand_name(&toks, &c, buf).unwrap(), ('T', "entry_SYSCALL_64".to_string()));
        let c = compress(&toks, b"t__do_sys_x");
        assert_eq!(expand_name(&toks, &c, buf).unwrap(), ('t', "__do_sys_x".to_string()));
        assert!(expand_name(&toks, &[], buf).is_err());
        assert!(expand_name(&toks, b"T", buf).is_err(), "a type with no name");
        let long = vec![0x01u8; 200]; // "sys_" * 200 = 800 bytes
        assert!(expand_name(&toks, &long, buf).is_err());
    }

    #[test]
    fn name_entries_use_one_or_two_length_bytes() {
        assert_eq!(name_entry(&[2, 9, 9, 1, 7], 0), Some((1..3, 3)));
        assert_eq!(name_entry(&[2, 9, 9, 1, 7], 3), Some((4..5, 5)));
        let mut big = vec![0x80 | (200 & 0x7f), 200 >> 7];
        big.extend(std::iter::repeat_n(b'q', 200));
        assert_eq!(name_entry(&big, 0), Some((2..202, 202)));
        assert_eq!(name_entry(&big[..100], 0), None, "truncated");
        assert_eq!(name_entry(&[0, 1], 0), None, "zero length");
        assert_eq!(name_entry(&[0x81, 0x80, 1], 0), None, "three-byte length");
        assert_eq!(name_entry(&[3, 1], 5), None, "past the end");
    }

    #[test]
    fn finds_digit_tokens_at_any_alignment() {
        for pad in 0..45 {
            let mut v = vec![0xaa; pad];
            v.push(0);
            v.extend_from_slice(&DIGIT_TOKENS);
            v.extend_from_slice(&[0x55; 30]);
            assert_eq!(find_digit_tokens(&v, 0, v.len()), Some(pad + 1), "pad {pad}");
            assert_eq!(find_digit_tokens(&v, pad + 2, v.len()), None);
            assert_eq!(find_digit_tokens(&v, 0, pad + 1), None, "`to` excludes the start");
        }
        let mut v = vec![0x41; 10];
        v.extend_from_slice(&DIGIT_TOKENS); // not preceded by a NUL
        assert_eq!(find_digit_tokens(&v, 0, v.len()), None);
        assert_eq!(find_digit_tokens(&[], 0, 100), None);
    }

    #[test]
    fn decodes_offsets_with_and_without_absolute_percpu() {
        let base = 0xffff_ffff_8100_0000;
        let (a, abs) = symbol_addresses(&[0, 0x20, -1, -0x41, -0x1001], base).unwrap();
        assert!(abs);
        assert_eq!(a, vec![0, 0x20, base, base + 0x40, base + 0x1000]);
        let (a, abs) = symbol_addresses(&[0, 0x40, 0x1000_0000], base).unwrap();
        assert!(!abs);
        assert_eq!(a, vec![base, base + 0x40, base + 0x1000_0000]);
        assert!(symbol_addresses(&[-1, -2], u64::MAX).is_err(), "overflow");
        assert!(symbol_addresses(&[-2, -3], base).is_err(), "nothing at the base");
        assert!(symbol_addresses(&[0, 0x50, 0x40, 0x30, 0x20, 0x10], base).is_err(), "unsorted");
    }

    #[test]
    fn locates_fake_kernel_through_page_tables() {
        let syms = kernel_syms();
        let blob = build(&syms, true);
        let (mem, blob_va) = memory_with(&blob.bytes, 0x123 * 8);
        let space = AddressSpace::new(&mem, 0x1000, false);
        let k = Kallsyms::locate(&space, TEXT + 0x40).unwrap();
        assert_eq!(k.len(), syms.len());
        for (got, want) in k.symbols().zip(&syms) {
            assert_eq!((got.kind, got.name.as_str(), got.addr), (want.kind as char, want.name.as_str(), want.addr));
        }
        let t = k.tables().unwrap();
        assert_eq!(t.token_table, blob_va + blob.token_table as u64);
        assert_eq!(t.seqs_of_names, blob_va + blob.seqs as u64);
        assert_eq!(t.markers, blob_va + blob.markers as u64);
        assert_eq!(t.names, blob_va + blob.names as u64);
        assert_eq!(t.num_syms_addr, blob_va + blob.num_syms as u64);
        assert_eq!(t.relative_base_addr, blob_va + blob.relative_base as u64);
        assert_eq!(t.offsets, blob_va + blob.offsets as u64);
        assert_eq!(t.relative_base, TEXT);
        assert!(t.absolute_percpu);

        assert_eq!(k.lookup("entry_SYSCALL_64"), vec![TEXT + 0x40]);
        assert_eq!(k.lookup("cpu_number"), vec![0x20]);
        assert_eq!(k.lookup("q".repeat(200).as_str()), vec![TEXT + 0x3000]);
        assert_eq!(k.lookup("gen_599"), vec![TEXT + 0x200 + 599 * 0x10]);
        assert_eq!(k.lookup("dup"), vec![TEXT + 0x10, TEXT + 0x80, TEXT + 0x3100]);
        assert_eq!(k.text_range(), Some(TEXT..TEXT + 0x4000));
    }

    #[test]
    fn rebased_decode_matches_the_decode_of_the_slid_kernel() {
        // KASLR moves the image and relocates only kallsyms_relative_base.
        const SLIDE: u64 = 0x2000_0000;
        let syms = kernel_syms();
        let slid: Vec<Fake> = syms
            .iter()
            .cloned()
            .map(|mut s| {
                if !s.percpu {
                    s.addr += SLIDE;
                }
                s
            })
            .collect();
        let (m1, _) = memory_at(TEXT, &build(&syms, true).bytes, 64);
        let (m2, _) = memory_at(TEXT + SLIDE, &build(&slid, true).bytes, 64);
        let (k1, run1) = Kallsyms::locate_with_run(&AddressSpace::new(&m1, 0x1000, false), TEXT + 0x40).unwrap();
        let (k2, run2) = Kallsyms::locate_with_run(&AddressSpace::new(&m2, 0x1000, false), TEXT + SLIDE + 0x40).unwrap();
        let (e1, e2) = (k1.extent().unwrap(), k2.extent().unwrap());
        assert_eq!((e2.start, e2.len, e2.relative_base_at), (e1.start + SLIDE, e1.len, e1.relative_base_at));
        // The two runs differ in the relative base only.
        let (mut r1, mut r2) = (run1.unwrap(), run2.unwrap());
        assert_eq!(r1.len() as u64, e1.len);
        assert_ne!(r1, r2);
        let at = e1.relative_base_at as usize;
        assert_eq!(r2[at..at + 8], (TEXT + SLIDE).to_le_bytes());
        r1[at..at + 8].fill(0);
        r2[at..at + 8].fill(0);
        assert_eq!(r1, r2);

        let moved = k1.clone().rebased(TEXT + SLIDE).unwrap();
        assert_eq!(moved.symbols().collect::<Vec<_>>(), k2.symbols().collect::<Vec<_>>());
        assert_eq!(moved.kernel_range(), k2.kernel_range());
        assert_eq!(moved.text_range(), k2.text_range());
        assert_eq!(moved.tables(), k2.tables());
        assert_eq!(moved.extent(), k2.extent());
        assert_eq!(moved.lookup("cpu_number"), vec![0x20], "absolute per-CPU offsets stay");
        assert_eq!(moved.lookup("dup"), vec![TEXT + SLIDE + 0x10, TEXT + SLIDE + 0x80, TEXT + SLIDE + 0x3100]);
        assert_eq!(moved.resolve(TEXT + SLIDE + 0x44).map(|s| s.name), k2.resolve(TEXT + SLIDE + 0x44).map(|s| s.name));
        moved.check_contains(TEXT + SLIDE + 0x40).unwrap();
        assert!(moved.check_contains(TEXT + 0x40).is_err(), "the old LSTAR is outside the moved kernel");
        assert!(k1.clone().rebased(u64::MAX - 0x100).is_err(), "overflow");
        assert!(Kallsyms::from_symbols(Vec::new()).rebased(TEXT).is_err(), "no tables to rebase");
    }

    #[test]
    fn skips_decoys_and_unmapped_ranges() {
        let syms = kernel_syms();
        let blob = build(&syms, true);
        let (mem, blob_va) = far_memory_with(&blob.bytes);
        let space = AddressSpace::new(&mem, 0x1000, false);
        let k = Kallsyms::locate(&space, TEXT + 0x40).unwrap();
        assert_eq!(k.len(), syms.len());
        assert_eq!(k.tables().unwrap().token_table, blob_va + blob.token_table as u64);
    }

    #[test]
    fn relative_only_offsets_decode_too() {
        let syms: Vec<Fake> = kernel_syms().into_iter().filter(|s| !s.percpu).collect();
        let blob = build(&syms, false);
        let k = locate_blob(&blob.bytes, 64).unwrap();
        assert!(!k.tables().unwrap().absolute_percpu);
        assert_eq!(k.symbols().map(|s| s.addr).collect::<Vec<_>>(), syms.iter().map(|s| s.addr).collect::<Vec<_>>());
    }

    #[test]
    fn sympos_follows_livepatch() {
        let blob = build(&kernel_syms(), true);
        let k = locate_blob(&blob.bytes, 0).unwrap();
        assert_eq!(k.address_of("dup", 1).unwrap(), TEXT + 0x10);
        assert_eq!(k.address_of("dup", 3).unwrap(), TEXT + 0x3100);
        assert!(matches!(k.address_of("dup", 4), Err(IntrospectError::Kallsyms(_))));
        assert!(matches!(k.address_of("dup", 0), Err(IntrospectError::Kallsyms(_))));
        assert!(matches!(k.lookup_unique("dup"), Err(IntrospectError::Kallsyms(_))));
        assert_eq!(k.address_of("do_thing", 0).unwrap(), TEXT + 0x100);
        assert_eq!(k.address_of("do_thing", 1).unwrap(), TEXT + 0x100);
        assert!(matches!(k.address_of("do_thing", 2), Err(IntrospectError::Kallsyms(_))));
        assert!(matches!(k.lookup_unique("nope"), Err(IntrospectError::NoSymbol(_))));
        assert!(k.lookup("nope").is_empty());
    }

    #[test]
    fn resolve_sizes_follow_get_symbol_pos() {
        let blob = build(&kernel_syms(), true);
        let k = locate_blob(&blob.bytes, 0).unwrap();
        // Three aliases at _text: the first in kallsyms order wins.
        let at = k.resolve(TEXT + 4).unwrap();
        assert_eq!(at, SymbolAt { name: "_text".into(), addr: TEXT, offset: 4, size: 0x10 });
        assert_eq!(at.format(), "_text+0x4/0x10");
        let at = k.resolve(TEXT + 0x40).unwrap();
        assert_eq!(at.format(), "entry_SYSCALL_64+0x0/0x40");
        // A strong symbol and its weak alias: the first wins, size to do_thing.
        assert_eq!(k.resolve(TEXT + 0xff).unwrap().format(), "__x64_sys_read+0x3f/0x40");
        assert_eq!(k.resolve(TEXT + 0x6010).unwrap().format(), "some_bss+0x10/0x1000");
        // The last symbol runs to _end, i.e. has size 0 when it is _end.
        assert_eq!(k.resolve(TEXT + 0x7000), None, "_end is outside [_stext, _end)");
        assert_eq!(k.resolve(TEXT + 0x6fff).unwrap().format(), "some_bss+0xfff/0x1000");
        assert_eq!(k.resolve(TEXT - 1), None);
        assert_eq!(k.resolve(0x20), None, "per-CPU offsets are not kernel addresses");
        let by_addr: Vec<u64> = k.symbols_by_addr().map(|s| s.addr).collect();
        assert!(by_addr.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn resolve_without_end_symbol_gives_last_symbol_size_zero() {
        let k = Kallsyms::from_symbols(vec![
            Symbol { name: "a".into(), addr: 0x1000, kind: 'T' },
            Symbol { name: "b".into(), addr: 0x1040, kind: 'T' },
        ]);
        assert_eq!(k.resolve(0x1040).unwrap().format(), "b+0x0/0x0");
        assert_eq!(k.resolve(0x1041), None);
        assert_eq!(k.resolve(0x103f).unwrap().format(), "a+0x3f/0x40");
        assert_eq!(k.text_range(), None);
        let empty = Kallsyms::from_symbols(Vec::new());
        assert!(empty.is_empty());
        assert_eq!(empty.resolve(0), None);
    }

    /// Patches the blob and expects `locate` to fail cleanly.
    fn corrupt(what: &str, f: impl Fn(&mut Blob)) {
        let mut blob = build(&kernel_syms(), true);
        f(&mut blob);
        let r = locate_blob(&blob.bytes, 0);
        assert!(matches!(r, Err(IntrospectError::Kallsyms(_))), "{what}: {r:?}");
    }

    fn put32(v: &mut [u8], at: usize, x: u32) {
        v[at..at + 4].copy_from_slice(&x.to_le_bytes());
    }

    #[test]
    fn hostile_tables_are_errors() {
        corrupt("absurd num_syms", |b| put32(&mut b.bytes, b.num_syms, 0xffff_fff0));
        corrupt("num_syms one too many", |b| {
            let n = u32::from_le_bytes(b.bytes[b.num_syms..b.num_syms + 4].try_into().unwrap());
            put32(&mut b.bytes, b.num_syms, n + 1)
        });
        corrupt("a name length that desynchronises the names", |b| b.bytes[b.names] = 0x7f);
        corrupt("truncated big name", |b| {
            b.bytes[b.names] = 0xff;
            b.bytes[b.names + 1] = 0x7f;
        });
        corrupt("markers going backwards (a loop)", |b| put32(&mut b.bytes, b.markers + 8, 4));
        corrupt("seqs not a permutation", |b| {
            let (s0, s1) = (b.seqs, b.seqs + 3);
            let first: Vec<u8> = b.bytes[s0..s0 + 3].to_vec();
            b.bytes[s1..s1 + 3].copy_from_slice(&first);
        });
        corrupt("relative base that overflows", |b| {
            let rb = b.relative_base;
            b.bytes[rb..rb + 8].copy_from_slice(&(u64::MAX - 4).to_le_bytes());
        });
        corrupt("offsets that make addresses unsorted", |b| {
            for i in 0..40 {
                put32(&mut b.bytes, b.offsets + 4 * (10 + 2 * i), (-0x10_0000i32) as u32);
            }
        });
        corrupt("token index not increasing", |b| {
            let idx = b.bytes.len() - 512;
            b.bytes[idx + 2 * 0x50..idx + 2 * 0x50 + 2].copy_from_slice(&0u16.to_le_bytes());
        });
        corrupt("token table without its index", |b| {
            let n = b.bytes.len() - 512;
            b.bytes.truncate(n);
        });
        corrupt("LSTAR outside the decoded kernel", |b| {
            let rb = b.relative_base;
            b.bytes[rb..rb + 8].copy_from_slice(&(TEXT + 0x100).to_le_bytes());
        });
    }

    /// The blob's tables in the 6.12 order: num_syms, names, markers,
    /// token table and index, offsets, relative base, seqs. Returns the
    /// bytes and the token table's offset in them.
    fn tokens_first(b: &Blob) -> (Vec<u8>, usize) {
        let v = &b.bytes;
        let mut out = v[b.num_syms..b.seqs].to_vec();
        let tt = out.len();
        out.extend_from_slice(&v[b.token_table..]);
        out.extend_from_slice(&v[b.offsets..b.num_syms]);
        out.extend_from_slice(&v[b.seqs..b.token_table]);
        (out, tt)
    }

    #[test]
    fn decodes_tables_in_the_6_12_order() {
        let syms = kernel_syms();
        let blob = build(&syms, true);
        let old = locate_blob(&blob.bytes, 0x123 * 8).unwrap();
        let (bytes, _) = tokens_first(&blob);
        let k = locate_blob(&bytes, 0x123 * 8).unwrap();
        assert_eq!(k.len(), syms.len());
        let names = |k: &Kallsyms| k.symbols().map(|s| (s.name.clone(), s.addr, s.kind)).collect::<Vec<_>>();
        assert_eq!(names(&k), names(&old));
        let t = k.tables().unwrap();
        assert!(t.token_index < t.offsets && t.relative_base_addr < t.seqs_of_names);
        let e = k.extent().unwrap();
        // The run ends with the last seq, before the blob's final padding.
        assert_eq!((e.start, e.len), (t.num_syms_addr, (bytes.len() - (blob.token_table - blob.seqs) + 3 * syms.len()) as u64));
        assert_eq!(e.relative_base_at, t.relative_base_addr - t.num_syms_addr);
    }

    #[test]
    fn tables_after_the_tokens_wait_for_the_region_to_grow() {
        // Enough symbols that offsets + seqs (7 bytes each) outrun the
        // lookahead past the last judged signature hit.
        let mut syms = kernel_syms();
        let end = syms.pop().unwrap();
        let last = syms.iter().map(|s| s.addr).max().unwrap();
        for i in 0..8000u64 {
            syms.push(fake(b't', &format!("more_{i}"), last + 0x10 + i * 0x10));
        }
        syms.push(Fake { addr: last + 0x10 + 8000 * 0x10, ..end });
        let blob = build(&syms, true);
        let (bytes, tt_off) = tokens_first(&blob);
        assert!(bytes.len() - tt_off > TOKEN_LOOKAHEAD);
        // The token table starts just before the first chunk's judged part ends.
        let junk = (CHUNK as usize - TOKEN_LOOKAHEAD - 0x100 - tt_off) & !7;
        let (mem, _) = memory_with(&bytes, junk);
        let space = AddressSpace::new(&mem, 0x1000, false);
        let k = Kallsyms::locate(&space, TEXT + 0x40).unwrap();
        assert_eq!(k.len(), syms.len());
        // One chunk of the segment: the decoder asks for more, or fails if
        // the region is final.
        let mut seg = vec![0u8; junk];
        seg.extend_from_slice(&bytes);
        seg.truncate(CHUNK as usize);
        let r = Region { base: TEXT + 0x2000, bytes: seg };
        let tt = parse_token_table(&r, find_digit_tokens(&r.bytes, 0, r.bytes.len()).unwrap()).unwrap();
        match decode_around_tokens(&r, &tt, TEXT + 0x40, false) {
            Ok(TokensOutcome::NeedsMore) => {}
            _ => panic!("expected a request for more of the image"),
        }
        assert!(decode_around_tokens(&r, &tt, TEXT + 0x40, true).is_err());
    }

    #[test]
    fn tables_cut_off_by_the_region_start_are_errors() {
        let blob = build(&kernel_syms(), true);
        let find = |r: &Region| find_digit_tokens(&r.bytes, 0, r.bytes.len());
        // Offsets start before the region: the backward walk must not read there.
        let cut = blob.offsets + 8;
        let r = Region { base: TEXT + 0x10_0000 + cut as u64, bytes: blob.bytes[cut..].to_vec() };
        let hit = find(&r).unwrap();
        let tt = parse_token_table(&r, hit).unwrap();
        assert!(decode_around_tokens(&r, &tt, TEXT + 0x40, true).is_err());
        // Whole blob as a region decodes (sanity for the setup above).
        let r = Region { base: TEXT + 0x10_0000, bytes: blob.bytes.clone() };
        let tt = parse_token_table(&r, find(&r).unwrap()).unwrap();
        let Ok(TokensOutcome::Decoded(k)) = decode_around_tokens(&r, &tt, TEXT + 0x40, true) else { panic!("no decode") };
        assert_eq!(k.len(), kernel_syms().len());
    }

    #[test]
    fn unmapped_or_empty_memory_is_an_error() {
        let mem = VecMemory(vec![0u8; 0x2000]);
        let space = AddressSpace::new(&mem, 0x1000, false);
        let r = Kallsyms::locate(&space, TEXT + 0x40);
        assert!(matches!(r, Err(IntrospectError::Kallsyms(_))), "{r:?}");
        let r = Kallsyms::locate(&space, u64::MAX - 3);
        assert!(r.is_err());
        // Mapped memory full of digit-token signatures but no tables.
        let mut junk = Vec::new();
        while junk.len() < 3 * 0x1000 {
            junk.push(0);
            junk.extend_from_slice(&DIGIT_TOKENS);
        }
        let r = locate_blob(&junk, 0);
        assert!(matches!(r, Err(IntrospectError::Kallsyms(_))), "{r:?}");
    }
}
