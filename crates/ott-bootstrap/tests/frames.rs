//! Framing and answering never panic on arbitrary input.

use ott_bootstrap::{read_frame, Request, Response, Service};
use ott_overlay::{AddressPlan, Topology};
use proptest::prelude::*;
use proptest::test_runner::RngSeed;

proptest! {
    // A fixed seed keeps runs reproducible; no regression files are written.
    #![proptest_config(ProptestConfig {
        rng_seed: RngSeed::Fixed(124825607),
        failure_persistence: None,
        cases: 512,
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = read_frame::<_, Request>(&mut bytes.as_slice());
        let _ = read_frame::<_, Response>(&mut bytes.as_slice());
    }

    #[test]
    fn framed_garbage_never_panics(body in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut bytes = u32::try_from(body.len()).expect("small").to_be_bytes().to_vec();
        bytes.extend_from_slice(&body);
        let _ = read_frame::<_, Request>(&mut bytes.as_slice());
    }

    #[test]
    fn any_id_gets_an_answer(id in ".{0,40}", client in any::<bool>()) {
        let t = Topology::parse(
            "name = \"t\"\nbootstrapper = \"s\"\n[[node]]\nid = \"s\"\nrole = \"server\"\n",
            "t.toml",
        )
        .expect("valid");
        let s = Service::new(t, AddressPlan::Links);
        let req = if client { Request::Client { id: Some(id) } } else { Request::Node { id } };
        let _ = s.answer(&req);
    }
}
