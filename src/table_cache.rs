//! The guest kernel's kallsyms and BTF, decoded once per kernel build and
//! shared by every VMM on the host.
//!
//! Both tables are immutable once the kernel has booted, and decoding them
//! is the largest host cost of a VMM's first operation (kallsyms: a scan of
//! the image and ~25k names; BTF: ~30k types and their indexes). Many VMs of
//! one kernel on a host would each decode the same bytes again.
//!
//! The cache is content-addressed: an entry is stored under the SHA-256 of
//! the guest bytes it was decoded from, and a VMM uses it only after
//! reading those bytes from its own guest and hashing them. So a guest
//! cannot make another guest's VMM use tables that are not its own: a guest
//! that lies in its tables gets an entry of its own, under another key.
//! The entry holds what exactly the hashed bytes decode to:
//! - kallsyms: the run from `kallsyms_offsets` to the end of
//!   `kallsyms_token_index`, as the decoder read it, with the 8 bytes of
//!   `kallsyms_relative_base` zeroed (KASLR relocates that value; every
//!   address is rebased to the reading guest's value, see
//!   `Kallsyms::rebased`). A hint file per entry gives the run's place
//!   relative to the syscall entry (LSTAR), which KASLR moves with it, so a
//!   hit needs no scan.
//! - BTF: the blob between `__start_BTF` and `__stop_BTF`.
//!
//! - a patch module, parsed and checked against the kernel's BTF: keyed by
//!   the .ko's bytes and the BTF's key, since the parse depends on nothing
//!   else. Linking it stays per guest: relocations need that guest's own
//!   addresses (its KASLR slide, its region, its modules' bases).
//!
//! An entry file carries a checksum of its payload; a file that is
//! truncated, corrupt or from another hyperpatch build is not used (the
//! tables are decoded from the guest and the entry written again). Entries
//! live in a directory per hyperpatch executable, because the payload is
//! the in-memory form of this build's types.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use introspect::btf::Btf;
use introspect::kallsyms::{Kallsyms, TablesExtent, MAX_EXTENT};
use introspect::kernel::{kernel_space, through_first_root, Kernel};
use introspect::memory::PhysMem;
use introspect::{CpuState, KernelMemory};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// First bytes of every entry file.
const MAGIC: &[u8; 8] = b"HPTABLE1";
/// Hint files looked at per open, newest first: each costs a read of the
/// run's first bytes.
const MAX_HINTS: usize = 16;
/// Bytes of the run a hint carries, compared before the whole run is read.
const PROBE_LEN: usize = 64;
/// The largest entry file read.
const MAX_ENTRY: u64 = 512 << 20;
/// The largest hint file read.
const MAX_HINT: u64 = 4096;

/// Where the tables of one open came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// Decoded from the guest's memory (and written to the cache).
    Guest,
    /// A patch module parsed from its file now (and written to the cache).
    Parsed,
    /// A cache entry whose key the guest's own bytes hash to.
    Cache,
}

/// What `open_kernel` did, for `list` and the tests.
#[derive(Clone, Debug, Serialize)]
pub struct TablesOrigin {
    pub kallsyms: Origin,
    pub btf: Origin,
    /// SHA-256 (hex) of the kallsyms run, when the run was found.
    pub kallsyms_key: Option<String>,
    pub btf_key: String,
    /// Host microseconds the open took (reading, hashing, decoding).
    pub open_us: f64,
    /// Why an entry could not be used or written, if that happened: the
    /// open still succeeded from the guest's memory.
    pub notes: Vec<String>,
}

/// Where a patch module's parse came from.
#[derive(Clone, Debug, Serialize)]
pub struct ModuleOrigin {
    /// SHA-256 (hex) of the .ko's bytes and the BTF key.
    pub key: String,
    pub origin: Origin,
    /// Host microseconds to hash and parse (or read back) the module.
    pub parse_us: f64,
    pub notes: Vec<String>,
}

/// The on-disk cache; `None` directory = not used.
#[derive(Clone, Debug)]
pub struct TableCache {
    dir: Option<PathBuf>,
}

/// Where a kallsyms run lies relative to LSTAR, and how it begins.
#[derive(Serialize, Deserialize)]
struct KallsymsHint {
    /// Run start minus LSTAR.
    from_lstar: i64,
    len: u64,
    relative_base_at: u64,
    /// The run's first bytes (the start of `kallsyms_offsets`).
    probe: Vec<u8>,
}

impl TableCache {
    /// A cache in `dir` (created when first written).
    pub fn at(dir: PathBuf) -> TableCache {
        TableCache { dir: Some(dir) }
    }

    /// No cache: every open decodes from the guest.
    pub fn disabled() -> TableCache {
        TableCache { dir: None }
    }

    /// `root/<this executable's size and mtime>`: entries are the in-memory
    /// form of this build's types, so another build has its own directory.
    pub fn for_this_build(root: &Path) -> TableCache {
        let id = std::env::current_exe()
            .and_then(fs::metadata)
            .map(|m| {
                let mtime = m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
                format!("{}-{}", m.len(), mtime.map_or(0, |d| d.as_nanos()))
            })
            .unwrap_or_else(|_| "unknown-build".into());
        TableCache::at(root.join(id))
    }

    /// `~/.cache/hyperpatch/kernel-tables` (or `$XDG_CACHE_HOME/...`).
    pub fn default_root() -> Option<PathBuf> {
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
        Some(base.join("hyperpatch").join("kernel-tables"))
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The guest kernel as `Kernel::open` reads it, its kallsyms and BTF
    /// from the cache when the guest's own bytes hash to an entry.
    pub fn open_kernel<'m>(&self, phys: &'m dyn PhysMem, cpus: Vec<CpuState>) -> anyhow::Result<(Kernel<'m>, TablesOrigin)> {
        let started = std::time::Instant::now();
        let mut notes = Vec::new();
        // kallsyms through the first root that maps them, then everything
        // through the kernel's own table (as `Kernel::open`).
        let (syms, kallsyms, kallsyms_key) =
            through_first_root(phys, &cpus, |via, lstar| self.kallsyms(via, lstar, &mut notes).map_err(|e| format!("{e:#}")))?;
        let mem = kernel_space(phys, &cpus, &syms)?;
        let start = syms.lookup_unique("__start_BTF")?;
        let stop = syms.lookup_unique("__stop_BTF")?;
        let blob = Btf::read_blob(&mem, start, stop)?;
        let btf_key = hex(&Sha256::new().chain_update(b"btf\0").chain_update(&blob).finalize());
        let (btf, btf_origin) = match self.load::<Btf>("btf", &btf_key, &mut notes) {
            Some(b) => (b, Origin::Cache),
            None => {
                let b = Btf::parse(blob)?;
                self.store("btf", &btf_key, &b, &mut notes);
                (b, Origin::Guest)
            }
        };
        let k = Kernel { mem, syms, btf, cpus };
        let origin = TablesOrigin {
            kallsyms,
            btf: btf_origin,
            kallsyms_key,
            btf_key,
            open_us: started.elapsed().as_secs_f64() * 1e6,
            notes,
        };
        Ok((k, origin))
    }

    /// `bytes` (the .ko at `path`) parsed against `btf`, whose key is
    /// `btf_key`: from the cache when this kernel build parsed the same
    /// bytes before, else parsed now and stored.
    pub fn patch_module(&self, path: &str, bytes: &[u8], btf: &Btf, btf_key: &str) -> anyhow::Result<(patcher::PatchModule, ModuleOrigin)> {
        let started = std::time::Instant::now();
        let key = hex(&Sha256::new().chain_update(b"module\0").chain_update(patcher::module::PARSE_VERSION.to_le_bytes()).chain_update(btf_key.as_bytes()).chain_update(bytes).finalize());
        let mut notes = Vec::new();
        let (m, origin) = match self.load::<patcher::PatchModule>("module", &key, &mut notes) {
            Some(mut m) => {
                // The parse names the file it came from; this one may be elsewhere.
                m.path = path.to_string();
                (m, Origin::Cache)
            }
            None => {
                let m = patcher::PatchModule::parse(path, bytes, btf)?;
                self.store("module", &key, &m, &mut notes);
                (m, Origin::Parsed)
            }
        };
        Ok((m, ModuleOrigin { key, origin, parse_us: started.elapsed().as_secs_f64() * 1e6, notes }))
    }

    fn kallsyms(&self, mem: &dyn KernelMemory, lstar: u64, notes: &mut Vec<String>) -> anyhow::Result<(Kallsyms, Origin, Option<String>)> {
        for hint in self.hints(notes) {
            if let Some((k, key)) = self.kallsyms_from_hint(mem, lstar, &hint, notes) {
                return Ok((k, Origin::Cache, Some(key)));
            }
        }
        let (k, run) = Kallsyms::locate_with_run(mem, lstar)?;
        let (Some(extent), Some(run)) = (k.extent(), run) else {
            notes.push("the kallsyms tables are not one run in the expected order: not cached".into());
            return Ok((k, Origin::Guest, None));
        };
        let Some(key) = kallsyms_key(&run, extent.relative_base_at) else {
            notes.push("the kallsyms run is shorter than its own layout: not cached".into());
            return Ok((k, Origin::Guest, None));
        };
        let from_lstar = (extent.start as i128) - (lstar as i128);
        if let (Ok(from_lstar), Some(probe)) = (i64::try_from(from_lstar), run.get(..PROBE_LEN)) {
            // The entry first, then the hint that leads to it.
            if self.store("kallsyms", &key, &k, notes) {
                let hint = KallsymsHint { from_lstar, len: extent.len, relative_base_at: extent.relative_base_at, probe: probe.to_vec() };
                self.store_hint(&key, &hint, notes);
            }
        }
        Ok((k, Origin::Guest, Some(key)))
    }

    /// The cached kallsyms a hint leads to, if this guest's run hashes to
    /// its key; rebased to this guest's relative base and checked against
    /// its LSTAR.
    fn kallsyms_from_hint(&self, mem: &dyn KernelMemory, lstar: u64, hint: &(String, KallsymsHint), notes: &mut Vec<String>) -> Option<(Kallsyms, String)> {
        let (key, h) = hint;
        let start = lstar.checked_add_signed(h.from_lstar)?;
        let mut probe = vec![0u8; h.probe.len()];
        mem.read_virt(start, &mut probe).ok()?;
        if probe != h.probe {
            return None;
        }
        // A hint is a host file that may be corrupt: never read more than a
        // table run can be.
        if h.len > MAX_EXTENT || h.probe.len() > PROBE_LEN {
            notes.push(format!("kallsyms hint {key}: a run of {} bytes, probe {}: passed over", h.len, h.probe.len()));
            return None;
        }
        let run = mem.read_bytes(start, usize::try_from(h.len).ok()?).ok()?;
        if kallsyms_key(&run, h.relative_base_at).as_ref() != Some(key) {
            return None;
        }
        let at = usize::try_from(h.relative_base_at).ok()?;
        let rb = u64::from_le_bytes(run.get(at..at.checked_add(8)?)?.try_into().ok()?);
        let cached: Kallsyms = self.load("kallsyms", key, notes)?;
        let k = match cached.rebased(rb) {
            Ok(k) => k,
            Err(e) => {
                notes.push(format!("kallsyms entry {key}: {e}"));
                return None;
            }
        };
        let expected = TablesExtent { start, len: h.len, relative_base_at: h.relative_base_at };
        if k.extent() != Some(expected) {
            notes.push(format!("kallsyms entry {key} describes another run than its hint"));
            return None;
        }
        if let Err(e) = k.check_contains(lstar) {
            notes.push(format!("kallsyms entry {key}: {e}"));
            return None;
        }
        Some((k, key.clone()))
    }

    /// Hints, newest first, at most `MAX_HINTS`.
    fn hints(&self, notes: &mut Vec<String>) -> Vec<(String, KallsymsHint)> {
        let Some(dir) = &self.dir else { return Vec::new() };
        let Ok(rd) = fs::read_dir(dir) else { return Vec::new() };
        let mut found: Vec<(std::time::SystemTime, PathBuf, String)> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let key = name.strip_prefix("kallsyms-")?.strip_suffix(".hint")?.to_string();
                let mtime = e.metadata().ok()?.modified().ok()?;
                Some((mtime, e.path(), key))
            })
            .collect();
        found.sort_by_key(|e| std::cmp::Reverse(e.0));
        found
            .into_iter()
            .take(MAX_HINTS)
            .filter_map(|(_, path, key)| match read_bounded(&path, MAX_HINT).and_then(|b| serde_json::from_slice(&b).map_err(Into::into)) {
                Ok(h) => Some((key, h)),
                Err(e) => {
                    notes.push(format!("{}: {e}", path.display()));
                    None
                }
            })
            .collect()
    }

    fn entry_path(&self, kind: &str, key: &str) -> Option<PathBuf> {
        Some(self.dir.as_ref()?.join(format!("{kind}-{key}.bin")))
    }

    /// The entry `kind-key`, if present and intact.
    fn load<T: serde::de::DeserializeOwned>(&self, kind: &str, key: &str, notes: &mut Vec<String>) -> Option<T> {
        let path = self.entry_path(kind, key)?;
        if !path.exists() {
            return None;
        }
        let r = read_bounded(&path, MAX_ENTRY).and_then(|bytes| {
            let payload = unwrap_entry(&bytes).ok_or_else(|| anyhow::anyhow!("not an intact entry of this format"))?;
            Ok(bincode::deserialize::<T>(payload)?)
        });
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                notes.push(format!("{}: {e:#}: decoded from the guest instead", path.display()));
                None
            }
        }
    }

    /// Writes the entry `kind-key` (atomically: a reader sees all of it or
    /// none). Returns whether it was written.
    fn store<T: Serialize>(&self, kind: &str, key: &str, value: &T, notes: &mut Vec<String>) -> bool {
        let Some(path) = self.entry_path(kind, key) else { return false };
        let r = bincode::serialize(value).map_err(anyhow::Error::from).and_then(|payload| {
            let mut bytes = Vec::with_capacity(payload.len() + 40);
            bytes.extend_from_slice(MAGIC);
            bytes.extend_from_slice(&Sha256::digest(&payload));
            bytes.extend_from_slice(&payload);
            write_atomically(&path, &bytes)
        });
        if let Err(e) = &r {
            notes.push(format!("writing {}: {e:#}", path.display()));
        }
        r.is_ok()
    }

    fn store_hint(&self, key: &str, hint: &KallsymsHint, notes: &mut Vec<String>) {
        let Some(dir) = &self.dir else { return };
        let path = dir.join(format!("kallsyms-{key}.hint"));
        let r = serde_json::to_vec(hint).map_err(anyhow::Error::from).and_then(|b| write_atomically(&path, &b));
        if let Err(e) = r {
            notes.push(format!("writing {}: {e:#}", path.display()));
        }
    }
}

/// SHA-256 of a kallsyms run with its relative base zeroed, or `None` if
/// the run does not hold the relative base.
fn kallsyms_key(run: &[u8], relative_base_at: u64) -> Option<String> {
    let at = usize::try_from(relative_base_at).ok()?;
    let end = at.checked_add(8)?;
    let (before, rest) = (run.get(..at)?, run.get(end..)?);
    let h = Sha256::new()
        .chain_update(b"kallsyms\0")
        .chain_update((run.len() as u64).to_le_bytes())
        .chain_update(relative_base_at.to_le_bytes())
        .chain_update(before)
        .chain_update([0u8; 8])
        .chain_update(rest)
        .finalize();
    Some(hex(&h))
}

/// The payload of an entry file whose magic and checksum are right.
fn unwrap_entry(bytes: &[u8]) -> Option<&[u8]> {
    let rest = bytes.strip_prefix(MAGIC.as_slice())?;
    let (sum, payload) = (rest.get(..32)?, rest.get(32..)?);
    (Sha256::digest(payload).as_slice() == sum).then_some(payload)
}

fn read_bounded(path: &Path, max: u64) -> anyhow::Result<Vec<u8>> {
    let len = fs::metadata(path)?.len();
    if len > max {
        anyhow::bail!("{len} bytes, more than the {max} an entry may have");
    }
    Ok(fs::read(path)?)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().ok_or_else(|| anyhow::anyhow!("no parent directory"))?;
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("entry"),
        std::process::id()
    ));
    let mut f = fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)?;
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
