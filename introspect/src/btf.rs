//! The guest kernel's own BTF, read from its memory (`__start_BTF` ..
//! `__stop_BTF`). Every struct layout hyperpatch relies on comes from here,
//! so no offset is hard-coded and any build of the guest kernel works.
//!
//! The blob is untrusted guest data: parsing checks every length, offset,
//! string and type id up front, rejects reference cycles, and every later
//! walk (typedef chains, anonymous members, declarators) is bounded, so a
//! corrupted blob gives an error value, never a panic or a hang.
//!
//! Like drgn, a kernel object is described by names: a struct name plus a
//! member path (`"thread.sp"`, `"se.on_rq"`), where members of anonymous
//! structs and unions are reachable as if they were members of the parent.

use crate::name_index::NameIndex;

use crate::error::{IntrospectError, Result};
use crate::translate::KernelMemory;

/// Largest BTF blob accepted from guest memory (the 6.1 vmlinux BTF of a
/// full distribution config is about 5 MiB).
pub const MAX_BTF_SIZE: u64 = 64 << 20;

const MAGIC: u16 = 0xeb9f;
const MAGIC_SWAPPED: u16 = 0x9feb;
const VERSION: u8 = 1;
const HEADER_LEN: usize = 24;
/// The kernel's `BTF_MAX_TYPE`.
const MAX_TYPES: usize = 0x000f_ffff;
/// The kernel's `BTF_MAX_NAME_OFFSET`.
const MAX_STRINGS_LEN: usize = 0x00ff_ffff;
/// Bits of `btf_type.info` that carry meaning (vlen, kind, kind_flag).
const INFO_MASK: u32 = 0x9f00_ffff;
/// Longest chain of pointer/array/typedef/qualifier links between two
/// "real" types; real kernels need fewer than ten.
const MAX_CHAIN: usize = 64;
/// Deepest nesting of anonymous members, member paths and declarators.
const MAX_DEPTH: usize = 64;
/// Most struct/union levels one member lookup may visit, and most type
/// nodes one printed type name may expand: anonymous members and function
/// prototypes can share subtrees, so depth alone does not bound the work.
const MAX_VISITS: usize = 1 << 16;
/// Most lines one struct description may have.
const MAX_DESCRIBED: usize = 1 << 16;
/// Most members one member lookup may examine, all struct/union levels
/// together (a lookup in `task_struct` examines a few hundred).
const MAX_MEMBER_STEPS: usize = 1 << 20;
/// Most type nodes one whole struct description may expand, all members'
/// declarations together.
const MAX_DESCRIBE_VISITS: usize = 1 << 18;
/// Longest name accepted in the string section (the kernel's own BTF check
/// stops identifiers at KSYM_NAME_LEN, 512).
const MAX_NAME_LEN: usize = 1024;
/// Longest C declaration printed for one type.
const MAX_DECL_LEN: usize = 4096;
/// x86-64: BTF does not record the size of a pointer.
const POINTER_SIZE: u64 = 8;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// `BTF_INT_SIGNED`, `BTF_INT_CHAR`, `BTF_INT_BOOL`.
const INT_ENCODINGS: u8 = 0x1 | 0x2 | 0x4;
const INT_SIGNED: u8 = 0x1;

fn corrupt(msg: impl Into<String>) -> IntrospectError {
    IntrospectError::Btf(msg.into())
}

/// A member as the guest's BTF lays it out.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct RawMember {
    name_off: u32,
    type_id: u32,
    offset_bits: u32,
    bitfield_size: u8,
}

#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct Enumerator {
    name_off: u32,
    value: i64,
}

#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct Param {
    name_off: u32,
    type_id: u32,
}

#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct SecVar {
    type_id: u32,
    offset: u32,
    size: u32,
}

/// Kinds that only refer to another type and add a name or qualifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Link {
    Typedef,
    Volatile,
    Const,
    Restrict,
    TypeTag,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
enum Kind {
    Void,
    Int { size: u32, encoding: u8 },
    Ptr(u32),
    Array { elem: u32, index: u32, len: u32 },
    Composite { union: bool, size: u32, members: Vec<RawMember> },
    Enum { size: u32, signed: bool, values: Vec<Enumerator> },
    Fwd { union: bool },
    Link(Link, u32),
    Func { proto: u32 },
    FuncProto { ret: u32, params: Vec<Param> },
    Var { type_id: u32 },
    Datasec { size: u32, vars: Vec<SecVar> },
    Float { size: u32 },
    DeclTag { target: u32, component: i32 },
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Type {
    name_off: u32,
    kind: Kind,
}

/// What kind of type an id names, without its details: lets callers (and
/// the `types` CLI verb) decide how to read or print a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypeKind {
    Void,
    Int,
    Pointer,
    Array,
    Struct,
    Union,
    Enum,
    Fwd,
    Typedef,
    Volatile,
    Const,
    Restrict,
    TypeTag,
    Func,
    FuncProto,
    Var,
    Datasec,
    Float,
    DeclTag,
}

/// Where one (possibly nested) member lives inside its outermost struct.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    /// Bit offset from the start of the outermost struct.
    pub offset_bits: u64,
    /// Width in bits when the member is a bitfield, else 0.
    pub bitfield_size: u32,
    /// The member's declared type (typedefs and qualifiers not skipped).
    pub type_id: u32,
    /// Byte size of the member's type (of the underlying integer for a
    /// bitfield).
    pub size: u64,
}

impl Member {
    /// Whether the member is a bitfield (read it through `offset_bits`).
    pub fn is_bitfield(&self) -> bool {
        self.bitfield_size != 0
    }
}

/// One line of a pahole-like listing of a struct (see
/// [`Btf::describe_struct`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MemberDesc {
    /// Member name; empty for an anonymous struct/union member.
    pub name: String,
    /// C name of the member's type (`"struct list_head"`, `"char [16]"`,
    /// `"struct <anonymous>"`).
    pub type_name: String,
    /// C declaration of the member without the bitfield width
    /// (`"char comm[16]"`, `"int (*init)(void)"`).
    pub decl: String,
    /// Byte offset from the start of the described struct; for a bitfield,
    /// the start of its storage unit (as pahole prints it).
    pub offset: u64,
    /// For a bitfield: bit offset inside the storage unit at `offset`.
    pub bit_offset: u32,
    /// Exact bit offset from the start of the described struct.
    pub offset_bits: u64,
    /// Byte size of the member's type.
    pub size: u64,
    /// Width in bits when the member is a bitfield, else 0.
    pub bitfield_size: u32,
    /// Nesting level: 0 for direct members, +1 inside each expanded
    /// anonymous struct/union.
    pub depth: u32,
    /// The member's type is an anonymous struct/union whose members follow
    /// at `depth + 1`.
    pub expanded: bool,
    /// The member's declared type.
    pub type_id: u32,
}

/// A parsed, validated BTF blob with a name index. Serializable with its
/// indexes, for a host-side cache keyed by the blob's bytes.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Btf {
    /// Indexed by type id; id 0 is `void`.
    types: Vec<Type>,
    #[serde(with = "serde_bytes")]
    strings: Vec<u8>,
    by_name: NameIndex<u32>,
    /// Every enumerator's values by name (for lookups without the enum's name).
    enumerators: NameIndex<(u32, i64)>,
}

impl std::fmt::Debug for Btf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Btf").field("types", &self.types.len()).field("strings_len", &self.strings.len()).finish()
    }
}

/// Bounds-checked little-endian reads over the type section.
struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn u32(&mut self) -> Result<u32> {
        let end = self.pos.checked_add(4).ok_or_else(|| corrupt("type section offset overflow"))?;
        let b = self
            .data
            .get(self.pos..end)
            .ok_or_else(|| corrupt(format!("type section truncated at byte {}", self.pos)))?;
        self.pos = end;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn done(&self) -> bool {
        self.pos >= self.data.len()
    }
}

fn header_u32(bytes: &[u8], at: usize) -> Result<u32> {
    let b = bytes.get(at..at + 4).ok_or_else(|| corrupt("header truncated"))?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// A section of the blob after the header, checked against the blob.
fn section(data: &[u8], off: u32, len: u32, what: &str) -> Result<std::ops::Range<usize>> {
    let start = off as usize;
    let end = start.checked_add(len as usize).ok_or_else(|| corrupt(format!("{what} section overflows")))?;
    if end > data.len() {
        return Err(corrupt(format!(
            "{what} section {start}+{len} is past the end of the blob ({} bytes after the header)",
            data.len()
        )));
    }
    Ok(start..end)
}

impl Btf {
    /// Parses and validates a raw `.BTF` blob (the bytes between
    /// `__start_BTF` and `__stop_BTF`).
    pub fn parse(bytes: Vec<u8>) -> Result<Btf> {
        if bytes.len() < HEADER_LEN {
            return Err(corrupt(format!("blob of {} bytes is shorter than the header", bytes.len())));
        }
        let magic = u16::from_le_bytes([bytes[0], bytes[1]]);
        if magic == MAGIC_SWAPPED {
            return Err(corrupt("big-endian BTF is not supported"));
        }
        if magic != MAGIC {
            return Err(corrupt(format!("bad magic {magic:#06x}")));
        }
        if bytes[2] != VERSION {
            return Err(corrupt(format!("unsupported version {}", bytes[2])));
        }
        if bytes[3] != 0 {
            return Err(corrupt(format!("unsupported flags {:#x}", bytes[3])));
        }
        let hdr_len = header_u32(&bytes, 4)? as usize;
        if hdr_len < HEADER_LEN || hdr_len > bytes.len() {
            return Err(corrupt(format!("header length {hdr_len} out of range")));
        }
        // A longer header is a newer format: only accept it if the unknown
        // part is zero (what the kernel does).
        if bytes.get(HEADER_LEN..hdr_len).is_some_and(|rest| rest.iter().any(|b| *b != 0)) {
            return Err(corrupt("unknown non-zero header fields"));
        }
        let type_off = header_u32(&bytes, 8)?;
        let type_len = header_u32(&bytes, 12)?;
        let str_off = header_u32(&bytes, 16)?;
        let str_len = header_u32(&bytes, 20)?;
        let data = bytes.get(hdr_len..).ok_or_else(|| corrupt("header past the end"))?;
        if type_off % 4 != 0 || type_len % 4 != 0 {
            return Err(corrupt("type section is not 4-byte aligned"));
        }
        let type_range = section(data, type_off, type_len, "type")?;
        let str_range = section(data, str_off, str_len, "string")?;
        if !type_range.is_empty() && type_range.start < str_range.end && str_range.start < type_range.end {
            return Err(corrupt("type and string sections overlap"));
        }
        let strings = data.get(str_range).ok_or_else(|| corrupt("string section"))?;
        if strings.is_empty() || strings.len() > MAX_STRINGS_LEN {
            return Err(corrupt(format!("string section length {} out of range", strings.len())));
        }
        if strings.first() != Some(&0) || strings.last() != Some(&0) {
            return Err(corrupt("string section must start and end with NUL"));
        }
        let type_data = data.get(type_range).ok_or_else(|| corrupt("type section"))?;
        let mut types = vec![Type { name_off: 0, kind: Kind::Void }];
        let mut cur = Cursor { data: type_data, pos: 0 };
        while !cur.done() {
            if types.len() > MAX_TYPES {
                return Err(corrupt(format!("more than {MAX_TYPES} types")));
            }
            let id = types.len();
            types.push(parse_type(&mut cur, id)?);
        }
        let mut btf = Btf { types, strings: strings.to_vec(), by_name: NameIndex::default(), enumerators: NameIndex::default() };
        btf.validate()?;
        btf.index_names();
        Ok(btf)
    }

    /// Reads and parses the guest's BTF between `start` (`__start_BTF`) and
    /// `end` (`__stop_BTF`).
    pub fn from_memory(mem: &dyn KernelMemory, start: u64, end: u64) -> Result<Btf> {
        Btf::parse(Btf::read_blob(mem, start, end)?)
    }

    /// The raw blob between `start` and `end`, bounded, not parsed (a cache
    /// keyed by these bytes decides whether to parse them).
    pub fn read_blob(mem: &dyn KernelMemory, start: u64, end: u64) -> Result<Vec<u8>> {
        let len =
            end.checked_sub(start).ok_or_else(|| corrupt(format!("BTF end {end:#x} is below its start {start:#x}")))?;
        if len > MAX_BTF_SIZE {
            return Err(corrupt(format!("BTF of {len} bytes exceeds the {MAX_BTF_SIZE}-byte limit")));
        }
        let len = usize::try_from(len).map_err(|_| IntrospectError::Overflow(end))?;
        mem.read_bytes(start, len)
    }

    /// Number of type ids, `void` (id 0) included.
    pub fn type_count(&self) -> usize {
        self.types.len()
    }

    /// Ids of all named types (structs, unions, enums, typedefs, ints,
    /// floats, forward declarations, functions, variables, data sections)
    /// called `name`.
    pub fn ids_by_name(&self, name: &str) -> Vec<u32> {
        self.by_name.get(name.as_bytes(), |&id| self.name_bytes(self.types.get(id as usize).map_or(0, |t| t.name_off))).copied().collect()
    }

    /// The name of type `id` as BTF records it (empty when anonymous).
    pub fn raw_name(&self, id: u32) -> Result<&str> {
        Ok(self.str_at(self.ty(id)?.name_off))
    }

    /// What kind of type `id` is.
    pub fn kind(&self, id: u32) -> Result<TypeKind> {
        Ok(match &self.ty(id)?.kind {
            Kind::Void => TypeKind::Void,
            Kind::Int { .. } => TypeKind::Int,
            Kind::Ptr(_) => TypeKind::Pointer,
            Kind::Array { .. } => TypeKind::Array,
            Kind::Composite { union: false, .. } => TypeKind::Struct,
            Kind::Composite { union: true, .. } => TypeKind::Union,
            Kind::Enum { .. } => TypeKind::Enum,
            Kind::Fwd { .. } => TypeKind::Fwd,
            Kind::Link(Link::Typedef, _) => TypeKind::Typedef,
            Kind::Link(Link::Volatile, _) => TypeKind::Volatile,
            Kind::Link(Link::Const, _) => TypeKind::Const,
            Kind::Link(Link::Restrict, _) => TypeKind::Restrict,
            Kind::Link(Link::TypeTag, _) => TypeKind::TypeTag,
            Kind::Func { .. } => TypeKind::Func,
            Kind::FuncProto { .. } => TypeKind::FuncProto,
            Kind::Var { .. } => TypeKind::Var,
            Kind::Datasec { .. } => TypeKind::Datasec,
            Kind::Float { .. } => TypeKind::Float,
            Kind::DeclTag { .. } => TypeKind::DeclTag,
        })
    }

    /// Skips typedefs, qualifiers and type tags: the id of the type that
    /// says how a value is laid out.
    pub fn resolve_type(&self, id: u32) -> Result<u32> {
        let mut cur = id;
        for _ in 0..MAX_CHAIN {
            match self.ty(cur)?.kind {
                Kind::Link(_, target) => cur = target,
                _ => return Ok(cur),
            }
        }
        Err(corrupt(format!("typedef/qualifier chain from type {id} is too long")))
    }

    /// Byte size of a value of type `id`.
    pub fn type_size(&self, id: u32) -> Result<u64> {
        self.size_of(id, 0)
    }

    /// The C name of type `id`, as a cast would spell it: `"unsigned int"`,
    /// `"struct task_struct *"`, `"char [16]"`, `"void (*)(void)"`.
    pub fn type_name(&self, id: u32) -> Result<String> {
        self.declaration(id, "")
    }

    /// The C declaration of `name` with type `id` (`"char comm[16]"`,
    /// `"int (*init)(void)"`).
    pub fn declaration(&self, id: u32, name: &str) -> Result<String> {
        let mut budget = MAX_VISITS;
        self.decl(id, name.to_string(), 0, &mut budget)
    }

    /// [`Btf::declaration`] charging a caller's budget of type nodes.
    fn declaration_in(&self, id: u32, name: &str, budget: &mut usize) -> Result<String> {
        self.decl(id, name.to_string(), 0, budget)
    }

    /// The id of struct or union `name` (a `struct `/`union ` prefix is
    /// accepted). A complete definition wins over a typedef of one, which
    /// wins over a forward declaration (returned only when nothing else
    /// exists; layout queries on it fail).
    pub fn find_struct(&self, name: &str) -> Result<u32> {
        let (want_union, bare) = if let Some(rest) = name.strip_prefix("struct ") {
            (Some(false), rest.trim())
        } else if let Some(rest) = name.strip_prefix("union ") {
            (Some(true), rest.trim())
        } else {
            (None, name.trim())
        };
        let ids = self.ids_by_name(bare);
        let kind_ok = |union: bool| want_union.is_none_or(|w| w == union);
        let mut fwd = None;
        let mut via_typedef = None;
        for id in ids {
            match &self.ty(id)?.kind {
                Kind::Composite { union, .. } if kind_ok(*union) => return Ok(id),
                Kind::Fwd { union } if kind_ok(*union) => {
                    fwd.get_or_insert(id);
                }
                Kind::Link(Link::Typedef, _) if want_union.is_none() => {
                    // A broken typedef must not hide a good definition.
                    let target = self.resolve_type(id).ok().and_then(|t| Some((t, self.ty(t).ok()?)));
                    if let Some((target, Type { kind: Kind::Composite { .. }, .. })) = target {
                        via_typedef.get_or_insert(target);
                    }
                }
                _ => {}
            }
        }
        via_typedef.or(fwd).ok_or_else(|| IntrospectError::NoType(name.to_string()))
    }

    /// Byte size of struct or union `name`.
    pub fn struct_size(&self, name: &str) -> Result<u64> {
        let id = self.find_struct(name)?;
        match self.ty(id)?.kind {
            Kind::Composite { size, .. } => Ok(u64::from(size)),
            _ => Err(self.incomplete(name)),
        }
    }

    /// Where member `path` of struct `struct_name` lives. `path` is a
    /// dotted member path (`"thread.sp"`, `"se.on_rq"`) whose steps may
    /// index arrays (`"pids[1].node"`); members of anonymous structs and
    /// unions are found as if they were members of their parent.
    pub fn member(&self, struct_name: &str, path: &str) -> Result<Member> {
        let id = self.find_struct(struct_name)?;
        self.member_in(id, path)
    }

    /// [`Btf::member`] on type `id` (e.g. the target of a member pointer,
    /// which may be anonymous).
    pub fn member_in(&self, id: u32, path: &str) -> Result<Member> {
        let mut offset_bits: u64 = 0;
        let mut cur = id;
        let mut bitfield_size = 0u32;
        let mut steps = 0usize;
        for component in path.split('.') {
            let (name, indices) = split_indices(component).ok_or_else(|| self.no_member(id, path))?;
            if bitfield_size != 0 {
                return Err(self.no_member(id, path));
            }
            let mut budget = MAX_MEMBER_STEPS;
            let (rel, m) = self.find_member(cur, name, 0, &mut budget)?.ok_or_else(|| self.no_member(id, path))?;
            offset_bits = offset_bits.checked_add(rel).ok_or(IntrospectError::Overflow(offset_bits))?;
            bitfield_size = u32::from(m.bitfield_size);
            cur = m.type_id;
            for index in indices {
                steps += 1;
                if steps > MAX_DEPTH || bitfield_size != 0 {
                    return Err(self.no_member(id, path));
                }
                let index = index.ok_or_else(|| self.no_member(id, path))?;
                let Kind::Array { elem, .. } = self.ty(self.resolve_type(cur)?)?.kind else {
                    return Err(corrupt(format!("{path}: indexing a non-array in {}", self.type_label(id))));
                };
                // Past-the-end indices are allowed: flexible array members.
                let step = self
                    .type_size(elem)?
                    .checked_mul(8)
                    .and_then(|bits| bits.checked_mul(index))
                    .ok_or(IntrospectError::Overflow(offset_bits))?;
                offset_bits = offset_bits.checked_add(step).ok_or(IntrospectError::Overflow(offset_bits))?;
                cur = elem;
            }
            steps += 1;
            if steps > MAX_DEPTH {
                return Err(self.no_member(id, path));
            }
        }
        Ok(Member { offset_bits, bitfield_size, type_id: cur, size: self.type_size(cur)? })
    }

    /// Byte offset of member `path` of struct `struct_name` (see
    /// [`Btf::member`]). Bitfields have no byte offset: use `member`.
    pub fn member_offset(&self, struct_name: &str, path: &str) -> Result<u64> {
        let m = self.member(struct_name, path)?;
        if m.bitfield_size != 0 || m.offset_bits % 8 != 0 {
            return Err(corrupt(format!(
                "{struct_name}.{path} is a bitfield (bit {}, {} bits): read it with member()",
                m.offset_bits, m.bitfield_size
            )));
        }
        Ok(m.offset_bits / 8)
    }

    /// Every enumerator whose name starts with `prefix`, with its value,
    /// in name order (a kernel's flag sets, e.g. `FTRACE_FL_`).
    pub fn enumerators_with_prefix(&self, prefix: &str) -> Vec<(String, i64)> {
        self.enumerators
            .with_prefix(prefix.as_bytes(), |&(off, _)| self.name_bytes(off))
            .map(|&(off, v)| (self.str_at(off).to_string(), v))
            .collect()
    }

    /// The value of `enumerator`, from enum `enum_name` (an `enum ` prefix
    /// or a typedef name is accepted) or, when `None`, from whichever enum
    /// defines it (also when empty; an error if two enums disagree about
    /// its value).
    /// Unsigned 64-bit values above `i64::MAX` come back as their two's
    /// complement bit pattern.
    pub fn enum_value(&self, enum_name: Option<&str>, enumerator: &str) -> Result<i64> {
        let no_member = |ty: &str| IntrospectError::NoMember { ty: ty.to_string(), member: enumerator.to_string() };
        let Some(enum_name) = enum_name.filter(|n| !n.trim().is_empty()) else {
            let mut found: Option<i64> = None;
            for &(_, v) in self.enumerators.get(enumerator.as_bytes(), |&(off, _)| self.name_bytes(off)) {
                match found {
                    Some(prev) if prev != v => {
                        return Err(corrupt(format!("enumerator {enumerator} has two values ({prev}, {v})")))
                    }
                    _ => found = Some(v),
                }
            }
            return found.ok_or_else(|| no_member("any enum"));
        };
        let bare = enum_name.strip_prefix("enum ").unwrap_or(enum_name).trim();
        let mut any_enum = false;
        for id in self.ids_by_name(bare) {
            let target = match self.ty(id)?.kind {
                Kind::Enum { .. } => id,
                Kind::Link(Link::Typedef, _) => self.resolve_type(id)?,
                _ => continue,
            };
            if let Kind::Enum { values, .. } = &self.ty(target)?.kind {
                any_enum = true;
                if let Some(v) = values.iter().find(|v| self.name_is(v.name_off, enumerator)) {
                    return Ok(v.value);
                }
            }
        }
        if any_enum {
            Err(no_member(&format!("enum {bare}")))
        } else {
            Err(IntrospectError::NoType(enum_name.to_string()))
        }
    }

    /// Number of elements of array type `id` (typedefs skipped).
    pub fn array_len(&self, id: u32) -> Result<u32> {
        match self.ty(self.resolve_type(id)?)?.kind {
            Kind::Array { len, .. } => Ok(len),
            _ => Err(corrupt(format!("{} is not an array", self.type_label(id)))),
        }
    }

    /// Element type of array type `id` (typedefs skipped).
    pub fn array_elem(&self, id: u32) -> Result<u32> {
        match self.ty(self.resolve_type(id)?)?.kind {
            Kind::Array { elem, .. } => Ok(elem),
            _ => Err(corrupt(format!("{} is not an array", self.type_label(id)))),
        }
    }

    /// The type pointer type `id` points to (typedefs skipped; 0 = void).
    pub fn pointer_target(&self, id: u32) -> Result<u32> {
        match self.ty(self.resolve_type(id)?)?.kind {
            Kind::Ptr(target) => Ok(target),
            _ => Err(corrupt(format!("{} is not a pointer", self.type_label(id)))),
        }
    }

    /// Byte size and signedness of integer or enum type `id` (typedefs
    /// skipped), to read a member's value correctly.
    pub fn int_info(&self, id: u32) -> Result<(u64, bool)> {
        match self.ty(self.resolve_type(id)?)?.kind {
            Kind::Int { size, encoding, .. } => Ok((u64::from(size), encoding & INT_SIGNED != 0)),
            Kind::Enum { size, signed, .. } => Ok((u64::from(size), signed)),
            _ => Err(corrupt(format!("{} is not an integer", self.type_label(id)))),
        }
    }

    /// The members of struct or union `name`, in order, each with its
    /// offset, size, bitfield position and C type, members of anonymous
    /// structs/unions listed inline after them one level deeper: enough to
    /// print the layout the way pahole does.
    pub fn describe_struct(&self, name: &str) -> Result<Vec<MemberDesc>> {
        let id = self.find_struct(name)?;
        if !matches!(self.ty(id)?.kind, Kind::Composite { .. }) {
            return Err(self.incomplete(name));
        }
        let mut out = Vec::new();
        let mut budget = MAX_DESCRIBE_VISITS;
        self.describe_members(id, 0, 0, &mut out, &mut budget)?;
        Ok(out)
    }

    // ---- internals ----------------------------------------------------------

    fn ty(&self, id: u32) -> Result<&Type> {
        self.types.get(id as usize).ok_or_else(|| corrupt(format!("type id {id} out of range")))
    }

    /// A string by offset; [`Btf::validate`] checked every offset in use,
    /// so the empty fallback is never taken for them.
    /// Names are at most [`MAX_NAME_LEN`] bytes (checked by validation),
    /// so no lookup scans further than that for the NUL.
    /// The bytes of the name at `off` that `str_at` gives (empty where it
    /// gives ""), for the name indexes.
    fn name_bytes(&self, off: u32) -> &[u8] {
        self.str_at(off).as_bytes()
    }

    fn str_at(&self, off: u32) -> &str {
        self.strings
            .get(off as usize..)
            .map(|s| s.get(..=MAX_NAME_LEN).unwrap_or(s))
            .and_then(|s| s.split(|b| *b == 0).next())
            .and_then(|s| std::str::from_utf8(s).ok())
            .unwrap_or("")
    }

    /// Whether the name at `off` is `name`, in O(`name.len()`) whatever the
    /// string section holds.
    fn name_is(&self, off: u32, name: &str) -> bool {
        let start = off as usize;
        let Some(end) = start.checked_add(name.len()) else { return false };
        self.strings.get(start..end) == Some(name.as_bytes()) && self.strings.get(end) == Some(&0)
    }

    /// Whether the name at `off` is empty (anonymous).
    fn name_is_empty(&self, off: u32) -> bool {
        off == 0 || self.strings.get(off as usize) == Some(&0)
    }

    fn check_str(&self, off: u32, what: &str) -> Result<()> {
        let tail = self
            .strings
            .get(off as usize..)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| corrupt(format!("{what}: name offset {off} past the string section")))?;
        // Bounded scan: a section of one huge string must not cost its
        // length for every type that points into it.
        let window = tail.get(..=MAX_NAME_LEN).unwrap_or(tail);
        let len = window
            .iter()
            .position(|b| *b == 0)
            .ok_or_else(|| corrupt(format!("{what}: name at {off} is longer than {MAX_NAME_LEN} bytes")))?;
        let s = window.get(..len).unwrap_or(&[]);
        std::str::from_utf8(s).map_err(|_| corrupt(format!("{what}: name at {off} is not UTF-8")))?;
        Ok(())
    }

    fn check_id(&self, id: u32, what: &str) -> Result<()> {
        if (id as usize) < self.types.len() {
            Ok(())
        } else {
            Err(corrupt(format!("{what}: type id {id} out of range ({} types)", self.types.len())))
        }
    }

    /// Checks names, type ids, per-kind rules and reference cycles: after
    /// this, lookups only fail for reasons a query can explain.
    fn validate(&self) -> Result<()> {
        for (index, t) in self.types.iter().enumerate() {
            let what = format!("type {index}");
            let what = what.as_str();
            self.check_str(t.name_off, what)?;
            let named = !self.str_at(t.name_off).is_empty();
            match &t.kind {
                Kind::Void => {}
                Kind::Int { .. } | Kind::Float { .. } | Kind::Fwd { .. } if !named => {
                    return Err(corrupt(format!("{what}: needs a name")));
                }
                Kind::Int { .. } | Kind::Float { .. } | Kind::Fwd { .. } => {}
                Kind::Ptr(target) => self.check_id(*target, what)?,
                Kind::Array { elem, index, .. } => {
                    self.check_id(*elem, what)?;
                    self.check_id(*index, what)?;
                    if *elem == 0 {
                        return Err(corrupt(format!("{what}: array of void")));
                    }
                }
                Kind::Composite { members, .. } => {
                    for m in members {
                        self.check_str(m.name_off, what)?;
                        self.check_id(m.type_id, what)?;
                        if m.type_id == 0 {
                            return Err(corrupt(format!("{what}: member of type void")));
                        }
                    }
                }
                Kind::Enum { values, .. } => {
                    for v in values {
                        self.check_str(v.name_off, what)?;
                    }
                }
                Kind::Link(link, target) => {
                    self.check_id(*target, what)?;
                    if matches!(link, Link::Typedef | Link::TypeTag) && !named {
                        return Err(corrupt(format!("{what}: typedef/type tag needs a name")));
                    }
                }
                Kind::Func { proto, .. } => {
                    self.check_id(*proto, what)?;
                    if !named || !matches!(self.ty(*proto)?.kind, Kind::FuncProto { .. }) {
                        return Err(corrupt(format!("{what}: function needs a name and a prototype")));
                    }
                }
                Kind::FuncProto { ret, params } => {
                    self.check_id(*ret, what)?;
                    for (i, p) in params.iter().enumerate() {
                        self.check_str(p.name_off, what)?;
                        self.check_id(p.type_id, what)?;
                        // Type 0 is only allowed as the last one: `...`.
                        if p.type_id == 0 && i + 1 != params.len() {
                            return Err(corrupt(format!("{what}: void parameter")));
                        }
                    }
                }
                Kind::Var { type_id, .. } => {
                    self.check_id(*type_id, what)?;
                    if !named || *type_id == 0 {
                        return Err(corrupt(format!("{what}: variable needs a name and a type")));
                    }
                }
                Kind::Datasec { size, vars } => {
                    if !named {
                        return Err(corrupt(format!("{what}: data section needs a name")));
                    }
                    for v in vars {
                        self.check_id(v.type_id, what)?;
                        if !matches!(self.ty(v.type_id)?.kind, Kind::Var { .. }) {
                            return Err(corrupt(format!("{what}: data section entry is not a variable")));
                        }
                        let end = u64::from(v.offset) + u64::from(v.size);
                        if end > u64::from(*size) {
                            return Err(corrupt(format!("{what}: variable past the end of its section")));
                        }
                    }
                }
                Kind::DeclTag { target, component } => {
                    self.check_id(*target, what)?;
                    if !named {
                        return Err(corrupt(format!("{what}: decl tag needs a name")));
                    }
                    let components = match &self.ty(*target)?.kind {
                        Kind::Composite { members, .. } => Some(members.len()),
                        Kind::Func { proto, .. } => match &self.ty(*proto)?.kind {
                            Kind::FuncProto { params, .. } => Some(params.len()),
                            _ => None,
                        },
                        Kind::Var { .. } | Kind::Link(Link::Typedef, _) => Some(0),
                        _ => None,
                    };
                    let ok = match (components, *component) {
                        (None, _) => false,
                        (Some(_), -1) => true,
                        (Some(n), c) => c >= 0 && (c as usize) < n,
                    };
                    if !ok {
                        return Err(corrupt(format!("{what}: decl tag on a bad target/component")));
                    }
                }
            }
            self.check_chain(index as u32)?;
        }
        Ok(())
    }

    /// Follows pointer/array/typedef/qualifier links from `id`: they must
    /// end at a type that stands on its own within `MAX_CHAIN` steps (this
    /// rejects `typedef A B; typedef B A;` and pointers to themselves).
    fn check_chain(&self, id: u32) -> Result<()> {
        let mut cur = id;
        for _ in 0..MAX_CHAIN {
            cur = match self.ty(cur)?.kind {
                Kind::Ptr(t) | Kind::Link(_, t) => t,
                Kind::Array { elem, .. } => elem,
                _ => return Ok(()),
            };
        }
        Err(corrupt(format!("type {id}: reference chain loops or is longer than {MAX_CHAIN}")))
    }

    fn index_names(&mut self) {
        let mut named = Vec::new();
        let mut enumerators = Vec::new();
        for (id, t) in self.types.iter().enumerate() {
            let indexed = matches!(
                t.kind,
                Kind::Int { .. }
                    | Kind::Composite { .. }
                    | Kind::Enum { .. }
                    | Kind::Fwd { .. }
                    | Kind::Link(Link::Typedef, _)
                    | Kind::Func { .. }
                    | Kind::Var { .. }
                    | Kind::Datasec { .. }
                    | Kind::Float { .. }
            );
            // Type ids are bounded by MAX_TYPES.
            if indexed && !self.str_at(t.name_off).is_empty() {
                named.push(id as u32);
            }
            if let Kind::Enum { values, .. } = &t.kind {
                for v in values {
                    if !self.str_at(v.name_off).is_empty() {
                        enumerators.push((v.name_off, v.value));
                    }
                }
            }
        }
        // Built and searched with the same name function.
        let by_name = NameIndex::build(named, |&id| self.name_bytes(self.types.get(id as usize).map_or(0, |t| t.name_off)));
        let enumerators = NameIndex::build(enumerators, |&(off, _)| self.name_bytes(off));
        self.by_name = by_name;
        self.enumerators = enumerators;
    }

    fn size_of(&self, id: u32, depth: usize) -> Result<u64> {
        if depth > MAX_DEPTH {
            return Err(corrupt(format!("type {id} nests too deeply")));
        }
        let id = self.resolve_type(id)?;
        match &self.ty(id)?.kind {
            Kind::Int { size, .. }
            | Kind::Composite { size, .. }
            | Kind::Enum { size, .. }
            | Kind::Datasec { size, .. }
            | Kind::Float { size } => Ok(u64::from(*size)),
            Kind::Ptr(_) => Ok(POINTER_SIZE),
            Kind::Array { elem, len, .. } => self
                .size_of(*elem, depth + 1)?
                .checked_mul(u64::from(*len))
                .ok_or_else(|| corrupt(format!("array type {id} is too large"))),
            Kind::Var { type_id, .. } => self.size_of(*type_id, depth + 1),
            _ => Err(corrupt(format!("{} has no size", self.type_label(id)))),
        }
    }

    /// "struct foo" / "type 123" for error messages.
    fn type_label(&self, id: u32) -> String {
        match self.type_name(id) {
            Ok(name) if !name.is_empty() => name,
            _ => format!("type {id}"),
        }
    }

    fn no_member(&self, id: u32, path: &str) -> IntrospectError {
        IntrospectError::NoMember { ty: self.type_label(id), member: path.to_string() }
    }

    fn incomplete(&self, name: &str) -> IntrospectError {
        corrupt(format!("{name} is only declared (forward declaration), not defined"))
    }

    /// Finds member `name` of struct/union `id`, looking through anonymous
    /// members; returns its bit offset relative to `id` and the member.
    /// `budget` counts members examined (anonymous members can share
    /// subtrees, so the number of structs visited alone does not bound the
    /// work).
    fn find_member(&self, id: u32, name: &str, depth: usize, budget: &mut usize) -> Result<Option<(u64, RawMember)>> {
        if depth > MAX_DEPTH || *budget == 0 {
            return Err(corrupt(format!("anonymous members of type {id} nest too deeply")));
        }
        *budget -= 1;
        let resolved = self.resolve_type(id)?;
        let members = match &self.ty(resolved)?.kind {
            Kind::Composite { members, .. } => members,
            Kind::Fwd { .. } => return Err(self.incomplete(&self.type_label(resolved))),
            _ => {
                return Err(corrupt(format!(
                    "{} is not a struct or union (looking for member {name})",
                    self.type_label(id)
                )))
            }
        };
        *budget = budget
            .checked_sub(members.len())
            .ok_or_else(|| corrupt(format!("looking for member {name}: more than {MAX_MEMBER_STEPS} members examined")))?;
        if let Some(m) = members.iter().find(|m| self.name_is(m.name_off, name)) {
            return Ok(Some((u64::from(m.offset_bits), *m)));
        }
        for m in members.iter().filter(|m| self.name_is_empty(m.name_off)) {
            if !matches!(self.ty(self.resolve_type(m.type_id)?)?.kind, Kind::Composite { .. }) {
                continue;
            }
            if let Some((rel, found)) = self.find_member(m.type_id, name, depth + 1, budget)? {
                let off = rel.checked_add(u64::from(m.offset_bits)).ok_or(IntrospectError::Overflow(rel))?;
                return Ok(Some((off, found)));
            }
        }
        Ok(None)
    }

    fn describe_members(
        &self,
        id: u32,
        base_bits: u64,
        depth: u32,
        out: &mut Vec<MemberDesc>,
        budget: &mut usize,
    ) -> Result<()> {
        if depth as usize > MAX_DEPTH {
            return Err(corrupt(format!("anonymous members of type {id} nest too deeply")));
        }
        if out.len() >= MAX_DESCRIBED {
            return Err(corrupt(format!("type {id} has more than {MAX_DESCRIBED} members")));
        }
        let resolved = self.resolve_type(id)?;
        let Kind::Composite { members, .. } = &self.ty(resolved)?.kind else {
            return Err(corrupt(format!("{} is not a struct or union", self.type_label(id))));
        };
        for m in members {
            if out.len() >= MAX_DESCRIBED {
                return Err(corrupt(format!("type {id} has more than {MAX_DESCRIBED} members")));
            }
            let offset_bits =
                base_bits.checked_add(u64::from(m.offset_bits)).ok_or(IntrospectError::Overflow(base_bits))?;
            let size = self.type_size(m.type_id)?;
            let name = self.str_at(m.name_off);
            let bitfield_size = u32::from(m.bitfield_size);
            // pahole prints a bitfield at the start of its storage unit.
            let (offset, bit_offset) = if bitfield_size != 0 && size != 0 {
                let unit_bits = size.saturating_mul(8);
                let offset = offset_bits / unit_bits * size;
                (offset, (offset_bits - offset * 8) as u32)
            } else {
                (offset_bits / 8, (offset_bits % 8) as u32)
            };
            let anonymous = self.anonymous_composite(m.type_id)?;
            let (type_name, decl) = match anonymous {
                Some(union) => {
                    let tag = if union { "union <anonymous>" } else { "struct <anonymous>" };
                    let decl = if name.is_empty() { tag.to_string() } else { format!("{tag} {name}") };
                    (tag.to_string(), decl)
                }
                None => (self.declaration_in(m.type_id, "", budget)?, self.declaration_in(m.type_id, name, budget)?),
            };
            out.push(MemberDesc {
                name: name.to_string(),
                type_name,
                decl,
                offset,
                bit_offset,
                offset_bits,
                size,
                bitfield_size,
                depth,
                expanded: anonymous.is_some(),
                type_id: m.type_id,
            });
            if anonymous.is_some() {
                self.describe_members(m.type_id, offset_bits, depth + 1, out, budget)?;
            }
        }
        Ok(())
    }

    /// `Some(is_union)` when `id` (qualifiers skipped, typedefs not) is an
    /// anonymous struct/union, which pahole and C print inline.
    fn anonymous_composite(&self, id: u32) -> Result<Option<bool>> {
        let mut cur = id;
        for _ in 0..MAX_CHAIN {
            let t = self.ty(cur)?;
            match t.kind {
                Kind::Link(Link::Typedef, _) => return Ok(None),
                Kind::Link(_, target) => cur = target,
                Kind::Composite { union, .. } if self.str_at(t.name_off).is_empty() => return Ok(Some(union)),
                _ => return Ok(None),
            }
        }
        Err(corrupt(format!("qualifier chain from type {id} is too long")))
    }

    /// C declarator printing: `inner` is what is declared so far (a name,
    /// `*name`, `name[4]`), wrapped outward type by type.
    fn decl(&self, id: u32, inner: String, depth: usize, budget: &mut usize) -> Result<String> {
        if depth > MAX_DEPTH || *budget == 0 {
            return Err(corrupt(format!("type {id} nests too deeply to print")));
        }
        if inner.len() > MAX_DECL_LEN {
            return Err(corrupt(format!("declaration of type {id} is longer than {MAX_DECL_LEN} bytes")));
        }
        *budget -= 1;
        let join = |base: &str, inner: &str| {
            if inner.is_empty() {
                base.to_string()
            } else {
                format!("{base} {inner}")
            }
        };
        let t = self.ty(id)?;
        let name = self.str_at(t.name_off);
        let tagged = |tag: &str| {
            if name.is_empty() {
                format!("{tag} <anonymous>")
            } else {
                format!("{tag} {name}")
            }
        };
        Ok(match &t.kind {
            Kind::Void => join("void", &inner),
            Kind::Int { .. } | Kind::Float { .. } | Kind::Link(Link::Typedef, _) | Kind::Var { .. } => {
                join(name, &inner)
            }
            Kind::Datasec { .. } => join(&format!("section {name}"), &inner),
            Kind::Composite { union, .. } | Kind::Fwd { union } => {
                join(&tagged(if *union { "union" } else { "struct" }), &inner)
            }
            Kind::Enum { .. } => join(&tagged("enum"), &inner),
            Kind::Ptr(target) => {
                let wrapped = match self.ty(*target)?.kind {
                    Kind::Array { .. } | Kind::FuncProto { .. } => format!("(*{inner})"),
                    _ => format!("*{inner}"),
                };
                self.decl(*target, wrapped, depth + 1, budget)?
            }
            Kind::Link(link, target) => {
                let qualifier = match link {
                    Link::Const => "const",
                    Link::Volatile => "volatile",
                    Link::Restrict => "restrict",
                    // Type tags (`__user` with clang) do not change the C type.
                    Link::TypeTag | Link::Typedef => return self.decl(*target, inner, depth + 1, budget),
                };
                if matches!(self.ty(*target)?.kind, Kind::Ptr(_)) {
                    // `char *const p`: the qualifier binds to the pointer.
                    self.decl(*target, join(qualifier, &inner), depth + 1, budget)?
                } else {
                    format!("{qualifier} {}", self.decl(*target, inner, depth + 1, budget)?)
                }
            }
            Kind::Array { elem, len, .. } => self.decl(*elem, format!("{inner}[{len}]"), depth + 1, budget)?,
            Kind::FuncProto { ret, params } => {
                let mut list = Vec::with_capacity(params.len().min(64));
                let mut list_len = 0usize;
                for p in params {
                    let param =
                        if p.type_id == 0 { "...".to_string() } else { self.decl(p.type_id, String::new(), depth + 1, budget)? };
                    list_len = list_len.saturating_add(param.len());
                    if list_len > MAX_DECL_LEN {
                        return Err(corrupt(format!("parameter list of type {id} is longer than {MAX_DECL_LEN} bytes")));
                    }
                    list.push(param);
                }
                let list = if list.is_empty() { "void".to_string() } else { list.join(", ") };
                self.decl(*ret, format!("{inner}({list})"), depth + 1, budget)?
            }
            Kind::Func { proto, .. } => {
                let declared = if inner.is_empty() { name.to_string() } else { inner };
                self.decl(*proto, declared, depth + 1, budget)?
            }
            Kind::DeclTag { target, .. } => self.decl(*target, inner, depth + 1, budget)?,
        })
    }
}

/// Splits `"pids[1][2]"` into `("pids", [Some(1), Some(2)])`; an index
/// that is not a number is `None`. `None` overall when malformed.
fn split_indices(component: &str) -> Option<(&str, Vec<Option<u64>>)> {
    let component = component.trim();
    let (name, mut rest) = match component.find('[') {
        Some(at) => (component.get(..at)?, component.get(at..)?),
        None => (component, ""),
    };
    if name.is_empty() {
        return None;
    }
    let mut indices = Vec::new();
    while !rest.is_empty() {
        let body = rest.strip_prefix('[')?;
        let close = body.find(']')?;
        indices.push(body.get(..close)?.trim().parse::<u64>().ok());
        rest = body.get(close + 1..)?;
        if indices.len() > MAX_DEPTH {
            return None;
        }
    }
    Some((name, indices))
}

/// Decodes one `btf_type` record and what follows it.
fn parse_type(cur: &mut Cursor<'_>, id: usize) -> Result<Type> {
    let name_off = cur.u32()?;
    let info = cur.u32()?;
    let size_or_type = cur.u32()?;
    if info & !INFO_MASK != 0 {
        return Err(corrupt(format!("type {id}: reserved info bits set ({info:#x})")));
    }
    let vlen = (info & 0xffff) as usize;
    let kind = (info >> 24) & 0x1f;
    let kind_flag = info >> 31 != 0;
    let bad = |why: &str| corrupt(format!("type {id} (kind {kind}): {why}"));
    let no_vlen = |k: Kind| if vlen == 0 { Ok(k) } else { Err(bad("unexpected vlen")) };
    if kind_flag && !matches!(kind, KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 | KIND_FWD) {
        return Err(bad("kind_flag not allowed"));
    }
    let kind = match kind {
        KIND_INT => {
            let extra = cur.u32()?;
            let encoding = ((extra >> 24) & 0x0f) as u8;
            let bit_offset = ((extra >> 16) & 0xff) as u8;
            let bits = (extra & 0xff) as u8;
            if extra & 0xf000_ff00 != 0 {
                return Err(bad("reserved int bits set"));
            }
            if !matches!(size_or_type, 1 | 2 | 4 | 8 | 16) {
                return Err(bad("int size not 1, 2, 4, 8 or 16"));
            }
            if bits == 0 || bits > 128 || u32::from(bit_offset) + u32::from(bits) > size_or_type * 8 {
                return Err(bad("int bits out of range"));
            }
            if encoding & !INT_ENCODINGS != 0 || encoding.count_ones() > 1 {
                return Err(bad("bad int encoding"));
            }
            no_vlen(Kind::Int { size: size_or_type, encoding })?
        }
        KIND_PTR => no_vlen(Kind::Ptr(size_or_type))?,
        KIND_ARRAY => {
            let elem = cur.u32()?;
            let index = cur.u32()?;
            let len = cur.u32()?;
            no_vlen(Kind::Array { elem, index, len })?
        }
        KIND_STRUCT | KIND_UNION => {
            let mut members = Vec::with_capacity(vlen);
            for _ in 0..vlen {
                let name_off = cur.u32()?;
                let type_id = cur.u32()?;
                let offset = cur.u32()?;
                let (offset_bits, bitfield_size) =
                    if kind_flag { (offset & 0x00ff_ffff, (offset >> 24) as u8) } else { (offset, 0) };
                let end = u64::from(offset_bits) + u64::from(bitfield_size);
                if end > u64::from(size_or_type) * 8 {
                    return Err(bad("member past the end of the struct"));
                }
                members.push(RawMember { name_off, type_id, offset_bits, bitfield_size });
            }
            Kind::Composite { union: kind == KIND_UNION, size: size_or_type, members }
        }
        KIND_ENUM | KIND_ENUM64 => {
            if !matches!(size_or_type, 1 | 2 | 4 | 8) {
                return Err(bad("enum size not 1, 2, 4 or 8"));
            }
            let mut values = Vec::with_capacity(vlen);
            for _ in 0..vlen {
                let name_off = cur.u32()?;
                // kind_flag marks a signed enum (libbpf sets it for any
                // negative enumerator); clear means unsigned.
                let value = if kind == KIND_ENUM64 {
                    let lo = u64::from(cur.u32()?);
                    let hi = u64::from(cur.u32()?);
                    ((hi << 32) | lo) as i64
                } else if kind_flag {
                    i64::from(cur.u32()? as i32)
                } else {
                    i64::from(cur.u32()?)
                };
                values.push(Enumerator { name_off, value });
            }
            Kind::Enum { size: size_or_type, signed: kind_flag, values }
        }
        KIND_FWD => no_vlen(Kind::Fwd { union: kind_flag })?,
        KIND_TYPEDEF => no_vlen(Kind::Link(Link::Typedef, size_or_type))?,
        KIND_VOLATILE => no_vlen(Kind::Link(Link::Volatile, size_or_type))?,
        KIND_CONST => no_vlen(Kind::Link(Link::Const, size_or_type))?,
        KIND_RESTRICT => no_vlen(Kind::Link(Link::Restrict, size_or_type))?,
        KIND_TYPE_TAG => no_vlen(Kind::Link(Link::TypeTag, size_or_type))?,
        KIND_FUNC => {
            if vlen > 2 {
                return Err(bad("bad function linkage"));
            }
            Kind::Func { proto: size_or_type }
        }
        KIND_FUNC_PROTO => {
            let mut params = Vec::with_capacity(vlen);
            for _ in 0..vlen {
                let name_off = cur.u32()?;
                let type_id = cur.u32()?;
                params.push(Param { name_off, type_id });
            }
            Kind::FuncProto { ret: size_or_type, params }
        }
        KIND_VAR => {
            let linkage = cur.u32()?;
            if linkage > 2 {
                return Err(bad("bad variable linkage"));
            }
            no_vlen(Kind::Var { type_id: size_or_type })?
        }
        KIND_DATASEC => {
            let mut vars = Vec::with_capacity(vlen);
            for _ in 0..vlen {
                let type_id = cur.u32()?;
                let offset = cur.u32()?;
                let size = cur.u32()?;
                vars.push(SecVar { type_id, offset, size });
            }
            Kind::Datasec { size: size_or_type, vars }
        }
        KIND_FLOAT => {
            if !matches!(size_or_type, 2 | 4 | 8 | 12 | 16) {
                return Err(bad("float size not 2, 4, 8, 12 or 16"));
            }
            no_vlen(Kind::Float { size: size_or_type })?
        }
        KIND_DECL_TAG => {
            let component = cur.u32()? as i32;
            no_vlen(Kind::DeclTag { target: size_or_type, component })?
        }
        _ => return Err(bad("unknown kind")),
    };
    Ok(Type { name_off, kind })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Writes BTF blobs the way pahole/libbpf lay them out.
    struct Builder {
        types: Vec<u32>,
        strings: Vec<u8>,
        next_id: u32,
    }

    impl Builder {
        fn new() -> Builder {
            Builder { types: Vec::new(), strings: vec![0], next_id: 1 }
        }

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
        fn ptr(&mut self, target: u32) -> u32 {
            self.raw("", KIND_PTR, 0, false, target, &[])
        }
        fn array(&mut self, elem: u32, index: u32, len: u32) -> u32 {
            self.raw("", KIND_ARRAY, 0, false, 0, &[elem, index, len])
        }
        /// Members are (name, type, bit offset, bitfield width); any
        /// non-zero width sets kind_flag.
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
        fn strukt(&mut self, name: &str, size: u32, members: &[(&str, u32, u32, u32)]) -> u32 {
            self.composite(name, false, size, members)
        }
        fn union(&mut self, name: &str, size: u32, members: &[(&str, u32, u32, u32)]) -> u32 {
            self.composite(name, true, size, members)
        }
        fn enum32(&mut self, name: &str, signed: bool, values: &[(&str, i32)]) -> u32 {
            let mut extra = Vec::new();
            for (n, v) in values {
                let off = self.s(n);
                extra.extend_from_slice(&[off, *v as u32]);
            }
            self.raw(name, KIND_ENUM, values.len() as u32, signed, 4, &extra)
        }
        fn enum64(&mut self, name: &str, values: &[(&str, u64)]) -> u32 {
            let mut extra = Vec::new();
            for (n, v) in values {
                let off = self.s(n);
                extra.extend_from_slice(&[off, *v as u32, (*v >> 32) as u32]);
            }
            self.raw(name, KIND_ENUM64, values.len() as u32, false, 8, &extra)
        }
        fn fwd(&mut self, name: &str, union: bool) -> u32 {
            self.raw(name, KIND_FWD, 0, union, 0, &[])
        }
        fn link(&mut self, kind: u32, name: &str, target: u32) -> u32 {
            self.raw(name, kind, 0, false, target, &[])
        }
        fn typedef(&mut self, name: &str, target: u32) -> u32 {
            self.link(KIND_TYPEDEF, name, target)
        }
        fn konst(&mut self, target: u32) -> u32 {
            self.link(KIND_CONST, "", target)
        }
        fn proto(&mut self, ret: u32, params: &[(&str, u32)]) -> u32 {
            let mut extra = Vec::new();
            for (n, t) in params {
                let off = self.s(n);
                extra.extend_from_slice(&[off, *t]);
            }
            self.raw("", KIND_FUNC_PROTO, params.len() as u32, false, ret, &extra)
        }

        /// A blob with an explicit header (for corrupting it).
        fn build_with(&self, edit: impl FnOnce(&mut [u32; 6])) -> Vec<u8> {
            let type_len = (self.types.len() * 4) as u32;
            let mut hdr = [
                u32::from(MAGIC) | (u32::from(VERSION) << 16),
                HEADER_LEN as u32,
                0,
                type_len,
                type_len,
                self.strings.len() as u32,
            ];
            edit(&mut hdr);
            let mut out = Vec::new();
            for w in hdr {
                out.extend_from_slice(&w.to_le_bytes());
            }
            for w in &self.types {
                out.extend_from_slice(&w.to_le_bytes());
            }
            out.extend_from_slice(&self.strings);
            out
        }

        fn build(&self) -> Vec<u8> {
            self.build_with(|_| {})
        }
    }

    /// A small kernel-like type graph: every kind, anonymous nesting,
    /// bitfields, typedef chains and a forward declaration that precedes
    /// its definition.
    fn sample() -> (Vec<u8>, HashMap<&'static str, u32>) {
        let mut b = Builder::new();
        let mut ids = HashMap::new();
        let int = b.int("int", 4, true);
        let uint = b.int("unsigned int", 4, false);
        let ulong = b.int("long unsigned int", 8, false);
        let chr = b.int("char", 1, true);
        let u8t = b.int("unsigned char", 1, false);
        ids.insert("int", int);
        let fwd = b.fwd("list_head", false);
        ids.insert("fwd", fwd);
        let fwd_ptr = b.ptr(fwd);
        let list = b.strukt("list_head", 16, &[("next", fwd_ptr, 0, 0), ("prev", fwd_ptr, 64, 0)]);
        ids.insert("list_head", list);
        // typedef chain: u32 -> __u32 -> unsigned int; const u32.
        let u32_inner = b.typedef("__u32", uint);
        let u32t = b.typedef("u32", u32_inner);
        let const_u32 = b.konst(u32t);
        ids.insert("const_u32", const_u32);
        let const_char = b.konst(chr);
        let const_char_ptr = b.ptr(const_char);
        ids.insert("const char *", const_char_ptr);
        let char_ptr = b.ptr(chr);
        let char_ptr_const = b.konst(char_ptr);
        ids.insert("char *const", char_ptr_const);
        let comm = b.array(chr, int, 16);
        ids.insert("comm", comm);
        let matrix_row = b.array(int, int, 3);
        let matrix = b.array(matrix_row, int, 2);
        ids.insert("matrix", matrix);
        let fn_proto = b.proto(int, &[("a", int), ("", 0)]);
        let fn_ptr = b.ptr(fn_proto);
        ids.insert("fn_ptr", fn_ptr);
        let void_proto = b.proto(0, &[]);
        let void_fn_ptr = b.ptr(void_proto);
        let thread = b.strukt("thread_struct", 24, &[("es", u32t, 0, 0), ("sp", ulong, 64, 0), ("cr2", ulong, 128, 0)]);
        let state_enum = b.enum32("module_state", false, &[("MODULE_STATE_LIVE", 0), ("MODULE_STATE_GOING", 2)]);
        let signed_enum = b.enum32("", true, &[("KLP_UNDEFINED_TEST", -1), ("MODULE_STATE_LIVE", 0)]);
        ids.insert("signed_enum", signed_enum);
        let wide = b.enum64("wide", &[("WIDE_BIG", 0x1_0000_0002), ("WIDE_TOP", u64::MAX)]);
        ids.insert("wide", wide);
        // Anonymous: union { unsigned int __state; struct { u8 a; u8 b; }; }
        let inner_anon = b.strukt("", 2, &[("a", u8t, 0, 0), ("b", u8t, 8, 0)]);
        let anon_union = b.union("", 4, &[("__state", uint, 0, 0), ("", inner_anon, 0, 0)]);
        // A named member of an anonymous type: struct { int x; } named;
        let named_anon = b.strukt("", 4, &[("x", int, 0, 0)]);
        let task = b.strukt(
            "task_struct",
            144,
            &[
                ("", anon_union, 0, 0),
                ("flags", const_u32, 32, 0),
                ("tasks", list, 64, 0),
                ("on_cpu", uint, 192, 1),
                ("in_iowait", uint, 193, 3),
                ("comm", comm, 224, 0),
                ("thread", thread, 384, 0),
                ("fn", fn_ptr, 576, 0),
                ("name", const_char_ptr, 640, 0),
                ("state", state_enum, 704, 0),
                ("named", named_anon, 736, 0),
                ("grid", matrix, 768, 0),
                ("done", void_fn_ptr, 960, 0),
                ("buf", char_ptr_const, 1024, 0),
                ("tail", comm, 1088, 0),
            ],
        );
        ids.insert("task_struct", task);
        let anon_typedef_target = b.strukt("", 4, &[("counter", int, 0, 0)]);
        let atomic = b.typedef("atomic_t", anon_typedef_target);
        ids.insert("atomic_t", atomic);
        // The rest of the kinds, so the parser sees all of them.
        let volatile = b.link(KIND_VOLATILE, "", int);
        let restrict = b.link(KIND_RESTRICT, "", char_ptr);
        let tag = b.link(KIND_TYPE_TAG, "user", chr);
        let tagged_ptr = b.ptr(tag);
        ids.insert("tagged_ptr", tagged_ptr);
        let _ = (volatile, restrict);
        let main_proto = b.proto(int, &[("argc", int)]);
        let func = b.raw("main", KIND_FUNC, 1, false, main_proto, &[]);
        ids.insert("func", func);
        let var = b.raw("jiffies", KIND_VAR, 0, false, ulong, &[1]);
        b.raw(".data", KIND_DATASEC, 1, false, 64, &[var, 0, 8]);
        b.raw("double", KIND_FLOAT, 0, false, 8, &[]);
        b.raw("nonnull", KIND_DECL_TAG, 0, false, func, &[0]);
        b.raw("packed", KIND_DECL_TAG, 0, false, task, &[u32::MAX]);
        let fwd_union = b.fwd("only_declared", true);
        ids.insert("fwd_union", fwd_union);
        (b.build(), ids)
    }

    #[test]
    fn parses_every_kind() {
        let (blob, ids) = sample();
        let btf = Btf::parse(blob).unwrap();
        assert_eq!(btf.kind(0).unwrap(), TypeKind::Void);
        assert_eq!(btf.kind(ids["fwd"]).unwrap(), TypeKind::Fwd);
        assert_eq!(btf.kind(ids["func"]).unwrap(), TypeKind::Func);
        assert_eq!(btf.ids_by_name("jiffies").len(), 1);
        assert_eq!(btf.ids_by_name("double").len(), 1);
        assert_eq!(btf.type_name(ids["func"]).unwrap(), "int main(int)");
    }

    #[test]
    fn complete_struct_wins_over_forward_declaration() {
        let (blob, ids) = sample();
        let btf = Btf::parse(blob).unwrap();
        assert!(ids["fwd"] < ids["list_head"]);
        assert_eq!(btf.find_struct("list_head").unwrap(), ids["list_head"]);
        assert_eq!(btf.find_struct("struct list_head").unwrap(), ids["list_head"]);
        assert!(matches!(btf.find_struct("union list_head"), Err(IntrospectError::NoType(_))));
        assert_eq!(btf.struct_size("list_head").unwrap(), 16);
        // Only declared: found, but it has no layout.
        assert_eq!(btf.find_struct("only_declared").unwrap(), ids["fwd_union"]);
        assert!(btf.struct_size("only_declared").is_err());
        assert!(btf.member("only_declared", "x").is_err());
        assert!(btf.describe_struct("only_declared").is_err());
        // A typedef of an anonymous struct.
        assert_eq!(btf.struct_size("atomic_t").unwrap(), 4);
        assert_eq!(btf.member_offset("atomic_t", "counter").unwrap(), 0);
        assert!(matches!(btf.find_struct("no_such"), Err(IntrospectError::NoType(_))));
    }

    #[test]
    fn member_paths_nest_and_see_through_anonymous_members() {
        let (blob, _) = sample();
        let btf = Btf::parse(blob).unwrap();
        assert_eq!(btf.struct_size("task_struct").unwrap(), 144);
        assert_eq!(btf.member_offset("task_struct", "__state").unwrap(), 0);
        assert_eq!(btf.member_offset("task_struct", "b").unwrap(), 1);
        assert_eq!(btf.member_offset("task_struct", "tasks").unwrap(), 8);
        assert_eq!(btf.member_offset("task_struct", "tasks.prev").unwrap(), 16);
        assert_eq!(btf.member_offset("task_struct", "thread.sp").unwrap(), 48 + 8);
        assert_eq!(btf.member_offset("task_struct", "named.x").unwrap(), 92);
        assert_eq!(btf.member_offset("task_struct", "comm[3]").unwrap(), 28 + 3);
        assert_eq!(btf.member_offset("task_struct", "grid[1][2]").unwrap(), 96 + 12 + 8);
        // Past-the-end indices: flexible arrays.
        assert_eq!(btf.member_offset("task_struct", "tail[20]").unwrap(), 136 + 20);
        let m = btf.member("task_struct", "thread.es").unwrap();
        assert_eq!((m.offset_bits, m.size, m.bitfield_size), (48 * 8, 4, 0));
        assert_eq!(btf.type_name(m.type_id).unwrap(), "u32");
        assert_eq!(btf.type_name(btf.resolve_type(m.type_id).unwrap()).unwrap(), "unsigned int");
        for bad in ["", ".", "tasks.", "x", "tasks.nope", "comm[x]", "comm[1", "__state.x", "sp", "thread..sp"] {
            assert!(btf.member("task_struct", bad).is_err(), "{bad:?}");
        }
        assert!(matches!(
            btf.member("task_struct", "nope"),
            Err(IntrospectError::NoMember { ref ty, ref member }) if ty == "struct task_struct" && member == "nope"
        ));
        let tasks = btf.member("task_struct", "tasks").unwrap();
        assert!(btf.member_in(tasks.type_id, "next").is_ok());
    }

    #[test]
    fn bitfields_come_from_kind_flag() {
        let (blob, _) = sample();
        let btf = Btf::parse(blob).unwrap();
        let on_cpu = btf.member("task_struct", "on_cpu").unwrap();
        assert_eq!((on_cpu.offset_bits, on_cpu.bitfield_size, on_cpu.size), (192, 1, 4));
        assert!(on_cpu.is_bitfield());
        let iowait = btf.member("task_struct", "in_iowait").unwrap();
        assert_eq!((iowait.offset_bits, iowait.bitfield_size), (193, 3));
        // A bitfield has no byte offset, and no members.
        assert!(btf.member_offset("task_struct", "on_cpu").is_err());
        assert!(btf.member("task_struct", "on_cpu.x").is_err());
        // In a kind_flag struct, plain members have width 0.
        assert_eq!(btf.member("task_struct", "tasks").unwrap().bitfield_size, 0);
    }

    #[test]
    fn type_names_are_c() {
        let (blob, ids) = sample();
        let btf = Btf::parse(blob).unwrap();
        assert_eq!(btf.type_name(ids["const char *"]).unwrap(), "const char *");
        assert_eq!(btf.type_name(ids["char *const"]).unwrap(), "char *const");
        assert_eq!(btf.type_name(ids["comm"]).unwrap(), "char [16]");
        assert_eq!(btf.type_name(ids["matrix"]).unwrap(), "int [2][3]");
        assert_eq!(btf.type_name(ids["fn_ptr"]).unwrap(), "int (*)(int, ...)");
        assert_eq!(btf.type_name(ids["const_u32"]).unwrap(), "const u32");
        assert_eq!(btf.type_name(ids["tagged_ptr"]).unwrap(), "char *");
        assert_eq!(btf.declaration(ids["fn_ptr"], "fn").unwrap(), "int (*fn)(int, ...)");
        assert_eq!(btf.declaration(ids["comm"], "comm").unwrap(), "char comm[16]");
        assert_eq!(btf.type_name(ids["fwd_union"]).unwrap(), "union only_declared");
        assert_eq!(btf.type_name(0).unwrap(), "void");
        assert!(btf.type_name(u32::MAX).is_err());
        assert_eq!(btf.resolve_type(ids["const_u32"]).map(|t| btf.type_name(t).unwrap()).unwrap(), "unsigned int");
        assert_eq!(btf.type_size(ids["matrix"]).unwrap(), 24);
        assert_eq!(btf.type_size(ids["fn_ptr"]).unwrap(), 8);
        assert!(btf.type_size(0).is_err());
        assert!(btf.type_size(ids["fwd"]).is_err());
        assert_eq!(btf.array_len(ids["comm"]).unwrap(), 16);
        assert!(btf.array_len(ids["fn_ptr"]).is_err());
        assert_eq!(btf.pointer_target(ids["const char *"]).map(|t| btf.type_name(t).unwrap()).unwrap(), "const char");
        assert!(btf.pointer_target(ids["comm"]).is_err());
        assert_eq!(btf.int_info(ids["const_u32"]).unwrap(), (4, false));
        assert_eq!(btf.int_info(ids["int"]).unwrap(), (4, true));
    }

    #[test]
    fn enums_signed_unsigned_and_64_bit() {
        let (blob, _) = sample();
        let btf = Btf::parse(blob).unwrap();
        assert_eq!(btf.enum_value(Some("module_state"), "MODULE_STATE_GOING").unwrap(), 2);
        assert_eq!(btf.enum_value(Some("enum module_state"), "MODULE_STATE_LIVE").unwrap(), 0);
        assert_eq!(btf.enum_value(None, "KLP_UNDEFINED_TEST").unwrap(), -1);
        assert_eq!(btf.enum_value(Some(""), "KLP_UNDEFINED_TEST").unwrap(), -1);
        // Defined twice with the same value: fine.
        assert_eq!(btf.enum_value(None, "MODULE_STATE_LIVE").unwrap(), 0);
        assert_eq!(btf.enum_value(Some("wide"), "WIDE_BIG").unwrap(), 0x1_0000_0002);
        assert_eq!(btf.enum_value(Some("wide"), "WIDE_TOP").unwrap(), -1);
        assert!(matches!(btf.enum_value(Some("module_state"), "X"), Err(IntrospectError::NoMember { .. })));
        assert!(matches!(btf.enum_value(Some("nope"), "X"), Err(IntrospectError::NoType(_))));
        assert!(btf.enum_value(None, "NOPE").is_err());
    }

    #[test]
    fn conflicting_enumerators_are_an_error() {
        let mut b = Builder::new();
        b.enum32("a", false, &[("X", 1)]);
        b.enum32("b", false, &[("X", 2)]);
        let btf = Btf::parse(b.build()).unwrap();
        assert!(btf.enum_value(None, "X").is_err());
        assert_eq!(btf.enum_value(Some("b"), "X").unwrap(), 2);
    }

    #[test]
    fn describe_struct_lists_like_pahole() {
        let (blob, _) = sample();
        let btf = Btf::parse(blob).unwrap();
        let d = btf.describe_struct("task_struct").unwrap();
        let line = |name: &str| d.iter().find(|m| m.name == name).unwrap_or_else(|| panic!("{name}"));
        assert_eq!(d[0].name, "");
        assert!(d[0].expanded);
        assert_eq!((d[0].type_name.as_str(), d[0].depth, d[0].size), ("union <anonymous>", 0, 4));
        assert_eq!((d[1].name.as_str(), d[1].depth), ("__state", 1));
        assert_eq!((d[2].decl.as_str(), d[2].depth, d[2].expanded), ("struct <anonymous>", 1, true));
        assert_eq!((d[3].name.as_str(), d[3].depth, d[3].offset), ("a", 2, 0));
        assert_eq!((line("b").offset, line("b").depth), (1, 2));
        assert_eq!(line("flags").decl, "const u32 flags");
        let iowait = line("in_iowait");
        assert_eq!((iowait.offset, iowait.bit_offset, iowait.bitfield_size, iowait.size), (24, 1, 3, 4));
        assert_eq!(line("fn").decl, "int (*fn)(int, ...)");
        assert_eq!(line("done").decl, "void (*done)(void)");
        assert_eq!(line("buf").decl, "char *const buf");
        assert_eq!(line("state").type_name, "enum module_state");
        let named = line("named");
        assert!(named.expanded);
        assert_eq!(named.decl, "struct <anonymous> named");
        assert_eq!((line("x").offset, line("x").depth), (92, 1));
        assert_eq!(line("grid").decl, "int grid[2][3]");
        assert_eq!(line("thread").size, 24);
        assert!(!line("thread").expanded);
    }

    #[test]
    fn from_memory_reads_the_blob_and_bounds_its_size() {
        struct Flat(Vec<u8>);
        impl KernelMemory for Flat {
            fn read_virt(&self, va: u64, buf: &mut [u8]) -> Result<()> {
                let start = usize::try_from(va).map_err(|_| IntrospectError::Overflow(va))?;
                let src = start
                    .checked_add(buf.len())
                    .and_then(|end| self.0.get(start..end))
                    .ok_or(IntrospectError::NotMapped { va, level: 1 })?;
                buf.copy_from_slice(src);
                Ok(())
            }
        }
        let (blob, _) = sample();
        let len = blob.len() as u64;
        let mut mem = vec![0u8; 0x100];
        mem.extend_from_slice(&blob);
        let mem = Flat(mem);
        let btf = Btf::from_memory(&mem, 0x100, 0x100 + len).unwrap();
        assert_eq!(btf.struct_size("task_struct").unwrap(), 144);
        assert!(Btf::from_memory(&mem, 0x100 + len, 0x100).is_err());
        assert!(Btf::from_memory(&mem, 0, MAX_BTF_SIZE + 1).is_err());
        assert!(Btf::from_memory(&mem, 0x100, 0x100 + len + 1).is_err());
        assert!(Btf::from_memory(&mem, 0x100, 0x100 + 10).is_err());
    }

    #[test]
    fn bad_headers_are_errors() {
        let (blob, _) = sample();
        assert!(Btf::parse(Vec::new()).is_err());
        let mut b = Builder::new();
        b.int("int", 4, true);
        type HeaderEdit = Box<dyn Fn(&mut [u32; 6])>;
        let edits: Vec<HeaderEdit> = vec![
            Box::new(|h| h[0] = 0x0001_9feb),             // byte-swapped magic
            Box::new(|h| h[0] = 0x0001_1234),             // bad magic
            Box::new(|h| h[0] = 0x0002_eb9f),             // version 2
            Box::new(|h| h[0] = 0x0101_eb9f),             // flags
            Box::new(|h| h[1] = 8),                       // header too short
            Box::new(|h| h[1] = 1 << 20),                 // header past the end
            Box::new(|h| h[2] = 2),                       // misaligned types
            Box::new(|h| h[3] = h[3].wrapping_add(4)),    // types overlap strings
            Box::new(|h| h[2] = u32::MAX - 3),            // offset overflow
            Box::new(|h| h[3] = u32::MAX - 3),            // length overflow
            Box::new(|h| h[4] = h[4].wrapping_add(1000)), // strings past the end
            Box::new(|h| h[5] = h[5].wrapping_add(1)),    // strings past the end
            Box::new(|h| h[5] = 0),                       // no strings
            Box::new(|h| h[4] = h[4].wrapping_add(1)),    // strings not NUL-led
            Box::new(|h| h[5] = h[5].wrapping_sub(1)),    // strings not NUL-ended
        ];
        assert!(Btf::parse(b.build()).is_ok());
        for (i, edit) in edits.iter().enumerate() {
            assert!(Btf::parse(b.build_with(|h| edit(h))).is_err(), "edit {i}");
        }
        // A longer header is fine when its extra part is zero.
        let mut long = blob.clone();
        long.splice(24..24, [0u8; 8]);
        long[4] = 32;
        assert!(Btf::parse(long.clone()).is_ok());
        long[30] = 1;
        assert!(Btf::parse(long).is_err());
    }

    #[test]
    fn every_truncation_is_an_error() {
        let (blob, _) = sample();
        for len in 0..blob.len() {
            assert!(Btf::parse(blob[..len].to_vec()).is_err(), "truncated to {len}");
        }
    }

    #[test]
    fn hostile_references_are_errors() {
        type Case = (&'static str, Box<dyn Fn(&mut Builder)>);
        let cases: Vec<Case> = vec![
            (
                "pointer to a missing type",
                Box::new(|b| {
                    b.ptr(99);
                }),
            ),
            (
                "member of a missing type",
                Box::new(|b| {
                    b.strukt("s", 4, &[("x", 1234, 0, 0)]);
                }),
            ),
            (
                "member of type void",
                Box::new(|b| {
                    b.strukt("s", 4, &[("x", 0, 0, 0)]);
                }),
            ),
            (
                "member past the end",
                Box::new(|b| {
                    let i = b.int("int", 4, true);
                    b.strukt("s", 4, &[("x", i, 64, 0)]);
                }),
            ),
            (
                "name past the strings",
                Box::new(|b| {
                    b.types.extend_from_slice(&[0xffff, KIND_INT << 24, 4, 32]);
                    b.next_id += 1;
                }),
            ),
            (
                "member name past the strings",
                Box::new(|b| {
                    let i = b.int("int", 4, true);
                    b.types.extend_from_slice(&[0, (KIND_STRUCT << 24) | 1, 4, 1 << 30, i, 0]);
                }),
            ),
            (
                "self-referencing typedef",
                Box::new(|b| {
                    let id = b.next_id;
                    b.typedef("loop", id);
                }),
            ),
            (
                "typedef/const loop",
                Box::new(|b| {
                    let id = b.next_id;
                    b.typedef("a", id + 1);
                    b.konst(id + 2);
                    b.typedef("c", id);
                }),
            ),
            (
                "pointer to itself",
                Box::new(|b| {
                    let id = b.next_id;
                    b.ptr(id);
                }),
            ),
            (
                "array of itself",
                Box::new(|b| {
                    let id = b.next_id;
                    b.array(id, id, 2);
                }),
            ),
            (
                "array of void",
                Box::new(|b| {
                    b.array(0, 0, 2);
                }),
            ),
            (
                "unknown kind",
                Box::new(|b| {
                    b.raw("x", 20, 0, false, 0, &[]);
                }),
            ),
            (
                "kind 0",
                Box::new(|b| {
                    b.raw("x", 0, 0, false, 0, &[]);
                }),
            ),
            (
                "reserved info bits",
                Box::new(|b| {
                    b.types.extend_from_slice(&[0, (KIND_PTR << 24) | 0x0001_0000, 0]);
                }),
            ),
            (
                "kind_flag on a pointer",
                Box::new(|b| {
                    b.raw("", KIND_PTR, 0, true, 0, &[]);
                }),
            ),
            (
                "int of size 3",
                Box::new(|b| {
                    b.raw("int", KIND_INT, 0, false, 3, &[24]);
                }),
            ),
            (
                "int wider than its size",
                Box::new(|b| {
                    b.raw("int", KIND_INT, 0, false, 4, &[33]);
                }),
            ),
            (
                "anonymous int",
                Box::new(|b| {
                    b.raw("", KIND_INT, 0, false, 4, &[32]);
                }),
            ),
            (
                "function without prototype",
                Box::new(|b| {
                    let i = b.int("int", 4, true);
                    b.raw("f", KIND_FUNC, 0, false, i, &[]);
                }),
            ),
            (
                "void parameter in the middle",
                Box::new(|b| {
                    let i = b.int("int", 4, true);
                    b.proto(i, &[("a", 0), ("b", i)]);
                }),
            ),
            (
                "data section entry not a variable",
                Box::new(|b| {
                    let i = b.int("int", 4, true);
                    b.raw(".data", KIND_DATASEC, 1, false, 8, &[i, 0, 4]);
                }),
            ),
            (
                "decl tag component out of range",
                Box::new(|b| {
                    let i = b.int("int", 4, true);
                    let s = b.strukt("s", 4, &[("x", i, 0, 0)]);
                    b.raw("tag", KIND_DECL_TAG, 0, false, s, &[1]);
                }),
            ),
            (
                "vlen on a typedef",
                Box::new(|b| {
                    let i = b.int("int", 4, true);
                    b.raw("t", KIND_TYPEDEF, 1, false, i, &[]);
                }),
            ),
            (
                "huge vlen, no members",
                Box::new(|b| {
                    b.raw("s", KIND_STRUCT, 0xffff, false, 4, &[]);
                }),
            ),
            (
                "long typedef chain",
                Box::new(|b| {
                    let mut t = b.int("int", 4, true);
                    for _ in 0..(MAX_CHAIN + 1) {
                        t = b.typedef("t", t);
                    }
                }),
            ),
        ];
        for (what, build) in cases {
            let mut b = Builder::new();
            build(&mut b);
            assert!(Btf::parse(b.build()).is_err(), "{what}: accepted");
        }
    }

    #[test]
    fn exponential_anonymous_nesting_is_bounded() {
        // Each level holds two anonymous members of the level below: a
        // lookup of a missing name, a description and a printed prototype
        // would all take 2^40 steps without a budget.
        let mut b = Builder::new();
        let int = b.int("int", 4, true);
        let mut level = b.strukt("", 4, &[("leaf", int, 0, 0)]);
        let mut proto = b.proto(int, &[("a", int)]);
        for _ in 0..40 {
            level = b.union("", 4, &[("", level, 0, 0), ("", level, 0, 0)]);
            let p = b.ptr(proto);
            proto = b.proto(int, &[("a", p), ("b", p)]);
        }
        b.strukt("top", 4, &[("", level, 0, 0)]);
        let fp = b.ptr(proto);
        let btf = Btf::parse(b.build()).unwrap();
        assert!(btf.member("top", "missing").is_err());
        assert!(btf.describe_struct("top").is_err());
        assert!(btf.type_name(fp).is_err());
    }

    #[test]
    fn self_referencing_prototype_prints_as_an_error() {
        // Not a reference chain (a parameter starts a new one), so parsing
        // accepts it; printing it must stop.
        let mut b = Builder::new();
        let int = b.int("int", 4, true);
        let id = b.next_id;
        b.proto(int, &[("self", id + 1)]);
        b.ptr(id);
        let btf = Btf::parse(b.build()).unwrap();
        assert!(btf.type_name(id + 1).is_err());
        assert_eq!(btf.type_size(id + 1).unwrap(), 8);
    }

    /// Every single-byte corruption of a valid blob parses or fails cleanly,
    /// and whatever parses answers every query without panicking.
    #[test]
    fn corrupted_blobs_never_panic() {
        let (blob, _) = sample();
        for at in 0..blob.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = blob.clone();
                bad[at] ^= flip;
                if let Ok(btf) = Btf::parse(bad) {
                    exercise(&btf);
                }
            }
        }
    }

    fn exercise(btf: &Btf) {
        for id in 0..btf.type_count() as u32 + 2 {
            let _ = btf.type_name(id);
            let _ = btf.type_size(id);
            let _ = btf.resolve_type(id);
            let _ = btf.array_len(id);
            let _ = btf.pointer_target(id);
            let _ = btf.kind(id);
            let _ = btf.int_info(id);
            let _ = btf.member_in(id, "thread.sp");
        }
        for name in ["task_struct", "list_head", "atomic_t", "only_declared", "thread_struct"] {
            let _ = btf.struct_size(name);
            let _ = btf.describe_struct(name);
            for path in ["__state", "b", "tasks.prev", "named.x", "comm[3]", "grid[1][2]", "on_cpu"] {
                let _ = btf.member(name, path);
                let _ = btf.member_offset(name, path);
            }
        }
        let _ = btf.enum_value(None, "MODULE_STATE_LIVE");
        let _ = btf.enum_value(Some("wide"), "WIDE_TOP");
    }

    /// One string of many megabytes that every type names: validation
    /// must not scan it once per type (that was hours of work).
    #[test]
    fn huge_names_are_rejected_quickly() {
        let mut b = Builder::new();
        b.strings.extend(std::iter::repeat_n(b'a', 4 << 20));
        b.strings.push(0);
        for _ in 0..50_000 {
            b.raw("", KIND_INT, 0, false, 4, &[32]);
            let at = b.types.len() - 4;
            b.types[at] = 1; // name_off of the type just added
        }
        let t = std::time::Instant::now();
        assert!(Btf::parse(b.build()).is_err());
        assert!(t.elapsed() < std::time::Duration::from_secs(5), "{:?}", t.elapsed());
    }

    /// A binary tree of anonymous members with shared subtrees (17 levels)
    /// where every struct also has 30000 named members: a lookup of a
    /// missing member visited 65536 structs of 30000 members each (two
    /// billion compares); it must stop after a bounded number of members.
    #[test]
    fn member_lookup_in_shared_wide_anonymous_members_is_bounded() {
        let mut b = Builder::new();
        let int = b.int("int", 4, true);
        let mut level = b.strukt("", 4, &[("x", int, 0, 0)]);
        for _ in 0..17 {
            let mut members: Vec<(&str, u32, u32, u32)> = vec![("", level, 0, 0), ("", level, 0, 0)];
            members.extend((0..30_000).map(|_| ("a", int, 0, 0)));
            level = b.strukt("", 4, &members);
        }
        b.strukt("top", 4, &[("", level, 0, 0)]);
        let btf = Btf::parse(b.build()).unwrap();
        let t = std::time::Instant::now();
        assert!(btf.member("top", "missing").is_err());
        assert!(btf.describe_struct("top").is_err());
        assert!(t.elapsed() < std::time::Duration::from_secs(10), "{:?}", t.elapsed());
    }

    /// A prototype with 60000 parameters of a type with a long name: the
    /// declaration (and every member using it) must not grow without bound.
    #[test]
    fn huge_declarations_are_errors() {
        let mut b = Builder::new();
        let long = "l".repeat(1000);
        let int = b.int(&long, 4, true);
        let params: Vec<(&str, u32)> = (0..60_000).map(|_| ("", int)).collect();
        let proto = b.proto(int, &params);
        let fp = b.ptr(proto);
        let members: Vec<(String, u32, u32, u32)> = (0..5000).map(|i| (format!("m{i}"), fp, 0, 0)).collect();
        let members: Vec<(&str, u32, u32, u32)> = members.iter().map(|(n, t, o, w)| (n.as_str(), *t, *o, *w)).collect();
        b.strukt("s", 8, &members);
        let btf = Btf::parse(b.build()).unwrap();
        let t = std::time::Instant::now();
        assert!(btf.type_name(fp).is_err());
        assert!(btf.describe_struct("s").is_err());
        assert!(t.elapsed() < std::time::Duration::from_secs(10), "{:?}", t.elapsed());
    }
}
