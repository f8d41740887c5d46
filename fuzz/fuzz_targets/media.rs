//! Media datagrams: `MediaHeader::parse` on any bytes returns `Ok` or `Err`, never
//! panics; an accepted header writes back to the same 24 bytes.
#![deny(unsafe_code)]
#![no_main]
use libfuzzer_sys::fuzz_target;
use ott_proto::{flags, MediaHeader, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = MediaHeader::parse(data) {
        assert!(h.frag_index < h.frag_count);
        assert_eq!(h.to_bytes()[..], data[..HEADER_LEN]);
        let mut copy = data.to_vec();
        MediaHeader::mark_retransmit(&mut copy);
        let r = MediaHeader::parse(&copy).expect("still a header once marked");
        assert!(r.has(flags::RETRANSMIT));
        assert_eq!(r.flags & !flags::RETRANSMIT, h.flags & !flags::RETRANSMIT);
        assert_eq!(copy[HEADER_LEN..], data[HEADER_LEN..]);
    }
});
