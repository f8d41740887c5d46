//! `cargo xtask emulate`: a topology in Linux network namespaces.

pub(crate) mod link;
pub(crate) mod netns;
pub(crate) mod routes;
