//! Errors of the VMM crate: each variant names what failed so the binary can
//! print one clear line.

use std::path::PathBuf;

/// Everything that can go wrong while building, running, pausing or
/// snapshotting a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot open /dev/kvm: {0}")]
    Kvm(#[source] kvm_ioctls::Error),
    #[error("KVM ioctl {what} failed: {source}")]
    KvmIoctl {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot read {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is neither an ELF vmlinux nor a bzImage")]
    UnknownKernelFormat { path: PathBuf },
    #[error("{path} is an ELF file without a PVH entry note (build the kernel with CONFIG_PVH=y)")]
    NoPvhEntry { path: PathBuf },
    #[error("cannot load kernel {path}: {detail}")]
    KernelLoad { path: PathBuf, detail: String },
    #[error("guest memory too small: {0}")]
    MemoryTooSmall(String),
    #[error("guest memory: {0}")]
    GuestMemory(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("snapshot: {0}")]
    Snapshot(String),
    #[error("vCPU {index}: {detail}")]
    Vcpu { index: usize, detail: String },
    #[error("the VM has stopped")]
    Stopped,
    #[error("a client of the control API holds the VM paused: no guest code may run until it resumes")]
    ClientHold,
    #[error("{path}: snapshot format version {found}, but this hyperpatch reads only version {supported}")]
    SnapshotVersion { path: PathBuf, found: u64, supported: u32 },
}

impl VmmError {
    /// Wraps a KVM ioctl error with the name of the ioctl.
    pub fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
        move |source| VmmError::KvmIoctl { what, source }
    }
}

/// Result alias for the VMM crate.
pub type Result<T> = std::result::Result<T, VmmError>;
