//! Legacy PIO devices: the 8250 console UART (vm-superio), a minimal i8042
//! whose reset command ends the VM, and a CMOS RTC that tells the host time.
//! Everything else on the port bus reads as all-ones (absent hardware).

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

pub const SERIAL_PORT_BASE: u16 = 0x3f8;
pub const SERIAL_PORT_END: u16 = 0x3ff;
pub const SERIAL_IRQ: u32 = 4;
const I8042_DATA: u16 = 0x60;
const I8042_CMD: u16 = 0x64;
const I8042_CMD_RESET: u8 = 0xfe;
const CMOS_INDEX: u16 = 0x70;
const CMOS_DATA: u16 = 0x71;

/// Raises the UART interrupt through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Where console output goes. Also watches for a kernel panic so the VMM can
/// report it (the guest reboots on panic with `panic=-1`).
pub struct ConsoleOut {
    out: Box<dyn Write + Send>,
    tail: Vec<u8>,
    pub panicked: Arc<AtomicBool>,
    /// Bytes handed to `out` so far. Every byte is written and flushed on
    /// the vCPU thread before its port-I/O exit returns, so once every vCPU
    /// is paused this count is final: a reader that has seen this many bytes
    /// has seen everything the guest printed.
    pub written: Arc<AtomicU64>,
}

impl ConsoleOut {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        ConsoleOut {
            out,
            tail: Vec::with_capacity(256),
            panicked: Arc::new(AtomicBool::new(false)),
            written: Arc::new(AtomicU64::new(0)),
        }
    }
}

const PANIC_MARK: &[u8] = b"Kernel panic - not syncing";

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for b in buf {
            if *b == b'\n' {
                self.tail.clear();
            } else if self.tail.len() < 256 {
                self.tail.push(*b);
                if self.tail.ends_with(PANIC_MARK) {
                    self.panicked.store(true, Ordering::SeqCst);
                }
            }
        }
        self.out.write_all(buf)?;
        self.out.flush()?;
        self.written.fetch_add(buf.len() as u64, Ordering::SeqCst);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// The console UART plus the host input not yet taken by the guest.
pub struct SerialConsole {
    pub serial: Serial<IrqTrigger, NoEvents, ConsoleOut>,
    pending: VecDeque<u8>,
}

impl SerialConsole {
    pub fn new(irq: EventFd, out: ConsoleOut) -> Self {
        SerialConsole { serial: Serial::new(IrqTrigger(irq), out), pending: VecDeque::new() }
    }

    pub fn from_state(state: &SerialState, irq: EventFd, out: ConsoleOut) -> Result<Self, String> {
        let serial = Serial::from_state(state, IrqTrigger(irq), NoEvents, out).map_err(|e| format!("{e:?}"))?;
        Ok(SerialConsole { serial, pending: VecDeque::new() })
    }

    /// Queues host bytes for the guest and moves what fits into the FIFO.
    pub fn queue_input(&mut self, bytes: &[u8]) {
        self.pending.extend(bytes);
        self.flush_input();
    }

    fn flush_input(&mut self) {
        while !self.pending.is_empty() {
            let room = self.serial.fifo_capacity();
            if room == 0 {
                break;
            }
            let n = room.min(self.pending.len());
            let chunk: Vec<u8> = self.pending.iter().take(n).copied().collect();
            match self.serial.enqueue_raw_bytes(&chunk) {
                Ok(w) => {
                    self.pending.drain(..w);
                    if w == 0 {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
    }

    pub fn read(&mut self, offset: u8) -> u8 {
        let v = self.serial.read(offset);
        if offset == 0 {
            self.flush_input();
        }
        v
    }

    pub fn write(&mut self, offset: u8, value: u8) {
        // A failed write to the host console loses the byte, as on hardware.
        let _ = self.serial.write(offset, value);
    }
}

/// Outcome of a port write that the VM loop must act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PioAction {
    None,
    /// The guest asked for a reset (i8042 0xFE): the VM ends, status 0.
    Reset,
}

/// The legacy port bus.
pub struct PioBus {
    pub console: SerialConsole,
    cmos_index: u8,
}

impl PioBus {
    pub fn new(console: SerialConsole) -> Self {
        PioBus { console, cmos_index: 0 }
    }

    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        let v = match port {
            SERIAL_PORT_BASE..=SERIAL_PORT_END => self.console.read((port - SERIAL_PORT_BASE) as u8),
            I8042_CMD => 0, // output buffer empty, input buffer empty
            I8042_DATA => 0,
            CMOS_DATA => cmos_read(self.cmos_index),
            _ => 0xff,
        };
        data.fill(0xff);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    pub fn write(&mut self, port: u16, data: &[u8]) -> PioAction {
        let v = data.first().copied().unwrap_or(0);
        match port {
            SERIAL_PORT_BASE..=SERIAL_PORT_END => self.console.write((port - SERIAL_PORT_BASE) as u8, v),
            I8042_CMD if v == I8042_CMD_RESET => return PioAction::Reset,
            CMOS_INDEX => self.cmos_index = v & 0x7f,
            _ => {}
        }
        PioAction::None
    }
}

fn bcd(v: u32) -> u8 {
    (((v / 10) % 10) << 4 | (v % 10)) as u8
}

/// CMOS RTC registers from the host's UTC clock (BCD, 24h).
fn cmos_read(index: u8) -> u8 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = secs / 86400;
    let rem = secs % 86400;
    let (y, m, d) = civil_from_days(days as i64);
    match index {
        0x00 => bcd((rem % 60) as u32),
        0x02 => bcd(((rem / 60) % 60) as u32),
        0x04 => bcd((rem / 3600) as u32),
        0x06 => bcd(((days + 4) % 7 + 1) as u32),
        0x07 => bcd(d),
        0x08 => bcd(m),
        0x09 => bcd((y % 100) as u32),
        0x32 => bcd((y / 100) as u32),
        0x0a => 0x26, // UIP clear
        0x0b => 0x02, // 24h, BCD
        0x0d => 0x80, // battery ok
        _ => 0,
    }
}

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Serializable copy of the UART registers for snapshots.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<&SerialState> for SerialSnapshot {
    fn from(s: &SerialState) -> Self {
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl From<&SerialSnapshot> for SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
    }

    #[test]
    fn reset_and_unknown_ports() {
        let out = ConsoleOut::new(Box::new(std::io::sink()));
        let mut bus = PioBus::new(SerialConsole::new(EventFd::new(0).unwrap(), out));
        assert_eq!(bus.write(0x64, &[0xfe]), PioAction::Reset);
        assert_eq!(bus.write(0x64, &[0xd1]), PioAction::None);
        let mut d = [0u8; 2];
        bus.read(0x1234, &mut d);
        assert_eq!(d, [0xff, 0xff]);
    }

    #[test]
    fn console_input_beyond_fifo_is_kept() {
        let out = ConsoleOut::new(Box::new(std::io::sink()));
        let mut c = SerialConsole::new(EventFd::new(0).unwrap(), out);
        let input: Vec<u8> = (0..200u8).collect();
        c.queue_input(&input);
        let mut got = Vec::new();
        for _ in 0..200 {
            got.push(c.read(0));
        }
        assert_eq!(got, input);
    }

    #[test]
    fn panic_is_detected() {
        let mut o = ConsoleOut::new(Box::new(std::io::sink()));
        let flag = o.panicked.clone();
        o.write_all(b"[ 1.0] Kernel panic - not syncing: VFS\n").unwrap();
        assert!(flag.load(Ordering::SeqCst));
    }
}
