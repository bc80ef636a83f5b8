//! The one way the engine changes a stopped guest. A [`WritePlan`] lists
//! every write of one step (site bytes, stubs, ftrace record flags, task
//! marks). `commit` first validates all of it (every address translates,
//! every site still holds the bytes hyperpatch expects), then writes in
//! order, and on a failed write puts back what it had written, newest
//! first. A step is applied whole or not at all.

use crate::addr::{GuestPhys, GuestVirt};
use crate::engine::guest_view::GuestMem;
use crate::error::{PatchError, Result};

/// Where one write goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteAt {
    Virt(GuestVirt),
    Phys(GuestPhys),
}

/// What a site must hold before it is written, and whose site it is.
#[derive(Clone, Debug)]
struct Expected {
    function: String,
    bytes: Vec<u8>,
}

#[derive(Clone, Debug)]
struct Write {
    at: WriteAt,
    bytes: Vec<u8>,
    expect: Option<Expected>,
}

/// The writes of one engine step, validated and committed together.
#[derive(Clone, Debug, Default)]
pub struct WritePlan {
    writes: Vec<Write>,
}

/// One physical piece of a write (a virtual write is split at pages).
struct Chunk {
    at: GuestPhys,
    bytes: Vec<u8>,
    before: Vec<u8>,
}

impl WritePlan {
    pub fn new() -> WritePlan {
        WritePlan::default()
    }

    /// Writes `bytes` at guest-virtual `at`, which must hold `expect` now
    /// (a call site of `function`): anything else there was changed behind
    /// hyperpatch's back and refuses the whole plan.
    pub fn site(&mut self, function: &str, at: GuestVirt, expect: &[u8], bytes: &[u8]) {
        self.writes.push(Write {
            at: WriteAt::Virt(at),
            bytes: bytes.to_vec(),
            expect: Some(Expected { function: function.to_string(), bytes: expect.to_vec() }),
        });
    }

    /// Writes `bytes` at guest-virtual `at`.
    pub fn virt(&mut self, at: GuestVirt, bytes: &[u8]) {
        self.writes.push(Write { at: WriteAt::Virt(at), bytes: bytes.to_vec(), expect: None });
    }

    /// Writes `bytes` at guest-physical `at`.
    pub fn phys(&mut self, at: GuestPhys, bytes: &[u8]) {
        self.writes.push(Write { at: WriteAt::Phys(at), bytes: bytes.to_vec(), expect: None });
    }

    /// Appends `later`'s writes after these.
    pub fn extend(&mut self, later: WritePlan) {
        self.writes.extend(later.writes);
    }

    /// Number of writes planned.
    pub fn len(&self) -> usize {
        self.writes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// Where the writes go, in order (for tests and logs).
    pub fn targets(&self) -> Vec<WriteAt> {
        self.writes.iter().map(|w| w.at).collect()
    }

    /// Validates every write, then writes them in order; a failed write
    /// rolls back the ones before it. Nothing is written if validation
    /// fails.
    pub fn commit(self, g: &dyn GuestMem) -> Result<()> {
        let mut chunks: Vec<Chunk> = Vec::new();
        for w in &self.writes {
            if let Some(e) = &w.expect {
                let WriteAt::Virt(at) = w.at else {
                    return Err(PatchError::State("an expected-bytes write must be guest-virtual".into()));
                };
                let mut now = vec![0u8; e.bytes.len()];
                g.read(at, &mut now)?;
                if now != e.bytes {
                    return Err(PatchError::Site {
                        name: e.function.clone(),
                        site: at.0,
                        detail: format!("holds {now:02x?}, expected {:02x?}: changed behind hyperpatch's back", e.bytes),
                    });
                }
            }
            match w.at {
                WriteAt::Phys(at) => chunks.push(Chunk { at, bytes: w.bytes.clone(), before: Vec::new() }),
                WriteAt::Virt(at) => {
                    // A write may cross a page: each page translates on its own.
                    let mut done = 0usize;
                    while done < w.bytes.len() {
                        let va = at.offset(done as u64)?;
                        let pa = g.translate(va)?;
                        let room = (0x1000 - va.page_offset()) as usize;
                        let n = room.min(w.bytes.len() - done);
                        chunks.push(Chunk { at: pa, bytes: w.bytes[done..done + n].to_vec(), before: Vec::new() });
                        done += n;
                    }
                }
            }
        }
        for c in chunks.iter_mut() {
            let mut before = vec![0u8; c.bytes.len()];
            g.read_phys(c.at, &mut before)?;
            c.before = before;
        }
        for (i, c) in chunks.iter().enumerate() {
            if let Err(e) = g.write_phys(c.at, &c.bytes) {
                for done in chunks[..i].iter().rev() {
                    if let Err(undo) = g.write_phys(done.at, &done.before) {
                        return Err(PatchError::RollbackFailed { cause: Box::new(e), at: done.at.0, detail: undo.to_string() });
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }
}
