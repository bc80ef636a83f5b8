//! Symbol resolution: the module's undefined symbols and the functions a
//! patch changes, found in the guest's kallsyms and module symbols, each
//! function's call site checked. Nothing here writes to the guest.

use introspect::ftrace::{decode_site, SiteInsn, NOP5};
use introspect::kernel::Kernel;
use introspect::translate::KernelMemory;

use crate::engine::sites::SiteState;
use crate::engine::Patcher;
use crate::error::{PatchError, Result};
use crate::link::SymbolResolver;
use crate::module::{FuncSpec, PatchSpec};


/// One function a patch changes, found in the guest: its spec, its
/// object, the old function's address and size, and its call site.
#[derive(Clone, Debug)]
pub(crate) struct ResolvedFunc {
    pub spec: FuncSpec,
    pub object: Option<String>,
    pub old_addr: u64,
    pub old_size: u64,
    pub site: u64,
}

/// Resolves symbols through guest kallsyms and module symbols;
/// `klp_enable_patch` goes to hyperpatch's hook when one is given.
pub(crate) struct GuestResolver<'a, 'm> {
    pub k: &'a Kernel<'m>,
    pub klp_enable_patch: Option<u64>,
    /// hyperpatch's `klp_get_prev_state()` (the guest's sees only its own patches).
    pub klp_get_prev_state: Option<u64>,
}

impl SymbolResolver for GuestResolver<'_, '_> {
    fn resolve(&self, object: Option<&str>, name: &str, sympos: u64) -> Result<u64> {
        if let (None, "klp_enable_patch", Some(hook)) = (object, name, self.klp_enable_patch) {
            return Ok(hook);
        }
        if let (None, "klp_get_prev_state", Some(f)) = (object, name, self.klp_get_prev_state) {
            return Ok(f);
        }
        match object {
            None => match self.k.syms.address_of(name, sympos_u32(name, sympos)?) {
                Ok(a) => Ok(a),
                Err(introspect::IntrospectError::NoSymbol(_)) => {
                    // Exported by a loaded module?
                    for m in self.k.modules()? {
                        if let Some(s) = self.k.module_symbols(&m)?.into_iter().find(|s| s.name == name) {
                            return Ok(s.addr);
                        }
                    }
                    Err(PatchError::MissingSymbol { name: name.into() })
                }
                Err(e) => Err(PatchError::Function { name: name.into(), detail: e.to_string() }),
            },
            Some(obj) => module_function(self.k, obj, name, sympos).map(|(a, _)| a),
        }
    }
}

/// Address and size of function `name` of loaded module `obj`.
fn module_function(k: &Kernel<'_>, obj: &str, name: &str, sympos: u64) -> Result<(u64, u64)> {
    let m = k
        .modules()?
        .into_iter()
        .find(|m| m.name == obj)
        .ok_or_else(|| PatchError::Function { name: name.into(), detail: format!("module {obj} is not loaded") })?;
    let syms: Vec<(u64, u64)> = k.module_symbols(&m)?.into_iter().filter(|s| s.name == name).map(|s| (s.addr, s.size)).collect();
    let addrs: Vec<u64> = syms.iter().map(|s| s.0).collect();
    let a = pick(name, &addrs, sympos)?;
    let size = syms.iter().find(|s| s.0 == a).map(|s| s.1).unwrap_or(0);
    if size == 0 {
        return Err(PatchError::Function { name: name.into(), detail: format!("module {obj} gives no size for it") });
    }
    Ok((a, size))
}

/// kallsyms counts positions in u32: a larger `sympos` is refused, not truncated.
fn sympos_u32(name: &str, sympos: u64) -> Result<u32> {
    u32::try_from(sympos).map_err(|_| PatchError::Function { name: name.into(), detail: format!("sympos {sympos} is out of range") })
}

/// The `sympos`-th of `hits` (1-based; 0 only when the name is unique).
pub(crate) fn pick(name: &str, hits: &[u64], sympos: u64) -> Result<u64> {
    match (hits.len(), sympos) {
        (0, _) => Err(PatchError::MissingSymbol { name: name.into() }),
        (1, 0) | (1, 1) => Ok(hits[0]),
        (_, 0) => Err(PatchError::Function { name: name.into(), detail: format!("{} symbols have this name: give old_sympos", hits.len()) }),
        (n, p) => usize::try_from(p - 1).ok().and_then(|i| hits.get(i)).copied().ok_or_else(|| PatchError::Function {
            name: name.into(),
            detail: format!("old_sympos {p} but only {n} symbols have this name"),
        }),
    }
}

impl Patcher {
    /// Every function of `spec` resolved in the guest, its call site checked
    /// (the ftrace NOP, or hyperpatch's own jmp), and the new sites it takes
    /// over; nothing is written. Objects naming modules that are not
    /// loaded are left for when they load (`klp_module_coming`).
    pub(crate) fn resolve_funcs(
        &self,
        k: &Kernel<'_>,
        records: &introspect::ftrace::FtraceRecords,
        spec: &PatchSpec,
    ) -> Result<(Vec<ResolvedFunc>, Vec<SiteState>)> {
        let guest_klp = k.klp_patches()?;
        let mut funcs: Vec<ResolvedFunc> = Vec::new();
        let mut new_sites: Vec<SiteState> = Vec::new();
        let loaded = k.modules()?;
        for obj in &spec.objects {
            if let Some(name) = &obj.name {
                if !loaded.iter().any(|m| &m.name == name) {
                    continue;
                }
            }
            for f in &obj.funcs {
                let (old_addr, old_size) = match &obj.name {
                    None => {
                        let a = k.syms.address_of(&f.old_name, sympos_u32(&f.old_name, f.old_sympos)?).map_err(|e| PatchError::Function {
                            name: f.old_name.clone(),
                            detail: e.to_string(),
                        })?;
                        let size = k.syms.resolve(a).filter(|s| s.addr == a).map(|s| s.size).unwrap_or(0);
                        if size == 0 {
                            return Err(PatchError::Function { name: f.old_name.clone(), detail: "kallsyms gives no size for it".into() });
                        }
                        (a, size)
                    }
                    Some(o) => module_function(k, o, &f.old_name, f.old_sympos)?,
                };
                let head = k.mem.read_bytes(old_addr, 9)?;
                let site = records.site_of(old_addr, old_size, &head);
                if funcs.iter().any(|x| x.site == site) {
                    return Err(PatchError::Function { name: f.old_name.clone(), detail: "listed twice in the patch".into() });
                }
                let mut bytes = [0u8; 5];
                k.mem.read_virt(site, &mut bytes)?;
                let (insn, text) = decode_site(&bytes, site);
                let serr = |d: String| PatchError::Site { name: f.old_name.clone(), site, detail: d };
                if let Some(owned) = self.sites.get(&site) {
                    let ok = match (owned.active, &insn) {
                        (Some(t), SiteInsn::Jmp { target }) => *target == t,
                        (None, SiteInsn::Nop) => bytes == owned.original,
                        _ => false,
                    };
                    if !ok {
                        return Err(serr(format!("holds `{text}`, not what hyperpatch wrote there")));
                    }
                } else {
                    if insn != SiteInsn::Nop || bytes != NOP5 {
                        return Err(serr(format!("holds `{text}`, not the ftrace NOP (traced or patched by the guest?)")));
                    }
                    let mut rec = *records.by_ip.get(&site).ok_or_else(|| {
                        serr("has no ftrace record: the function is notrace and cannot be patched".into())
                    })?;
                    // The records were read before this stop (maybe while the
                    // guest ran): the record must still be this site's, and its
                    // flags are read again now.
                    if k.mem.read_u64(rec.ip_addr)? != site {
                        return Err(serr(format!("its ftrace record at {:#x} moved since it was read; try again", rec.ip_addr)));
                    }
                    rec.flags = k.mem.read_u64(rec.flags_addr)?;
                    if rec.enabled() || rec.refcount() > 0 {
                        return Err(serr(format!("the guest's ftrace uses this site (flags {:#x})", rec.flags)));
                    }
                    if guest_klp.iter().flat_map(|p| &p.objects).flat_map(|o| &o.funcs).any(|gf| gf.old_func == old_addr) {
                        return Err(serr("the guest's own livepatch patches this function".into()));
                    }
                    new_sites.push(SiteState {
                        function: f.old_name.clone(),
                        site,
                        original: bytes,
                        record: Some((rec.flags_addr, rec.flags)),
                        flag_bits: rec.bits,
                        active: None,
                    });
                }
                funcs.push(ResolvedFunc { spec: f.clone(), object: obj.name.clone(), old_addr, old_size, site });
            }
        }
        Ok((funcs, new_sites))
    }

    /// Checks the staged module's patch as `apply` will (states, every
    /// function and its site), changing nothing: the verdict its
    /// `klp_enable_patch()` returns.
    pub(crate) fn check_staged(&self, k: &Kernel<'_>, records: &introspect::ftrace::FtraceRecords) -> Result<()> {
        let staged = self.staged.as_ref().ok_or_else(|| PatchError::State("no module is loaded to apply".into()))?;
        let spec = staged.spec.as_ref().ok_or_else(|| PatchError::State(format!("{}: its klp_patch was not read", staged.name)))?;
        if self.patches.iter().any(|p| p.name == staged.name) {
            return Err(PatchError::Duplicate(staged.name.clone()));
        }
        crate::engine::states::check_compatible(&staged.name, &spec.states, spec.replace, self.patches.iter())?;
        self.resolve_funcs(k, records, spec)?;
        let loaded = k.modules()?;
        if let Some(unloaded) = spec.objects.iter().filter_map(|o| o.name.as_ref()).find(|n| !loaded.iter().any(|m| &m.name == *n)) {
            if let Some(why) = self.calls.as_ref().and_then(|c| c.module_traps_missing.clone()) {
                return Err(PatchError::Lifecycle {
                    module: staged.name.clone(),
                    detail: format!("it patches module {unloaded}, which is not loaded, and module loads cannot be followed: {why}"),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sympos_rules() {
        assert_eq!(pick("f", &[5], 0).unwrap(), 5);
        assert!(pick("f", &[5, 6], 0).is_err());
        assert_eq!(pick("f", &[5, 6], 2).unwrap(), 6);
        assert!(pick("f", &[5, 6], 3).is_err());
        assert!(pick("f", &[], 0).is_err());
        assert!(pick("f", &[5, 6], u64::MAX).is_err());
    }
}
