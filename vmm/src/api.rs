//! The control loop: one event-manager loop on the main thread serves the
//! JSON control socket (one request per line, one reply per line), feeds the
//! console from stdin, and notices when the VM ends.
//!
//! Verbs served here: `status`, `pause`, `resume`, `shutdown`, `snapshot`.
//! Other verbs go to an [`ApiExtension`] (introspection and patching live in
//! other crates).

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use serde_json::{json, Value};

use crate::error::{Result, VmmError};
use crate::vcpu::VmExit;
use crate::vm::Vm;

/// Longest request line a client may send.
const MAX_REQUEST: usize = 1 << 20;
/// Largest `read_memory` request.
const MAX_READ: u64 = 1 << 20;
/// Most clients connected at once.
const MAX_CLIENTS: usize = 64;

/// Handles verbs this crate does not know. Returns `None` for an unknown verb.
pub trait ApiExtension {
    fn handle(&mut self, vm: &Vm, verb: &str, request: &Value) -> Option<std::result::Result<Value, String>>;
    /// Background work (a transition waiting for a safe point); returns how
    /// soon it wants to run again, `None` when idle.
    fn tick(&mut self, _vm: &Vm) -> Option<std::time::Duration> {
        None
    }
}

/// An extension that knows no verbs.
pub struct NoExtension;

impl ApiExtension for NoExtension {
    fn handle(&mut self, _: &Vm, _: &str, _: &Value) -> Option<std::result::Result<Value, String>> {
        None
    }
}

struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
}

/// Terminal settings restored when the loop ends.
struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    fn enable() -> Option<RawTerminal> {
        // SAFETY: isatty only inspects fd 0.
        if unsafe { libc::isatty(0) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it for fd 0.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointer to a termios on our stack.
        if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
            return None;
        }
        let saved = t;
        // SAFETY: cfmakeraw edits the struct in place.
        unsafe { libc::cfmakeraw(&mut t) };
        t.c_oflag |= libc::OPOST | libc::ONLCR;
        // SAFETY: valid termios for fd 0.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
        Some(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `enable` on fd 0.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.saved) };
    }
}

/// Everything the main loop owns.
pub struct Controller {
    vm: Vm,
    listener: Option<UnixListener>,
    sock_path: Option<PathBuf>,
    clients: HashMap<RawFd, Client>,
    stdin_open: bool,
    stdin_is_tty: bool,
    escape: bool,
    ext: Box<dyn ApiExtension>,
    done: Option<VmExit>,
    api_paused: bool,
}

const STDIN_FD: RawFd = 0;

impl Controller {
    /// Takes ownership of a started VM. `api_sock` is created with mode 0600.
    pub fn new(vm: Vm, api_sock: Option<&Path>, console_stdin: bool, ext: Box<dyn ApiExtension>) -> Result<Controller> {
        let listener = match api_sock {
            None => None,
            Some(p) => {
                if p.exists() {
                    // A live VM on that path answers a connect; refuse to steal it.
                    if UnixStream::connect(p).is_ok() {
                        return Err(VmmError::Config(format!("{} is in use by another VM", p.display())));
                    }
                    std::fs::remove_file(p).map_err(|source| VmmError::File { path: p.into(), source })?;
                }
                let l = UnixListener::bind(p).map_err(|source| VmmError::File { path: p.into(), source })?;
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))
                    .map_err(|source| VmmError::File { path: p.into(), source })?;
                l.set_nonblocking(true)?;
                Some(l)
            }
        };
        Ok(Controller {
            vm,
            listener,
            sock_path: api_sock.map(Path::to_path_buf),
            clients: HashMap::new(),
            stdin_open: console_stdin,
            // SAFETY: isatty only inspects fd 0.
            stdin_is_tty: console_stdin && unsafe { libc::isatty(0) } == 1,
            escape: false,
            ext,
            done: None,
            api_paused: false,
        })
    }

    /// Runs until the VM ends; returns why.
    pub fn run(self) -> Result<VmExit> {
        let raw = if self.stdin_is_tty { RawTerminal::enable() } else { None };
        let ctl = Rc::new(RefCell::new(self));
        let mut em = EventManager::<Rc<RefCell<Controller>>>::new()
            .map_err(|e| VmmError::Config(format!("event manager: {e}")))?;
        em.add_subscriber(ctl.clone());
        loop {
            let done = ctl.borrow().done.clone();
            if let Some(why) = done {
                drop(raw);
                let mut c = ctl.borrow_mut();
                c.vm.stop(why.clone());
                if let Some(p) = &c.sock_path {
                    let _ = std::fs::remove_file(p);
                }
                return Ok(c.vm.exit_reason().unwrap_or(why));
            }
            let wait_ms = {
                let mut c = ctl.borrow_mut();
                let Controller { ext, vm, .. } = &mut *c;
                ext.tick(vm).map(|d| d.as_millis().clamp(1, 500) as i32).unwrap_or(500)
            };
            if let Err(e) = em.run_with_timeout(wait_ms) {
                if !matches!(&e, event_manager::Error::Epoll(err) if err.errno() == libc::EINTR) {
                    return Err(VmmError::Config(format!("event loop: {e}")));
                }
            }
            let mut c = ctl.borrow_mut();
            if c.done.is_none() {
                if let Some(why) = c.vm.exit_reason() {
                    c.done = Some(why);
                }
            }
        }
    }

    fn on_stdin(&mut self, ops: &mut EventOps) {
        let mut buf = [0u8; 4096];
        // SAFETY: reads into a stack buffer of the given length from fd 0.
        let n = unsafe { libc::read(STDIN_FD, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            if n == 0 || std::io::Error::last_os_error().kind() != ErrorKind::Interrupted {
                let _ = ops.remove(Events::new_raw(STDIN_FD, EventSet::IN));
                self.stdin_open = false;
            }
            return;
        }
        let data = buf.get(..n as usize).unwrap_or(&[]);
        if self.stdin_is_tty {
            // Ctrl-A x ends the VM, as in qemu.
            let mut pass = Vec::with_capacity(data.len());
            for b in data {
                if self.escape {
                    self.escape = false;
                    if *b == b'x' {
                        self.done = Some(VmExit::Shutdown);
                        return;
                    }
                    pass.push(1);
                    pass.push(*b);
                } else if *b == 1 {
                    self.escape = true;
                } else {
                    pass.push(*b);
                }
            }
            self.vm.console_input(&pass);
        } else {
            self.vm.console_input(data);
        }
    }

    fn on_accept(&mut self, ops: &mut EventOps) {
        let Some(l) = &self.listener else { return };
        loop {
            match l.accept() {
                Ok((stream, _)) => {
                    if self.clients.len() >= MAX_CLIENTS {
                        let _ = (&stream).write_all(b"{\"ok\":false,\"error\":\"too many clients\"}\n");
                        continue;
                    }
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    if ops.add(Events::new_raw(fd, EventSet::IN | EventSet::READ_HANG_UP)).is_ok() {
                        self.clients.insert(fd, Client { stream, buf: Vec::new() });
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => break,
            }
        }
    }

    fn on_client(&mut self, fd: RawFd, ops: &mut EventOps) {
        let mut close = false;
        let mut lines = Vec::new();
        if let Some(c) = self.clients.get_mut(&fd) {
            let mut buf = [0u8; 8192];
            loop {
                match c.stream.read(&mut buf) {
                    Ok(0) => {
                        close = true;
                        break;
                    }
                    Ok(n) => c.buf.extend_from_slice(buf.get(..n).unwrap_or(&[])),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => {
                        close = true;
                        break;
                    }
                }
            }
            while let Some(pos) = c.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = c.buf.drain(..=pos).collect();
                lines.push(line);
            }
            if c.buf.len() > MAX_REQUEST {
                c.buf.clear();
                lines.push(Vec::new()); // answered as malformed
            }
        }
        for line in lines {
            let reply = self.handle_line(&line);
            if let Some(c) = self.clients.get_mut(&fd) {
                let mut text = reply.to_string();
                text.push('\n');
                if write_all_blocking(&mut c.stream, text.as_bytes()).is_err() {
                    close = true;
                }
            }
        }
        if close {
            if let Some(c) = self.clients.remove(&fd) {
                let _ = ops.remove(Events::new_raw(c.stream.as_raw_fd(), EventSet::IN | EventSet::READ_HANG_UP));
            }
        }
    }

    fn handle_line(&mut self, line: &[u8]) -> Value {
        let text = String::from_utf8_lossy(line);
        let text = text.trim();
        let req: Value = match serde_json::from_str(text) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => return error_reply("request must be a JSON object"),
            Err(e) => return error_reply(&format!("malformed request: {e}")),
        };
        let Some(verb) = req.get("verb").and_then(Value::as_str).map(str::to_owned) else {
            return error_reply("request has no \"verb\" string");
        };
        match self.dispatch(&verb, &req) {
            Ok(v) => json!({"ok": true, "result": v}),
            Err(e) => error_reply(&e),
        }
    }

    fn dispatch(&mut self, verb: &str, req: &Value) -> std::result::Result<Value, String> {
        match verb {
            "status" => Ok(self.status()),
            "pause" => {
                if !self.api_paused {
                    self.vm.pause_hold().map_err(|e| e.to_string())?;
                    self.api_paused = true;
                }
                Ok(self.status())
            }
            "resume" => {
                if self.api_paused {
                    self.vm.resume_hold();
                    self.api_paused = false;
                }
                Ok(self.status())
            }
            "shutdown" => {
                self.done = Some(VmExit::Shutdown);
                Ok(json!({"state": "shutting down"}))
            }
            "snapshot" => {
                let dir = req
                    .get("dir")
                    .and_then(Value::as_str)
                    .ok_or_else(|| "snapshot needs \"dir\"".to_string())?;
                let paused = self.vm.pause().map_err(|e| e.to_string())?;
                crate::snapshot::save(&paused, Path::new(dir)).map_err(|e| e.to_string())?;
                drop(paused);
                Ok(json!({"dir": dir, "vcpus": self.vm.vcpu_count()}))
            }
            "read_memory" => {
                let addr = req.get("addr").and_then(Value::as_u64).ok_or("read_memory needs \"addr\"")?;
                let len = req.get("len").and_then(Value::as_u64).ok_or("read_memory needs \"len\"")?;
                if len > MAX_READ {
                    return Err(format!("read_memory reads at most {MAX_READ} bytes"));
                }
                let paused = self.vm.pause().map_err(|e| e.to_string())?;
                let mut buf = vec![0u8; len as usize];
                use vm_memory::Bytes;
                paused
                    .memory()
                    .read_slice(&mut buf, vm_memory::GuestAddress(addr))
                    .map_err(|e| format!("guest-physical {addr:#x}+{len:#x}: {e}"))?;
                drop(paused);
                let hex: String = buf.iter().map(|b| format!("{b:02x}")).collect();
                Ok(json!({"addr": addr, "hex": hex}))
            }
            other => match self.ext.handle(&self.vm, other, req) {
                Some(r) => r,
                None => Err(format!("unknown verb {other:?}")),
            },
        }
    }

    fn status(&self) -> Value {
        let l = self.vm.layout();
        json!({
            "vcpus": self.vm.vcpu_count(),
            "state": if self.vm.is_paused() { "paused" } else { "running" },
            "uptime_secs": self.vm.uptime().as_secs_f64(),
            "console_bytes": self.vm.console_bytes(),
            "memory_mib": l.ram_end >> 20,
            "reserved_region": {"start": l.reserved_start(), "size": l.reserved_size},
        })
    }
}

fn error_reply(msg: &str) -> Value {
    json!({"ok": false, "error": msg})
}

fn write_all_blocking(s: &mut UnixStream, mut data: &[u8]) -> std::io::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !data.is_empty() {
        match s.write(data) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => data = data.get(n..).unwrap_or(&[]),
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                if std::time::Instant::now() > deadline {
                    return Err(ErrorKind::TimedOut.into());
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl MutEventSubscriber for Controller {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.vm.exit_event().as_raw_fd() {
            let _ = self.vm.exit_event().read();
            if let Some(why) = self.vm.exit_reason() {
                self.done = Some(why);
            }
        } else if Some(fd) == self.listener.as_ref().map(|l| l.as_raw_fd()) {
            self.on_accept(ops);
        } else if fd == STDIN_FD && self.stdin_open {
            self.on_stdin(ops);
        } else {
            self.on_client(fd, ops);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new_raw(self.vm.exit_event().as_raw_fd(), EventSet::IN));
        if let Some(l) = &self.listener {
            let _ = ops.add(Events::new_raw(l.as_raw_fd(), EventSet::IN));
        }
        if self.stdin_open && ops.add(Events::new_raw(STDIN_FD, EventSet::IN)).is_err() {
            // stdin that epoll cannot watch (a regular file, /dev/null): no console input.
            self.stdin_open = false;
        }
    }
}

/// A blocking client for the control socket, used by the CLI and tests.
pub struct ApiClient {
    stream: UnixStream,
    reader: std::io::BufReader<UnixStream>,
}

impl ApiClient {
    pub fn connect(path: &Path) -> std::io::Result<ApiClient> {
        let stream = UnixStream::connect(path)?;
        let reader = std::io::BufReader::new(stream.try_clone()?);
        Ok(ApiClient { stream, reader })
    }

    /// Sends one request object and waits for its reply object.
    pub fn call(&mut self, request: &Value) -> std::io::Result<Value> {
        use std::io::BufRead;
        let mut line = request.to_string();
        line.push('\n');
        self.stream.write_all(line.as_bytes())?;
        let mut reply = String::new();
        if self.reader.read_line(&mut reply)? == 0 {
            return Err(std::io::Error::new(ErrorKind::UnexpectedEof, "the VM closed the connection"));
        }
        serde_json::from_str(&reply).map_err(|e| std::io::Error::new(ErrorKind::InvalidData, e))
    }
}
