//! Call sites and their func stacks. Every site hyperpatch owns remembers
//! its original bytes and the guest's ftrace record; what it jumps to is
//! the newest enabled patch that changes it. Site writes go through the
//! write plan together with the record flags that hand the site over.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::addr::GuestVirt;
use crate::engine::guest_view::GuestMem;
use crate::engine::plan::WritePlan;
use crate::engine::{Patch, Patcher};
use crate::error::{PatchError, Result};


/// A call site hyperpatch owns.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SiteState {
    pub function: String,
    pub site: u64,
    pub original: [u8; 5],
    /// The guest's ftrace record flags (address, value before we owned it).
    pub record: Option<(u64, u64)>,
    /// What the bits of those flags mean in this kernel (its BTF's).
    pub flag_bits: introspect::ftrace::FtraceFlagBits,
    /// Target the site jumps to now (`None`: original bytes).
    pub active: Option<u64>,
}

/// Where each owned site should jump: the target of the newest enabled
/// patch on its func stack, `None` for its original code.
pub type Desired = BTreeMap<u64, Option<u64>>;

/// `jmp target` encoded at `site`.
pub(crate) fn jmp_bytes(site: u64, target: u64) -> Result<[u8; 5]> {
    let rel = i128::from(target) - i128::from(site) - 5;
    let rel = i32::try_from(rel).map_err(|_| PatchError::Site {
        name: String::new(),
        site,
        detail: format!("target {target:#x} out of rel32 reach"),
    })?;
    let mut b = [0xe9, 0, 0, 0, 0];
    b[1..].copy_from_slice(&rel.to_le_bytes());
    Ok(b)
}

impl SiteState {
    /// The bytes the site holds when it jumps to `target` (`None`: original).
    pub(crate) fn bytes_for(&self, target: Option<u64>) -> Result<[u8; 5]> {
        match target {
            Some(t) => jmp_bytes(self.site, t),
            None => Ok(self.original),
        }
    }

    /// Plans the site's change from jumping to `from` to jumping to `to`
    /// (either may be a stub, `None` is the original bytes), and the ftrace
    /// record's: a site we jump from is marked FTRACE_FL_DISABLED so the
    /// guest's ftrace leaves it alone, and a site back at its original
    /// bytes gets its flag back. Refused if the guest's ftrace took the
    /// site meanwhile.
    pub(crate) fn plan_change(&self, g: &dyn GuestMem, plan: &mut WritePlan, from: Option<u64>, to: Option<u64>) -> Result<()> {
        if from == to {
            return Ok(());
        }
        let site = GuestVirt(self.site);
        plan.site(&self.function, site, &self.bytes_for(from)?, &self.bytes_for(to)?);
        if let Some((addr, orig)) = self.record {
            let rec = GuestVirt(addr);
            let cur = g.read_u64(rec)?;
            let new = match (from, to) {
                (None, Some(_)) => {
                    let bits = self.flag_bits;
                    if bits.disabled == 0 {
                        return Err(PatchError::Site {
                            name: self.function.clone(),
                            site: self.site,
                            detail: "the meaning of the guest's ftrace record flags is unknown".into(),
                        });
                    }
                    if cur & (bits.enabled | bits.ref_mask) != 0 {
                        return Err(PatchError::Site {
                            name: self.function.clone(),
                            site: self.site,
                            detail: format!("the guest's ftrace uses this site now (flags {cur:#x})"),
                        });
                    }
                    cur | bits.disabled
                }
                (Some(_), None) => {
                    let d = self.flag_bits.disabled;
                    (cur & !d) | (orig & d)
                }
                _ => cur,
            };
            if new != cur {
                plan.virt(rec, &new.to_le_bytes());
            }
        }
        Ok(())
    }
}

impl Patcher {
    /// The target each owned site should jump to with `patches` as given.
    pub(crate) fn desired(patches: &[Patch]) -> Desired {
        let mut d = Desired::new();
        for p in patches {
            for f in &p.funcs {
                let e = d.entry(f.site).or_insert(None);
                if p.enabled {
                    *e = Some(f.new_addr);
                }
            }
        }
        d
    }

    /// Writes every site of `desired` that differs from now, as one plan:
    /// all of them, or none. Returns how many changed.
    pub(crate) fn switch_sites(&mut self, g: &dyn GuestMem, desired: &Desired) -> Result<usize> {
        let mut plan = WritePlan::new();
        let mut changed = Vec::new();
        for (site, target) in desired {
            let Some(s) = self.sites.get(site) else { continue };
            if s.active == *target {
                continue;
            }
            s.plan_change(g, &mut plan, s.active, *target)?;
            changed.push((*site, *target));
        }
        plan.commit(g)?;
        for (site, target) in &changed {
            if let Some(s) = self.sites.get_mut(site) {
                s.active = *target;
            }
        }
        Ok(changed.len())
    }

    /// Forgets the sites no patch on the stack names any more (they hold
    /// their original bytes).
    pub(crate) fn forget_unused_sites(&mut self) {
        let still: std::collections::BTreeSet<u64> = self.patches.iter().flat_map(|p| p.funcs.iter().map(|f| f.site)).collect();
        self.sites.retain(|site, _| still.contains(site));
    }

    /// The code running now at owned `site`: the active patch's new
    /// function, or `fallback` (the original function).
    pub(crate) fn current_range(&self, site: u64, fallback: (u64, u64)) -> crate::engine::safety::CodeRange {
        use crate::engine::safety::CodeRange;
        let active = self.sites.get(&site).and_then(|s| s.active);
        if let Some(t) = active {
            if let Some(f) = self.patches.iter().flat_map(|p| &p.funcs).find(|f| f.site == site && f.new_addr == t) {
                return CodeRange { name: f.new_symbol.clone(), start: f.new_addr, size: f.new_size };
            }
        }
        let name = self.sites.get(&site).map(|s| s.function.clone()).unwrap_or_default();
        CodeRange { name, start: fallback.0, size: fallback.1 }
    }

    /// The code running now for function `name` at `site`, whether or not
    /// hyperpatch owns the site yet.
    pub(crate) fn current_range_or(&self, site: u64, name: &str, addr: u64, size: u64) -> crate::engine::safety::CodeRange {
        if self.sites.contains_key(&site) {
            self.current_range(site, (addr, size))
        } else {
            crate::engine::safety::CodeRange { name: name.to_string(), start: addr, size }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jmp_encoding_and_reach() {
        let b = jmp_bytes(0x1000, 0x2000).unwrap();
        assert_eq!(b, [0xe9, 0xfb, 0x0f, 0, 0]);
        assert!(jmp_bytes(0, 0x1_0000_0000).is_err());
    }
}
