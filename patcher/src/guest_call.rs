//! Running guest kernel functions from outside, in process context.
//!
//! There is no agent in the guest. With every vCPU stopped, hyperpatch
//! writes a call slot into the reserved region: the function and its
//! arguments, a `struct irq_work` and a `struct work_struct` (layouts from
//! the guest's BTF), and two small routines of its own (written once):
//!
//! - `irq_fn(struct irq_work *)` runs in hard-IRQ context and queues the
//!   slot's work on `system_unbound_wq` (`queue_work_on`, which is
//!   IRQ-safe), so any CPU not busy in the kernel may run it;
//! - `work_fn(struct work_struct *)` runs in a kworker, in process context,
//!   calls the function with its six arguments, stores the result and then
//!   the slot's state `DONE`, and returns.
//!
//! The slot's irq_work is pushed onto boot CPU 0's per-CPU `raised_list` (a
//! lockless llist: a vCPU stopped inside `llist_add` fails its cmpxchg and
//! retries; `llist_del_all` is one xchg) with the flags `irq_work_claim`
//! gives it, and the VMM then sends CPU 0 the guest's own irq_work vector
//! (found in the guest's IDT as the gate of `asm_sysvec_irq_work`) as an
//! MSI. The guest's interrupt entry does the rest, as for its own irq_work
//! (`irq_enter`, RCU watching, even from the idle loop). So a call works on
//! an idle guest, where every vCPU halts, and on a busy one.
//!
//! Safety:
//! - Nothing of the guest is changed but the list head of one llist,
//!   written as one aligned 8-byte store while every vCPU is stopped.
//! - The called function runs where kernel code normally runs (a kworker),
//!   so it may sleep, allocate with GFP_KERNEL and take mutexes.
//! - `DONE` is the routine's last access to its slot; after it the kworker
//!   runs only the routine's fixed epilogue, which is never rewritten.
//!   `process_one_work` does not touch a work item after its function
//!   returns, and `irq_work_single` touches the irq_work only until it
//!   clears `IRQ_WORK_BUSY`: a slot is reused only when its state is `DONE`
//!   and its irq_work's flags are clear.
//! - A call that does not finish in time is reported as timed out. Its slot
//!   is never reused and the routines are never freed: the kworker may
//!   still return into them.
//! - A `work_struct` whose `data` is 0 is what `INIT_WORK` gives but for
//!   the "no pool" marker: no flag set, and pool 0 (which always exists) as
//!   the pool it last ran on, which `__queue_work` only consults to find a
//!   worker still running this very item. So no flag value is guessed.

use serde::{Deserialize, Serialize};

use introspect::kernel::Kernel;
use introspect::orc::{orc_reg, orc_type, OrcEntry};
use introspect::translate::KernelMemory;

use crate::error::{PatchError, Result};
use crate::guest::GuestWriter;
use crate::placement::{Allocation, AreaKind, Region};

/// Call slots; a slot whose call timed out is never reused.
pub const SLOTS: usize = 16;
const SLOT_SIZE: u64 = 512;
/// Room for the routines: 6.12's (endbr64 entries, return thunks, module
/// traps behind sealed entries) take a little over 512 bytes.
const ROUTINES_SIZE: u64 = 1024;
const STATE_QUEUED: u32 = 1;
const STATE_DONE: u32 = 2;
/// Offsets in hyperpatch's own slot header.
const OFF_STATE: u64 = 0;
const OFF_FN: u64 = 8;
const OFF_ARGS: u64 = 16;
const OFF_RESULT: u64 = 64;
const OFF_IRQ_WORK: u64 = 128;
/// String arguments live here, NUL-terminated.
const OFF_SCRATCH: u64 = 320;
/// After the slots: the `klp_enable_patch` hook's call count, argument,
/// whether its first call waits for the host's verdict, the verdict's
/// presence and value.
const HOOK_COUNT: u64 = SLOT_SIZE * SLOTS as u64;
const HOOK_PTR: u64 = HOOK_COUNT + 8;
const HOOK_WAITING: u64 = HOOK_COUNT + 16;
const HOOK_READY: u64 = HOOK_COUNT + 20;
const HOOK_VERDICT: u64 = HOOK_COUNT + 24;
/// Module events (a module coming or going, caught at the guest's
/// `klp_module_coming`/`klp_module_going`): a lock, whether a task waits for
/// the host, the host's answer being there, the answer, the event's kind and
/// its `struct module`.
const EV_BUSY: u64 = HOOK_COUNT + 64;
const EV_WAITING: u64 = EV_BUSY + 4;
const EV_READY: u64 = EV_BUSY + 8;
const EV_VERDICT: u64 = EV_BUSY + 12;
const EV_KIND: u64 = EV_BUSY + 16;
const EV_MOD: u64 = EV_BUSY + 24;
/// hyperpatch's `klp_get_prev_state()` answers from this table of
/// (id, struct klp_state *) pairs, ended by id 0, which the host writes
/// before a patch's callbacks run.
const PREV_STATES: u64 = HOOK_COUNT + 128;
/// Most states the table holds.
pub const MAX_PREV_STATES: usize = 32;
const DATA_SIZE: u64 = PREV_STATES + 16 * (MAX_PREV_STATES as u64 + 1);
/// `EV_KIND` values.
pub const EVENT_COMING: u32 = 1;
pub const EVENT_GOING: u32 = 2;
/// `-EBUSY` (errno values are the kernel's ABI), what the hook returns to a
/// second `klp_enable_patch()`.
const EBUSY: i32 = 16;

/// One argument of a guest call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CallArg {
    /// Passed as is (integers, pointers).
    Value(u64),
    /// Copied into the call's slot with a NUL; its address is passed.
    Str(String),
}

/// Why a guest call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("guest call of {func:#x} did not finish within {secs} s (its slot {slot} stays reserved: the kworker may still return into it)")]
    TimedOut { func: u64, secs: f64, slot: usize },
    #[error("all {0} guest-call slots are busy or lost to calls that never returned")]
    NoSlot(usize),
    #[error("the guest has no irq_work interrupt: no IDT gate points at asm_sysvec_irq_work")]
    NoIrqWorkVector,
    #[error("guest-call layout: {0}")]
    Layout(String),
    #[error("a guest call takes at most 6 arguments, not {0}")]
    TooManyArgs(usize),
    #[error("string arguments of a guest call take at most {max} bytes with their NULs, not {len}")]
    ArgsTooLong { len: usize, max: u64 },
}

/// What the guest's BTF and kallsyms give for the routines.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct Layout {
    /// `irq_work.node.llist`, `irq_work.node.a_flags`, `irq_work.func`.
    irq_llist: u64,
    irq_flags: u64,
    irq_func: u64,
    /// `IRQ_WORK_CLAIMED` (`IRQ_WORK_PENDING | IRQ_WORK_BUSY`).
    claimed: u32,
    /// `IRQ_WORK_PENDING | IRQ_WORK_BUSY`, the bits that mean "in use".
    busy_bits: u32,
    work_data: u64,
    work_entry: u64,
    work_func: u64,
    /// Offset of the work_struct in a slot.
    work_off: u64,
}

/// One call slot's host-side state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SlotState {
    Free,
    Busy,
    /// Timed out: the kworker may still be in the called function.
    Lost,
}

/// The routines and slots, placed once per guest; never freed once a call
/// has been made (a lost call may still return into them).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CallEngine {
    text: Allocation,
    data: Allocation,
    layout: Layout,
    irq_fn: u64,
    work_fn: u64,
    /// hyperpatch's `klp_enable_patch()`: records its argument for the host.
    pub hook_fn: u64,
    /// hyperpatch's `klp_get_prev_state()`.
    #[serde(default)]
    pub prev_state_fn: u64,
    /// Where a task entering the guest's `klp_module_coming` or
    /// `klp_module_going` is sent (a trap redirects it): it reports the
    /// module to the host, sleeps until the host has patched or unpatched
    /// it, then continues into the original function (`coming` may return
    /// the host's error instead). (trap address, redirect) pairs.
    #[serde(default)]
    pub module_traps: Vec<(u64, u64)>,
    /// Why module loads and unloads cannot be followed, if they cannot.
    #[serde(default)]
    pub module_traps_missing: Option<String>,
    /// IDT vector of the guest's irq_work interrupt.
    pub vector: u8,
    /// CPU 0's `raised_list`.
    raised_list: u64,
    slots: Vec<SlotState>,
    /// ORC entries of the routines: (ips, entries), so a kworker inside a
    /// call unwinds reliably.
    pub orc: (Vec<u64>, Vec<OrcEntry>),
}

/// A call in flight.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct CallTicket {
    pub slot: usize,
    pub func: u64,
    /// Guest-virtual address of the slot (for reading state and result).
    pub slot_virt: u64,
    pub slot_phys: crate::addr::GuestPhys,
}

fn lerr(e: impl std::fmt::Display) -> PatchError {
    PatchError::Call(CallError::Layout(e.to_string()))
}

fn rel32(from_end: u64, to: u64) -> Result<[u8; 4]> {
    let d = i128::from(to) - i128::from(from_end);
    i32::try_from(d).map(i32::to_le_bytes).map_err(|_| lerr(format!("{to:#x} is out of rel32 reach of {from_end:#x}")))
}

/// The rel8 byte of a short jump ending at `end` back to `to` (kernel
/// addresses: the difference, not the addresses, must fit).
fn short_back(to: u64, end: u64) -> Result<u8> {
    let d = to.wrapping_sub(end) as i64;
    i8::try_from(d).map(|x| x as u8).map_err(|_| lerr(format!("short jump of {d} bytes")))
}

fn disp32(v: i64) -> Result<[u8; 4]> {
    i32::try_from(v).map(i32::to_le_bytes).map_err(|_| lerr(format!("displacement {v} does not fit 32 bits")))
}

/// Small assembler for the routines: addresses are final.
struct Code {
    base: u64,
    b: Vec<u8>,
}

impl Code {
    fn at(&self) -> u64 {
        self.base + self.b.len() as u64
    }
    fn bytes(&mut self, x: &[u8]) {
        self.b.extend_from_slice(x);
    }
    /// `op rel32` whose target is `to` (call e8, jmp e9).
    fn rel(&mut self, op: &[u8], to: u64) -> Result<()> {
        let end = self.at() + op.len() as u64 + 4;
        self.bytes(op);
        let r = rel32(end, to)?;
        self.bytes(&r);
        Ok(())
    }
    /// `op [rip + rel32]` addressing `to`, with `tail` immediate bytes after.
    fn riprel(&mut self, op: &[u8], to: u64, tail: &[u8]) -> Result<()> {
        let end = self.at() + op.len() as u64 + 4 + tail.len() as u64;
        self.bytes(op);
        let r = rel32(end, to)?;
        self.bytes(&r);
        self.bytes(tail);
        Ok(())
    }
    /// `op disp32` after a ModRM that takes one.
    fn disp(&mut self, op: &[u8], d: i64) -> Result<()> {
        self.bytes(op);
        let d = disp32(d)?;
        self.bytes(&d);
        Ok(())
    }
}

/// How the guest's own compiled code enters, returns and calls through a
/// register: with IBT every indirect-call target starts with ENDBR64, with
/// return thunks every `ret` is a jump to `__x86_return_thunk`, with
/// retpolines an indirect call goes through `__x86_indirect_thunk_rax`.
struct CodeStyle {
    endbr: bool,
    return_thunk: Option<u64>,
    indirect_thunk: Option<u64>,
}

const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];

impl CodeStyle {
    fn of(k: &Kernel<'_>) -> Result<CodeStyle> {
        let q = k.sym("queue_work_on")?;
        let mut first = [0u8; 4];
        k.mem.read_virt(q, &mut first)?;
        Ok(CodeStyle {
            endbr: first == ENDBR64,
            return_thunk: k.syms.address_of("__x86_return_thunk", 0).ok(),
            indirect_thunk: k.syms.address_of("__x86_indirect_thunk_rax", 0).ok(),
        })
    }
    fn entry(&self, c: &mut Code) {
        if self.endbr {
            c.bytes(&ENDBR64);
        }
    }
    fn ret(&self, c: &mut Code) -> Result<()> {
        match self.return_thunk {
            Some(t) => c.rel(&[0xe9], t),
            None => {
                c.bytes(&[0xc3]);
                Ok(())
            }
        }
    }
    fn call_rax(&self, c: &mut Code) -> Result<()> {
        match self.indirect_thunk {
            Some(t) => c.rel(&[0xe8], t),
            None => {
                c.bytes(&[0xff, 0xd0]);
                Ok(())
            }
        }
    }
}

/// `prev_state(unsigned long id)`: looks `id` up in the (id, pointer)
/// table at `table` (ended by id 0); the pointer, or NULL.
fn emit_prev_state(c: &mut Code, style: &CodeStyle, table: u64) -> Result<()> {
    style.entry(c);
    c.riprel(&[0x48, 0x8d, 0x05], table, &[])?; // lea rax, [rip + table]
    let top = c.at();
    let ret_len: u8 = if style.return_thunk.is_some() { 5 } else { 1 };
    c.bytes(&[0x48, 0x8b, 0x10]); // mov rdx, [rax]
    c.bytes(&[0x48, 0x85, 0xd2]); // test rdx, rdx
    // jz none: past cmp (3), je (2), add (4), jmp (2), mov (4), ret.
    c.bytes(&[0x74, 15 + ret_len]);
    c.bytes(&[0x48, 0x39, 0xfa]); // cmp rdx, rdi
    c.bytes(&[0x74, 0x06]); // je found: past add (4), jmp (2)
    c.bytes(&[0x48, 0x83, 0xc0, 0x10]); // add rax, 16
    c.bytes(&[0xeb, short_back(top, c.at() + 2)?]); // jmp top
    c.bytes(&[0x48, 0x8b, 0x40, 0x08]); // found: mov rax, [rax + 8]
    style.ret(c)?;
    c.bytes(&[0x31, 0xc0]); // none: xor eax, eax
    style.ret(c)
}

fn orc(sp_offset: i16) -> OrcEntry {
    OrcEntry { sp_offset, bp_offset: 0, sp_reg: orc_reg::SP, bp_reg: orc_reg::UNDEFINED, kind: orc_type::CALL, end: false, signal: false }
}

impl CallEngine {
    /// Places the routines and slots in `region` and writes the routines.
    /// The region must be mapped.
    pub fn place(k: &Kernel<'_>, w: &dyn GuestWriter, region: &mut Region) -> Result<CallEngine> {
        let layout = Self::layout(k)?;
        let vector = Self::irq_work_vector(k)?;
        let raised_list = k.per_cpu("raised_list", 0)?;
        let text = region.alloc(AreaKind::Text, ROUTINES_SIZE, 64)?;
        let data = match region.alloc(AreaKind::Data, DATA_SIZE, 64) {
            Ok(d) => d,
            Err(e) => {
                region.free(&text);
                return Err(e);
            }
        };
        let r = Self::write_code(k, w, &text, &data, layout);
        let (code, [irq_fn, work_fn, hook_fn, prev_state_fn], module_traps, module_traps_missing, orc) = match r {
            Ok(x) => x,
            Err(e) => {
                region.free(&text);
                region.free(&data);
                return Err(e);
            }
        };
        let zero = vec![0u8; DATA_SIZE as usize];
        if let Err(e) = w.write_phys(text.phys, &code).and_then(|()| w.write_phys(data.phys, &zero)) {
            region.free(&text);
            region.free(&data);
            return Err(e);
        }
        Ok(CallEngine { text, data, layout, irq_fn, work_fn, hook_fn, prev_state_fn, module_traps, module_traps_missing, vector, raised_list, slots: vec![SlotState::Free; SLOTS], orc })
    }

    /// The allocations the engine holds (never freed).
    pub fn allocations(&self) -> [Allocation; 2] {
        [self.text, self.data]
    }

    /// Text range of the routines.
    pub fn text_range(&self) -> (u64, u64) {
        (self.text.virt, self.text.virt + self.text.size)
    }

    fn layout(k: &Kernel<'_>) -> Result<Layout> {
        let b = &k.btf;
        let off = |s: &str, p: &str| b.member_offset(s, p).map_err(lerr);
        let en = |n: &str| -> Result<u32> {
            let v = b.enum_value(None, n).map_err(lerr)?;
            u32::try_from(v).map_err(|_| lerr(format!("{n} = {v}")))
        };
        let irq_work_size = b.struct_size("irq_work").map_err(lerr)?;
        let work_size = b.struct_size("work_struct").map_err(lerr)?;
        let work_off = (OFF_IRQ_WORK + irq_work_size).next_multiple_of(16);
        if work_off + work_size > SLOT_SIZE {
            return Err(lerr(format!("irq_work ({irq_work_size} bytes) and work_struct ({work_size}) do not fit a {SLOT_SIZE}-byte slot")));
        }
        Ok(Layout {
            irq_llist: off("irq_work", "node.llist")?,
            irq_flags: off("irq_work", "node.a_flags")?,
            irq_func: off("irq_work", "func")?,
            claimed: en("IRQ_WORK_CLAIMED")?,
            busy_bits: en("IRQ_WORK_PENDING")? | en("IRQ_WORK_BUSY")?,
            work_data: off("work_struct", "data")?,
            work_entry: off("work_struct", "entry")?,
            work_func: off("work_struct", "func")?,
            work_off,
        })
    }

    /// The IDT vector whose gate points at `asm_sysvec_irq_work`.
    fn irq_work_vector(k: &Kernel<'_>) -> Result<u8> {
        let handler = k.sym("asm_sysvec_irq_work")?;
        let idt = k.sym("idt_table")?;
        let mut table = vec![0u8; 256 * 16];
        k.mem.read_virt(idt, &mut table)?;
        for (v, gate) in table.chunks_exact(16).enumerate() {
            let w = |i: usize| u64::from(u16::from_le_bytes([gate[i], gate[i + 1]]));
            let high = u64::from(u32::from_le_bytes([gate[8], gate[9], gate[10], gate[11]]));
            let present = gate[5] & 0x80 != 0;
            let target = w(0) | (w(6) << 16) | (high << 32);
            if present && target == handler {
                return u8::try_from(v).map_err(|_| PatchError::Call(CallError::NoIrqWorkVector));
            }
        }
        Err(PatchError::Call(CallError::NoIrqWorkVector))
    }

    /// The routines at `text`; their addresses (irq_fn, work_fn, hook) and
    /// ORC entries.
    #[allow(clippy::type_complexity)]
    fn write_code(
        k: &Kernel<'_>,
        _w: &dyn GuestWriter,
        text: &Allocation,
        data: &Allocation,
        l: Layout,
    ) -> Result<(Vec<u8>, [u64; 4], Vec<(u64, u64)>, Option<String>, (Vec<u64>, Vec<OrcEntry>))> {
        let style = CodeStyle::of(k)?;
        let queue_work_on = k.sym("queue_work_on")?;
        let system_wq = k.sym("system_unbound_wq")?;
        let unbound = k.btf.enum_value(None, "WORK_CPU_UNBOUND").map_err(lerr)?;
        let unbound = u32::try_from(unbound).map_err(|_| lerr("WORK_CPU_UNBOUND"))?;
        let mut c = Code { base: text.virt, b: Vec::new() };
        let (mut ips, mut entries) = (Vec::new(), Vec::new());

        // irq_fn(struct irq_work *work): queue_work_on(UNBOUND, system_unbound_wq, slot work)
        let irq_fn = c.at();
        ips.push(irq_fn);
        entries.push(orc(8));
        style.entry(&mut c);
        let to_work = l.work_off as i64 - (OFF_IRQ_WORK as i64);
        c.disp(&[0x48, 0x8d, 0x97], to_work)?; // lea rdx, [rdi + disp32]
        c.riprel(&[0x48, 0x8b, 0x35], system_wq, &[])?; // mov rsi, [rip + system_unbound_wq]
        c.bytes(&[0xbf]); // mov edi, imm32
        c.bytes(&unbound.to_le_bytes());
        c.rel(&[0xe8], queue_work_on)?; // call queue_work_on
        style.ret(&mut c)?;
        while !c.b.len().is_multiple_of(16) {
            c.bytes(&[0xcc]);
        }

        // work_fn(struct work_struct *work): state = DONE after result = fn(args)
        let work_fn = c.at();
        ips.push(work_fn);
        entries.push(orc(8));
        style.entry(&mut c);
        c.bytes(&[0x53]); // push rbx
        ips.push(c.at());
        entries.push(orc(16));
        c.disp(&[0x48, 0x8d, 0x9f], -(l.work_off as i64))?; // lea rbx, [rdi - work_off]
        c.disp(&[0x48, 0x8b, 0x83], OFF_FN as i64)?; // mov rax, [rbx + fn]
        for (i, op) in [[0x48, 0x8b, 0xbb], [0x48, 0x8b, 0xb3], [0x48, 0x8b, 0x93], [0x48, 0x8b, 0x8b], [0x4c, 0x8b, 0x83], [0x4c, 0x8b, 0x8b]]
            .iter()
            .enumerate()
        {
            c.disp(op, (OFF_ARGS + 8 * i as u64) as i64)?; // mov rdi/rsi/rdx/rcx/r8/r9, [rbx + arg i]
        }
        style.call_rax(&mut c)?;
        c.disp(&[0x48, 0x89, 0x83], OFF_RESULT as i64)?; // mov [rbx + result], rax
        c.disp(&[0xc7, 0x83], OFF_STATE as i64)?; // mov dword [rbx + state], DONE
        c.bytes(&STATE_DONE.to_le_bytes());
        c.bytes(&[0x5b]); // pop rbx
        ips.push(c.at());
        entries.push(orc(8));
        style.ret(&mut c)?;
        while !c.b.len().is_multiple_of(16) {
            c.bytes(&[0xcc]);
        }

        // hook(struct klp_patch *patch): the module's klp_enable_patch().
        // The first call records `patch`, then sleeps a jiffy at a time
        // until the host has checked the patch and run its pre-patch
        // callbacks, and returns the host's verdict (0 or -errno), as
        // upstream's klp_enable_patch() returns theirs. Later calls -EBUSY.
        let sleep = k.sym("schedule_timeout_uninterruptible")?;
        let hook_fn = c.at();
        ips.push(hook_fn);
        entries.push(orc(8));
        style.entry(&mut c);
        let count = data.virt + HOOK_COUNT;
        c.riprel(&[0x48, 0x8b, 0x05], count, &[])?; // mov rax, [rip + count]
        c.bytes(&[0x48, 0xff, 0xc0]); // inc rax
        c.riprel(&[0x48, 0x89, 0x05], count, &[])?; // mov [rip + count], rax
        c.bytes(&[0x48, 0x83, 0xf8, 0x01]); // cmp rax, 1
        let mut first = Code { base: c.at() + 2, b: Vec::new() };
        first.riprel(&[0x48, 0x89, 0x3d], data.virt + HOOK_PTR, &[])?; // mov [rip + ptr], rdi
        first.riprel(&[0xc7, 0x05], data.virt + HOOK_WAITING, &1u32.to_le_bytes())?; // mov dword [rip + waiting], 1
        let again = first.at();
        first.bytes(&[0xbf, 1, 0, 0, 0]); // mov edi, 1
        first.rel(&[0xe8], sleep)?; // call schedule_timeout_uninterruptible
        first.riprel(&[0x83, 0x3d], data.virt + HOOK_READY, &[0])?; // cmp dword [rip + ready], 0
        let back = short_back(again, first.at() + 2)?;
        first.bytes(&[0x74, back]); // je again
        first.riprel(&[0x8b, 0x05], data.virt + HOOK_VERDICT, &[])?; // mov eax, [rip + verdict]
        style.ret(&mut first)?;
        let skip = u8::try_from(first.b.len()).map_err(|_| lerr("hook"))?;
        c.bytes(&[0x75, skip]); // jne busy
        c.bytes(&first.b);
        c.bytes(&[0xb8]); // busy: mov eax, -EBUSY
        c.bytes(&(-EBUSY).to_le_bytes());
        style.ret(&mut c)?;

        // prev_state(unsigned long id): the module's klp_get_prev_state().
        while !c.b.len().is_multiple_of(16) {
            c.bytes(&[0xcc]);
        }
        let prev_state_fn = c.at();
        ips.push(prev_state_fn);
        entries.push(orc(8));
        emit_prev_state(&mut c, &style, data.virt + PREV_STATES)?;

        // The module-event stubs, entered in place of klp_module_coming /
        // klp_module_going (rdi = struct module *), in the task loading or
        // unloading the module (process context).
        let mut module_traps = Vec::new();
        let mut missing = None;
        // Read once, and only when an entry is sealed.
        let mut records = None;
        for (func, kind) in [("klp_module_coming", EVENT_COMING), ("klp_module_going", EVENT_GOING)] {
            let Ok(entry) = k.sym(func) else {
                missing = Some(format!("the guest has no {func}"));
                continue;
            };
            let head = k.mem.read_bytes(entry, 9)?;
            let mut skip = if head.get(..4) == Some(&ENDBR64[..]) { 4 } else { 0 };
            if head.get(skip..skip + 5) != Some(&introspect::ftrace::NOP5[..]) {
                // A sealed endbr64 (6.12 seals the ones of functions only
                // called directly with a NOP of its own): the site is where
                // the guest's ftrace record says.
                let size = k.syms.resolve(entry).filter(|s| s.addr == entry).map_or(0, |s| s.size);
                if records.is_none() {
                    records = Some(k.ftrace_records()?);
                }
                let site = records.as_ref().map_or(entry, |r| r.site_of(entry, size, &head));
                skip = usize::try_from(site - entry).unwrap_or(usize::MAX);
            }
            if head.get(skip..skip.saturating_add(5)) != Some(&introspect::ftrace::NOP5[..]) {
                // Traced or patched by the guest: its entry cannot be replayed.
                missing = Some(format!("{func} does not start with the ftrace NOP (traced or patched by the guest?)"));
                continue;
            }
            let cont = entry + skip as u64 + 5;
            while !c.b.len().is_multiple_of(16) {
                c.bytes(&[0xcc]);
            }
            let stub = c.at();
            ips.push(stub);
            entries.push(orc(8));
            c.bytes(&[0x57]); // push rdi
            ips.push(c.at());
            entries.push(orc(16));
            let acquire = c.at();
            c.bytes(&[0xb8, 1, 0, 0, 0]); // mov eax, 1
            c.riprel(&[0x87, 0x05], data.virt + EV_BUSY, &[])?; // xchg [rip + busy], eax
            c.bytes(&[0x85, 0xc0]); // test eax, eax
            let jz_at = c.b.len();
            c.bytes(&[0x74, 0]); // jz got (patched below)
            c.bytes(&[0xbf, 1, 0, 0, 0]); // mov edi, 1
            c.rel(&[0xe8], sleep)?; // call schedule_timeout_uninterruptible
            c.bytes(&[0xeb, short_back(acquire, c.at() + 2)?]); // jmp acquire
            let got = c.b.len();
            if let Some(b) = c.b.get_mut(jz_at + 1) {
                *b = u8::try_from(got - (jz_at + 2)).map_err(|_| lerr("stub"))?;
            }
            c.bytes(&[0x48, 0x8b, 0x3c, 0x24]); // mov rdi, [rsp]
            c.riprel(&[0x48, 0x89, 0x3d], data.virt + EV_MOD, &[])?; // mov [rip + mod], rdi
            c.riprel(&[0xc7, 0x05], data.virt + EV_KIND, &kind.to_le_bytes())?; // mov dword [rip + kind], kind
            c.riprel(&[0xc7, 0x05], data.virt + EV_READY, &0u32.to_le_bytes())?; // mov dword [rip + ready], 0
            c.riprel(&[0xc7, 0x05], data.virt + EV_WAITING, &1u32.to_le_bytes())?; // mov dword [rip + waiting], 1
            let wait = c.at();
            c.bytes(&[0xbf, 1, 0, 0, 0]); // mov edi, 1
            c.rel(&[0xe8], sleep)?; // call schedule_timeout_uninterruptible
            c.riprel(&[0x83, 0x3d], data.virt + EV_READY, &[0])?; // cmp dword [rip + ready], 0
            c.bytes(&[0x74, short_back(wait, c.at() + 2)?]); // je wait
            c.riprel(&[0x8b, 0x05], data.virt + EV_VERDICT, &[])?; // mov eax, [rip + verdict]
            c.riprel(&[0xc7, 0x05], data.virt + EV_WAITING, &0u32.to_le_bytes())?; // waiting = 0
            c.riprel(&[0xc7, 0x05], data.virt + EV_BUSY, &0u32.to_le_bytes())?; // busy = 0 (release)
            c.bytes(&[0x5f]); // pop rdi
            ips.push(c.at());
            entries.push(orc(8));
            if kind == EVENT_COMING {
                c.bytes(&[0x85, 0xc0]); // test eax, eax
                c.bytes(&[0x74, 0x01]); // jz continue
                c.bytes(&[0xc3]); // ret (the host's error)
            }
            c.rel(&[0xe9], cont)?; // jmp into the original, past its ftrace NOP
            module_traps.push((entry, stub));
        }
        // Past the end: no ORC (an address here is unknown).
        ips.push(c.at());
        entries.push(OrcEntry { sp_reg: orc_reg::UNDEFINED, ..orc(0) });
        if c.b.len() as u64 > text.size {
            return Err(lerr(format!("routines need {} bytes, {} allocated", c.b.len(), text.size)));
        }
        if missing.is_some() {
            module_traps.clear();
        }
        Ok((c.b, [irq_fn, work_fn, hook_fn, prev_state_fn], module_traps, missing, (ips, entries)))
    }

    fn slot_addr(&self, slot: usize) -> (u64, crate::addr::GuestPhys) {
        let off = SLOT_SIZE * slot as u64;
        (self.data.virt + off, self.data.phys + off)
    }

    /// Queues `func(args)` (every vCPU stopped). The caller then resumes the
    /// VM and sends CPU 0 the MSI for `self.vector` (APIC ID of vCPU 0).
    pub fn queue(&mut self, k: &Kernel<'_>, w: &dyn GuestWriter, func: u64, call_args: &[CallArg]) -> Result<CallTicket> {
        let l = self.layout;
        if call_args.len() > 6 {
            return Err(PatchError::Call(CallError::TooManyArgs(call_args.len())));
        }
        let strings: usize = call_args.iter().map(|a| if let CallArg::Str(s) = a { s.len() + 1 } else { 0 }).sum();
        if strings as u64 > SLOT_SIZE - OFF_SCRATCH {
            return Err(PatchError::Call(CallError::ArgsTooLong { len: strings, max: SLOT_SIZE - OFF_SCRATCH }));
        }
        // A slot is reusable when its call is done and its irq_work released.
        let mut pick = None;
        for (i, st) in self.slots.iter_mut().enumerate() {
            match st {
                SlotState::Lost => continue,
                SlotState::Free => {
                    pick = Some(i);
                    break;
                }
                SlotState::Busy => {
                    let off = SLOT_SIZE * i as u64;
                    let (va, _) = (self.data.virt + off, self.data.phys + off);
                    let state = k.mem.read_u32(va + OFF_STATE)?;
                    let flags = k.mem.read_u32(va + OFF_IRQ_WORK + l.irq_flags)?;
                    if state == STATE_DONE && flags & l.busy_bits == 0 {
                        *st = SlotState::Free;
                        pick = Some(i);
                        break;
                    }
                }
            }
        }
        let slot = pick.ok_or(PatchError::Call(CallError::NoSlot(SLOTS)))?;
        let (va, pa) = self.slot_addr(slot);
        let mut b = vec![0u8; SLOT_SIZE as usize];
        let put = |b: &mut [u8], off: u64, v: &[u8]| {
            if let Some(d) = b.get_mut(off as usize..off as usize + v.len()) {
                d.copy_from_slice(v);
            }
        };
        put(&mut b, OFF_STATE, &STATE_QUEUED.to_le_bytes());
        put(&mut b, OFF_FN, &func.to_le_bytes());
        let mut scratch = OFF_SCRATCH;
        for (i, a) in call_args.iter().enumerate() {
            let v = match a {
                CallArg::Value(v) => *v,
                CallArg::Str(s) => {
                    put(&mut b, scratch, s.as_bytes());
                    let at = va + scratch;
                    scratch += s.len() as u64 + 1;
                    at
                }
            };
            put(&mut b, OFF_ARGS + 8 * i as u64, &v.to_le_bytes());
        }
        let head = k.mem.read_u64(self.raised_list)?;
        let iw = OFF_IRQ_WORK;
        put(&mut b, iw + l.irq_llist, &head.to_le_bytes());
        put(&mut b, iw + l.irq_flags, &l.claimed.to_le_bytes());
        put(&mut b, iw + l.irq_func, &self.irq_fn.to_le_bytes());
        let wk = l.work_off;
        put(&mut b, wk + l.work_data, &0u64.to_le_bytes());
        let entry = va + wk + l.work_entry;
        put(&mut b, wk + l.work_entry, &entry.to_le_bytes());
        put(&mut b, wk + l.work_entry + 8, &entry.to_le_bytes());
        put(&mut b, wk + l.work_func, &self.work_fn.to_le_bytes());
        w.write_phys(pa, &b)?;
        // Publish: one aligned 8-byte store of the list head.
        let node = va + iw + l.irq_llist;
        let head_pa = crate::addr::GuestPhys(k.mem.translate(self.raised_list)?);
        w.write_phys(head_pa, &node.to_le_bytes())?;
        if let Some(s) = self.slots.get_mut(slot) {
            *s = SlotState::Busy;
        }
        Ok(CallTicket { slot, func, slot_virt: va, slot_phys: pa })
    }

    /// Reads a call's result from guest-physical memory: `Some` once done.
    pub fn poll(phys: &dyn introspect::PhysMem, t: &CallTicket) -> Result<Option<i64>> {
        let mut st = [0u8; 4];
        phys.read_phys((t.slot_phys + OFF_STATE).0, &mut st)?;
        if u32::from_le_bytes(st) != STATE_DONE {
            return Ok(None);
        }
        let mut r = [0u8; 8];
        phys.read_phys((t.slot_phys + OFF_RESULT).0, &mut r)?;
        Ok(Some(i64::from_le_bytes(r)))
    }

    /// A call did not finish in time: its slot is never used again.
    pub fn lose(&mut self, t: &CallTicket) {
        if let Some(s) = self.slots.get_mut(t.slot) {
            *s = SlotState::Lost;
        }
    }

    /// A call timed out and its slot is lost: the routines stay for good.
    pub fn any_lost(&self) -> bool {
        self.slots.iter().any(|s| matches!(s, SlotState::Lost))
    }

    /// No call is running or lost, and every slot's irq_work is released.
    pub fn idle(&self, k: &Kernel<'_>) -> Result<bool> {
        for (i, st) in self.slots.iter().enumerate() {
            match st {
                SlotState::Free => {}
                SlotState::Lost => return Ok(false),
                SlotState::Busy => {
                    let (va, _) = self.slot_addr(i);
                    let state = k.mem.read_u32(va + OFF_STATE)?;
                    let flags = k.mem.read_u32(va + OFF_IRQ_WORK + self.layout.irq_flags)?;
                    if state != STATE_DONE || flags & self.layout.busy_bits != 0 {
                        return Ok(false);
                    }
                }
            }
        }
        Ok(true)
    }

    /// Clears the `klp_enable_patch` hook's record before a module's init.
    pub fn reset_hook(&self, w: &dyn GuestWriter) -> Result<()> {
        w.write_phys(self.data.phys + HOOK_COUNT, &[0u8; 32])
    }

    /// How often the hook was called since the reset, and its first argument.
    pub fn hook_record(&self, k: &Kernel<'_>) -> Result<(u64, u64)> {
        let count = k.mem.read_u64(self.data.virt + HOOK_COUNT)?;
        let ptr = k.mem.read_u64(self.data.virt + HOOK_PTR)?;
        Ok((count, ptr))
    }

    /// The hook's first call waits for a verdict (read without stopping
    /// the guest): the guest-physical address of its flag.
    pub fn hook_waiting_phys(&self) -> crate::addr::GuestPhys {
        self.data.phys + HOOK_WAITING
    }

    /// Gives the waiting hook its return value (0 or -errno).
    pub fn hook_verdict(&self, w: &dyn GuestWriter, ret: i32) -> Result<()> {
        w.write_phys(self.data.phys + HOOK_VERDICT, &ret.to_le_bytes())?;
        w.write_phys(self.data.phys + HOOK_READY, &1u32.to_le_bytes())
    }

    /// A module event waiting for the host, read without stopping the
    /// guest: (kind, struct module address), when one waits unanswered.
    pub fn pending_event(&self, phys: &dyn introspect::PhysMem) -> Result<Option<(u32, u64)>> {
        let mut b = [0u8; 32];
        phys.read_phys((self.data.phys + EV_BUSY).0, &mut b)?;
        let u = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let (waiting, ready, kind) = (u(4), u(8), u(16));
        if waiting != 1 || ready != 0 {
            return Ok(None);
        }
        let m = u64::from_le_bytes([b[24], b[25], b[26], b[27], b[28], b[29], b[30], b[31]]);
        Ok(Some((kind, m)))
    }

    /// Answers the waiting module event (0, or -errno to fail a load).
    pub fn answer_event(&self, w: &dyn GuestWriter, ret: i32) -> Result<()> {
        w.write_phys(self.data.phys + EV_VERDICT, &ret.to_le_bytes())?;
        w.write_phys(self.data.phys + EV_READY, &1u32.to_le_bytes())
    }

    /// Whether a task is inside a module-event stub (waiting or leaving).
    pub fn event_busy(&self, k: &Kernel<'_>) -> Result<bool> {
        Ok(k.mem.read_u32(self.data.virt + EV_BUSY)? != 0)
    }

    /// Writes the table `klp_get_prev_state()` answers from.
    pub fn set_prev_states(&self, w: &dyn GuestWriter, states: &[(u64, u64)]) -> Result<()> {
        let mut b = vec![0u8; 16 * (MAX_PREV_STATES + 1)];
        for (i, (id, ptr)) in states.iter().take(MAX_PREV_STATES).enumerate() {
            b[i * 16..i * 16 + 8].copy_from_slice(&id.to_le_bytes());
            b[i * 16 + 8..i * 16 + 16].copy_from_slice(&ptr.to_le_bytes());
        }
        w.write_phys(self.data.phys + PREV_STATES, &b)
    }

    /// Slots by state.
    pub fn slot_states(&self) -> &[SlotState] {
        &self.slots
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Mnemonic};

    #[test]
    fn assembler_encodes_rip_relative_and_calls() {
        let mut c = Code { base: 0xffff_ffff_bf00_0000, b: Vec::new() };
        c.riprel(&[0x48, 0x8b, 0x35], 0xffff_ffff_8200_0000, &[]).unwrap();
        c.rel(&[0xe8], 0xffff_ffff_8100_0000).unwrap();
        c.disp(&[0x48, 0x8d, 0x9f], -288).unwrap();
        let mut d = Decoder::with_ip(64, &c.b, c.base, DecoderOptions::NONE);
        let mov = d.decode();
        assert_eq!(mov.mnemonic(), Mnemonic::Mov);
        assert_eq!(mov.memory_displacement64(), 0xffff_ffff_8200_0000);
        let call = d.decode();
        assert_eq!(call.mnemonic(), Mnemonic::Call);
        assert_eq!(call.near_branch_target(), 0xffff_ffff_8100_0000);
        let lea = d.decode();
        assert_eq!(lea.mnemonic(), Mnemonic::Lea);
        assert_eq!(lea.memory_displacement64() as i64, -288);
        assert!(rel32(0, 1 << 40).is_err());
    }
}

#[cfg(test)]
mod prev_state_tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Mnemonic};

    /// The generated prev_state routine's branches land on `found` and
    /// `none`, with plain returns and with return thunks.
    #[test]
    fn prev_state_branches_land_on_found_and_none() {
        for thunk in [None, Some(0xffff_ffff_8100_0000u64)] {
            let style = CodeStyle { endbr: thunk.is_some(), return_thunk: thunk, indirect_thunk: None };
            let mut c = Code { base: 0xffff_ffff_bf00_0000, b: Vec::new() };
            emit_prev_state(&mut c, &style, 0xffff_ffff_bf40_0000).unwrap();
            let mut d = Decoder::with_ip(64, &c.b, c.base, DecoderOptions::NONE);
            let insns: Vec<_> = std::iter::from_fn(|| if d.can_decode() { Some(d.decode()) } else { None }).collect();
            let at = |m: Mnemonic, n: usize| insns.iter().filter(|i| i.mnemonic() == m).nth(n).copied().unwrap();
            let found = insns.iter().find(|i| i.mnemonic() == Mnemonic::Mov && i.memory_displacement64() == 8).unwrap().ip();
            let none = at(Mnemonic::Xor, 0).ip();
            assert_eq!(at(Mnemonic::Je, 0).near_branch_target(), none, "jz goes to `xor eax, eax` ({thunk:?})");
            assert_eq!(at(Mnemonic::Je, 1).near_branch_target(), found, "je goes to the found path ({thunk:?})");
            let lea = at(Mnemonic::Lea, 0);
            assert_eq!(lea.memory_displacement64(), 0xffff_ffff_bf40_0000);
            assert_eq!(at(Mnemonic::Jmp, 0).near_branch_target(), lea.next_ip(), "the loop returns to its top");
        }
    }

    #[test]
    fn short_jumps_between_kernel_addresses() {
        assert_eq!(short_back(0xffff_ffff_bf00_0010, 0xffff_ffff_bf00_0020).unwrap(), (-16i8) as u8);
        assert_eq!(short_back(0xffff_ffff_bf00_0020, 0xffff_ffff_bf00_0020).unwrap(), 0);
        assert!(short_back(0xffff_ffff_bf00_0000, 0xffff_ffff_bf00_0100).is_err());
    }
}
