//! ORC stack unwinding from the guest kernel's own ORC tables.
//!
//! The tables (`__start_orc_unwind_ip`: s32 self-relative IPs,
//! `__start_orc_unwind`: 6-byte `struct orc_entry`, `orc_lookup`: one u32
//! index per 256-byte block of `_stext.._etext`) are copied into host memory
//! once by [`OrcTables::load`]; modules' tables are added with
//! [`OrcTables::add_module_table`]. [`OrcTables::unwind`] then walks a
//! sleeping task's stack (from `task->thread.sp`, an `inactive_task_frame`)
//! or a stopped vCPU's kernel stack (from its registers) the way the guest's
//! `arch/x86/kernel/unwind_orc.c` does, and decides reliability the way
//! `arch_stack_walk_reliable()` does. Guest memory is hostile: every read is
//! checked, every walk bounded, every address computation checked.

use std::sync::Arc;
use crate::cpu::CpuState;
use crate::error::{IntrospectError, Result};
use crate::orc_format::OrcFormat;
use crate::translate::KernelMemory;

/// Bytes of kernel text covered by one `orc_lookup` slot (`LOOKUP_BLOCK_SIZE`).
pub const LOOKUP_BLOCK_SIZE: u64 = 1 << 8;
/// Size of one `struct orc_entry` in the guest.
pub const ORC_ENTRY_SIZE: u64 = crate::orc_format::ORC_ENTRY_BYTES as u64;
/// Most ORC entries accepted in one table (a distro kernel has well under 1M).
pub const MAX_ORC_ENTRIES: u64 = 1 << 22;
/// Most `orc_lookup` slots accepted (covers 1 GiB of kernel text).
const MAX_LOOKUP_BLOCKS: u64 = 1 << 22;
/// Most stack regions one unwind considers (the kernel has a handful of stack types).
const MAX_STACK_REGIONS: usize = 16;
/// Guest reads of big tables are split into pieces of this size.
const READ_CHUNK: u64 = 1 << 16;

/// `orc_entry.sp_reg` / `bp_reg` values (`asm/orc_types.h`).
pub mod orc_reg {
    pub const UNDEFINED: u8 = 0;
    pub const PREV_SP: u8 = 1;
    pub const DX: u8 = 2;
    pub const DI: u8 = 3;
    pub const BP: u8 = 4;
    pub const SP: u8 = 5;
    pub const R10: u8 = 6;
    pub const R13: u8 = 7;
    pub const BP_INDIRECT: u8 = 8;
    pub const SP_INDIRECT: u8 = 9;
}

/// hyperpatch's own numbering of an entry's type, the same whatever the
/// guest's ([`crate::orc_format::OrcFormat`] maps the guest's numbers).
pub mod orc_type {
    /// A normal call frame: the return address sits just below the previous SP.
    pub const CALL: u8 = 0;
    /// A full `pt_regs` (syscall, interrupt or exception entry).
    pub const REGS: u8 = 1;
    /// Only the hardware IRET frame of a `pt_regs`.
    pub const REGS_PARTIAL: u8 = 2;
    /// No unwind data here (6.4+ `ORC_TYPE_UNDEFINED`): unreliable.
    pub const UNDEFINED: u8 = 3;
    /// The end of the stack (6.4+ `ORC_TYPE_END_OF_STACK`).
    pub const END_OF_STACK: u8 = 4;
    /// Or-ed with a type number the guest's format does not define.
    pub const UNKNOWN_BASE: u8 = 0x80;
}

/// One decoded `struct orc_entry`, in hyperpatch's format-neutral terms
/// (see [`crate::orc_format`] for the guest's bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OrcEntry {
    pub sp_offset: i16,
    pub bp_offset: i16,
    pub sp_reg: u8,
    pub bp_reg: u8,
    /// `type`: one of [`orc_type`].
    pub kind: u8,
    /// Up to 6.3, the end-of-stack hint (`UNWIND_HINT_EMPTY` has `sp_reg`
    /// undefined and `end`); from 6.4 that is [`orc_type::END_OF_STACK`].
    pub end: bool,
    /// The IP of the frame this entry unwinds to is not a return address
    /// (it is looked up as it is, not minus one). Up to 6.2 every regs
    /// frame; from 6.3 the entry's own `signal` bit.
    pub signal: bool,
}

impl OrcEntry {
    /// The kernel's `orc_fp_entry`: the frame-pointer guess used for code
    /// without ORC data (the rest of such an unwind is unreliable).
    pub const FRAME_POINTER_GUESS: OrcEntry = OrcEntry {
        sp_offset: 16,
        bp_offset: -16,
        sp_reg: orc_reg::BP,
        bp_reg: orc_reg::PREV_SP,
        kind: orc_type::CALL,
        end: false,
        signal: false,
    };
}

/// Runtime addresses of the kernel symbols the unwinder needs (from the
/// guest's kallsyms, or System.map for an unrelocated kernel).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SymbolAddrs {
    pub start_orc_unwind_ip: u64,
    pub stop_orc_unwind_ip: u64,
    pub start_orc_unwind: u64,
    pub stop_orc_unwind: u64,
    pub orc_lookup: u64,
    pub orc_lookup_end: u64,
    /// `_stext`: start of the range `orc_lookup` covers.
    pub text_start: u64,
    /// `_etext`.
    pub text_end: u64,
    /// `_sinittext`.. `_einittext`: searched with the slow binary search (the
    /// idle tasks' stacks keep return addresses into freed init code).
    pub init_text: Option<(u64, u64)>,
    /// `ret_from_fork`: a never-run task's first IP, which is not a return
    /// address (the kernel unwinds it as a signal frame).
    pub ret_from_fork: Option<u64>,
    /// `__sched_text_start`..`__sched_text_end`: hidden from `/proc/PID/stack`.
    pub sched_text: Option<(u64, u64)>,
    /// `__lock_text_start`..`__lock_text_end`: hidden from `/proc/PID/stack`.
    pub lock_text: Option<(u64, u64)>,
}

impl SymbolAddrs {
    /// Builds the set from a name → address lookup (kallsyms or System.map).
    /// The table and text symbols are required; the others are optional.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<u64>) -> Result<SymbolAddrs> {
        let need = |name: &str| lookup(name).ok_or_else(|| IntrospectError::NoSymbol(name.to_string()));
        let pair = |a: &str, b: &str| Some((lookup(a)?, lookup(b)?));
        Ok(SymbolAddrs {
            start_orc_unwind_ip: need("__start_orc_unwind_ip")?,
            stop_orc_unwind_ip: need("__stop_orc_unwind_ip")?,
            start_orc_unwind: need("__start_orc_unwind")?,
            stop_orc_unwind: need("__stop_orc_unwind")?,
            orc_lookup: need("orc_lookup")?,
            orc_lookup_end: need("orc_lookup_end")?,
            text_start: need("_stext")?,
            text_end: need("_etext")?,
            init_text: pair("_sinittext", "_einittext"),
            ret_from_fork: lookup("ret_from_fork"),
            sched_text: pair("__sched_text_start", "__sched_text_end"),
            lock_text: pair("__lock_text_start", "__lock_text_end"),
        })
    }
}

/// One sorted ORC table (vmlinux, a module, or one built on the host).
#[derive(Clone, Debug)]
struct OrcTable {
    /// Text range this table answers for (`[start, end)`).
    text_start: u64,
    text_end: u64,
    /// Absolute IPs, non-decreasing.
    ips: Vec<u64>,
    entries: Vec<OrcEntry>,
}

impl OrcTable {
    fn covers(&self, ip: u64) -> bool {
        ip >= self.text_start && ip < self.text_end
    }

    /// The kernel's `__orc_find` over `[first, first + count)`: the rightmost
    /// entry whose IP is <= `ip`, or the first entry when there is none.
    fn find_in(&self, first: usize, count: usize, ip: u64) -> Option<OrcEntry> {
        let end = first.checked_add(count)?;
        let ips = self.ips.get(first..end)?;
        if ips.is_empty() {
            return None;
        }
        // partition_point: number of leading entries with ip <= target.
        let below_or_at = ips.partition_point(|&e| e <= ip);
        let found = first.checked_add(below_or_at.saturating_sub(1))?;
        self.entries.get(found).copied()
    }

    fn find(&self, ip: u64) -> Option<OrcEntry> {
        self.find_in(0, self.ips.len(), ip)
    }
}

/// A copy of an ftrace (or other) trampoline: IPs in it unwind like the code
/// it was copied from (the kernel's `orc_ftrace_find`).
#[derive(Clone, Copy, Debug)]
struct TrampolineAlias {
    start: u64,
    end: u64,
    copied_from: u64,
}

/// The guest's ORC tables, copied into host memory.
#[derive(Clone, Debug)]
pub struct OrcTables {
    /// Shared: an unwinder built again for another module list keeps it.
    vmlinux: Arc<OrcTable>,
    /// `orc_lookup`, when it passed validation (else the full binary search is used).
    lookup: Option<Arc<Vec<u32>>>,
    init_text: Option<(u64, u64)>,
    ret_from_fork: Option<u64>,
    sched_text: Option<(u64, u64)>,
    lock_text: Option<(u64, u64)>,
    modules: Vec<OrcTable>,
    trampolines: Vec<TrampolineAlias>,
    /// The guest's entry format (module tables are decoded with it too).
    format: OrcFormat,
}

/// Reads `len` bytes of guest memory in bounded pieces.
fn read_table(mem: &dyn KernelMemory, addr: u64, len: u64, what: &str) -> Result<Vec<u8>> {
    let total = usize::try_from(len).map_err(|_| IntrospectError::Unwind(format!("{what}: {len} bytes")))?;
    let mut out = vec![0u8; total];
    let mut done: u64 = 0;
    while done < len {
        let n = (len - done).min(READ_CHUNK);
        let at = addr.checked_add(done).ok_or(IntrospectError::Overflow(addr))?;
        let lo = usize::try_from(done).map_err(|_| IntrospectError::Overflow(done))?;
        let hi = usize::try_from(done + n).map_err(|_| IntrospectError::Overflow(done))?;
        let buf = out.get_mut(lo..hi).ok_or(IntrospectError::Overflow(at))?;
        mem.read_virt(at, buf)
            .map_err(|e| IntrospectError::Unwind(format!("reading {what} at {at:#x}: {e}")))?;
        done += n;
    }
    Ok(out)
}

/// Reads and decodes `count` (IP, entry) pairs; checks the IPs are sorted.
fn read_orc_pair(
    mem: &dyn KernelMemory,
    format: &OrcFormat,
    ip_table: u64,
    orc_table: u64,
    count: u64,
    what: &str,
) -> Result<(Vec<u64>, Vec<OrcEntry>)> {
    if count == 0 {
        return Err(IntrospectError::Unwind(format!("{what}: empty ORC table")));
    }
    if count > MAX_ORC_ENTRIES {
        return Err(IntrospectError::Unwind(format!("{what}: {count} ORC entries (more than {MAX_ORC_ENTRIES})")));
    }
    let ip_bytes = read_table(mem, ip_table, count * 4, what)?;
    let orc_bytes = read_table(mem, orc_table, count * ORC_ENTRY_SIZE, what)?;
    let mut ips = Vec::with_capacity(ip_bytes.len() / 4);
    for (i, chunk) in ip_bytes.chunks_exact(4).enumerate() {
        let rel = i32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        let slot = (i as u64).checked_mul(4).and_then(|o| ip_table.checked_add(o));
        let ip = slot.and_then(|s| s.checked_add_signed(i64::from(rel)));
        let ip = ip.ok_or_else(|| IntrospectError::Unwind(format!("{what}: IP entry {i} overflows")))?;
        if let Some(&prev) = ips.last() {
            if ip < prev {
                return Err(IntrospectError::Unwind(format!(
                    "{what}: ORC IP table not sorted at entry {i} ({ip:#x} after {prev:#x})"
                )));
            }
        }
        ips.push(ip);
    }
    let entries: Vec<OrcEntry> = orc_bytes
        .chunks_exact(ORC_ENTRY_SIZE as usize)
        .map(|c| format.decode([c[0], c[1], c[2], c[3], c[4], c[5]]))
        .collect();
    if entries.len() != ips.len() {
        return Err(IntrospectError::Unwind(format!("{what}: {} IPs but {} entries", ips.len(), entries.len())));
    }
    Ok((ips, entries))
}

/// Byte length of `[start, stop)`, which must be a whole number of `unit`s.
fn table_count(start: u64, stop: u64, unit: u64, what: &str) -> Result<u64> {
    let len = stop
        .checked_sub(start)
        .ok_or_else(|| IntrospectError::Unwind(format!("{what}: end {stop:#x} before start {start:#x}")))?;
    if len % unit != 0 {
        return Err(IntrospectError::Unwind(format!("{what}: {len} bytes is not a multiple of {unit}")));
    }
    Ok(len / unit)
}

fn in_range(range: Option<(u64, u64)>, ip: u64) -> bool {
    matches!(range, Some((lo, hi)) if ip >= lo && ip < hi)
}

impl OrcTables {
    /// Copies vmlinux's ORC tables out of guest memory and validates them
    /// (equal counts, sorted IPs, a consistent `orc_lookup`).
    pub fn load(mem: &dyn KernelMemory, syms: &SymbolAddrs, format: OrcFormat) -> Result<OrcTables> {
        let n_ips = table_count(syms.start_orc_unwind_ip, syms.stop_orc_unwind_ip, 4, "__start_orc_unwind_ip")?;
        let n_orcs = table_count(syms.start_orc_unwind, syms.stop_orc_unwind, ORC_ENTRY_SIZE, "__start_orc_unwind")?;
        if n_ips != n_orcs {
            return Err(IntrospectError::Unwind(format!(
                "vmlinux ORC tables disagree: {n_ips} IPs, {n_orcs} entries"
            )));
        }
        if syms.text_end <= syms.text_start {
            return Err(IntrospectError::Unwind(format!(
                "kernel text {:#x}..{:#x} is empty",
                syms.text_start, syms.text_end
            )));
        }
        let (ips, entries) = read_orc_pair(mem, &format, syms.start_orc_unwind_ip, syms.start_orc_unwind, n_ips, "vmlinux")?;
        let vmlinux = OrcTable { text_start: syms.text_start, text_end: syms.text_end, ips, entries };

        let n_blocks = table_count(syms.orc_lookup, syms.orc_lookup_end, 4, "orc_lookup")?;
        if n_blocks > MAX_LOOKUP_BLOCKS {
            return Err(IntrospectError::Unwind(format!("orc_lookup: {n_blocks} blocks")));
        }
        let lookup_bytes = read_table(mem, syms.orc_lookup, n_blocks * 4, "orc_lookup")?;
        let lookup: Vec<u32> = lookup_bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let lookup = Self::validated_lookup(lookup, &vmlinux);

        Ok(OrcTables {
            vmlinux: Arc::new(vmlinux),
            lookup: lookup.map(Arc::new),
            init_text: syms.init_text,
            ret_from_fork: syms.ret_from_fork,
            sched_text: syms.sched_text,
            lock_text: syms.lock_text,
            modules: Vec::new(),
            trampolines: Vec::new(),
            format,
        })
    }

    /// Builds the tables from host data (tests, or code the host placed in
    /// the guest): `ips` absolute and sorted, one entry per IP; `format` is
    /// the one modules' tables will be read in.
    pub fn from_parts(
        syms: &SymbolAddrs,
        format: OrcFormat,
        ips: Vec<u64>,
        entries: Vec<OrcEntry>,
        lookup: Option<Vec<u32>>,
    ) -> Result<OrcTables> {
        let vmlinux = Self::host_table(syms.text_start, syms.text_end, ips, entries)?;
        let lookup = lookup.and_then(|l| Self::validated_lookup(l, &vmlinux));
        Ok(OrcTables {
            vmlinux: Arc::new(vmlinux),
            lookup: lookup.map(Arc::new),
            init_text: syms.init_text,
            ret_from_fork: syms.ret_from_fork,
            sched_text: syms.sched_text,
            lock_text: syms.lock_text,
            modules: Vec::new(),
            trampolines: Vec::new(),
            format,
        })
    }

    /// The guest's ORC entry format.
    pub fn format(&self) -> &OrcFormat {
        &self.format
    }

    fn host_table(text_start: u64, text_end: u64, ips: Vec<u64>, entries: Vec<OrcEntry>) -> Result<OrcTable> {
        if ips.is_empty() || ips.len() != entries.len() || ips.len() as u64 > MAX_ORC_ENTRIES {
            return Err(IntrospectError::Unwind(format!(
                "ORC table with {} IPs and {} entries",
                ips.len(),
                entries.len()
            )));
        }
        if ips.windows(2).any(|w| w[1] < w[0]) {
            return Err(IntrospectError::Unwind("ORC IP table not sorted".into()));
        }
        if text_end <= text_start {
            return Err(IntrospectError::Unwind(format!("empty text range {text_start:#x}..{text_end:#x}")));
        }
        Ok(OrcTable { text_start, text_end, ips, entries })
    }

    /// Keeps `orc_lookup` only if it looks like what `unwind_init()` wrote:
    /// enough blocks for the text, indices non-decreasing and in range.
    fn validated_lookup(lookup: Vec<u32>, table: &OrcTable) -> Option<Vec<u32>> {
        let text = table.text_end.checked_sub(table.text_start)?;
        let needed = text.div_ceil(LOOKUP_BLOCK_SIZE).checked_add(1)?;
        if (lookup.len() as u64) < needed {
            return None;
        }
        let count = table.ips.len() as u64;
        if lookup.iter().any(|&v| u64::from(v) >= count) || lookup.windows(2).any(|w| w[1] < w[0]) {
            return None;
        }
        // An all-zero table is what the image holds before unwind_init() ran.
        if lookup.len() > 2 && lookup.iter().all(|&v| v == 0) {
            return None;
        }
        Some(lookup)
    }

    /// Whether lookups use the guest's `orc_lookup` (else a full binary search).
    pub fn uses_fast_lookup(&self) -> bool {
        self.lookup.is_some()
    }

    /// The vmlinux tables alone (no module or host tables): what an
    /// unwinder for another module list starts from. Cheap: the vmlinux
    /// table is shared, not copied.
    pub fn vmlinux_only(&self) -> OrcTables {
        OrcTables {
            vmlinux: Arc::clone(&self.vmlinux),
            lookup: self.lookup.clone(),
            init_text: self.init_text,
            ret_from_fork: self.ret_from_fork,
            sched_text: self.sched_text,
            lock_text: self.lock_text,
            modules: Vec::new(),
            trampolines: Vec::new(),
            format: self.format,
        }
    }

    /// Number of vmlinux ORC entries.
    pub fn vmlinux_entries(&self) -> usize {
        self.vmlinux.ips.len()
    }

    /// Adds a module's ORC table (`mod->arch.orc_unwind_ip`, `orc_unwind`,
    /// `num_orcs`) for the module text `[text_start, text_end)`. Call once
    /// per text range (core, init) of the module.
    pub fn add_module_table(
        &mut self,
        mem: &dyn KernelMemory,
        text_start: u64,
        text_end: u64,
        ip_table_addr: u64,
        orc_addr: u64,
        count: u64,
    ) -> Result<()> {
        let what = format!("module text {text_start:#x}");
        let (ips, entries) = read_orc_pair(mem, &self.format, ip_table_addr, orc_addr, count, &what)?;
        self.add_host_table(text_start, text_end, ips, entries)
    }

    /// Adds a table built on the host (e.g. for code the host placed in the
    /// guest) for `[text_start, text_end)`.
    pub fn add_host_table(&mut self, text_start: u64, text_end: u64, ips: Vec<u64>, entries: Vec<OrcEntry>) -> Result<()> {
        let table = Self::host_table(text_start, text_end, ips, entries)?;
        if self.modules.len() >= 1 << 16 {
            return Err(IntrospectError::Unwind("too many extra ORC tables".into()));
        }
        self.modules.push(table);
        Ok(())
    }

    /// Forgets every module/host table (e.g. before re-reading the module list).
    pub fn clear_module_tables(&mut self) {
        self.modules.clear();
    }

    /// Declares `[start, start + size)` a copy of the code at `copied_from`
    /// (an ftrace trampoline copied from `ftrace_caller`/`ftrace_regs_caller`).
    pub fn add_trampoline(&mut self, start: u64, size: u64, copied_from: u64) -> Result<()> {
        let end = start.checked_add(size).ok_or(IntrospectError::Overflow(start))?;
        copied_from.checked_add(size).ok_or(IntrospectError::Overflow(copied_from))?;
        if self.trampolines.len() >= 1 << 16 {
            return Err(IntrospectError::Unwind("too many trampolines".into()));
        }
        self.trampolines.push(TrampolineAlias { start, end, copied_from });
        Ok(())
    }

    /// Whether `ip` is code some table answers for (the unwinder's notion
    /// of kernel text; an IP outside it ends the unwind as unreliable).
    pub fn is_known_text(&self, ip: u64) -> bool {
        self.vmlinux.covers(ip)
            || in_range(self.init_text, ip)
            || self.modules.iter().any(|m| m.covers(ip))
            || self.trampolines.iter().any(|t| ip >= t.start && ip < t.end)
    }

    /// The ORC entry for `ip` (the kernel's `orc_find` without the IP 0 special case).
    pub fn find(&self, ip: u64) -> Option<OrcEntry> {
        self.find_direct(ip).or_else(|| {
            let t = self.trampolines.iter().find(|t| ip >= t.start && ip < t.end)?;
            let mapped = t.copied_from.checked_add(ip - t.start)?;
            if mapped == ip {
                return None;
            }
            self.find_direct(mapped)
        })
    }

    /// The vmlinux entry for `ip` by binary search over the whole table,
    /// ignoring `orc_lookup` (to cross-check the guest's lookup table).
    pub fn find_by_full_search(&self, ip: u64) -> Option<OrcEntry> {
        self.vmlinux.find(ip)
    }

    fn find_direct(&self, ip: u64) -> Option<OrcEntry> {
        let v = &self.vmlinux;
        if v.covers(ip) {
            let Some(lookup) = &self.lookup else {
                return v.find(ip);
            };
            let idx = usize::try_from((ip - v.text_start) / LOOKUP_BLOCK_SIZE).ok()?;
            if idx.checked_add(1)? >= lookup.len() {
                return None;
            }
            let start = usize::try_from(*lookup.get(idx)?).ok()?;
            let stop = usize::try_from(*lookup.get(idx + 1)?).ok()?.checked_add(1)?;
            if start >= v.ips.len() || stop > v.ips.len() || stop < start {
                return None;
            }
            return v.find_in(start, stop - start, ip);
        }
        if in_range(self.init_text, ip) {
            return v.find(ip);
        }
        self.modules.iter().find(|m| m.covers(ip)).and_then(|m| m.find(ip))
    }

    /// The IPs `/proc/PID/stack` would print for this stack: scheduler and
    /// lock functions dropped (`stack_trace_consume_entry_nosched`), at most
    /// 64 entries (`MAX_STACK_TRACE_DEPTH`), stopping at the first unknown IP.
    pub fn proc_pid_stack(&self, stack: &Stack) -> Vec<u64> {
        stack
            .frames
            .iter()
            .take_while(|f| self.is_known_text(f.ip))
            .map(|f| f.ip)
            .filter(|&ip| !in_range(self.sched_text, ip) && !in_range(self.lock_text, ip))
            .take(64)
            .collect()
    }

    /// Whether `ip` is in scheduler or lock text (hidden from `/proc/PID/stack`).
    pub fn in_sched_functions(&self, ip: u64) -> bool {
        in_range(self.sched_text, ip) || in_range(self.lock_text, ip)
    }
}

/// Offsets in `struct inactive_task_frame` (from the guest's BTF).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InactiveTaskFrameLayout {
    /// `sizeof(struct inactive_task_frame)`.
    pub size: u64,
    /// `offsetof(ret_addr)`.
    pub ret_addr: u64,
    /// `offsetof(bp)`.
    pub bp: u64,
}

/// Offsets in `struct pt_regs` (from the guest's BTF).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PtRegsLayout {
    /// `sizeof(struct pt_regs)`.
    pub size: u64,
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    pub cs: u64,
    pub di: u64,
    pub dx: u64,
    pub r10: u64,
    pub r13: u64,
}

impl PtRegsLayout {
    fn check(&self) -> std::result::Result<(), String> {
        let fields = [self.ip, self.sp, self.bp, self.cs, self.di, self.dx, self.r10, self.r13];
        if self.size > 4096 || fields.iter().any(|&o| o.checked_add(8).is_none_or(|e| e > self.size)) {
            return Err(format!("implausible pt_regs layout {self:?}"));
        }
        if self.ip >= self.size {
            return Err("pt_regs.ip outside pt_regs".into());
        }
        Ok(())
    }
}

/// A stack region `[low, high)`, e.g. `task->stack .. + THREAD_SIZE`, or a
/// CPU's IRQ stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StackBounds {
    pub low: u64,
    pub high: u64,
}

impl StackBounds {
    /// Whether `[addr, addr + len)` lies inside.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.low && addr.checked_add(len).is_some_and(|e| e <= self.high)
    }
}

/// Where an unwind begins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UnwindStart {
    /// A task that is not running: `thread_sp` is `task->thread.sp`, which
    /// points at its `inactive_task_frame`; `stack` is the task's stack.
    Sleeping { thread_sp: u64, frame: InactiveTaskFrameLayout, stack: StackBounds },
    /// A vCPU stopped with these registers. `stacks`: the running task's
    /// stack and the CPU's IRQ/exception stacks; the walk may pass from one
    /// to another (each at most once). A vCPU in user mode has an empty
    /// (reliable) kernel stack.
    Running { regs: CpuState, stacks: Vec<StackBounds> },
}

/// How a frame's IP was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// `inactive_task_frame.ret_addr` of a sleeping task (a return address,
    /// or `ret_from_fork` for a task that never ran).
    TaskSwitch,
    /// The stopped vCPU's RIP (exact, not a return address).
    Interrupted,
    /// A return address read from the stack.
    Call,
    /// The IP saved in a full `pt_regs` (exact).
    Regs,
    /// The IP saved in an IRET frame (exact).
    PartialRegs,
}

/// One frame of an unwound stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Code address: a return address except for [`FrameKind::Interrupted`],
    /// [`FrameKind::Regs`], [`FrameKind::PartialRegs`] (and `ret_from_fork`).
    pub ip: u64,
    /// Stack pointer in this frame (just above the return address for calls).
    pub sp: u64,
    pub kind: FrameKind,
    /// No problem was seen up to and including this frame.
    pub reliable_so_far: bool,
}

impl Frame {
    /// Whether `ip` is a return address (symbolize `ip - 1` to name the caller).
    pub fn is_return_address(&self) -> bool {
        matches!(self.kind, FrameKind::Call | FrameKind::TaskSwitch)
    }
}

/// An unwound stack, innermost frame first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stack {
    pub frames: Vec<Frame>,
    /// The walk reached the end of the stack the way `arch_stack_walk_reliable`
    /// accepts (user-mode `pt_regs`, or an ORC end hint), every IP known.
    pub reliable: bool,
    /// Why the stack is not reliable.
    pub reason: Option<String>,
}

/// Where the current `pt_regs` are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RegsAt {
    /// The stopped vCPU's own registers.
    Vcpu,
    /// A `struct pt_regs` at this guest address.
    Memory(u64),
}

/// A `pt_regs` member the unwinder may need.
#[derive(Clone, Copy, Debug)]
enum Reg {
    Bp,
    Di,
    Dx,
    R10,
    R13,
}

/// `struct unwind_state`, ORC part.
struct State {
    ip: u64,
    sp: u64,
    bp: u64,
    /// The IP is exact (interrupted), not a return address.
    signal: bool,
    regs: Option<RegsAt>,
    prev_regs: Option<RegsAt>,
    full_regs: bool,
    /// Index into the stack regions of the stack the walk is on.
    stack: usize,
    visited: Vec<bool>,
    /// A guess (frame pointer) was used: the rest is unreliable.
    error: bool,
    kind: FrameKind,
}

/// One step of the walk.
enum Step {
    Next,
    End,
}

struct Walk<'a> {
    tables: &'a OrcTables,
    mem: &'a dyn KernelMemory,
    regs_layout: &'a PtRegsLayout,
    vcpu: Option<CpuState>,
    stacks: &'a [StackBounds],
}

impl Walk<'_> {
    /// `stack_access_ok`: `[addr, addr + len)` is on the current stack, or
    /// on another one not visited before (which becomes current).
    fn access_ok(&self, st: &mut State, addr: u64, len: u64) -> bool {
        if self.stacks.get(st.stack).is_some_and(|s| s.contains(addr, len)) {
            return true;
        }
        let Some(i) = self.stacks.iter().position(|s| s.contains(addr, len)) else {
            return false;
        };
        match st.visited.get_mut(i) {
            Some(v) if !*v => {
                *v = true;
                st.stack = i;
                true
            }
            _ => false,
        }
    }

    fn deref(&self, st: &mut State, addr: u64) -> std::result::Result<u64, String> {
        if !self.access_ok(st, addr, 8) {
            return Err(format!("stack slot {addr:#x} is outside the stack"));
        }
        self.mem.read_u64(addr).map_err(|e| format!("reading stack slot {addr:#x}: {e}"))
    }

    fn read_field(&self, base: u64, off: u64, what: &str) -> std::result::Result<u64, String> {
        let at = base.checked_add(off).ok_or_else(|| format!("pt_regs.{what} address overflows"))?;
        self.mem.read_u64(at).map_err(|e| format!("reading pt_regs.{what} at {at:#x}: {e}"))
    }

    fn regs_value(&self, at: RegsAt, reg: Reg) -> std::result::Result<u64, String> {
        let l = self.regs_layout;
        match at {
            RegsAt::Vcpu => {
                let c = self.vcpu.ok_or("no vCPU registers")?;
                Ok(match reg {
                    Reg::Bp => c.rbp,
                    Reg::Di => c.rdi,
                    Reg::Dx => c.rdx,
                    Reg::R10 => c.r10,
                    Reg::R13 => c.r13,
                })
            }
            RegsAt::Memory(base) => {
                let (off, name) = match reg {
                    Reg::Bp => (l.bp, "bp"),
                    Reg::Di => (l.di, "di"),
                    Reg::Dx => (l.dx, "dx"),
                    Reg::R10 => (l.r10, "r10"),
                    Reg::R13 => (l.r13, "r13"),
                };
                self.read_field(base, off, name)
            }
        }
    }

    /// The kernel's `get_reg`: from full regs, or from the previous full
    /// regs when the current ones are only an IRET frame.
    fn get_reg(&self, st: &State, reg: Reg) -> std::result::Result<Option<u64>, String> {
        let Some(regs) = st.regs else { return Ok(None) };
        if st.full_regs {
            return self.regs_value(regs, reg).map(Some);
        }
        match st.prev_regs {
            Some(prev) => self.regs_value(prev, reg).map(Some),
            None => Ok(None),
        }
    }

    fn user_mode(&self, at: RegsAt) -> std::result::Result<bool, String> {
        match at {
            RegsAt::Vcpu => Ok(self.vcpu.is_some_and(|c| c.in_user_mode())),
            RegsAt::Memory(base) => Ok(self.read_field(base, self.regs_layout.cs, "cs")? & 3 != 0),
        }
    }

    /// `unwind_next_frame` after the end-of-stack check for user regs.
    fn next_frame(&self, st: &mut State) -> std::result::Result<Step, String> {
        let orig_ip = st.ip;
        let prev_sp = st.sp;
        let prev_stack = st.stack;
        let lookup_ip = if st.signal { st.ip } else { st.ip.checked_sub(1).ok_or("IP 0")? };
        let orc = match self.tables.find(lookup_ip) {
            Some(o) => o,
            None => {
                st.error = true;
                OrcEntry::FRAME_POINTER_GUESS
            }
        };

        match orc.kind {
            orc_type::END_OF_STACK => return Ok(Step::End),
            orc_type::UNDEFINED => return Err(format!("no ORC unwind data at {orig_ip:#x} (type undefined)")),
            _ => {}
        }
        if orc.sp_reg == orc_reg::UNDEFINED {
            if orc.end {
                return Ok(Step::End);
            }
            return Err(format!("no ORC unwind data at {orig_ip:#x} (undefined SP, no end hint)"));
        }
        st.signal = orc.signal;

        let add = |base: u64, off: i16, what: &str| -> std::result::Result<u64, String> {
            base.checked_add_signed(i64::from(off)).ok_or_else(|| format!("{what} {base:#x}{off:+} overflows"))
        };
        let mut indirect = false;
        let mut sp = match orc.sp_reg {
            orc_reg::SP => add(st.sp, orc.sp_offset, "sp")?,
            orc_reg::BP => add(st.bp, orc.sp_offset, "bp")?,
            orc_reg::SP_INDIRECT => {
                indirect = true;
                st.sp
            }
            orc_reg::BP_INDIRECT => {
                indirect = true;
                add(st.bp, orc.sp_offset, "bp")?
            }
            orc_reg::R10 | orc_reg::R13 | orc_reg::DI | orc_reg::DX => {
                let (reg, name) = match orc.sp_reg {
                    orc_reg::R10 => (Reg::R10, "R10"),
                    orc_reg::R13 => (Reg::R13, "R13"),
                    orc_reg::DI => (Reg::Di, "RDI"),
                    _ => (Reg::Dx, "DX"),
                };
                self.get_reg(st, reg)?.ok_or_else(|| format!("missing {name} value at {orig_ip:#x}"))?
            }
            other => return Err(format!("unknown ORC SP base register {other} at {orig_ip:#x}")),
        };

        if indirect {
            sp = self.deref(st, sp)?;
            if orc.sp_reg == orc_reg::SP_INDIRECT {
                sp = add(sp, orc.sp_offset, "sp")?;
            }
        }

        let l = self.regs_layout;
        match orc.kind {
            orc_type::CALL => {
                let ip_slot = sp.checked_sub(8).ok_or("return address slot underflows")?;
                st.ip = self.deref(st, ip_slot)?;
                st.sp = sp;
                st.regs = None;
                st.prev_regs = None;
                st.kind = FrameKind::Call;
            }
            orc_type::REGS => {
                if !self.access_ok(st, sp, l.size) {
                    return Err(format!("pt_regs at {sp:#x} (for {orig_ip:#x}) are outside the stack"));
                }
                st.ip = self.read_field(sp, l.ip, "ip")?;
                st.sp = self.read_field(sp, l.sp, "sp")?;
                st.regs = Some(RegsAt::Memory(sp));
                st.prev_regs = None;
                st.full_regs = true;
                st.kind = FrameKind::Regs;
            }
            orc_type::REGS_PARTIAL => {
                let iret_size = l.size - l.ip; // checked by PtRegsLayout::check
                if !self.access_ok(st, sp, iret_size) {
                    return Err(format!("IRET frame at {sp:#x} (for {orig_ip:#x}) is outside the stack"));
                }
                let base = sp.checked_sub(l.ip).ok_or("IRET frame address underflows")?;
                st.ip = self.read_field(base, l.ip, "ip")?;
                st.sp = self.read_field(base, l.sp, "sp")?;
                if st.full_regs {
                    st.prev_regs = st.regs;
                }
                st.regs = Some(RegsAt::Memory(base));
                st.full_regs = false;
                st.kind = FrameKind::PartialRegs;
            }
            other => return Err(format!("unknown ORC entry type {other} at {orig_ip:#x}")),
        }

        match orc.bp_reg {
            orc_reg::UNDEFINED => {
                if let Some(bp) = self.get_reg(st, Reg::Bp)? {
                    st.bp = bp;
                }
            }
            orc_reg::PREV_SP => st.bp = self.deref(st, add(sp, orc.bp_offset, "bp slot")?)?,
            orc_reg::BP => st.bp = self.deref(st, add(st.bp, orc.bp_offset, "bp slot")?)?,
            other => return Err(format!("unknown ORC BP base register {other} at {orig_ip:#x}")),
        }

        // Prevent a loop on bad ORC data.
        if st.stack == prev_stack
            && self.stacks.get(st.stack).is_some_and(|s| s.contains(st.sp, 8))
            && st.sp <= prev_sp
        {
            return Err(format!(
                "stack going in the wrong direction at {orig_ip:#x} (sp {:#x} after {prev_sp:#x})",
                st.sp
            ));
        }
        Ok(Step::Next)
    }
}

impl OrcTables {
    /// Unwinds one stack, at most `max_frames` frames. Never fails: problems
    /// make the result unreliable, with a reason.
    pub fn unwind(&self, mem: &dyn KernelMemory, start: UnwindStart, regs_layout: &PtRegsLayout, max_frames: usize) -> Stack {
        let mut out = Stack::default();
        let fail = |out: &mut Stack, reason: String| {
            out.reliable = false;
            if out.reason.is_none() {
                out.reason = Some(reason);
            }
        };
        if let Err(e) = regs_layout.check() {
            fail(&mut out, e);
            return out;
        }

        let (mut st, stacks, vcpu) = match start {
            UnwindStart::Running { regs, stacks } => {
                if regs.in_user_mode() {
                    // The vCPU runs user code: the kernel stack holds nothing.
                    out.reliable = true;
                    return out;
                }
                let st = State {
                    ip: regs.rip,
                    sp: regs.rsp,
                    bp: regs.rbp,
                    signal: true,
                    regs: Some(RegsAt::Vcpu),
                    prev_regs: None,
                    full_regs: true,
                    stack: 0,
                    visited: Vec::new(),
                    error: false,
                    kind: FrameKind::Interrupted,
                };
                (st, stacks, Some(regs))
            }
            UnwindStart::Sleeping { thread_sp, frame, stack } => {
                let read = |off: u64, what: &str| -> std::result::Result<u64, String> {
                    let at = thread_sp.checked_add(off).ok_or_else(|| format!("{what} address overflows"))?;
                    if !stack.contains(at, 8) {
                        return Err(format!("inactive_task_frame.{what} at {at:#x} is outside the task stack"));
                    }
                    mem.read_u64(at).map_err(|e| format!("reading inactive_task_frame.{what} at {at:#x}: {e}"))
                };
                let first = (|| {
                    let sp = thread_sp.checked_add(frame.size).ok_or("thread.sp + frame size overflows")?;
                    let ip = read(frame.ret_addr, "ret_addr")?;
                    let bp = read(frame.bp, "bp")?;
                    Ok::<_, String>((ip, sp, bp))
                })();
                let (ip, sp, bp) = match first {
                    Ok(v) => v,
                    Err(e) => {
                        fail(&mut out, e);
                        return out;
                    }
                };
                let st = State {
                    ip,
                    sp,
                    bp,
                    signal: self.ret_from_fork == Some(ip),
                    regs: None,
                    prev_regs: None,
                    full_regs: false,
                    stack: 0,
                    visited: Vec::new(),
                    error: false,
                    kind: FrameKind::TaskSwitch,
                };
                (st, vec![stack], None)
            }
        };
        if stacks.is_empty() || stacks.len() > MAX_STACK_REGIONS {
            fail(&mut out, format!("{} stack regions given (1..={MAX_STACK_REGIONS} expected)", stacks.len()));
            return out;
        }
        let walk = Walk { tables: self, mem, regs_layout, vcpu, stacks: &stacks };

        // get_stack_info for the first SP.
        st.visited = vec![false; stacks.len()];
        match stacks.iter().position(|s| s.contains(st.sp, 8)) {
            Some(i) => {
                st.stack = i;
                if let Some(v) = st.visited.get_mut(i) {
                    *v = true;
                }
            }
            None => {
                fail(&mut out, format!("start SP {:#x} is outside the given stacks", st.sp));
                return out;
            }
        }

        loop {
            // End of stack for user tasks: user-mode pt_regs.
            if let Some(regs) = st.regs {
                match walk.user_mode(regs) {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(e) => {
                        fail(&mut out, e);
                        return out;
                    }
                }
            }
            if out.frames.len() >= max_frames {
                fail(&mut out, format!("more than {max_frames} frames"));
                return out;
            }
            if !self.is_known_text(st.ip) {
                out.frames.push(Frame { ip: st.ip, sp: st.sp, kind: st.kind, reliable_so_far: false });
                fail(&mut out, format!("unknown IP {:#x} (no ORC table covers it)", st.ip));
                return out;
            }
            let had_error = st.error;
            out.frames.push(Frame { ip: st.ip, sp: st.sp, kind: st.kind, reliable_so_far: !had_error });
            let ip = st.ip;
            match walk.next_frame(&mut st) {
                Ok(Step::Next) => {
                    if st.error && !had_error {
                        fail(&mut out, format!("no ORC entry for {ip:#x}: guessed a frame pointer"));
                    }
                }
                Ok(Step::End) => break,
                Err(e) => {
                    fail(&mut out, e);
                    return out;
                }
            }
        }
        if out.reason.is_none() && !st.error {
            out.reliable = true;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guest-virtual memory as a few flat regions.
    struct RegionMemory(Vec<(u64, Vec<u8>)>);

    impl KernelMemory for RegionMemory {
        fn read_virt(&self, va: u64, buf: &mut [u8]) -> Result<()> {
            for (base, bytes) in &self.0 {
                if va >= *base {
                    let off = (va - base) as usize;
                    if let Some(src) = off.checked_add(buf.len()).and_then(|end| bytes.get(off..end)) {
                        buf.copy_from_slice(src);
                        return Ok(());
                    }
                }
            }
            Err(IntrospectError::NotMapped { va, level: 1 })
        }
    }

    const TEXT: u64 = 0xffff_ffff_8100_0000;
    const TEXT_END: u64 = TEXT + 0x1000;
    const STACK_LO: u64 = 0xffff_c900_0000_0000;
    const STACK_HI: u64 = STACK_LO + 0x4000;
    const RET_FROM_FORK: u64 = TEXT + 0x800;

    // Functions (each 0x100 bytes) in the synthetic text.
    const F_SCHED: u64 = TEXT; // __schedule-like: frame of 0x30 bytes (5 pushes + ret)
    const F_MID: u64 = TEXT + 0x100; // a plain call frame of 0x10 (1 push + ret)
    const F_ENTRY: u64 = TEXT + 0x200; // entry code: pt_regs at sp
    const F_START: u64 = TEXT + 0x300; // end hint
    const F_GAP: u64 = TEXT + 0x400; // terminator: undefined sp, no end
    const F_LOOP: u64 = TEXT + 0x500; // sp_offset 0: would loop

    fn call(sp_offset: i16) -> OrcEntry {
        OrcEntry { sp_offset, bp_offset: 0, sp_reg: orc_reg::SP, bp_reg: orc_reg::UNDEFINED, kind: orc_type::CALL, end: false, signal: false }
    }

    fn syms() -> SymbolAddrs {
        SymbolAddrs {
            text_start: TEXT,
            text_end: TEXT_END,
            ret_from_fork: Some(RET_FROM_FORK),
            sched_text: Some((F_SCHED, F_SCHED + 0x100)),
            ..SymbolAddrs::default()
        }
    }

    fn table_parts() -> (Vec<u64>, Vec<OrcEntry>) {
        let end = OrcEntry { sp_offset: 0, bp_offset: 0, sp_reg: orc_reg::UNDEFINED, bp_reg: 0, kind: orc_type::CALL, end: true, signal: false };
        let regs = OrcEntry { sp_offset: 0, bp_offset: 0, sp_reg: orc_reg::SP, bp_reg: orc_reg::UNDEFINED, kind: orc_type::REGS, end: false, signal: true };
        let gap = OrcEntry { end: false, ..end };
        let ips = vec![F_SCHED, F_MID, F_ENTRY, F_START, F_GAP, F_LOOP, RET_FROM_FORK];
        let entries = vec![call(0x30), call(0x10), regs, end, gap, call(0), end];
        (ips, entries)
    }

    fn lookup_for(ips: &[u64]) -> Vec<u32> {
        let blocks = (TEXT_END - TEXT) / LOOKUP_BLOCK_SIZE + 1;
        (0..blocks)
            .map(|b| {
                let at = TEXT + b * LOOKUP_BLOCK_SIZE;
                ips.partition_point(|&i| i <= at).saturating_sub(1) as u32
            })
            .collect()
    }

    fn tables() -> OrcTables {
        let (ips, entries) = table_parts();
        let lookup = lookup_for(&ips);
        let t = OrcTables::from_parts(&syms(), OrcFormat::LINUX_6_1, ips, entries, Some(lookup)).unwrap();
        assert!(t.uses_fast_lookup());
        t
    }

    fn layout() -> PtRegsLayout {
        // x86_64 struct pt_regs.
        PtRegsLayout { size: 168, ip: 128, sp: 152, bp: 32, cs: 136, di: 112, dx: 96, r10: 56, r13: 16 }
    }

    fn frame_layout() -> InactiveTaskFrameLayout {
        InactiveTaskFrameLayout { size: 56, ret_addr: 48, bp: 40 }
    }

    struct StackBuilder(Vec<u8>);
    impl StackBuilder {
        fn new() -> Self {
            StackBuilder(vec![0u8; (STACK_HI - STACK_LO) as usize])
        }
        fn put(&mut self, va: u64, v: u64) {
            let off = (va - STACK_LO) as usize;
            self.0[off..off + 8].copy_from_slice(&v.to_le_bytes());
        }
        fn mem(self) -> RegionMemory {
            RegionMemory(vec![(STACK_LO, self.0)])
        }
    }

    fn bounds() -> StackBounds {
        StackBounds { low: STACK_LO, high: STACK_HI }
    }

    /// A sleeping user task: switch frame -> __schedule-like -> mid -> entry (user pt_regs).
    fn user_task_stack() -> (StackBuilder, u64) {
        let mut s = StackBuilder::new();
        let regs = STACK_HI - 168; // user pt_regs at the top
        s.put(regs + 128, 0x40_1000); // user ip
        s.put(regs + 136, 0x33); // user cs
        s.put(regs + 152, 0x7fff_0000); // user sp
        // F_MID's frame: return address into F_ENTRY at regs - 8.
        let mid_ret_slot = regs - 8;
        s.put(mid_ret_slot, F_ENTRY + 0x20);
        // F_SCHED's frame of 0x30: return address into F_MID at mid_sp_start - 8.
        let mid_sp = mid_ret_slot - 8; // F_MID pushed one register
        s.put(mid_sp - 8, F_MID + 0x10);
        let sched_sp = mid_sp - 8 - 0x28;
        // inactive_task_frame below sched_sp: sched_sp == thread.sp + 56.
        let thread_sp = sched_sp - 56;
        s.put(thread_sp + 48, F_SCHED + 0x42);
        s.put(thread_sp + 40, 0);
        (s, thread_sp)
    }

    fn sleeping(thread_sp: u64) -> UnwindStart {
        UnwindStart::Sleeping { thread_sp, frame: frame_layout(), stack: bounds() }
    }

    #[test]
    fn lookup_matches_full_search() {
        let t = tables();
        let (ips, entries) = table_parts();
        let slow = OrcTables::from_parts(&syms(), OrcFormat::LINUX_6_1, ips, entries, None).unwrap();
        assert!(!slow.uses_fast_lookup());
        for ip in (TEXT..TEXT_END).step_by(7) {
            assert_eq!(t.find(ip), slow.find(ip), "ip {ip:#x}");
        }
        assert_eq!(t.find(F_MID + 5), Some(call(0x10)));
        assert_eq!(t.find(TEXT_END), None);
    }

    #[test]
    fn call_frames_up_to_user_regs_are_reliable() {
        let (s, thread_sp) = user_task_stack();
        let t = tables();
        let st = t.unwind(&s.mem(), sleeping(thread_sp), &layout(), 64);
        assert!(st.reliable, "{st:?}");
        let ips: Vec<u64> = st.frames.iter().map(|f| f.ip).collect();
        assert_eq!(ips, vec![F_SCHED + 0x42, F_MID + 0x10, F_ENTRY + 0x20]);
        assert_eq!(st.frames[0].kind, FrameKind::TaskSwitch);
        assert_eq!(st.frames[2].kind, FrameKind::Call);
        assert!(st.frames.iter().all(|f| f.reliable_so_far));
        // /proc/PID/stack hides the scheduler frame.
        assert_eq!(t.proc_pid_stack(&st), vec![F_MID + 0x10, F_ENTRY + 0x20]);
    }

    #[test]
    fn kernel_thread_ends_at_end_hint() {
        let mut s = StackBuilder::new();
        let thread_sp = STACK_HI - 0x100;
        s.put(thread_sp + 48, F_MID + 0x10);
        // F_MID frame 0x10: return address at sp + 8 into F_START (end hint).
        s.put(thread_sp + 56 + 8, F_START + 0x5);
        let st = tables().unwind(&s.mem(), sleeping(thread_sp), &layout(), 64);
        assert!(st.reliable, "{st:?}");
        assert_eq!(st.frames.iter().map(|f| f.ip).collect::<Vec<_>>(), vec![F_MID + 0x10, F_START + 0x5]);
    }

    #[test]
    fn never_run_task_starts_at_ret_from_fork() {
        let mut s = StackBuilder::new();
        let thread_sp = STACK_HI - 56 - 168;
        s.put(thread_sp + 48, RET_FROM_FORK);
        let st = tables().unwind(&s.mem(), sleeping(thread_sp), &layout(), 64);
        assert!(st.reliable, "{st:?}");
        assert_eq!(st.frames.len(), 1);
    }

    #[test]
    fn running_vcpu_through_kernel_regs_frame() {
        // vCPU interrupted in F_MID; F_MID was called from F_ENTRY, whose
        // ORC says pt_regs at sp: kernel-mode regs interrupted F_MID again,
        // which was called from F_START (end).
        let mut s = StackBuilder::new();
        let regs2 = STACK_HI - 0x400;
        s.put(regs2 + 128, F_MID + 0x3); // kernel ip
        s.put(regs2 + 136, 0x10); // kernel cs
        let inner_sp = STACK_HI - 0x200;
        s.put(regs2 + 152, inner_sp); // kernel sp
        s.put(inner_sp + 8, F_START + 1); // F_MID's return address (after one push)
        let rsp = regs2 - 16;
        s.put(rsp + 8, F_ENTRY + 0x10); // return into entry code
        let cpu = CpuState { rip: F_MID + 0x7, rsp, cs: 0x10, ..CpuState::default() };
        let st = tables().unwind(&s.mem(), UnwindStart::Running { regs: cpu, stacks: vec![bounds()] }, &layout(), 64);
        assert!(st.reliable, "{st:?}");
        let got: Vec<(u64, FrameKind)> = st.frames.iter().map(|f| (f.ip, f.kind)).collect();
        assert_eq!(
            got,
            vec![
                (F_MID + 0x7, FrameKind::Interrupted),
                (F_ENTRY + 0x10, FrameKind::Call),
                (F_MID + 0x3, FrameKind::Regs),
                (F_START + 1, FrameKind::Call),
            ]
        );
    }

    #[test]
    fn user_mode_vcpu_has_empty_reliable_stack() {
        let cpu = CpuState { rip: 0x40_0000, rsp: 0x7fff_0000, cs: 0x33, ..CpuState::default() };
        let st = tables().unwind(&RegionMemory(vec![]), UnwindStart::Running { regs: cpu, stacks: vec![bounds()] }, &layout(), 64);
        assert!(st.reliable && st.frames.is_empty() && st.reason.is_none());
    }

    #[test]
    fn unknown_ip_is_unreliable() {
        let (mut s, thread_sp) = user_task_stack();
        let regs = STACK_HI - 168;
        s.put(regs - 8, 0xffff_ffff_a000_0000); // return address outside every table
        let st = tables().unwind(&s.mem(), sleeping(thread_sp), &layout(), 64);
        assert!(!st.reliable);
        assert!(st.reason.as_deref().unwrap().contains("unknown IP"), "{st:?}");
        let last = st.frames.last().unwrap();
        assert_eq!(last.ip, 0xffff_ffff_a000_0000);
        assert!(!last.reliable_so_far);
    }

    #[test]
    fn module_table_makes_ip_known() {
        let (mut s, thread_sp) = user_task_stack();
        let regs = STACK_HI - 168;
        let module_text = 0xffff_ffff_c000_0000;
        s.put(regs - 8, module_text + 0x20);
        // The module function's frame: 0x10 (one push), called from F_ENTRY.
        // Place its own return at regs - 8 + 0x10 - 8 ... simpler: make the module
        // frame an end hint.
        let mut t = tables();
        let end = OrcEntry { sp_offset: 0, bp_offset: 0, sp_reg: orc_reg::UNDEFINED, bp_reg: 0, kind: 0, end: true, signal: false };
        // Guest-resident module table: ip table (s32 relative) + entries.
        let ip_tab = 0xffff_ffff_c010_0000u64;
        let orc_tab = ip_tab + 0x100;
        let mut bytes = vec![0u8; 0x200];
        let rel = (module_text as i64 - ip_tab as i64) as i32;
        bytes[0..4].copy_from_slice(&rel.to_le_bytes());
        bytes[0x100..0x106].copy_from_slice(&OrcFormat::LINUX_6_1.encode(&end).unwrap());
        let mem = RegionMemory(vec![(STACK_LO, s.0.clone()), (ip_tab, bytes)]);
        t.add_module_table(&mem, module_text, module_text + 0x1000, ip_tab, orc_tab, 1).unwrap();
        let st = t.unwind(&mem, sleeping(thread_sp), &layout(), 64);
        assert!(st.reliable, "{st:?}");
        assert_eq!(st.frames.last().unwrap().ip, module_text + 0x20);
        // Count mismatch / unsorted / unreadable tables are errors.
        assert!(t.add_module_table(&mem, module_text, module_text + 0x1000, ip_tab, orc_tab, 0).is_err());
        assert!(t.add_module_table(&mem, module_text, module_text + 0x1000, 0x1000, orc_tab, 1).is_err());
    }

    #[test]
    fn gap_terminator_is_unreliable() {
        let (mut s, thread_sp) = user_task_stack();
        s.put(STACK_HI - 168 - 8, F_GAP + 0x10);
        let st = tables().unwind(&s.mem(), sleeping(thread_sp), &layout(), 64);
        assert!(!st.reliable);
        assert!(st.reason.unwrap().contains("undefined SP"));
    }

    #[test]
    fn non_monotonic_sp_is_unreliable() {
        let mut s = StackBuilder::new();
        let thread_sp = STACK_HI - 0x100;
        s.put(thread_sp + 48, F_LOOP + 0x10); // sp_offset 0: sp would not grow
        s.put(thread_sp + 56 - 8, F_LOOP + 0x10);
        let st = tables().unwind(&s.mem(), sleeping(thread_sp), &layout(), 64);
        assert!(!st.reliable);
        assert!(st.reason.unwrap().contains("wrong direction"));
    }

    #[test]
    fn walking_off_the_stack_is_unreliable() {
        let mut s = StackBuilder::new();
        // F_SCHED's frame needs 0x30 bytes but the stack ends first.
        let thread_sp = STACK_HI - 56 - 0x10;
        s.put(thread_sp + 48, F_SCHED + 0x10);
        let mem = s.mem();
        let st = tables().unwind(&mem, sleeping(thread_sp), &layout(), 64);
        assert!(!st.reliable);
        assert!(st.reason.unwrap().contains("outside the stack"));
        // thread.sp outside the stack at all.
        let st = tables().unwind(&mem, sleeping(STACK_HI + 0x1000), &layout(), 64);
        assert!(!st.reliable && st.frames.is_empty());
    }

    #[test]
    fn too_many_frames_is_unreliable() {
        let (s, thread_sp) = user_task_stack();
        let st = tables().unwind(&s.mem(), sleeping(thread_sp), &layout(), 2);
        assert!(!st.reliable);
        assert_eq!(st.frames.len(), 2);
        assert!(st.reason.unwrap().contains("more than 2"));
    }

    #[test]
    fn unreadable_stack_is_unreliable() {
        let (_, thread_sp) = user_task_stack();
        let st = tables().unwind(&RegionMemory(vec![]), sleeping(thread_sp), &layout(), 64);
        assert!(!st.reliable);
        assert!(st.reason.unwrap().contains("reading"));
    }

    #[test]
    fn bad_tables_are_rejected() {
        let (mut ips, entries) = table_parts();
        ips.swap(0, 1);
        assert!(OrcTables::from_parts(&syms(), OrcFormat::LINUX_6_1, ips, entries.clone(), None).is_err());
        assert!(OrcTables::from_parts(&syms(), OrcFormat::LINUX_6_1, vec![TEXT], entries, None).is_err());
        // A lookup table with out-of-range indices is ignored (full search).
        let (ips, entries) = table_parts();
        let t = OrcTables::from_parts(&syms(), OrcFormat::LINUX_6_1, ips, entries, Some(vec![99; 20])).unwrap();
        assert!(!t.uses_fast_lookup());
        // Loading from unreadable memory, or with inconsistent sizes.
        let mem = RegionMemory(vec![]);
        let mut s = syms();
        s.start_orc_unwind_ip = 0x1000;
        s.stop_orc_unwind_ip = 0x1008;
        s.start_orc_unwind = 0x2000;
        s.stop_orc_unwind = 0x2006;
        assert!(OrcTables::load(&mem, &s, OrcFormat::LINUX_6_1).is_err());
        s.stop_orc_unwind = 0x200c;
        assert!(OrcTables::load(&mem, &s, OrcFormat::LINUX_6_1).is_err());
    }

    /// Random stacks and tables: the walk must end without panicking.
    #[test]
    fn hostile_data_never_panics() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..300 {
            let n = 1 + (next() % 16) as usize;
            let mut ips: Vec<u64> = (0..n).map(|_| TEXT + next() % 0x1000).collect();
            ips.sort();
            let entries: Vec<OrcEntry> = (0..n)
                .map(|_| {
                    let r = next();
                    let b = r.to_le_bytes();
                    // Both known formats: every entry either format reads must be walked safely.
                    let format = if round % 2 == 0 { OrcFormat::LINUX_6_1 } else { OrcFormat::LINUX_6_4 };
                    format.decode([b[0], b[1] & 0x80, b[2], b[3], b[4], b[5]])
                })
                .collect();
            let lookup = if round % 2 == 0 { Some(lookup_for(&ips)) } else { None };
            let t = OrcTables::from_parts(&syms(), OrcFormat::LINUX_6_1, ips, entries, lookup).unwrap();
            let mut s = StackBuilder::new();
            for i in (0..0x4000u64).step_by(8) {
                let v = match next() % 4 {
                    0 => TEXT + next() % 0x1000,
                    1 => STACK_LO + next() % 0x4000,
                    2 => next(),
                    _ => 0x33,
                };
                s.put(STACK_LO + i, v);
            }
            let mem = s.mem();
            let thread_sp = STACK_LO + (next() % 0x4000);
            let _ = t.unwind(&mem, sleeping(thread_sp), &layout(), 100);
            let cpu = CpuState { rip: next(), rsp: next(), rbp: next(), cs: 0x10, ..CpuState::default() };
            let _ = t.unwind(&mem, UnwindStart::Running { regs: cpu, stacks: vec![bounds()] }, &layout(), 100);
            let cpu = CpuState { rip: TEXT + next() % 0x1000, rsp: STACK_LO + next() % 0x4000, rbp: next(), r10: next(), cs: 0x10, ..CpuState::default() };
            let st = t.unwind(&mem, UnwindStart::Running { regs: cpu, stacks: vec![bounds()] }, &layout(), 100);
            assert!(st.frames.len() <= 100);
            assert!(st.reliable || st.reason.is_some());
        }
    }
}
