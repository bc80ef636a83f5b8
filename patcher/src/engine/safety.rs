//! Is any task in this code? The stack check behind every switch: a task
//! whose stack (or vCPU) is inside a range that is about to stop running,
//! or whose stack cannot be unwound reliably, holds the switch back.

use serde::{Deserialize, Serialize};

use crate::engine::guest_view::{GuestTasks, TaskRef};
use crate::error::Result;

/// Code that must be on no stack: a function's name, start and size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeRange {
    pub name: String,
    pub start: u64,
    pub size: u64,
}

impl CodeRange {
    pub fn contains(&self, ip: u64) -> bool {
        ip >= self.start && ip < self.start.saturating_add(self.size)
    }
}

/// A task that holds a transition back.
#[derive(Clone, Debug, Serialize)]
pub struct Blocker {
    pub pid: i32,
    pub comm: String,
    pub function: String,
    pub frame: String,
    /// The stack could not be unwound reliably (that alone blocks).
    pub unreliable: bool,
    /// The vCPU the task is running on, if it is running.
    pub running_on: Option<usize>,
}

impl std::fmt::Display for Blocker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.unreliable {
            write!(f, "pid {} ({}): unreliable stack: {}", self.pid, self.comm, self.frame)
        } else {
            write!(f, "pid {} ({}) in {} at {}", self.pid, self.comm, self.function, self.frame)
        }
    }
}

/// Why `t` may not switch away from `ranges` now, if it may not.
pub(crate) fn blocker(g: &dyn GuestTasks, ranges: &[CodeRange], t: &TaskRef) -> Option<Blocker> {
    let st = g.stack(t);
    if !st.reliable {
        return Some(Blocker {
            pid: t.pid,
            comm: t.comm.clone(),
            function: String::new(),
            frame: st.reason.clone().unwrap_or_else(|| "unreliable".into()),
            unreliable: true,
            running_on: t.running_on,
        });
    }
    for f in &st.frames {
        if let Some(r) = ranges.iter().find(|r| r.contains(f.code_ip())) {
            return Some(Blocker {
                pid: t.pid,
                comm: t.comm.clone(),
                function: r.name.clone(),
                frame: g.describe(*f),
                unreliable: false,
                running_on: t.running_on,
            });
        }
    }
    None
}

/// Every task of the guest that may not switch away from `ranges` now.
pub(crate) fn blockers(g: &dyn GuestTasks, ranges: &[CodeRange]) -> Result<Vec<Blocker>> {
    Ok(g.tasks_to_check(ranges)?.iter().filter_map(|t| blocker(g, ranges, t)).collect())
}
