//! Repository checks that run as tests (`cargo test -p xtask`).

#[cfg(test)]
mod tests {
    /// Crates that must stay sans-IO: no clock, no sleeping, no sockets, no threads, no
    /// files, no unseeded randomness. Clippy enforces the rule (`disallowed-methods` and
    /// `disallowed-types` in each crate's `clippy.toml`); these checks keep the
    /// configuration in place.
    const SANS_IO: &[&str] = &[
        "ott-proto",
        "ott-overlay",
        "ott-tree",
        "ott-media",
        "ott-datapath",
    ];
    /// Paths every sans-IO crate's `clippy.toml` forbids.
    const FORBIDDEN: &[&str] = &[
        "std::time::Instant::now",
        "std::time::SystemTime::now",
        "std::thread::sleep",
        "std::thread::spawn",
        "std::thread::scope",
        "std::net::UdpSocket",
        "std::net::TcpStream",
        "std::net::TcpListener",
        "std::fs::File",
        "std::fs::read",
        "std::fs::write",
        "fastrand::u64",
    ];

    #[test]
    fn protocol_crates_forbid_the_clock_sockets_threads_and_files_in_clippy() {
        let root = crate::project_root();
        let mut first: Option<(String, String)> = None;
        for krate in SANS_IO {
            let dir = root.join("crates").join(krate);
            let path = dir.join("clippy.toml");
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            for bad in FORBIDDEN {
                assert!(
                    text.contains(&format!("path = \"{bad}\"")),
                    "{} does not forbid {bad}",
                    path.display()
                );
            }
            // One list for all: clippy reads only the nearest clippy.toml, so the copies
            // must not drift apart.
            match &first {
                None => first = Some((krate.to_string(), text)),
                Some((k, t)) => assert!(
                    *t == text,
                    "{} differs from the clippy.toml of {k}",
                    path.display()
                ),
            }
            // Exemptions are scoped (a function, a test module), never the whole library.
            let lib = std::fs::read_to_string(dir.join("src/lib.rs")).unwrap_or_default();
            assert!(
                !lib.contains("#![allow(clippy::disallowed"),
                "{krate}/src/lib.rs switches the sans-IO lints off crate-wide"
            );
        }
    }

    #[test]
    fn library_crates_have_crate_docs() {
        let root = crate::project_root();
        for krate in [
            "ott-proto",
            "ott-overlay",
            "ott-tree",
            "ott-media",
            "ott-bootstrap",
            "ott-datapath",
        ] {
            let lib = root.join("crates").join(krate).join("src/lib.rs");
            let text = std::fs::read_to_string(&lib).unwrap_or_default();
            assert!(
                text.starts_with("//!"),
                "{} has no crate-level doc",
                lib.display()
            );
            assert!(
                text.contains("#![warn(missing_docs)]"),
                "{} does not warn on missing docs",
                lib.display()
            );
        }
    }
}
