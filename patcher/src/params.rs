//! Module parameters, given as insmod takes them (`name=value`), parsed
//! through the module's own `kernel_param` table (`__param`) and set in its
//! data before its init runs, with the rules of the kernel's
//! `param_set_*()`: an unknown name or a value of the wrong type is
//! refused as the kernel refuses it.

use introspect::btf::Btf;

use crate::error::{PatchError, Result};
use crate::module::{PatchModule, Target};

/// Longest `charp` value the kernel takes (`param_set_charp`).
const MAX_CHARP: usize = 1024;

/// A parameter's type, from the `kernel_param_ops` it uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ParamKind {
    Byte,
    Short,
    Ushort,
    Int,
    Uint,
    Hexint,
    Long,
    Ulong,
    Ullong,
    Bool,
    InvBool,
    Charp,
    /// `module_param_string`: a buffer of `maxlen` bytes.
    String { maxlen: u32 },
    /// Ops hyperpatch does not parse (custom `set`, arrays): refused when given.
    Other,
}

/// One entry of the module's `__param` table.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ParamSpec {
    pub name: String,
    pub kind: ParamKind,
    /// Where the value lives in the module (`kernel_param.arg`, or the
    /// buffer of a `kparam_string`).
    pub target: Option<(usize, u64)>,
    /// The `kernel_param_ops` symbol.
    pub ops: String,
}

/// What setting a parameter writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParamWrite {
    /// These bytes at `section`+`offset`.
    Bytes { section: usize, offset: u64, bytes: Vec<u8> },
    /// A pointer at `section`+`offset` to a NUL-terminated copy of `value`
    /// placed by the loader (`charp`).
    Pointer { section: usize, offset: u64, value: String },
}

impl ParamSpec {
    /// Reads every `struct kernel_param` of the module's `__param` section.
    pub fn read_all(m: &PatchModule, btf: &Btf) -> Result<Vec<ParamSpec>> {
        let Some(sec) = m.sections.iter().position(|s| s.name == "__param") else { return Ok(Vec::new()) };
        let size = btf.struct_size("kernel_param")?;
        let name_off = btf.member_offset("kernel_param", "name")?;
        let ops_off = btf.member_offset("kernel_param", "ops")?;
        let arg_off = btf.member_offset("kernel_param", "arg")?;
        let str_maxlen = btf.member_offset("kparam_string", "maxlen")?;
        let str_string = btf.member_offset("kparam_string", "string")?;
        let total = m.sections.get(sec).map(|s| s.size).unwrap_or(0);
        if size == 0 || total % size != 0 {
            return Err(PatchError::Malformed { path: m.path.clone(), detail: format!("__param is {total} bytes, not a multiple of kernel_param ({size})") });
        }
        let bad = |d: String| PatchError::Malformed { path: m.path.clone(), detail: d };
        let mut out = Vec::new();
        for i in 0..total / size {
            let base = i * size;
            let name = match m.pointer_at(sec, base + name_off) {
                Some(t @ Target::Local { .. }) => m.string(&t)?,
                other => return Err(bad(format!("kernel_param {i} has no name ({other:?})"))),
            };
            let ops = match m.pointer_at(sec, base + ops_off) {
                Some(Target::External { name, .. }) => name,
                Some(Target::Local { .. }) => "(the module's own ops)".to_string(),
                None => return Err(bad(format!("parameter {name} has no ops"))),
            };
            let arg = m.pointer_at(sec, base + arg_off);
            let local = |t: Option<Target>| match t {
                Some(Target::Local { section, offset }) => Some((section, offset)),
                _ => None,
            };
            let mut kind = match ops.as_str() {
                "param_ops_byte" => ParamKind::Byte,
                "param_ops_short" => ParamKind::Short,
                "param_ops_ushort" => ParamKind::Ushort,
                "param_ops_int" => ParamKind::Int,
                "param_ops_uint" => ParamKind::Uint,
                "param_ops_hexint" => ParamKind::Hexint,
                "param_ops_long" => ParamKind::Long,
                "param_ops_ulong" => ParamKind::Ulong,
                "param_ops_ullong" => ParamKind::Ullong,
                "param_ops_bool" => ParamKind::Bool,
                "param_ops_invbool" => ParamKind::InvBool,
                "param_ops_charp" => ParamKind::Charp,
                "param_ops_string" => ParamKind::String { maxlen: 0 },
                _ => ParamKind::Other,
            };
            let mut target = local(arg.clone());
            if let ParamKind::String { .. } = kind {
                // arg is a struct kparam_string { maxlen; string }.
                let (ks, ko) = target.ok_or_else(|| bad(format!("string parameter {name} has no kparam_string")))?;
                let maxlen = m.read_u32(ks, ko + str_maxlen)?;
                target = local(m.pointer_at(ks, ko + str_string));
                kind = ParamKind::String { maxlen };
            }
            if target.is_none() && kind != ParamKind::Other {
                return Err(bad(format!("parameter {name} does not point into the module")));
            }
            out.push(ParamSpec { name, kind, target, ops });
        }
        Ok(out)
    }
}

/// `kstrtoull(s, 0)`: 0x for hex, a leading 0 for octal, else decimal;
/// one trailing newline allowed.
fn parse_unsigned(s: &str) -> Option<u64> {
    let s = s.strip_suffix('\n').unwrap_or(s);
    let s = s.strip_prefix('+').unwrap_or(s);
    let (digits, radix) = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        (h, 16)
    } else if s.len() > 1 && s.starts_with('0') {
        (&s[1..], 8)
    } else {
        (s, 10)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

/// `kstrtoll(s, 0)`.
fn parse_signed(s: &str) -> Option<i64> {
    match s.strip_prefix('-') {
        Some(rest) => {
            let v = parse_unsigned(rest)?;
            if v == 1u64 << 63 {
                Some(i64::MIN)
            } else {
                i64::try_from(v).ok().map(|x| -x)
            }
        }
        None => i64::try_from(parse_unsigned(s)?).ok(),
    }
}

/// `kstrtobool`.
fn parse_bool(s: &str) -> Option<bool> {
    let b = s.as_bytes();
    match b.first()? {
        b'e' | b'E' | b'y' | b'Y' | b't' | b'T' | b'1' => Some(true),
        b'd' | b'D' | b'n' | b'N' | b'f' | b'F' | b'0' => Some(false),
        b'o' | b'O' => match b.get(1)? {
            b'n' | b'N' => Some(true),
            b'f' | b'F' => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// The writes that set the module's parameters to `args` (`name=value` or
/// `name` for a bool), in order; refused as the kernel's `parse_args` and
/// `param_set_*` refuse.
pub fn plan(module: &str, params: &[ParamSpec], args: &[String]) -> Result<Vec<ParamWrite>> {
    let err = |detail: String| PatchError::Param { module: module.into(), detail };
    let mut out = Vec::new();
    for a in args {
        let (name, val) = match a.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (a.as_str(), None),
        };
        // The kernel treats '-' and '_' in parameter names alike.
        let norm = |s: &str| s.replace('-', "_");
        let p = params
            .iter()
            .find(|p| norm(&p.name) == norm(name))
            .ok_or_else(|| err(format!("unknown parameter `{name}'")))?;
        let invalid = || err(format!("`{}' invalid for parameter `{name}'", val.unwrap_or("")));
        let no_arg = matches!(p.kind, ParamKind::Bool | ParamKind::InvBool);
        let v = match val {
            Some(v) => v,
            None if no_arg => "1",
            None => return Err(err(format!("parameter `{name}' needs a value"))),
        };
        let (section, offset) = p.target.ok_or_else(|| err(format!("parameter `{name}' uses {}, which hyperpatch does not parse", p.ops)))?;
        let num = |bytes: Vec<u8>| ParamWrite::Bytes { section, offset, bytes };
        let w = match p.kind {
            ParamKind::Byte => num(vec![u8::try_from(parse_unsigned(v).ok_or_else(invalid)?).map_err(|_| invalid())?]),
            ParamKind::Short => num(i16::try_from(parse_signed(v).ok_or_else(invalid)?).map_err(|_| invalid())?.to_le_bytes().to_vec()),
            ParamKind::Ushort => num(u16::try_from(parse_unsigned(v).ok_or_else(invalid)?).map_err(|_| invalid())?.to_le_bytes().to_vec()),
            ParamKind::Int => num(i32::try_from(parse_signed(v).ok_or_else(invalid)?).map_err(|_| invalid())?.to_le_bytes().to_vec()),
            ParamKind::Uint | ParamKind::Hexint => {
                num(u32::try_from(parse_unsigned(v).ok_or_else(invalid)?).map_err(|_| invalid())?.to_le_bytes().to_vec())
            }
            ParamKind::Long => num(parse_signed(v).ok_or_else(invalid)?.to_le_bytes().to_vec()),
            ParamKind::Ulong | ParamKind::Ullong => num(parse_unsigned(v).ok_or_else(invalid)?.to_le_bytes().to_vec()),
            ParamKind::Bool => num(vec![u8::from(parse_bool(v).ok_or_else(invalid)?)]),
            ParamKind::InvBool => num(vec![u8::from(!parse_bool(v).ok_or_else(invalid)?)]),
            ParamKind::Charp => {
                if v.len() > MAX_CHARP {
                    return Err(err(format!("parameter `{name}' is {} bytes, longer than {MAX_CHARP}", v.len())));
                }
                ParamWrite::Pointer { section, offset, value: v.to_string() }
            }
            ParamKind::String { maxlen } => {
                if v.len() + 1 > maxlen as usize {
                    return Err(err(format!("string parameter `{name}' too long: {} bytes, room for {}", v.len(), maxlen.saturating_sub(1))));
                }
                let mut b = v.as_bytes().to_vec();
                b.push(0);
                num(b)
            }
            ParamKind::Other => return Err(err(format!("parameter `{name}' uses {}, which hyperpatch does not parse", p.ops))),
        };
        out.push(w);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, kind: ParamKind) -> ParamSpec {
        ParamSpec { name: name.into(), kind, target: Some((3, 8)), ops: String::new() }
    }

    #[test]
    fn numbers_as_kstrto_parses_them() {
        assert_eq!(parse_unsigned("0x1f"), Some(31));
        assert_eq!(parse_unsigned("017"), Some(15));
        assert_eq!(parse_unsigned("0"), Some(0));
        assert_eq!(parse_unsigned("12\n"), Some(12));
        assert_eq!(parse_unsigned("09"), None);
        assert_eq!(parse_unsigned(""), None);
        assert_eq!(parse_unsigned("1 "), None);
        assert_eq!(parse_signed("-19"), Some(-19));
        assert_eq!(parse_signed("-0x10"), Some(-16));
        assert_eq!(parse_signed("-9223372036854775808"), Some(i64::MIN));
        assert_eq!(parse_bool("on"), Some(true));
        assert_eq!(parse_bool("off"), Some(false));
        assert_eq!(parse_bool("Y"), Some(true));
        assert_eq!(parse_bool("x"), None);
    }

    #[test]
    fn plans_writes_and_refuses_like_the_kernel() {
        let p = [
            spec("replace", ParamKind::Int),
            spec("flag", ParamKind::Bool),
            spec("name", ParamKind::Charp),
            spec("buf", ParamKind::String { maxlen: 4 }),
            spec("pre_patch_ret", ParamKind::Int),
        ];
        let w = plan("m", &p, &["replace=1".into(), "flag".into(), "name=abc".into(), "buf=xyz".into(), "pre-patch-ret=-19".into()]).unwrap();
        assert_eq!(w[0], ParamWrite::Bytes { section: 3, offset: 8, bytes: 1i32.to_le_bytes().to_vec() });
        assert_eq!(w[1], ParamWrite::Bytes { section: 3, offset: 8, bytes: vec![1] });
        assert_eq!(w[2], ParamWrite::Pointer { section: 3, offset: 8, value: "abc".into() });
        assert_eq!(w[3], ParamWrite::Bytes { section: 3, offset: 8, bytes: b"xyz\0".to_vec() });
        assert_eq!(w[4], ParamWrite::Bytes { section: 3, offset: 8, bytes: (-19i32).to_le_bytes().to_vec() });
        let e = plan("m", &p, &["nosuch=1".into()]).unwrap_err().to_string();
        assert!(e.contains("unknown parameter `nosuch'"), "{e}");
        let e = plan("m", &p, &["replace=abc".into()]).unwrap_err().to_string();
        assert!(e.contains("`abc' invalid for parameter `replace'"), "{e}");
        let e = plan("m", &p, &["replace=4294967296".into()]).unwrap_err().to_string();
        assert!(e.contains("invalid"), "{e}");
        let e = plan("m", &p, &["replace".into()]).unwrap_err().to_string();
        assert!(e.contains("needs a value"), "{e}");
        let e = plan("m", &p, &["buf=toolong".into()]).unwrap_err().to_string();
        assert!(e.contains("too long"), "{e}");
        let e = plan("m", &p, &["flag=maybe".into()]).unwrap_err().to_string();
        assert!(e.contains("invalid"), "{e}");
    }
}
