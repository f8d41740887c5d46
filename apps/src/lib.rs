//! ott-apps
