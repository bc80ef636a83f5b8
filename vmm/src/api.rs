//! The control loop: one event-manager loop on the main thread serves the
//! JSON control socket (one request per line, one reply per line), feeds the
//! console from stdin, and notices when the VM ends.
//!
//! Every request is decoded into a typed request ([`VmmRequest`] here, the
//! extension's own enum for its verbs) that refuses unknown verbs and
//! unknown fields by name. The loop itself only does quick work: anything
//! long (a snapshot, a transition, a wait) runs on another thread and its
//! reply is sent when it is done, so `status` and `pause` always answer.
//! Replies to one client keep the order of its requests.
//! The protocol is documented in `docs/API.md`.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::cell::RefCell;
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::sync::Arc;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use serde::Deserialize;
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
/// Requests a client may have queued behind one that is still running.
const MAX_QUEUED: usize = 64;

/// The verbs the VMM serves itself.
#[derive(Debug, Deserialize)]
#[serde(tag = "verb", rename_all = "snake_case", deny_unknown_fields)]
pub enum VmmRequest {
    /// vCPUs, run state, uptime, memory, console bytes written.
    Status {},
    /// Stop every vCPU and hold them until `resume` (no guest code runs).
    Pause {},
    /// End a `pause`.
    Resume {},
    /// End the VM.
    Shutdown {},
    /// Write a snapshot (memory, vCPUs, devices, the patcher's state) to `dir`.
    Snapshot { dir: PathBuf },
    /// Read guest-physical memory (at most 1 MiB).
    ReadMemory { addr: u64, len: u64 },
}

/// Verbs of [`VmmRequest`].
pub const VMM_VERBS: &[&str] = &["status", "pause", "resume", "shutdown", "snapshot", "read_memory"];

/// A reply now or later.
pub enum Handled {
    /// The answer.
    Now(std::result::Result<Value, String>),
    /// Long work runs on another thread; its answer arrives here.
    Later(Receiver<std::result::Result<Value, String>>),
}

/// Serves the verbs this crate does not know (introspection and patching
/// live in other crates). Called on the control loop's thread: it must hand
/// anything long to another thread and answer with [`Handled::Later`].
pub trait ApiExtension: Send + Sync {
    /// The verbs it serves.
    fn verbs(&self) -> Vec<&'static str>;
    /// Serves one request whose verb is one of `verbs()`.
    fn handle(&self, vm: &Arc<Vm>, request: &Value) -> Handled;
    /// Runs `save` with the extension's state (what it changed in the guest
    /// from outside) while that state cannot change, so the state and the
    /// VM's memory in a snapshot belong to one moment. Called off the loop.
    fn with_state(
        &self,
        save: &mut dyn FnMut(Option<&Value>) -> std::result::Result<Value, String>,
    ) -> std::result::Result<Value, String>;
    /// The VM is ending: stop background work.
    fn shutdown(&self) {}
}

/// An extension that knows no verbs.
pub struct NoExtension;

impl ApiExtension for NoExtension {
    fn verbs(&self) -> Vec<&'static str> {
        Vec::new()
    }
    fn handle(&self, _: &Arc<Vm>, request: &Value) -> Handled {
        Handled::Now(Err(format!("unknown verb {}", request.get("verb").unwrap_or(&Value::Null))))
    }
    fn with_state(
        &self,
        save: &mut dyn FnMut(Option<&Value>) -> std::result::Result<Value, String>,
    ) -> std::result::Result<Value, String> {
        save(None)
    }
}

struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
    /// The reply to this client's running request, when it comes later.
    waiting: Option<Receiver<std::result::Result<Value, String>>>,
    /// Requests that arrived while one was running, in order.
    queued: VecDeque<Vec<u8>>,
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
    vm: Arc<Vm>,
    listener: Option<UnixListener>,
    sock_path: Option<PathBuf>,
    clients: HashMap<RawFd, Client>,
    stdin_open: bool,
    stdin_is_tty: bool,
    escape: bool,
    ext: Arc<dyn ApiExtension>,
    done: Option<VmExit>,
}

const STDIN_FD: RawFd = 0;

impl Controller {
    /// Takes ownership of a started VM. `api_sock` is created with mode 0600.
    pub fn new(vm: Arc<Vm>, api_sock: Option<&Path>, console_stdin: bool, ext: Arc<dyn ApiExtension>) -> Result<Controller> {
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
                let c = ctl.borrow_mut();
                c.ext.shutdown();
                c.vm.stop(why.clone());
                if let Some(p) = &c.sock_path {
                    let _ = std::fs::remove_file(p);
                }
                return Ok(c.vm.exit_reason().unwrap_or(why));
            }
            // Replies of long work are polled: often while some are due.
            let wait_ms = if ctl.borrow().clients.values().any(|c| c.waiting.is_some()) { 2 } else { 500 };
            if let Err(e) = em.run_with_timeout(wait_ms) {
                if !matches!(&e, event_manager::Error::Epoll(err) if err.errno() == libc::EINTR) {
                    return Err(VmmError::Config(format!("event loop: {e}")));
                }
            }
            let mut c = ctl.borrow_mut();
            c.deliver_late_replies();
            if c.done.is_none() {
                if let Some(why) = c.vm.exit_reason() {
                    c.done = Some(why);
                }
            }
        }
    }

    /// Sends the replies of long work that has ended, then serves what those
    /// clients queued behind it.
    fn deliver_late_replies(&mut self) {
        let mut closed = Vec::new();
        let fds: Vec<RawFd> = self.clients.iter().filter(|(_, c)| c.waiting.is_some()).map(|(fd, _)| *fd).collect();
        for fd in fds {
            let Some(c) = self.clients.get_mut(&fd) else { continue };
            let Some(rx) = &c.waiting else { continue };
            let reply = match rx.try_recv() {
                Ok(r) => r,
                Err(TryRecvError::Empty) => continue,
                Err(TryRecvError::Disconnected) => Err("the operation ended without a reply".to_string()),
            };
            c.waiting = None;
            if send_reply(&mut c.stream, &reply_value(reply)).is_err() {
                closed.push(fd);
                continue;
            }
            if !self.serve_queued(fd) {
                closed.push(fd);
            }
        }
        for fd in closed {
            // Dropping the stream closes the fd, which takes it out of epoll.
            self.clients.remove(&fd);
        }
    }

    /// Serves the queued lines of client `fd` until one is answered later.
    /// False when the client is gone.
    fn serve_queued(&mut self, fd: RawFd) -> bool {
        loop {
            let Some(c) = self.clients.get_mut(&fd) else { return false };
            if c.waiting.is_some() {
                return true;
            }
            let Some(line) = c.queued.pop_front() else { return true };
            match self.handle_line(&line) {
                Handled::Now(r) => {
                    let Some(c) = self.clients.get_mut(&fd) else { return false };
                    if send_reply(&mut c.stream, &reply_value(r)).is_err() {
                        return false;
                    }
                }
                Handled::Later(rx) => {
                    let Some(c) = self.clients.get_mut(&fd) else { return false };
                    c.waiting = Some(rx);
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
                        self.clients.insert(fd, Client { stream, buf: Vec::new(), waiting: None, queued: VecDeque::new() });
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => break,
            }
        }
    }

    fn on_client(&mut self, fd: RawFd, ops: &mut EventOps) {
        let mut close = false;
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
                c.queued.push_back(line);
            }
            if c.buf.len() > MAX_REQUEST {
                c.buf.clear();
                c.queued.push_back(Vec::new()); // answered as malformed
            }
            if c.queued.len() > MAX_QUEUED {
                let _ = send_reply(&mut c.stream, &error_reply("too many requests queued behind a running one"));
                close = true;
            }
        }
        if !close && !self.serve_queued(fd) {
            close = true;
        }
        if close {
            if let Some(c) = self.clients.remove(&fd) {
                let _ = ops.remove(Events::new_raw(c.stream.as_raw_fd(), EventSet::IN | EventSet::READ_HANG_UP));
            }
        }
    }

    fn handle_line(&mut self, line: &[u8]) -> Handled {
        let text = String::from_utf8_lossy(line);
        let text = text.trim();
        let req: Value = match serde_json::from_str(text) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => return Handled::Now(Err("request must be a JSON object".into())),
            Err(e) => return Handled::Now(Err(format!("malformed request: {e}"))),
        };
        let Some(verb) = req.get("verb").and_then(Value::as_str).map(str::to_owned) else {
            return Handled::Now(Err("request has no \"verb\" string".into()));
        };
        if VMM_VERBS.contains(&verb.as_str()) {
            return match serde_json::from_value::<VmmRequest>(req) {
                Ok(r) => self.dispatch(r),
                Err(e) => Handled::Now(Err(format!("{verb}: {e}"))),
            };
        }
        if self.ext.verbs().contains(&verb.as_str()) {
            return self.ext.handle(&self.vm, &req);
        }
        let mut all: Vec<&str> = VMM_VERBS.to_vec();
        all.extend(self.ext.verbs());
        Handled::Now(Err(format!("unknown verb {verb:?}; the verbs are {}", all.join(", "))))
    }

    fn dispatch(&mut self, req: VmmRequest) -> Handled {
        let now = |r: std::result::Result<Value, String>| Handled::Now(r);
        match req {
            VmmRequest::Status {} => now(Ok(self.status())),
            VmmRequest::Pause {} => now(self.vm.client_hold().map(|()| self.status()).map_err(|e| e.to_string())),
            VmmRequest::Resume {} => {
                self.vm.client_release();
                now(Ok(self.status()))
            }
            VmmRequest::Shutdown {} => {
                self.done = Some(VmExit::Shutdown);
                now(Ok(json!({"state": "shutting down"})))
            }
            VmmRequest::Snapshot { dir } => {
                // Writing guest memory takes a while: off the loop.
                let (tx, rx) = mpsc::channel();
                let (vm, ext) = (self.vm.clone(), self.ext.clone());
                let spawned = std::thread::Builder::new().name("snapshot".into()).spawn(move || {
                    let r = ext.with_state(&mut |state| {
                        let paused = vm.pause().map_err(|e| e.to_string())?;
                        crate::snapshot::save(&paused, &dir, state).map_err(|e| e.to_string())?;
                        drop(paused);
                        Ok(json!({"dir": dir, "vcpus": vm.vcpu_count(), "format_version": crate::snapshot::FORMAT_VERSION,
                                  "extension_state": state.is_some()}))
                    });
                    let _ = tx.send(r);
                });
                match spawned {
                    Ok(_) => Handled::Later(rx),
                    Err(e) => now(Err(format!("cannot start the snapshot thread: {e}"))),
                }
            }
            VmmRequest::ReadMemory { addr, len } => now(self.read_memory(addr, len)),
        }
    }

    fn read_memory(&self, addr: u64, len: u64) -> std::result::Result<Value, String> {
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

    fn status(&self) -> Value {
        let l = self.vm.layout();
        json!({
            "vcpus": self.vm.vcpu_count(),
            "state": if self.vm.is_paused() { "paused" } else { "running" },
            "held_by_client": self.vm.client_holds(),
            "uptime_secs": self.vm.uptime().as_secs_f64(),
            "console_bytes": self.vm.console_bytes(),
            "memory_mib": l.ram_end >> 20,
            "reserved_region": {"start": l.reserved_start(), "size": l.reserved_size},
        })
    }
}

fn reply_value(r: std::result::Result<Value, String>) -> Value {
    match r {
        Ok(v) => json!({"ok": true, "result": v}),
        Err(e) => error_reply(&e),
    }
}

fn send_reply(s: &mut UnixStream, v: &Value) -> std::io::Result<()> {
    let mut text = v.to_string();
    text.push('\n');
    write_all_blocking(s, text.as_bytes())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> std::result::Result<VmmRequest, String> {
        serde_json::from_str::<VmmRequest>(text).map_err(|e| e.to_string())
    }

    #[test]
    fn typed_requests_decode() {
        assert!(matches!(parse(r#"{"verb":"status"}"#), Ok(VmmRequest::Status {})));
        assert!(matches!(parse(r#"{"verb":"read_memory","addr":4096,"len":16}"#), Ok(VmmRequest::ReadMemory { addr: 4096, len: 16 })));
        match parse(r#"{"verb":"snapshot","dir":"/tmp/x"}"#) {
            Ok(VmmRequest::Snapshot { dir }) => assert_eq!(dir, PathBuf::from("/tmp/x")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_fields_and_verbs_are_named() {
        let e = parse(r#"{"verb":"status","verbose":true}"#).unwrap_err();
        assert!(e.contains("verbose"), "{e}");
        let e = parse(r#"{"verb":"snapshot","dri":"/tmp/x"}"#).unwrap_err();
        assert!(e.contains("dri"), "{e}");
        let e = parse(r#"{"verb":"read_memory","addr":"0x10","len":1}"#).unwrap_err();
        assert!(e.contains("addr") || e.contains("invalid type"), "{e}");
        let e = parse(r#"{"verb":"frobnicate"}"#).unwrap_err();
        assert!(e.contains("frobnicate"), "{e}");
        for v in VMM_VERBS {
            let e = parse(&format!(r#"{{"verb":"{v}","bogus_field":1}}"#)).unwrap_err();
            assert!(e.contains("bogus_field"), "{v}: {e}");
        }
    }
}
