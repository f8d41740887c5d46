//! The topology parser refuses bad input with an error, never a panic.

use ott_overlay::Topology;
use proptest::prelude::*;
use proptest::test_runner::RngSeed;

const VALID: &str = r#"name = "p"
bootstrapper = "s1"
[[node]]
id = "s1"
role = "server"
address = "10.1.1.1"
[[node]]
id = "r1"
role = "relay"
[[node]]
id = "p1"
role = "pop"
[[node]]
id = "c1"
role = "client"
[[link]]
ends = ["s1", "r1"]
delay_ms = 2.0
rate_mbit = 100.0
[[link]]
ends = ["r1", "p1"]
loss_pct = 1.0
[[link]]
ends = ["p1", "c1"]
[[overlay]]
ends = ["s1", "r1"]
[[overlay]]
ends = ["r1", "p1"]
"#;

proptest! {
    // A fixed seed keeps runs reproducible; no regression files are written.
    #![proptest_config(ProptestConfig {
        rng_seed: RngSeed::Fixed(124809360),
        failure_persistence: None,
        cases: 512,
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_text_never_panics(text in ".{0,400}") {
        let _ = Topology::parse(&text, "fuzz.toml");
    }

    /// Byte edits of a valid file: either still valid, or refused with a located message.
    #[test]
    fn edited_valid_file_never_panics(
        edits in proptest::collection::vec((0usize..VALID.len(), any::<u8>()), 1..6)
    ) {
        let mut bytes = VALID.as_bytes().to_vec();
        for (at, b) in edits {
            bytes[at] = b;
        }
        let text = String::from_utf8_lossy(&bytes);
        if let Err(e) = Topology::parse(&text, "fuzz.toml") {
            prop_assert!(e.to_string().starts_with("fuzz.toml"), "{}", e);
        }
    }

    /// Removing whole lines of a valid file never panics either.
    #[test]
    fn dropped_lines_never_panic(mask in any::<u32>()) {
        let text: String = VALID
            .lines()
            .enumerate()
            .filter(|(i, _)| mask & (1 << (i % 32)) == 0)
            .map(|(_, l)| format!("{l}\n"))
            .collect();
        let _ = Topology::parse(&text, "fuzz.toml");
    }
}

#[test]
fn the_fuzz_seed_is_valid() {
    Topology::parse(VALID, "p.toml").expect("valid");
}
