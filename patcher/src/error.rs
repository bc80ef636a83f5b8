//! Errors of patching: each names the module, function or site at fault.

/// What can go wrong while reading a patch module or changing the guest.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error("{path}: not an ELF file: {detail}")]
    NotElf { path: String, detail: String },
    #[error("{path}: not a livepatch module: {detail}")]
    NotLivepatch { path: String, detail: String },
    #[error("{path}: malformed module: {detail}")]
    Malformed { path: String, detail: String },
    #[error("{path}: section {section} is not processed by hyperpatch ({why}); the module is refused, nothing was changed")]
    UnhandledSection { path: String, section: String, why: &'static str },
    #[error("{path}: relocation against {symbol:?}: {detail}")]
    Relocation { path: String, symbol: String, detail: String },
    #[error("the guest's x86_return_thunk is {value:#x} ({}), not the start of a *_return_thunk in its text; return-thunk sites are refused", symbol.as_deref().unwrap_or("no symbol"))]
    UnknownReturnThunk { value: u64, symbol: Option<String> },
    #[error("{path}: return-thunk site at {site:#x} is not `jmp __x86_return_thunk` ({found}); the module is refused")]
    ReturnSite { path: String, site: u64, found: String },
    #[error("{path}: built for ORC format {module}, the guest's is {}; the module is refused", guest.as_deref().unwrap_or("not given (no .orc_header)"))]
    OrcHeaderMismatch { path: String, module: String, guest: Option<String> },
    #[error("the guest's ORC header runs from {start:#x} to {stop:#x}, not a hash")]
    GuestOrcHeader { start: u64, stop: u64 },
    #[error("symbol {name:?} needed by the patch is not in the guest kernel (module built for another kernel?)")]
    MissingSymbol { name: String },
    #[error("function {name:?}: {detail}")]
    Function { name: String, detail: String },
    #[error("call site of {name} at {site:#x}: {detail}")]
    Site { name: String, site: u64, detail: String },
    #[error("the reserved region has no room for {needed} bytes of {kind}")]
    NoRoom { kind: String, needed: u64 },
    #[error("mapping the reserved region: {0}")]
    Mapping(String),
    #[error("{module}: {detail}")]
    Param { module: String, detail: String },
    #[error("{module}: {detail}")]
    Lifecycle { module: String, detail: String },
    #[error("the klp_patch in guest memory at {addr:#x}: {detail}")]
    GuestPatch { addr: u64, detail: String },
    #[error("no patch named {0:?}")]
    NoPatch(String),
    #[error("patch {0:?} is already applied")]
    Duplicate(String),
    #[error("{0}")]
    State(String),
    #[error("transition timed out after {secs} s; blocked by: {blockers}")]
    Timeout { secs: u64, blockers: String },
    #[error("{cause}; putting back the bytes at phys {at:#x} failed too ({detail}): the guest is partly changed")]
    RollbackFailed { cause: Box<PatchError>, at: u64, detail: String },
    #[error("guest memory: {0}")]
    Guest(#[from] introspect::IntrospectError),
    #[error("VM: {0}")]
    Vm(String),
    #[error(transparent)]
    Call(#[from] crate::guest_call::CallError),
}

/// Result alias for the patcher.
pub type Result<T> = std::result::Result<T, PatchError>;
