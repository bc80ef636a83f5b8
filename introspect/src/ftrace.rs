//! ftrace call sites: where a function's 5-byte site is, what it holds now
//! (decoded with iced-x86), and what the guest's own ftrace records say.

use std::collections::{HashMap, HashSet};

use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter, Mnemonic};

use crate::btf::Btf;
use crate::error::{IntrospectError, Result};
use crate::kernel::Kernel;
use crate::translate::KernelMemory;

/// The 5-byte NOP boot writes into every traceable site.
pub const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];
/// Most records we read before calling the ftrace pages corrupted.
pub const MAX_RECORDS: usize = 1 << 20;
const MAX_PAGES: usize = 1 << 16;
/// Largest `struct dyn_ftrace` we accept (it is 16 bytes on x86_64).
const MAX_RECORD_SIZE: u64 = 64;

/// The `dyn_ftrace.flags` bits hyperpatch reads and writes, as this kernel
/// defines them: from the `FTRACE_FL_*` enumerators in its BTF. They move
/// between versions (6.1's lowest flag is bit 23; newer kernels add flags
/// down to bit 19), and every bit below the lowest flag is the record's
/// reference count (`FTRACE_REF_MAX_SHIFT`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FtraceFlagBits {
    /// FTRACE_FL_ENABLED: the guest's ftrace has the site turned on.
    pub enabled: u64,
    /// FTRACE_FL_DISABLED: the guest's ftrace leaves the record alone.
    pub disabled: u64,
    /// The reference count: the bits below the lowest FTRACE_FL_ flag.
    pub ref_mask: u64,
}

impl FtraceFlagBits {
    /// Refused, naming what is unknown, unless ENABLED and DISABLED are
    /// distinct single bits above a reference count of at least 8 bits.
    pub fn from_btf(btf: &Btf) -> Result<FtraceFlagBits> {
        let unknown = |why: String| IntrospectError::Corrupt(format!("ftrace record flags unknown: {why}"));
        let flags = btf.enumerators_with_prefix("FTRACE_FL_");
        let bit = |name: &str| -> Result<u64> {
            let v = flags.iter().find(|(n, _)| n == name).map(|(_, v)| *v as u64);
            match v {
                Some(v) if v.is_power_of_two() => Ok(v),
                Some(v) => Err(unknown(format!("{name} is {v:#x}, not one bit"))),
                None => Err(unknown(format!("the kernel's BTF has no {name}"))),
            }
        };
        let (enabled, disabled) = (bit("FTRACE_FL_ENABLED")?, bit("FTRACE_FL_DISABLED")?);
        let lowest = flags.iter().map(|(_, v)| *v as u64).filter(|v| v.is_power_of_two()).min().unwrap_or(0);
        if enabled == disabled || lowest < (1 << 8) {
            return Err(unknown(format!(
                "FTRACE_FL_ENABLED {enabled:#x}, FTRACE_FL_DISABLED {disabled:#x}, lowest flag {lowest:#x}"
            )));
        }
        Ok(FtraceFlagBits { enabled, disabled, ref_mask: lowest - 1 })
    }
}

/// What the 5 bytes at a site are.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum SiteInsn {
    /// The ftrace NOP: nobody traces or patches this function.
    Nop,
    /// `call target` (the guest's ftrace).
    Call { target: u64 },
    /// `jmp target` (hyperpatch, or a livepatch trampoline).
    Jmp { target: u64 },
    /// Anything else.
    Other { text: String },
}

/// One function's ftrace call site.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CallSite {
    pub function: String,
    pub func_addr: u64,
    /// Address of the 5-byte site (after `endbr64` when present).
    pub site: u64,
    pub bytes: [u8; 5],
    pub insn: SiteInsn,
    /// Intel syntax of the site instruction.
    pub text: String,
    /// Symbol of a call/jmp target.
    pub target_symbol: Option<String>,
    /// The guest's ftrace record for the site, if the function is traceable.
    pub record: Option<FtraceRecord>,
}

/// `struct dyn_ftrace` as the guest keeps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FtraceRecord {
    pub ip: u64,
    pub flags: u64,
    /// Guest address of the record's `flags` field.
    pub flags_addr: u64,
    /// Guest address of the record's `ip` field (records read while the
    /// guest ran are checked through it in a stop).
    pub ip_addr: u64,
    /// What the bits of `flags` mean in this kernel.
    pub bits: FtraceFlagBits,
}

impl FtraceRecord {
    /// The guest's ftrace has this site turned on (a tracer or a livepatch).
    pub fn enabled(&self) -> bool {
        self.flags & self.bits.enabled != 0
    }
    /// Number of ftrace_ops that want this site.
    pub fn refcount(&self) -> u64 {
        self.flags & self.bits.ref_mask
    }
    /// ftrace refuses to touch the site (e.g. init text freed).
    pub fn disabled(&self) -> bool {
        self.flags & self.bits.disabled != 0
    }
}

/// Decodes the 5 bytes at `site`.
pub fn decode_site(bytes: &[u8; 5], site: u64) -> (SiteInsn, String) {
    if *bytes == NOP5 {
        return (SiteInsn::Nop, "nop dword ptr [rax+rax]".into());
    }
    let mut d = Decoder::with_ip(64, bytes, site, DecoderOptions::NONE);
    let insn = d.decode();
    let mut text = String::new();
    IntelFormatter::new().format(&insn, &mut text);
    if insn.is_invalid() || insn.len() != 5 {
        return (SiteInsn::Other { text: text.clone() }, text);
    }
    let kind = match insn.mnemonic() {
        Mnemonic::Call => SiteInsn::Call { target: insn.near_branch_target() },
        Mnemonic::Jmp => SiteInsn::Jmp { target: insn.near_branch_target() },
        Mnemonic::Nop => SiteInsn::Nop,
        _ => SiteInsn::Other { text: text.clone() },
    };
    (kind, text)
}

/// All of the guest's ftrace records, by site address.
pub struct FtraceRecords {
    pub by_ip: HashMap<u64, FtraceRecord>,
}

/// Bytes at a function's start searched for its ftrace record: the
/// `__fentry__` call comes first, after at most a 4-byte `endbr64` or the
/// NOP the guest sealed it with.
const SITE_WINDOW: u64 = 16;

impl FtraceRecords {
    /// The ftrace call site of the function at `func` whose first bytes are
    /// `head`: the guest's own record in the function's first bytes, as the
    /// kernel's `ftrace_location()` finds it (after `endbr64`, or after the
    /// 4-byte NOP a loader sealed an unused `endbr64` with, whatever that
    /// NOP is in this kernel). Only the function's own `size` bytes are
    /// searched (when known, else 0). A function without a record (notrace)
    /// gets the byte after `endbr64`, or `func`.
    pub fn site_of(&self, func: u64, size: u64, head: &[u8]) -> u64 {
        let window = if size == 0 { SITE_WINDOW } else { size.min(SITE_WINDOW) };
        (0..window)
            .filter_map(|off| func.checked_add(off))
            .find(|ip| self.by_ip.contains_key(ip))
            .unwrap_or_else(|| if head.get(..4) == Some(&ENDBR64[..]) { func.saturating_add(4) } else { func })
    }
}

impl Kernel<'_> {
    /// Reads every `dyn_ftrace` from `ftrace_pages_start` (the boot-time
    /// `__start_mcount_loc` is freed init data).
    pub fn ftrace_records(&self) -> Result<FtraceRecords> {
        let next_off = self.off("ftrace_page", "next")?;
        let records_off = self.off("ftrace_page", "records")?;
        let index_off = self.off("ftrace_page", "index")?;
        let rec_size = self.btf.struct_size("dyn_ftrace")?;
        // BTF is guest data too: a huge record size would make one page's
        // read an unbounded allocation.
        if rec_size == 0 || rec_size > MAX_RECORD_SIZE {
            return Err(IntrospectError::Corrupt(format!("sizeof(struct dyn_ftrace) = {rec_size} is implausible")));
        }
        let ip_off = self.off("dyn_ftrace", "ip")?;
        let flags_off = self.off("dyn_ftrace", "flags")?;
        let bits = FtraceFlagBits::from_btf(&self.btf)?;
        let mut page = self.mem.read_u64(self.sym("ftrace_pages_start")?)?;
        let mut by_ip = HashMap::new();
        let mut pages = 0usize;
        // Records read so far, duplicates included: a page list that loops
        // back must not re-read its pages up to MAX_PAGES times.
        let mut total_records = 0usize;
        let mut seen_pages = HashSet::new();
        while page != 0 {
            pages += 1;
            if pages > MAX_PAGES {
                return Err(IntrospectError::WalkLimit { what: "ftrace pages".into(), limit: MAX_PAGES });
            }
            if !seen_pages.insert(page) {
                return Err(IntrospectError::Corrupt(format!("ftrace page list loops back to {page:#x}")));
            }
            let records = self.read_ptr(page, records_off)?;
            let index = self.mem.read_i32(page.checked_add(index_off).ok_or(IntrospectError::Overflow(page))?)?;
            let count = usize::try_from(index).map_err(|_| IntrospectError::Corrupt(format!("ftrace page {page:#x} index {index}")))?;
            total_records = total_records.saturating_add(count);
            if total_records > MAX_RECORDS {
                return Err(IntrospectError::WalkLimit { what: "ftrace records".into(), limit: MAX_RECORDS });
            }
            let total = (count as u64).checked_mul(rec_size).ok_or(IntrospectError::Overflow(records))?;
            let raw = self.mem.read_bytes(records, usize::try_from(total).map_err(|_| IntrospectError::Overflow(total))?)?;
            for i in 0..count {
                let base = (i as u64 * rec_size) as usize;
                let field = |o: u64| -> Option<u64> {
                    let s = base.checked_add(o as usize)?;
                    let b = raw.get(s..s.checked_add(8)?)?;
                    Some(u64::from_le_bytes(b.try_into().ok()?))
                };
                if let (Some(ip), Some(flags)) = (field(ip_off), field(flags_off)) {
                    let rec = records.wrapping_add(base as u64);
                    let flags_addr = rec.wrapping_add(flags_off);
                    by_ip.insert(ip, FtraceRecord { ip, flags, flags_addr, ip_addr: rec.wrapping_add(ip_off), bits });
                }
            }
            page = self.read_ptr(page, next_off)?;
        }
        Ok(FtraceRecords { by_ip })
    }

    /// The call site of function `name` (`sympos` as livepatch counts it).
    pub fn call_site(&self, name: &str, sympos: u32, records: &FtraceRecords) -> Result<CallSite> {
        let (func_addr, size) = match self.syms.address_of(name, sympos) {
            Ok(a) => (a, self.syms.resolve(a).filter(|s| s.addr == a).map_or(0, |s| s.size)),
            Err(IntrospectError::NoSymbol(n)) => {
                // A module function?
                let mut hit = None;
                for m in self.modules()? {
                    if let Some(s) = self.module_symbols(&m)?.into_iter().find(|s| s.name == name && matches!(s.kind, 't' | 'T')) {
                        hit = Some((s.addr, s.size));
                        break;
                    }
                }
                hit.ok_or(IntrospectError::NoSymbol(n))?
            }
            Err(e) => return Err(e),
        };
        let head = self.mem.read_bytes(func_addr, 9)?;
        let site = records.site_of(func_addr, size, &head);
        let mut bytes = [0u8; 5];
        self.mem.read_virt(site, &mut bytes)?;
        let (insn, text) = decode_site(&bytes, site);
        let target_symbol = match &insn {
            SiteInsn::Call { target } | SiteInsn::Jmp { target } => self.symbolize(*target),
            _ => None,
        };
        Ok(CallSite {
            function: name.to_string(),
            func_addr,
            site,
            bytes,
            insn,
            text,
            target_symbol,
            record: records.by_ip.get(&site).copied(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_site_is_the_guests_record_after_endbr_or_its_seal() {
        let rec = |ip: u64| (ip, FtraceRecord { ip, flags: 0, flags_addr: 0, ip_addr: 0, bits: FtraceFlagBits::default() });
        // 0x1000: sealed (6.12's `66 0f 1f 00`), record at +4. 0x2000: a
        // 9-byte notrace function right before a traced one at 0x2009.
        let records = FtraceRecords { by_ip: HashMap::from([rec(0x1004), rec(0x200d)]) };
        let sealed = [0x66, 0x0f, 0x1f, 0x00, 0x0f, 0x1f, 0x44, 0x00, 0x00];
        assert_eq!(records.site_of(0x1000, 0x40, &sealed), 0x1004);
        assert_eq!(records.site_of(0x1000, 0, &sealed), 0x1004);
        assert_eq!(records.site_of(0x2000, 9, &sealed), 0x2000, "the next function's record is not this one's");
        let mut endbr = sealed;
        endbr[..4].copy_from_slice(&ENDBR64);
        assert_eq!(records.site_of(0x2000, 9, &endbr), 0x2004);
        assert_eq!(records.site_of(0x2009, 0x20, &endbr), 0x200d);
    }

    #[test]
    fn decodes_nop_call_jmp() {
        assert_eq!(decode_site(&NOP5, 0x1000).0, SiteInsn::Nop);
        // call +0x100 from 0x1000: target 0x1105
        let (k, _) = decode_site(&[0xe8, 0x00, 0x01, 0x00, 0x00], 0x1000);
        assert_eq!(k, SiteInsn::Call { target: 0x1105 });
        let (k, _) = decode_site(&[0xe9, 0xfb, 0xff, 0xff, 0xff], 0x1000);
        assert_eq!(k, SiteInsn::Jmp { target: 0x1000 });
        let (k, _) = decode_site(&[0x55, 0x48, 0x89, 0xe5, 0x90], 0x1000);
        assert!(matches!(k, SiteInsn::Other { .. }));
    }
}
