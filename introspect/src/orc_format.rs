//! The guest's ORC entry format, from its BTF.
//!
//! `struct orc_entry` has changed shape: up to Linux 6.3 its `type` field is
//! two bits (call 0, regs 1, partial regs 2) and the end of a stack is an
//! undefined SP register plus an `end` bit; from 6.4 `type` is three bits
//! (undefined 0, end of stack 1, call 2, regs 3, partial regs 4), `end` is
//! gone and a `signal` bit says whether the IP is a return address (6.3
//! had `signal` next to the two-bit `type` and `end`). The bit positions of
//! every field are read from the guest's BTF; which `type` numbering applies
//! follows from the members it has. Any other shape is refused by name: an
//! unwinder that misreads the type of each entry gives wrong answers, not
//! errors.

use crate::btf::Btf;
use crate::error::{IntrospectError, Result};
use crate::orc::{orc_type, OrcEntry};

/// Size of one `struct orc_entry` (every known format; checked in BTF).
pub const ORC_ENTRY_BYTES: usize = 6;

/// A field's place inside the 48 bits of one entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BitField {
    pub offset: u8,
    pub width: u8,
}

impl BitField {
    const fn new(offset: u8, width: u8) -> BitField {
        BitField { offset, width }
    }

    fn get(self, bits: u64) -> u64 {
        (bits >> self.offset) & ((1u64 << self.width) - 1)
    }

    fn put(self, bits: &mut u64, value: u64) {
        let mask = ((1u64 << self.width) - 1) << self.offset;
        *bits = (*bits & !mask) | ((value << self.offset) & mask);
    }
}

/// What the numbers in `orc_entry.type` mean.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TypeNumbering {
    /// Up to 6.3: call 0, regs 1, partial regs 2; end of stack is an
    /// undefined SP register with the `end` bit set.
    EndBit,
    /// From 6.4: undefined 0, end of stack 1, call 2, regs 3, partial regs 4.
    Typed,
}

/// The guest's `struct orc_entry`: where each field is and how `type` is
/// numbered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OrcFormat {
    pub sp_offset: BitField,
    pub bp_offset: BitField,
    pub sp_reg: BitField,
    pub bp_reg: BitField,
    pub kind: BitField,
    /// The `end` bit (up to 6.3).
    pub end: Option<BitField>,
    /// The `signal` bit (from 6.3).
    pub signal: Option<BitField>,
    pub numbering: TypeNumbering,
}

/// Members a known `struct orc_entry` may have (`unused` is the big-endian
/// padding).
const KNOWN_MEMBERS: [&str; 8] = ["sp_offset", "bp_offset", "sp_reg", "bp_reg", "type", "signal", "end", "unused"];

fn unknown(detail: String) -> IntrospectError {
    IntrospectError::UnknownOrcFormat(detail)
}

impl OrcFormat {
    /// Linux 6.1's little-endian layout (for tables built by hand in tests
    /// and fuzzing; a guest's format always comes from [`Self::from_btf`]).
    pub const LINUX_6_1: OrcFormat = OrcFormat {
        sp_offset: BitField::new(0, 16),
        bp_offset: BitField::new(16, 16),
        sp_reg: BitField::new(32, 4),
        bp_reg: BitField::new(36, 4),
        kind: BitField::new(40, 2),
        end: Some(BitField::new(42, 1)),
        signal: None,
        numbering: TypeNumbering::EndBit,
    };

    /// Linux 6.4+'s little-endian layout (6.12's), as [`Self::LINUX_6_1`].
    pub const LINUX_6_4: OrcFormat = OrcFormat {
        sp_offset: BitField::new(0, 16),
        bp_offset: BitField::new(16, 16),
        sp_reg: BitField::new(32, 4),
        bp_reg: BitField::new(36, 4),
        kind: BitField::new(40, 3),
        end: None,
        signal: Some(BitField::new(43, 1)),
        numbering: TypeNumbering::Typed,
    };

    /// Reads the format from the guest's BTF, or refuses a shape it does
    /// not know, naming what differs.
    pub fn from_btf(btf: &Btf) -> Result<OrcFormat> {
        let size = btf.struct_size("orc_entry")?;
        if size != ORC_ENTRY_BYTES as u64 {
            return Err(unknown(format!("{size} bytes, not {ORC_ENTRY_BYTES}")));
        }
        for m in btf.describe_struct("orc_entry")? {
            if !KNOWN_MEMBERS.contains(&m.name.as_str()) {
                return Err(unknown(format!("member {:?}", m.name)));
            }
        }
        let field = |name: &str, bitfield: bool| -> Result<Option<BitField>> {
            let m = match btf.member("orc_entry", name) {
                Ok(m) => m,
                Err(IntrospectError::NoMember { .. }) => return Ok(None),
                Err(e) => return Err(e),
            };
            let width = if m.is_bitfield() { u64::from(m.bitfield_size) } else { m.size.saturating_mul(8) };
            if m.is_bitfield() != bitfield {
                let what = if bitfield { "a whole integer, not a bitfield" } else { "a bitfield" };
                return Err(unknown(format!("{name} is {what}")));
            }
            let end = m.offset_bits.checked_add(width).ok_or_else(|| unknown(format!("{name}: offset overflows")))?;
            if width == 0 || end > 8 * ORC_ENTRY_BYTES as u64 {
                return Err(unknown(format!("{name} at bits {}..{end}", m.offset_bits)));
            }
            Ok(Some(BitField::new(m.offset_bits as u8, width as u8)))
        };
        let need = |name: &str, bitfield: bool, width: u8| -> Result<BitField> {
            let f = field(name, bitfield)?.ok_or_else(|| unknown(format!("no member {name}")))?;
            if f.width != width {
                return Err(unknown(format!("{name} is {} bits, not {width}", f.width)));
            }
            Ok(f)
        };
        let sp_offset = need("sp_offset", false, 16)?;
        let bp_offset = need("bp_offset", false, 16)?;
        let sp_reg = need("sp_reg", true, 4)?;
        let bp_reg = need("bp_reg", true, 4)?;
        let kind = field("type", true)?.ok_or_else(|| unknown("no member type".into()))?;
        let end = field("end", true)?;
        let signal = field("signal", true)?;
        for (name, f) in [("end", end), ("signal", signal)] {
            if let Some(f) = f.filter(|f| f.width != 1) {
                return Err(unknown(format!("{name} is {} bits, not 1", f.width)));
            }
        }
        let numbering = match (kind.width, end.is_some()) {
            (2, true) => TypeNumbering::EndBit,
            (3, false) if signal.is_some() => TypeNumbering::Typed,
            (w, e) => {
                return Err(unknown(format!(
                    "type is {w} bits {} end bit{}",
                    if e { "with an" } else { "without an" },
                    if signal.is_some() { " and has signal" } else { " and no signal" }
                )))
            }
        };
        let format = OrcFormat { sp_offset, bp_offset, sp_reg, bp_reg, kind, end, signal, numbering };
        format.check_disjoint()?;
        Ok(format)
    }

    fn fields(&self) -> impl Iterator<Item = (&'static str, BitField)> {
        [
            ("sp_offset", Some(self.sp_offset)),
            ("bp_offset", Some(self.bp_offset)),
            ("sp_reg", Some(self.sp_reg)),
            ("bp_reg", Some(self.bp_reg)),
            ("type", Some(self.kind)),
            ("end", self.end),
            ("signal", self.signal),
        ]
        .into_iter()
        .filter_map(|(n, f)| f.map(|f| (n, f)))
    }

    fn check_disjoint(&self) -> Result<()> {
        let mut used = 0u64;
        for (name, f) in self.fields() {
            let mut mask = 0u64;
            f.put(&mut mask, u64::MAX);
            if used & mask != 0 {
                return Err(unknown(format!("{name} overlaps another field")));
            }
            used |= mask;
        }
        Ok(())
    }

    /// Decodes one entry into hyperpatch's format-neutral [`OrcEntry`]
    /// (its `kind` in [`orc_type`] numbering, `end` and `signal` set as
    /// the guest's unwinder reads them).
    pub fn decode(&self, b: [u8; ORC_ENTRY_BYTES]) -> OrcEntry {
        let [b0, b1, b2, b3, b4, b5] = b;
        let bits = u64::from_le_bytes([b0, b1, b2, b3, b4, b5, 0, 0]);
        let raw = self.kind.get(bits) as u8;
        let end = self.end.is_some_and(|f| f.get(bits) != 0);
        let kind = match (self.numbering, raw) {
            (TypeNumbering::EndBit, 0) | (TypeNumbering::Typed, 2) => orc_type::CALL,
            (TypeNumbering::EndBit, 1) | (TypeNumbering::Typed, 3) => orc_type::REGS,
            (TypeNumbering::EndBit, 2) | (TypeNumbering::Typed, 4) => orc_type::REGS_PARTIAL,
            (TypeNumbering::Typed, 0) => orc_type::UNDEFINED,
            (TypeNumbering::Typed, 1) => orc_type::END_OF_STACK,
            (_, other) => orc_type::UNKNOWN_BASE | other,
        };
        // Up to 6.2 the unwinder takes every regs frame as a signal frame
        // and no call frame; from 6.3 the entry says so itself.
        let signal = match self.signal {
            Some(f) => f.get(bits) != 0,
            None => matches!(kind, orc_type::REGS | orc_type::REGS_PARTIAL),
        };
        OrcEntry {
            sp_offset: self.sp_offset.get(bits) as u16 as i16,
            bp_offset: self.bp_offset.get(bits) as u16 as i16,
            sp_reg: self.sp_reg.get(bits) as u8,
            bp_reg: self.bp_reg.get(bits) as u8,
            kind,
            end,
            signal,
        }
    }

    /// The guest's bytes for `e` (tables built by hand; code the host
    /// places in the guest). `None` when this format cannot say it (an end
    /// bit in the typed format, a type it has no number for).
    pub fn encode(&self, e: &OrcEntry) -> Option<[u8; ORC_ENTRY_BYTES]> {
        let raw: u8 = match (self.numbering, e.kind) {
            (TypeNumbering::EndBit, orc_type::CALL) => 0,
            (TypeNumbering::EndBit, orc_type::REGS) => 1,
            (TypeNumbering::EndBit, orc_type::REGS_PARTIAL) => 2,
            (TypeNumbering::Typed, orc_type::UNDEFINED) => 0,
            (TypeNumbering::Typed, orc_type::END_OF_STACK) => 1,
            (TypeNumbering::Typed, orc_type::CALL) => 2,
            (TypeNumbering::Typed, orc_type::REGS) => 3,
            (TypeNumbering::Typed, orc_type::REGS_PARTIAL) => 4,
            _ => return None,
        };
        let mut bits = 0u64;
        self.sp_offset.put(&mut bits, u64::from(e.sp_offset as u16));
        self.bp_offset.put(&mut bits, u64::from(e.bp_offset as u16));
        self.sp_reg.put(&mut bits, u64::from(e.sp_reg));
        self.bp_reg.put(&mut bits, u64::from(e.bp_reg));
        self.kind.put(&mut bits, u64::from(raw));
        match self.end {
            Some(f) => f.put(&mut bits, u64::from(e.end)),
            None if e.end => return None,
            None => {}
        }
        if let Some(f) = self.signal {
            f.put(&mut bits, u64::from(e.signal));
        }
        let b = bits.to_le_bytes();
        Some([b[0], b[1], b[2], b[3], b[4], b[5]])
    }

    /// An end-of-stack entry in this format's terms (`UNWIND_HINT_EMPTY` /
    /// `UNWIND_HINT_END_OF_STACK`).
    pub fn end_of_stack(&self) -> OrcEntry {
        let base = OrcEntry { sp_offset: 0, bp_offset: 0, sp_reg: crate::orc::orc_reg::UNDEFINED, bp_reg: 0, kind: orc_type::CALL, end: false, signal: false };
        match self.numbering {
            TypeNumbering::EndBit => OrcEntry { end: true, ..base },
            TypeNumbering::Typed => OrcEntry { kind: orc_type::END_OF_STACK, ..base },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::orc::orc_reg;

    #[test]
    fn six_one_entry_round_trips() {
        let f = OrcFormat::LINUX_6_1;
        let e = f.decode([0x10, 0x00, 0xf0, 0xff, 0x15, 0x05]);
        assert_eq!(e, OrcEntry { sp_offset: 16, bp_offset: -16, sp_reg: 5, bp_reg: 1, kind: orc_type::REGS, end: true, signal: true });
        assert_eq!(f.encode(&e), Some([0x10, 0x00, 0xf0, 0xff, 0x15, 0x05]));
    }

    #[test]
    fn typed_numbering_decodes_to_the_same_kinds() {
        let f = OrcFormat::LINUX_6_4;
        // call, SP+8, signal clear
        let call = f.decode([8, 0, 0, 0, orc_reg::SP, 2]);
        assert_eq!((call.kind, call.sp_offset, call.signal, call.end), (orc_type::CALL, 8, false, false));
        // regs with signal set: type 3 | signal (bit 3 of byte 5)
        let regs = f.decode([0, 0, 0, 0, orc_reg::SP, 3 | 8]);
        assert_eq!((regs.kind, regs.signal), (orc_type::REGS, true));
        assert_eq!(f.decode([0; 6]).kind, orc_type::UNDEFINED);
        assert_eq!(f.decode([0, 0, 0, 0, 0, 1]).kind, orc_type::END_OF_STACK);
        assert_eq!(f.decode([0, 0, 0, 0, 0, 6]).kind, orc_type::UNKNOWN_BASE | 6);
        for e in [call, regs, f.end_of_stack()] {
            assert_eq!(f.decode(f.encode(&e).unwrap()), e);
        }
        // The 6.1 format has no number for "end of stack" as a type.
        assert_eq!(OrcFormat::LINUX_6_1.encode(&f.end_of_stack()), None);
    }
}
