//! The vCPU state introspection needs, as plain data (no KVM types), so it
//! can come from a live VM or from a dump file.

/// One vCPU's registers at the moment the VM was stopped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CpuState {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
    /// CS selector; its low two bits are the privilege level.
    pub cs: u16,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    /// MSR_LSTAR: the guest's `entry_SYSCALL_64`.
    pub lstar: u64,
    pub gs_base: u64,
    pub kernel_gs_base: u64,
}

impl CpuState {
    /// Current privilege level.
    pub fn cpl(&self) -> u8 {
        (self.cs & 3) as u8
    }
    /// Whether the vCPU was running user code.
    pub fn in_user_mode(&self) -> bool {
        self.cpl() == 3
    }
    /// 5-level paging (CR4.LA57).
    pub fn la57(&self) -> bool {
        self.cr4 & (1 << 12) != 0
    }
    /// The GS base the kernel uses for per-CPU data: GS_BASE in kernel mode,
    /// KERNEL_GS_BASE (swapped away) in user mode.
    pub fn kernel_gs(&self) -> u64 {
        if self.in_user_mode() {
            self.kernel_gs_base
        } else {
            self.gs_base
        }
    }
}
