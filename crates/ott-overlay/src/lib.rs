//! ott-overlay (being written).
