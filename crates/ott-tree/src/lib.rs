//! ott-tree (being written).
