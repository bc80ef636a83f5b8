//! Errors of introspection. Guest memory is hostile: every failure to make
//! sense of it is an error value, never a panic.

/// What went wrong while reading the guest.
#[derive(Debug, thiserror::Error)]
pub enum IntrospectError {
    #[error("guest-physical address {addr:#x} (+{len}) is outside guest memory")]
    PhysOutOfRange { addr: u64, len: usize },
    #[error("virtual address {va:#x} is not mapped (page-table walk stopped at level {level})")]
    NotMapped { va: u64, level: u8 },
    #[error("virtual address {0:#x} is not canonical")]
    NonCanonical(u64),
    #[error("address arithmetic overflowed at {0:#x}")]
    Overflow(u64),
    #[error("kallsyms: {0}")]
    Kallsyms(String),
    #[error("symbol {0:?} not found in guest kallsyms")]
    NoSymbol(String),
    #[error("BTF: {0}")]
    Btf(String),
    #[error("type {0:?} not found in guest BTF")]
    NoType(String),
    #[error("member {member:?} not found in {ty}")]
    NoMember { ty: String, member: String },
    #[error("{what}: walk exceeded {limit} steps (loop or corrupted list?)")]
    WalkLimit { what: String, limit: usize },
    #[error("{0}")]
    Corrupt(String),
    #[error("unwind: {0}")]
    Unwind(String),
    #[error("struct orc_entry in the guest's BTF: {0}: not an ORC format hyperpatch knows (6.1's with an end bit, 6.3's with signal, 6.4+'s typed)")]
    UnknownOrcFormat(String),
    #[error("image file {path}: {detail}")]
    Image { path: String, detail: String },
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Result alias for introspection.
pub type Result<T> = std::result::Result<T, IntrospectError>;
