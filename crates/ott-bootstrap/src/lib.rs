//! ott-bootstrap (being written).
