//! Bootstrap requests: `read_frame` (length prefix, then MessagePack) on any byte stream
//! returns `Ok` or `Err`, never panics and never allocates more than the frame limit;
//! an accepted request gets an answer from a service on the seed topology, and both
//! round-trip through `write_frame`.
#![deny(unsafe_code)]
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use ott_bootstrap::{read_frame, write_frame, Request, Response, Service};
use ott_overlay::{AddressPlan, Topology};

fn services() -> &'static [Service; 2] {
    static S: OnceLock<[Service; 2]> = OnceLock::new();
    S.get_or_init(|| {
        let t = Topology::parse(
            include_str!("../../topologies/seed.toml"),
            "topologies/seed.toml",
        )
        .expect("the seed topology parses");
        [
            Service::new(t.clone(), AddressPlan::Loopback),
            Service::new(t, AddressPlan::Links),
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    // What the bootstrapper reads from a connection.
    let mut rest = data;
    if let Ok(req) = read_frame::<_, Request>(&mut rest) {
        let mut buf = Vec::new();
        write_frame(&mut buf, &req).expect("a decoded request encodes again");
        let back: Request = read_frame(&mut buf.as_slice()).expect("its frame decodes");
        assert_eq!(back, req);
        for s in services() {
            let resp = s.answer(&req);
            let mut buf = Vec::new();
            write_frame(&mut buf, &resp).expect("an answer fits a frame");
            let back: Response = read_frame(&mut buf.as_slice()).expect("the answer decodes");
            assert_eq!(back, resp);
        }
    }
    // What a node reads back from the bootstrapper.
    let _ = read_frame::<_, Response>(&mut &data[..]);
});
