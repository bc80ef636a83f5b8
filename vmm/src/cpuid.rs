//! The CPUID the guest sees: what KVM supports, with a distinct APIC id per
//! vCPU, minus the features this machine's nested KVM cannot run at CPL0
//! (see DESIGN.md: CX16, POPCNT, XSAVE, SMAP, FSGSBASE, RDTSCP, INVPCID, ...)
//! and minus the KVM paravirt features that rely on hypercalls.

use kvm_bindings::CpuId;

// Leaf 1 ECX.
const L1_ECX_PCID: u32 = 1 << 17;
const L1_ECX_CX16: u32 = 1 << 13;
const L1_ECX_X2APIC: u32 = 1 << 21;
const L1_ECX_POPCNT: u32 = 1 << 23;
const L1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const L1_ECX_XSAVE: u32 = 1 << 26;
const L1_ECX_OSXSAVE: u32 = 1 << 27;
const L1_ECX_AVX: u32 = 1 << 28;
const L1_ECX_F16C: u32 = 1 << 29;
const L1_ECX_HYPERVISOR: u32 = 1 << 31;
const L1_ECX_FMA: u32 = 1 << 12;
const L1_ECX_MOVBE: u32 = 1 << 22;
const L1_ECX_AES: u32 = 1 << 25;
const L1_ECX_PCLMUL: u32 = 1 << 1;
// Leaf 1 EDX: hyper-threading flag.
const L1_EDX_HTT: u32 = 1 << 28;
// Leaf 7.0 EBX.
const L7_EBX_FSGSBASE: u32 = 1 << 0;
const L7_EBX_AVX2: u32 = 1 << 5;
const L7_EBX_ERMS: u32 = 1 << 9;
const L7_EBX_INVPCID: u32 = 1 << 10;
const L7_EBX_RTM: u32 = 1 << 11;
const L7_EBX_AVX512_MASK: u32 = 0xd023_0000; // AVX512F/DQ/IFMA/PF/ER/CD/BW/VL
const L7_EBX_SMAP: u32 = 1 << 20;
const L7_EBX_CLFLUSHOPT: u32 = 1 << 23;
const L7_EBX_CLWB: u32 = 1 << 24;
const L7_EBX_HLE: u32 = 1 << 4;
// Leaf 7.0 ECX.
const L7_ECX_PKU: u32 = 1 << 3;
const L7_ECX_OSPKE: u32 = 1 << 4;
const L7_ECX_UMIP: u32 = 1 << 2;
const L7_ECX_LA57: u32 = 1 << 16;
const L7_ECX_RDPID: u32 = 1 << 22;
const L7_ECX_VAES_ETC: u32 = (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12) | (1 << 14) | (1 << 1) | (1 << 6);
// Leaf 7.0 EDX.
const L7_EDX_FSRM: u32 = 1 << 4;
const L7_EDX_AVX512_ETC: u32 = (1 << 2) | (1 << 3) | (1 << 8) | (1 << 23);
// Leaf 0x8000_0001 EDX / ECX.
const LX1_EDX_RDTSCP: u32 = 1 << 27;
const LX1_ECX_ABM: u32 = 1 << 5; // LZCNT, like POPCNT unsupported here
// KVM feature leaf 0x4000_0001 EAX.
const KVM_FEATURE_PV_UNHALT: u32 = 1 << 7;
const KVM_FEATURE_PV_SEND_IPI: u32 = 1 << 11;
const KVM_FEATURE_PV_SCHED_YIELD: u32 = 1 << 13;
const KVM_FEATURE_ASYNC_PF_INT: u32 = 1 << 14;
const KVM_FEATURE_ASYNC_PF: u32 = 1 << 4;
const KVM_FEATURE_ASYNC_PF_VMEXIT: u32 = 1 << 10;
const KVM_FEATURE_PV_TLB_FLUSH: u32 = 1 << 9;
const KVM_FEATURE_MSI_EXT_DEST_ID: u32 = 1 << 15;

/// Rewrites `cpuid` (from KVM_GET_SUPPORTED_CPUID) for vCPU `index` of
/// `count` vCPUs.
pub fn filter_cpuid(cpuid: &mut CpuId, index: u8, count: u8) {
    for e in cpuid.as_mut_slice().iter_mut() {
        match (e.function, e.index) {
            (1, _) => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(count) << 16) | (u32::from(index) << 24);
                e.ecx &= !(L1_ECX_CX16
                    | L1_ECX_PCID
                    | L1_ECX_POPCNT
                    | L1_ECX_XSAVE
                    | L1_ECX_OSXSAVE
                    | L1_ECX_AVX
                    | L1_ECX_F16C
                    | L1_ECX_FMA
                    | L1_ECX_MOVBE
                    | L1_ECX_AES
                    | L1_ECX_PCLMUL
                    | L1_ECX_X2APIC);
                e.ecx |= L1_ECX_HYPERVISOR | L1_ECX_TSC_DEADLINE;
                if count > 1 {
                    e.edx |= L1_EDX_HTT;
                }
            }
            (4, _) => {
                // Cores per package in EAX[31:26] (minus one); keep caches shared.
                e.eax &= 0x03ff_ffff;
                e.eax |= (u32::from(count.saturating_sub(1)) & 0x3f) << 26;
            }
            (7, 0) => {
                e.ebx &= !(L7_EBX_FSGSBASE
                    | L7_EBX_AVX2
                    | L7_EBX_ERMS
                    | L7_EBX_INVPCID
                    | L7_EBX_RTM
                    | L7_EBX_HLE
                    | L7_EBX_AVX512_MASK
                    | L7_EBX_SMAP
                    | L7_EBX_CLFLUSHOPT
                    | L7_EBX_CLWB);
                e.ecx &= !(L7_ECX_PKU | L7_ECX_OSPKE | L7_ECX_UMIP | L7_ECX_LA57 | L7_ECX_RDPID | L7_ECX_VAES_ETC);
                e.edx &= !(L7_EDX_FSRM | L7_EDX_AVX512_ETC);
            }
            (7, _) => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            (0xb, _) | (0x1f, _) => {
                e.edx = u32::from(index);
            }
            (0xd, _) => {
                // XSAVE is hidden: no state components.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            (0x4000_0001, _) => {
                e.eax &= !(KVM_FEATURE_PV_UNHALT
                    | KVM_FEATURE_PV_SEND_IPI
                    | KVM_FEATURE_PV_SCHED_YIELD
                    | KVM_FEATURE_ASYNC_PF
                    | KVM_FEATURE_ASYNC_PF_INT
                    | KVM_FEATURE_ASYNC_PF_VMEXIT
                    | KVM_FEATURE_PV_TLB_FLUSH
                    | KVM_FEATURE_MSI_EXT_DEST_ID);
            }
            (0x8000_0001, _) => {
                e.edx &= !LX1_EDX_RDTSCP;
                e.ecx &= !LX1_ECX_ABM;
            }
            _ => {}
        }
    }
}
