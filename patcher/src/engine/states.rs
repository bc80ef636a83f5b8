//! klp states: the system states a patch declares, with versions, checked
//! as Linux's `klp_is_patch_compatible()` does.

use crate::engine::Patch;
use crate::error::{PatchError, Result};
use crate::module::StateSpec;

/// May patch `name` with `states` go on a stack whose enabled patches are
/// `others`? A replacing patch must carry every state of the enabled
/// patches with an equal or higher version; no patch may lower a state's
/// version.
pub(crate) fn check_compatible<'a>(name: &str, states: &[StateSpec], replace: bool, others: impl Iterator<Item = &'a Patch>) -> Result<()> {
    for old in others.filter(|p| p.enabled) {
        for os in &old.states {
            match states.iter().find(|s| s.id == os.id) {
                None if replace => {
                    return Err(PatchError::State(format!(
                        "{name} replaces {} but does not carry its state id {} (version {})",
                        old.name, os.id, os.version
                    )))
                }
                None => {}
                Some(s) if s.version < os.version => {
                    return Err(PatchError::State(format!(
                        "{name} has state id {} version {}, lower than version {} of {}",
                        s.id, s.version, os.version, old.name
                    )))
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}
