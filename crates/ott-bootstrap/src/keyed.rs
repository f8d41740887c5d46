//! Requests and answers tagged with the overlay key.
//!
//! A program holding the overlay key sends a [`SealedRequest`]: the MessagePack body of
//! its [`Request`], a fresh nonce, and a tag over both
//! ([`OverlayKey::bootstrap_tag`]). A bootstrapper holding the key answers it with a
//! [`SealedResponse`] whose tag covers the request's nonce, so the program accepts only
//! an answer made for its own request by a holder of the key.
//!
//! Without a key, requests and answers are plain [`Request`] and [`Response`] frames, as
//! before. A keyed bootstrapper still answers a plain [`Request::Client`]: viewers hold
//! no key, and a client's assignment holds nothing but the PoPs' addresses. It refuses
//! a plain [`Request::Node`], a request whose tag does not verify, and (without a key) a
//! tagged request, each with a reason that says what to fix.

use std::time::{SystemTime, UNIX_EPOCH};

use ott_proto::auth::{BootstrapDirection, OverlayKey, NONCE_LEN};
use serde::{Deserialize, Serialize};

use crate::{BootstrapError, Request, Response};

/// A request tagged with the overlay key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedRequest {
    /// MessagePack (with field names) of the [`Request`].
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// Unique per request; the answer's tag covers it.
    #[serde(with = "serde_bytes")]
    pub nonce: Vec<u8>,
    /// Tag over the nonce and the body.
    #[serde(with = "serde_bytes")]
    pub tag: Vec<u8>,
}

/// An answer tagged with the overlay key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedResponse {
    /// MessagePack (with field names) of the [`Response`].
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// Tag over the request's nonce and the body.
    #[serde(with = "serde_bytes")]
    pub tag: Vec<u8>,
}

/// A request frame as the bootstrapper reads it: tagged or plain.
///
/// Written as either form; read with [`AnyRequest::decode`] (not through serde's
/// untagged enums, which lose MessagePack's encoding of addresses).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum AnyRequest {
    /// Tagged with the overlay key.
    Sealed(SealedRequest),
    /// Without a tag.
    Plain(Request),
}

/// An answer frame as a program reads it: tagged or plain (read with
/// [`AnyResponse::decode`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum AnyResponse {
    /// Tagged with the overlay key.
    Sealed(SealedResponse),
    /// Without a tag.
    Plain(Response),
}

impl AnyRequest {
    /// Decode a frame body: a [`SealedRequest`], else a plain [`Request`].
    pub fn decode(body: &[u8]) -> Result<Self, BootstrapError> {
        if let Ok(s) = rmp_serde::from_slice::<SealedRequest>(body) {
            return Ok(Self::Sealed(s));
        }
        rmp_serde::from_slice(body)
            .map(Self::Plain)
            .map_err(|e| BootstrapError::Malformed(e.to_string()))
    }
}

impl AnyResponse {
    /// Decode a frame body: a [`SealedResponse`], else a plain [`Response`].
    pub fn decode(body: &[u8]) -> Result<Self, BootstrapError> {
        if let Ok(s) = rmp_serde::from_slice::<SealedResponse>(body) {
            return Ok(Self::Sealed(s));
        }
        rmp_serde::from_slice(body)
            .map(Self::Plain)
            .map_err(|e| BootstrapError::Malformed(e.to_string()))
    }
}

/// A request the bootstrapper may answer, and the nonce to tag the answer with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedRequest {
    /// The request.
    pub request: Request,
    /// The nonce of a tagged request; `None` for a plain one (answered plain).
    pub nonce: Option<[u8; NONCE_LEN]>,
}

fn nonce_of(bytes: &[u8]) -> Option<[u8; NONCE_LEN]> {
    <[u8; NONCE_LEN]>::try_from(bytes).ok()
}

/// The bootstrapper's check of a request frame (see the module doc); `Err` is the reason
/// of the refusal.
pub fn check_request(
    key: Option<&OverlayKey>,
    frame: AnyRequest,
) -> Result<CheckedRequest, String> {
    match (key, frame) {
        (None, AnyRequest::Plain(request)) => Ok(CheckedRequest {
            request,
            nonce: None,
        }),
        (None, AnyRequest::Sealed(_)) => Err("the request is tagged with an overlay key but \
             this bootstrapper has none: give it the overlay's --key-file, or start the \
             program without one"
            .into()),
        (Some(_), AnyRequest::Plain(Request::Node { .. })) => Err("this overlay is keyed: a \
             node's request must be tagged with the overlay key (start it with --key-file)"
            .into()),
        (Some(_), AnyRequest::Plain(request @ Request::Client { .. })) => Ok(CheckedRequest {
            request,
            nonce: None,
        }),
        (Some(k), AnyRequest::Sealed(s)) => {
            let nonce = nonce_of(&s.nonce).ok_or_else(|| {
                format!(
                    "the request's nonce has {} bytes, not {NONCE_LEN}",
                    s.nonce.len()
                )
            })?;
            k.verify_bootstrap(BootstrapDirection::Request, &nonce, &s.body, &s.tag)
                .map_err(|_| {
                    "the request's tag does not verify: the program's --key-file holds \
                     another key than the bootstrapper's"
                        .to_string()
                })?;
            let request = rmp_serde::from_slice(&s.body)
                .map_err(|e| format!("malformed bootstrap message: {e}"))?;
            Ok(CheckedRequest {
                request,
                nonce: Some(nonce),
            })
        }
    }
}

/// The answer frame to a checked request: tagged when the request was.
pub fn seal_response(
    key: Option<&OverlayKey>,
    nonce: Option<&[u8; NONCE_LEN]>,
    response: Response,
) -> Result<AnyResponse, BootstrapError> {
    match (key, nonce) {
        (Some(k), Some(n)) => {
            let body = rmp_serde::to_vec_named(&response)
                .map_err(|e| BootstrapError::Malformed(e.to_string()))?;
            let tag = k
                .bootstrap_tag(BootstrapDirection::Response, n, &body)
                .to_vec();
            Ok(AnyResponse::Sealed(SealedResponse { body, tag }))
        }
        _ => Ok(AnyResponse::Plain(response)),
    }
}

/// A fresh nonce: wall-clock nanoseconds, the process id and a per-process count, so no
/// two requests of one host share one.
pub fn fresh_nonce() -> [u8; NONCE_LEN] {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNT: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut n = [0u8; NONCE_LEN];
    n[..8].copy_from_slice(&nanos.to_be_bytes());
    n[8..12].copy_from_slice(&std::process::id().to_be_bytes());
    n[12..].copy_from_slice(&COUNT.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    n
}

/// The request frame a program sends, and the nonce its answer must be tagged with.
pub fn seal_request(
    key: Option<&OverlayKey>,
    request: &Request,
) -> Result<(AnyRequest, Option<[u8; NONCE_LEN]>), BootstrapError> {
    let Some(k) = key else {
        return Ok((AnyRequest::Plain(request.clone()), None));
    };
    let body =
        rmp_serde::to_vec_named(request).map_err(|e| BootstrapError::Malformed(e.to_string()))?;
    let nonce = fresh_nonce();
    let tag = k
        .bootstrap_tag(BootstrapDirection::Request, &nonce, &body)
        .to_vec();
    Ok((
        AnyRequest::Sealed(SealedRequest {
            body,
            nonce: nonce.to_vec(),
            tag,
        }),
        Some(nonce),
    ))
}

/// A program's check of the answer to its request (sent with `nonce`, if tagged).
///
/// With a key, an assignment must be tagged for this request; a plain refusal is passed
/// on (it grants nothing). Without a key, a tagged answer cannot be checked and is
/// refused.
pub fn open_response(
    key: Option<&OverlayKey>,
    nonce: Option<&[u8; NONCE_LEN]>,
    frame: AnyResponse,
) -> Result<Response, BootstrapError> {
    match (key.zip(nonce), frame) {
        (_, AnyResponse::Plain(r @ Response::Refused { .. })) => Ok(r),
        (None, AnyResponse::Plain(r)) => Ok(r),
        (Some(_), AnyResponse::Plain(Response::Assigned(_))) => Err(BootstrapError::Auth(
            "the bootstrapper's answer carries no tag: it runs without --key-file (or \
             something else answered)"
                .into(),
        )),
        (None, AnyResponse::Sealed(_)) => Err(BootstrapError::Auth(
            "the bootstrapper answered with a tag, but this program has no --key-file".into(),
        )),
        (Some((k, n)), AnyResponse::Sealed(s)) => {
            k.verify_bootstrap(BootstrapDirection::Response, n, &s.body, &s.tag)
                .map_err(|_| {
                    BootstrapError::Auth(
                        "the bootstrapper's answer does not verify with this program's \
                         --key-file (another key, or a forged answer)"
                            .into(),
                    )
                })?;
            rmp_serde::from_slice(&s.body).map_err(|e| BootstrapError::Malformed(e.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{read_frame_body, write_frame};

    fn key(b: u8) -> OverlayKey {
        OverlayKey::from_bytes(&[b; 32]).expect("32 bytes")
    }

    fn node() -> Request {
        Request::Node { id: "r1".into() }
    }

    fn refused() -> Response {
        Response::Refused {
            reason: "no".into(),
        }
    }

    /// Through the framing, as on the wire.
    fn body<T: Serialize>(v: &T) -> Vec<u8> {
        let mut buf = Vec::new();
        write_frame(&mut buf, v).expect("fits");
        read_frame_body(&mut buf.as_slice()).expect("a frame")
    }
    fn wire_req<T: Serialize>(v: &T) -> AnyRequest {
        AnyRequest::decode(&body(v)).expect("decodes")
    }
    fn wire_resp<T: Serialize>(v: &T) -> AnyResponse {
        AnyResponse::decode(&body(v)).expect("decodes")
    }

    #[test]
    fn test_tagged_round_trip() {
        let k = key(1);
        let (frame, nonce) = seal_request(Some(&k), &node()).expect("seals");
        let checked = check_request(Some(&k), wire_req(&frame)).expect("valid");
        assert_eq!(checked.request, node());
        assert_eq!(checked.nonce, nonce);
        let answer = seal_response(Some(&k), checked.nonce.as_ref(), refused()).expect("seals");
        assert!(matches!(answer, AnyResponse::Sealed(_)));
        let back = open_response(Some(&k), nonce.as_ref(), wire_resp(&answer)).expect("verifies");
        assert_eq!(back, refused());
        // An answer for another request (another nonce) does not verify.
        let other = fresh_nonce();
        assert!(matches!(
            open_response(Some(&k), Some(&other), answer.clone()),
            Err(BootstrapError::Auth(_))
        ));
        // Nor one checked with another key.
        assert!(matches!(
            open_response(Some(&key(2)), nonce.as_ref(), answer),
            Err(BootstrapError::Auth(_))
        ));
    }

    #[test]
    fn test_plain_frames_are_the_old_ones() {
        // An old-style plain request frame reads as AnyRequest::Plain.
        assert_eq!(wire_req(&node()), AnyRequest::Plain(node()));
        assert_eq!(wire_resp(&refused()), AnyResponse::Plain(refused()));
        let checked = check_request(None, any_plain(node())).expect("unkeyed");
        assert_eq!(checked.nonce, None);
    }

    fn any_plain(r: Request) -> AnyRequest {
        AnyRequest::Plain(r)
    }

    #[test]
    fn test_refusals() {
        let k = key(3);
        // A keyed bootstrapper: a plain node request is refused, a plain client answered.
        let why = check_request(Some(&k), any_plain(node())).expect_err("needs a tag");
        assert!(why.contains("--key-file"), "{why}");
        let client = Request::Client { id: None };
        assert_eq!(
            check_request(Some(&k), any_plain(client.clone()))
                .expect("clients hold no key")
                .request,
            client
        );
        // Another key.
        let (frame, _) = seal_request(Some(&key(4)), &node()).expect("seals");
        let why = check_request(Some(&k), frame.clone()).expect_err("wrong key");
        assert!(why.contains("does not verify"), "{why}");
        // A tampered body.
        let AnyRequest::Sealed(mut s) = seal_request(Some(&k), &node()).expect("seals").0 else {
            panic!("sealed");
        };
        s.body[1] ^= 1;
        assert!(check_request(Some(&k), AnyRequest::Sealed(s)).is_err());
        // An unkeyed bootstrapper refuses a tagged request.
        let why = check_request(None, frame).expect_err("no key");
        assert!(why.contains("has none"), "{why}");
        // A keyed program refuses an untagged assignment.
        let plain = AnyResponse::Plain(Response::Assigned(crate::Assignment {
            id: "r1".into(),
            role: ott_overlay::Role::Relay,
            bind_ctrl: "127.0.0.1:7000".parse().expect("addr"),
            bind_data: "127.0.0.1:7001".parse().expect("addr"),
            addresses: Vec::new(),
            neighbours: Vec::new(),
            pops: Vec::new(),
            topology: "t".into(),
        }));
        let nonce = fresh_nonce();
        assert!(matches!(
            open_response(Some(&k), Some(&nonce), plain.clone()),
            Err(BootstrapError::Auth(_))
        ));
        assert!(open_response(None, None, plain).is_ok());
        // A plain refusal is passed on either way.
        assert_eq!(
            open_response(Some(&k), Some(&nonce), AnyResponse::Plain(refused()))
                .expect("passed on"),
            refused()
        );
    }

    #[test]
    fn test_nonces_are_unique() {
        let a = fresh_nonce();
        let b = fresh_nonce();
        assert_ne!(a, b);
    }
}
