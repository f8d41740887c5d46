//! Control datagrams: `ott_proto::decode` on any bytes returns `Ok` or `Err`, never
//! panics; what it accepts encodes again and decodes to the same message.
#![deny(unsafe_code)]
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = ott_proto::decode(data) {
        let _ = m.kind();
        let b = ott_proto::encode(&m).expect("a decoded message encodes again");
        assert_eq!(ott_proto::decode(&b).expect("its encoding decodes"), m);
    }
});
