//! HTTP request heads: `httpd::parse_request` (the parser of the bounded server behind
//! `--status`, `/metrics` and the client's `--http`) on any bytes returns `Ok` or `Err`,
//! never panics, and stays within its limits: an accepted request's head fit
//! `max_head`, it has at most `max_headers` headers, its body at most `max_body` bytes,
//! its path starts with `/`; a refusal carries an HTTP error status. The page helpers
//! that show what came from the network (HTML escaping, URL decoding, same-origin check)
//! run on what was parsed.
#![deny(unsafe_code)]
#![no_main]
use libfuzzer_sys::fuzz_target;

// The server module, compiled into this target (apps is a binary-heavy crate; the
// module needs only anyhow, httparse, ott-proto, serde, serde_json and tracing).
#[allow(dead_code, unused_imports)]
#[path = "../../apps/src/httpd.rs"]
mod httpd;

fuzz_target!(|data: &[u8]| {
    // Small limits, so the fuzzer reaches them.
    let limits = httpd::Limits {
        max_head: 1024,
        max_headers: 8,
        max_body: 256,
        ..httpd::Limits::default()
    };
    match httpd::parse_request(data, &limits) {
        Ok(req) => {
            assert!(req.path.starts_with('/'), "{:?}", req.path);
            assert!(req.headers.len() <= limits.max_headers);
            assert!(req.body.len() <= limits.max_body);
            assert!(req.method.len() + req.path.len() + req.query.len() <= limits.max_head);
            let escaped = httpd::escape_html(&httpd::url_decode(&req.query));
            assert!(
                !escaped.contains('<') && !escaped.contains('"'),
                "{escaped}"
            );
            let _ = httpd::check_same_origin(&req);
            for (k, v) in &req.headers {
                assert_eq!(k, &k.to_ascii_lowercase());
                let _ = httpd::host_is_address(v);
            }
        }
        Err((status, why)) => {
            assert!((400..600).contains(&status), "{status} {why}");
        }
    }
    // The same bytes cut anywhere never panic either (a peer that stops mid-head).
    if let Some(half) = data.get(..data.len() / 2) {
        let _ = httpd::parse_request(half, &limits);
    }
});
