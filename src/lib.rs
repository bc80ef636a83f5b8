//! The `hyperpatch` binary's library half: glue between the VMM (live
//! guests), introspection and patching, shared by the CLI and the tests.

pub mod guest;
pub mod inspect;
pub mod live;
pub mod table_cache;
