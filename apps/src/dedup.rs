//! Duplicate suppression and source lock: moved to [`ott_datapath::dedup`].

pub use ott_datapath::dedup::*;
