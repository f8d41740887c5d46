//! Framing under mutated valid frames.
//!
//! Random bytes mostly fail at the length prefix; these tests start from a valid frame
//! of a request or a response and flip, overwrite, insert, delete or truncate a few
//! bytes, length prefix included. Whatever the mutant, `read_frame` returns `Ok` or
//! `Err` without panicking, reads no further than the length it was given, and what it
//! accepts is written again as a frame that reads back the same.

use ott_bootstrap::{read_frame, write_frame, Request, Response, Service};
use ott_overlay::{AddressPlan, Topology};
use proptest::prelude::*;
use proptest::test_runner::RngSeed;

#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, bit: u8 },
    Set { at: usize, byte: u8 },
    Insert { at: usize, byte: u8 },
    Delete { at: usize },
    Truncate { keep: usize },
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    let one = prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Insert { at, byte }),
        any::<usize>().prop_map(|at| Mutation::Delete { at }),
        any::<usize>().prop_map(|keep| Mutation::Truncate { keep }),
    ];
    proptest::collection::vec(one, 1..6)
}

/// Applies the edits; positions are taken modulo the current length.
fn apply(bytes: &mut Vec<u8>, muts: &[Mutation]) {
    for m in muts {
        let len = bytes.len();
        match *m {
            Mutation::Flip { at, bit } if len > 0 => bytes[at % len] ^= 1 << bit,
            Mutation::Set { at, byte } if len > 0 => bytes[at % len] = byte,
            Mutation::Insert { at, byte } => bytes.insert(at % (len + 1), byte),
            Mutation::Delete { at } if len > 0 => {
                bytes.remove(at % len);
            }
            Mutation::Truncate { keep } => bytes.truncate(keep % (len + 1)),
            _ => {}
        }
    }
}

fn id() -> impl Strategy<Value = String> {
    "[a-z0-9]{0,6}"
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        id().prop_map(|id| Request::Node { id }),
        proptest::option::of(id()).prop_map(|id| Request::Client { id }),
    ]
}

/// A small topology with every role, so the bootstrapper's real answers are assignments
/// with neighbours and PoPs, and refusals.
const TOPOLOGY: &str = r#"name = "m"
bootstrapper = "a"
[[node]]
id = "a"
role = "server"
[[node]]
id = "b"
role = "relay"
[[node]]
id = "c"
role = "pop"
[[node]]
id = "d"
role = "pop"
[[node]]
id = "e"
role = "client"
[[link]]
ends = ["a", "b"]
[[link]]
ends = ["b", "c"]
[[link]]
ends = ["b", "d"]
[[link]]
ends = ["c", "e"]
"#;

/// What the bootstrapper answers to a request for one of the topology's ids (or an
/// unknown one), in either address plan: built by the service, so the test follows
/// the messages as they change.
fn response() -> impl Strategy<Value = Response> {
    let ids = ["a", "b", "c", "d", "e", "zz"];
    (0..ids.len(), any::<bool>(), any::<bool>()).prop_map(move |(i, client, links)| {
        let t = Topology::parse(TOPOLOGY, "m.toml").expect("the test topology is valid");
        let plan = if links {
            AddressPlan::Links
        } else {
            AddressPlan::Loopback
        };
        let id = ids[i].to_owned();
        let req = if client {
            Request::Client { id: Some(id) }
        } else {
            Request::Node { id }
        };
        Service::new(t, plan).answer(&req)
    })
}

fn frame<T: serde::Serialize>(msg: &T) -> Vec<u8> {
    let mut buf = Vec::new();
    write_frame(&mut buf, msg).expect("a small message fits a frame");
    buf
}

/// Reads one `T` from `bytes` and checks what the reader may do with what it accepts.
fn check<T>(bytes: &[u8]) -> Result<bool, TestCaseError>
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let mut rest = bytes;
    let Ok(got) = read_frame::<_, T>(&mut rest) else {
        return Ok(false);
    };
    // It consumed the prefix and exactly the body the prefix announced.
    let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    prop_assert_eq!(bytes.len() - rest.len(), 4 + len);
    let again = frame(&got);
    let back: T = read_frame(&mut again.as_slice()).expect("a written frame reads back");
    prop_assert_eq!(back, got);
    Ok(true)
}

proptest! {
    // A fixed seed keeps runs reproducible; no regression files are written.
    #![proptest_config(ProptestConfig {
        rng_seed: RngSeed::Fixed(0x626f_6f74),
        failure_persistence: None,
        cases: 2048,
        ..ProptestConfig::default()
    })]

    /// A mutated request frame is read or refused; an accepted one round-trips.
    #[test]
    fn mutated_request_frame(r in request(), muts in mutations()) {
        let mut bytes = frame(&r);
        apply(&mut bytes, &muts);
        check::<Request>(&bytes)?;
    }

    /// A mutated response frame is read or refused; an accepted one round-trips.
    #[test]
    fn mutated_response_frame(r in response(), muts in mutations()) {
        let mut bytes = frame(&r);
        apply(&mut bytes, &muts);
        check::<Response>(&bytes)?;
    }
}

/// Some mutants are still read (an id byte changed, a flag flipped, bytes appended after
/// the frame), so the property above reaches the body decoder and the round trip.
#[test]
fn mutants_reach_the_body() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    );
    let (mut ok, mut total) = (0, 0);
    for _ in 0..2000 {
        let r = response().new_tree(&mut runner).expect("value").current();
        let muts = mutations().new_tree(&mut runner).expect("value").current();
        let mut bytes = frame(&r);
        apply(&mut bytes, &muts);
        total += 1;
        if check::<Response>(&bytes).expect("holds") {
            ok += 1;
        }
    }
    assert!(
        ok * 50 > total,
        "only {ok} of {total} mutated frames were read: the mutations no longer reach the body"
    );
}
