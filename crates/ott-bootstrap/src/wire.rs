//! Framing: a `u32` big-endian length prefix, then a `rmp-serde` body.

use std::io::{Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::BootstrapError;

/// Largest frame body accepted or sent, in bytes (64 KiB).
pub const MAX_FRAME_LEN: usize = 64 * 1024;

/// Encodes `msg` (MessagePack with field names) and writes it as one frame.
///
/// A body longer than [`MAX_FRAME_LEN`] is not written: [`BootstrapError::TooLong`].
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), BootstrapError> {
    let body =
        rmp_serde::to_vec_named(msg).map_err(|e| BootstrapError::Malformed(e.to_string()))?;
    if body.len() > MAX_FRAME_LEN {
        return Err(BootstrapError::TooLong(body.len()));
    }
    let len = u32::try_from(body.len()).map_err(|_| BootstrapError::TooLong(body.len()))?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame and decodes its body.
///
/// A length over [`MAX_FRAME_LEN`] is refused before anything is allocated
/// ([`BootstrapError::TooLong`]); a body that is not a `T` is
/// [`BootstrapError::Malformed`]; a stream that ends early is an
/// [`io::ErrorKind::UnexpectedEof`](std::io::ErrorKind::UnexpectedEof) I/O error.
pub fn read_frame<R: Read, T: DeserializeOwned>(r: &mut R) -> Result<T, BootstrapError> {
    let body = read_frame_body(r)?;
    rmp_serde::from_slice(&body).map_err(|e| BootstrapError::Malformed(e.to_string()))
}

/// Reads one frame and returns its body undecoded (same limits as [`read_frame`]).
pub fn read_frame_body<R: Read>(r: &mut R) -> Result<Vec<u8>, BootstrapError> {
    let mut prefix = [0u8; 4];
    r.read_exact(&mut prefix)?;
    let len = u32::from_be_bytes(prefix);
    let len = usize::try_from(len).map_err(|_| BootstrapError::TooLong(usize::MAX))?;
    if len > MAX_FRAME_LEN {
        return Err(BootstrapError::TooLong(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Request, Response};

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        let req = Request::Node { id: "a".into() };
        write_frame(&mut buf, &req).expect("fits");
        assert_eq!(
            u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize,
            buf.len() - 4
        );
        let back: Request = read_frame(&mut buf.as_slice()).expect("decodes");
        assert_eq!(back, req);
    }

    #[test]
    fn oversized_prefix_is_refused_without_reading() {
        let mut buf = (MAX_FRAME_LEN as u32 + 1).to_be_bytes().to_vec();
        buf.extend_from_slice(b"xx");
        let err = read_frame::<_, Request>(&mut buf.as_slice()).expect_err("too long");
        assert!(
            matches!(err, BootstrapError::TooLong(n) if n == MAX_FRAME_LEN + 1),
            "{err}"
        );
        let err = read_frame::<_, Request>(&mut [0xff; 4].as_slice()).expect_err("too long");
        assert_eq!(
            err.to_string(),
            "bootstrap message too long: 4294967295 bytes (at most 65536)"
        );
    }

    #[test]
    fn garbage_and_truncation() {
        let mut buf = 3u32.to_be_bytes().to_vec();
        buf.extend_from_slice(&[0xc1, 0xc1, 0xc1]);
        let err = read_frame::<_, Request>(&mut buf.as_slice()).expect_err("garbage");
        assert!(matches!(err, BootstrapError::Malformed(_)), "{err}");
        let mut buf = 10u32.to_be_bytes().to_vec();
        buf.extend_from_slice(&[1, 2]);
        let err = read_frame::<_, Request>(&mut buf.as_slice()).expect_err("short");
        assert!(
            matches!(&err, BootstrapError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof)
        );
        // A valid frame of the wrong type is malformed, not a panic.
        let mut buf = Vec::new();
        write_frame(&mut buf, &Request::Client { id: None }).expect("fits");
        let err = read_frame::<_, Response>(&mut buf.as_slice()).expect_err("wrong type");
        assert!(matches!(err, BootstrapError::Malformed(_)), "{err}");
    }

    #[test]
    fn oversized_message_is_not_written() {
        let mut buf = Vec::new();
        let big = Response::Refused {
            reason: "x".repeat(MAX_FRAME_LEN),
        };
        assert!(matches!(
            write_frame(&mut buf, &big),
            Err(BootstrapError::TooLong(_))
        ));
        assert!(buf.is_empty());
    }
}
