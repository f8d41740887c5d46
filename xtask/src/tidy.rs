//! Repository checks that run as tests (`cargo test -p xtask`).

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    /// Crates that must stay sans-IO: no clock, no sleeping, no sockets, no threads.
    const SANS_IO: &[&str] = &[
        "ott-proto",
        "ott-overlay",
        "ott-tree",
        "ott-media",
        "ott-datapath",
    ];
    /// Calls a sans-IO crate never makes outside its tests.
    const FORBIDDEN: &[&str] = &[
        "Instant::now",
        "SystemTime::now",
        "thread::sleep",
        "thread::spawn",
        "UdpSocket",
        "TcpStream",
        "thread_rng",
    ];
    /// A line carrying this marker (or the line after it) may break the rule, with a reason.
    const MARKER: &str = "tidy: allow(clock)";

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                rust_files(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    #[test]
    fn protocol_crates_never_touch_the_clock_sockets_or_threads() {
        let root = crate::project_root();
        let mut problems = Vec::new();
        for krate in SANS_IO {
            let mut files = Vec::new();
            rust_files(&root.join("crates").join(krate).join("src"), &mut files);
            assert!(!files.is_empty(), "no sources found for {krate}");
            for f in files {
                let text = std::fs::read_to_string(&f).unwrap_or_default();
                let mut allowed_next = false;
                for (i, line) in text.lines().enumerate() {
                    // Unit tests sit at the end of each file, after #[cfg(test)].
                    if line.trim_start().starts_with("#[cfg(test)]") {
                        break;
                    }
                    let allowed = allowed_next || line.contains(MARKER);
                    allowed_next = line.contains(MARKER);
                    if line.trim_start().starts_with("//") {
                        continue;
                    }
                    for bad in FORBIDDEN {
                        if line.contains(bad) && !allowed {
                            problems.push(format!("{}:{}: {bad}", f.display(), i + 1));
                        }
                    }
                }
            }
        }
        assert!(
            problems.is_empty(),
            "sans-IO crates must take time as a parameter and do no I/O:\n{}",
            problems.join("\n")
        );
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
