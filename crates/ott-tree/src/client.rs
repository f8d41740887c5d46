//! Client PoP choice (being written).
