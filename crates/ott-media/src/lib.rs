//! ott-media (being written).
