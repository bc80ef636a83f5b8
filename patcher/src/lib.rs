//! Applying Linux livepatch modules to a running guest from outside:
//! reading the `.ko` (its `klp_patch`, code and relocations), placing the new
//! code in the VM's reserved region, and switching ftrace call sites at a
//! safe point, with a func stack per site. Works on a "stopped VM" through
//! introspection plus [`guest::GuestWriter`], so it is testable without KVM.

pub mod addr;
pub mod engine;
pub mod error;
pub mod guest;
pub mod guest_call;
pub mod link;
pub mod loader;
pub mod module;
pub mod params;
pub mod klp_read;
pub mod lifecycle;
pub mod placement;

pub use addr::{GuestPhys, GuestVirt};
pub use engine::{ApplyOptions, Outcome, Patcher};
pub use error::{PatchError, Result};
pub use module::PatchModule;
