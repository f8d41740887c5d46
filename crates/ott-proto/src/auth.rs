//! The shared overlay key: message authentication of control and media datagrams.
//!
//! Every member of an overlay (bootstrapper, servers, relays, PoPs) may hold the same
//! secret of at least [`MIN_KEY_LEN`] bytes. From it, [`OverlayKey`] derives one subkey
//! per use (control, media, bootstrap), so a tag made for one use never verifies for
//! another. Tags are keyed BLAKE3 truncated to [`TAG_LEN`] (16) bytes, compared in
//! constant time.
//!
//! - **Control** datagrams between members are sealed ([`ControlSealer::seal`]): a
//!   19-byte prefix (magic `"OC"`, version, sender id, counter), the unchanged control
//!   envelope, then the tag over everything before it. The receiver's [`ReplayGuard`]
//!   checks the tag first, then the counter against a per-sender sliding window, so a
//!   replayed or forged datagram is refused before its body is decoded.
//! - **Media** datagrams keep their 24-byte header and get the tag as a trailer
//!   ([`OverlayKey::seal_media`], [`OverlayKey::open_media`]). The tag covers every byte
//!   but the hop-local flag bits [`HOP_FLAGS`] (retransmission, cached replay), which
//!   relays set on copies they resend; so a relay forwards, resends and replays a
//!   server's datagram without making a new tag. Replays of media are left to duplicate
//!   suppression by sequence number. Hash, then MAC: the datagram is hashed once into a
//!   32-byte [`media_digest`] (BLAKE3 under a public key, collision resistant like
//!   BLAKE3), and each tag is a keyed BLAKE3 of that digest alone, one compression: a
//!   PoP that checks a datagram's overlay tag and seals it for ten viewers
//!   ([`SessionKey`]) hashes its bytes once, not eleven times.
//! - **Bootstrap** requests and answers carry a tag over their body and a nonce
//!   ([`OverlayKey::bootstrap_tag`]).
//!
//! Pure code: no I/O, no clock. The first counter of a sender comes from its caller (the
//! programs use their incarnation, microseconds of the wall clock at start, so a
//! restarted sender's counters are above those it used before).

use std::collections::HashMap;
use std::fmt;

use crate::media::{flags, HEADER_LEN};

/// Length of every tag, bytes.
pub const TAG_LEN: usize = 16;
/// Shortest accepted key material, bytes.
pub const MIN_KEY_LEN: usize = 32;
/// First two bytes of a sealed control datagram (a plain control envelope never starts
/// with them, nor does a media datagram, which starts with `"OT"`).
pub const CONTROL_MAGIC: [u8; 2] = *b"OC";
/// Version of the sealed control layout.
pub const AUTH_VERSION: u8 = 1;
/// Length of the prefix of a sealed control datagram: magic, version, sender, counter.
pub const SEALED_PREFIX_LEN: usize = 2 + 1 + 8 + 8;
/// Bytes a sealed control datagram has beyond its envelope.
pub const SEAL_OVERHEAD: usize = SEALED_PREFIX_LEN + TAG_LEN;
/// Flag bits of the media header left out of the media tag: relays set them on copies
/// they resend (a retransmission, a cached replay) without re-tagging.
pub const HOP_FLAGS: u8 = flags::RETRANSMIT | flags::CACHED;
/// Width of the per-sender replay window: a control datagram may arrive this many
/// counter values behind the newest one seen from its sender.
pub const REPLAY_WINDOW: u64 = 128;
/// Default bound on the senders a [`ReplayGuard`] remembers.
pub const DEFAULT_MAX_SENDERS: usize = 1024;
/// Length of a bootstrap nonce, bytes.
pub const NONCE_LEN: usize = 16;

const CONTEXT_CONTROL: &str = "ott overlay key v1: control datagram tag";
const CONTEXT_MEDIA: &str = "ott overlay key v1: media datagram tag";
const CONTEXT_BOOTSTRAP: &str = "ott overlay key v1: bootstrap message tag";
const CONTEXT_SENDER: &str = "ott overlay v1: sender id";
/// Length of a [`media_digest`], bytes.
pub const DIGEST_LEN: usize = 32;
/// The public key of [`media_digest`]: `blake3::derive_key("ott overlay v1: media
/// digest", b"")`, fixed so that the digest is a plain (if domain-separated) hash.
const DIGEST_CONTEXT: &str = "ott overlay v1: media digest";

/// The digest every media tag is made from: BLAKE3, keyed with a public constant (a
/// domain separation, no secret), of the datagram (header and payload, without a tag)
/// with the [`HOP_FLAGS`] bits of its header masked; a datagram shorter than the header
/// is hashed as it is. Tags ([`OverlayKey::media_tag_of`], [`SessionKey::tag_of`]) are
/// keyed hashes of these 32 bytes, so one digest serves any number of tags.
pub fn media_digest(datagram: &[u8]) -> [u8; DIGEST_LEN] {
    let key = digest_key();
    if datagram.len() < HEADER_LEN || datagram[3] & HOP_FLAGS == 0 {
        return *blake3::keyed_hash(&key, datagram).as_bytes();
    }
    let mut h = blake3::Hasher::new_keyed(&key);
    let mut header = [0u8; HEADER_LEN];
    header.copy_from_slice(&datagram[..HEADER_LEN]);
    header[3] &= !HOP_FLAGS;
    h.update(&header);
    h.update(&datagram[HEADER_LEN..]);
    *h.finalize().as_bytes()
}

/// [`media_digest`] of each of `datagrams`, in order, into `digests` (cleared first):
/// the same bytes, computed side by side (see `keyed_hashes_many`).
pub fn media_digests_many(datagrams: &[&[u8]], digests: &mut Vec<[u8; DIGEST_LEN]>) {
    keyed_hashes_many(&digest_key(), datagrams, digests);
}

fn digest_key() -> [u8; 32] {
    static KEY: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    *KEY.get_or_init(|| blake3::derive_key(DIGEST_CONTEXT, b""))
}

/// The 16-byte tag of a digest under `key`: keyed BLAKE3 of the 32 bytes, one
/// compression.
fn tag_of(key: &[u8; 32], digest: &[u8; DIGEST_LEN]) -> [u8; TAG_LEN] {
    truncate(blake3::keyed_hash(key, digest))
}

/// Why key material was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Fewer than [`MIN_KEY_LEN`] bytes.
    #[error("overlay key has {len} bytes, at least {min} random bytes are needed (e.g. `head -c 32 /dev/urandom > overlay.key`)")]
    TooShort {
        /// Bytes given.
        len: usize,
        /// The minimum.
        min: usize,
    },
}

/// Why an authenticated datagram was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Too short to hold what a tagged datagram of this kind holds.
    #[error("datagram of {0} bytes is too short to carry a tag")]
    Short(usize),
    /// A control datagram that is not sealed (no `"OC"` prefix).
    #[error("control datagram is not sealed with the overlay key")]
    NotSealed,
    /// A sealed layout of another version.
    #[error("unsupported sealed-datagram version {0}")]
    Version(u8),
    /// The tag does not verify: forged, damaged, or made with another key.
    #[error("tag does not verify (forged, damaged, or another overlay key)")]
    BadTag,
    /// The counter was already seen from this sender.
    #[error("replayed control datagram (sender {sender:016x}, counter {counter})")]
    Replay {
        /// Sender id.
        sender: u64,
        /// The repeated counter.
        counter: u64,
    },
    /// The counter is older than the sender's replay window.
    #[error("control datagram too old (sender {sender:016x}, counter {counter}, newest {newest})")]
    TooOld {
        /// Sender id.
        sender: u64,
        /// The old counter.
        counter: u64,
        /// The newest counter seen from the sender.
        newest: u64,
    },
}

/// The overlay's shared secret, as per-use subkeys. Its `Debug` shows no key bytes.
#[derive(Clone)]
pub struct OverlayKey {
    control: [u8; 32],
    media: [u8; 32],
    bootstrap: [u8; 32],
}

impl fmt::Debug for OverlayKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OverlayKey(..)")
    }
}

/// The key of one viewer's session with a PoP: the PoP tags every media datagram it
/// sends to that viewer with it (a 16-byte trailer, keyed BLAKE3 of the datagram's
/// [`media_digest`], as [`OverlayKey::media_tag`]), and the viewer writes nothing whose
/// tag does not verify.
///
/// The PoP derives it from a secret of its own and the viewer's address
/// ([`SessionKey::derive`]) and sends it only to that address, after the viewer proved it
/// receives there (the cookie exchange), so an off-path sender never learns it.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKey([u8; 32]);

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

const CONTEXT_SESSION: &str = "ott overlay key v1: viewer session key";
const CONTEXT_COOKIE: &str = "ott overlay key v1: viewer cookie";

impl SessionKey {
    /// A session key from its bytes (as received in `Admitted`).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The key's bytes (to send in `Admitted`).
    pub fn bytes(&self) -> [u8; 32] {
        self.0
    }

    /// The session key of the viewer at `addr` (data address), derived from the PoP's
    /// `secret`: stable for the PoP's life, different for every address.
    pub fn derive(secret: &[u8; 32], addr: std::net::SocketAddr) -> Self {
        let mut h = blake3::Hasher::new_derive_key(CONTEXT_SESSION);
        h.update(secret);
        h.update(addr.to_string().as_bytes());
        Self(*h.finalize().as_bytes())
    }

    /// The tag of `datagram` (header and payload, without a tag).
    pub fn tag(&self, datagram: &[u8]) -> [u8; TAG_LEN] {
        self.tag_of(&media_digest(datagram))
    }

    /// The tag of a datagram whose [`media_digest`] is `digest`: one compression.
    pub fn tag_of(&self, digest: &[u8; DIGEST_LEN]) -> [u8; TAG_LEN] {
        tag_of(&self.0, digest)
    }

    /// The tags of many datagrams (header and payload, without a tag) at once, in
    /// order: `tags` is cleared and gets `self.tag(d)` for each `d`. Faster than one
    /// [`SessionKey::tag`] per datagram (the digests side by side, see
    /// [`media_digests_many`]).
    pub fn tags_many(&self, datagrams: &[&[u8]], tags: &mut Vec<[u8; TAG_LEN]>) {
        let mut digests = Vec::with_capacity(datagrams.len());
        media_digests_many(datagrams, &mut digests);
        tags.clear();
        tags.extend(digests.iter().map(|d| self.tag_of(d)));
    }

    /// `datagram` (header and payload) with its tag appended.
    pub fn seal(&self, datagram: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(datagram.len() + TAG_LEN);
        out.extend_from_slice(datagram);
        out.extend_from_slice(&self.tag(datagram));
        out
    }

    /// Check the trailing tag; on success, the datagram without it.
    pub fn open<'a>(&self, datagram: &'a [u8]) -> Result<&'a [u8], AuthError> {
        let cut = datagram
            .len()
            .checked_sub(TAG_LEN)
            .filter(|c| *c >= HEADER_LEN)
            .ok_or(AuthError::Short(datagram.len()))?;
        let (body, tag) = datagram.split_at(cut);
        if tags_equal(&self.tag(body), tag) {
            Ok(body)
        } else {
            Err(AuthError::BadTag)
        }
    }
}

/// A viewer's return-routability cookie: a keyed hash, with a PoP's `secret`, of the
/// viewer's data address (IP and port) and a coarse time `bucket`. Stateless: the PoP
/// recomputes it to check an echo.
pub fn viewer_cookie(secret: &[u8; 32], addr: std::net::SocketAddr, bucket: u64) -> u64 {
    let mut h = blake3::Hasher::new_derive_key(CONTEXT_COOKIE);
    h.update(secret);
    h.update(&bucket.to_be_bytes());
    h.update(addr.to_string().as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.finalize().as_bytes()[..8]);
    u64::from_be_bytes(b)
}

/// Which way a bootstrap message goes, for [`OverlayKey::bootstrap_tag`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootstrapDirection {
    /// A program's request to the bootstrapper.
    Request,
    /// The bootstrapper's answer.
    Response,
}

fn truncate(h: blake3::Hash) -> [u8; TAG_LEN] {
    let mut t = [0u8; TAG_LEN];
    t.copy_from_slice(&h.as_bytes()[..TAG_LEN]);
    t
}

/// Length of a BLAKE3 chunk: inputs longer than one and at most two chunks (every
/// full-size media datagram) are the ones [`keyed_hashes_many`] hashes side by side.
const CHUNK_LEN: usize = 1024;
/// Length of a BLAKE3 block.
const BLOCK_LEN: usize = 64;

/// BLAKE3's domain flags (from the BLAKE3 specification).
const FLAG_CHUNK_START: u8 = 1 << 0;
const FLAG_CHUNK_END: u8 = 1 << 1;
const FLAG_PARENT: u8 = 1 << 2;
const FLAG_ROOT: u8 = 1 << 3;
const FLAG_KEYED_HASH: u8 = 1 << 4;

/// The keyed BLAKE3 hash under `key` of each of `datagrams` with the [`HOP_FLAGS`] bits
/// of its header masked, in order, into `out` (cleared first): [`media_digest`] when
/// `key` is its public key.
///
/// The result is exactly that of one [`blake3::keyed_hash`] per datagram; only the
/// order of work differs. An input of more than one and at most two BLAKE3 chunks (1,025
/// to 2,048 bytes: a full-size media datagram) is a tree of two chunks under one root.
/// Its three parts are computed for all such inputs together with the SIMD "many
/// inputs" routine of the `blake3` crate (8 inputs side by side with AVX2, 16 with
/// AVX-512), which the crate itself only uses for the chunks of one long input: the
/// first chunks; the full blocks of the second chunks (grouped by their number), whose
/// last block is then compressed one by one; and the roots. Other inputs, and any whose
/// header carries hop flags, take the one-at-a-time path. The tests compare both.
fn keyed_hashes_many(key: &[u8; 32], datagrams: &[&[u8]], out: &mut Vec<[u8; DIGEST_LEN]>) {
    use blake3::platform::{le_bytes_from_words_32, words_from_le_bytes_32, Platform};
    out.clear();
    let plain = |d: &[u8]| d.len() < HEADER_LEN || d[3] & HOP_FLAGS == 0;
    let two: Vec<&[u8]> = datagrams
        .iter()
        .copied()
        .filter(|d| d.len() > CHUNK_LEN && d.len() <= 2 * CHUNK_LEN && plain(d))
        .collect();
    let platform = Platform::detect();
    let words = words_from_le_bytes_32(key);
    // Per input: the parent block, first chunk's CV then second chunk's.
    let mut parents = vec![[0u8; BLOCK_LEN]; two.len()];
    if !two.is_empty() {
        let firsts: Vec<&[u8; CHUNK_LEN]> = two.iter().filter_map(|d| d.first_chunk()).collect();
        let mut cvs = vec![0u8; 32 * two.len()];
        platform.hash_many(
            &firsts,
            &words,
            0,
            blake3::IncrementCounter::No,
            FLAG_KEYED_HASH,
            FLAG_CHUNK_START,
            FLAG_CHUNK_END,
            &mut cvs,
        );
        for (p, cv) in parents.iter_mut().zip(cvs.chunks_exact(32)) {
            p[..32].copy_from_slice(cv);
        }
        // The second chunk: `full` whole blocks, then a last block of 1 to 64 bytes.
        let full = |d: &[u8]| (d.len() - CHUNK_LEN - 1) / BLOCK_LEN;
        let mut cv1 = vec![words; two.len()];
        let mut group: Vec<usize> = Vec::with_capacity(two.len());
        for blocks in 1..CHUNK_LEN / BLOCK_LEN {
            group.clear();
            group.extend((0..two.len()).filter(|&j| full(two[j]) == blocks));
            if !group.is_empty() {
                second_chunk_blocks(platform, &words, &two, &group, blocks, &mut cv1);
            }
        }
        for ((d, cv), p) in two.iter().zip(cv1.iter_mut()).zip(parents.iter_mut()) {
            let start = CHUNK_LEN + full(d) * BLOCK_LEN;
            let last = &d[start..];
            let mut block = [0u8; BLOCK_LEN];
            block[..last.len()].copy_from_slice(last);
            let first = if start == CHUNK_LEN {
                FLAG_CHUNK_START
            } else {
                0
            };
            platform.compress_in_place(
                cv,
                &block,
                last.len() as u8,
                1,
                FLAG_KEYED_HASH | FLAG_CHUNK_END | first,
            );
            p[32..].copy_from_slice(&le_bytes_from_words_32(cv));
        }
    }
    // The roots: one parent node each, compressed as the root.
    let mut roots = vec![0u8; 32 * two.len()];
    if !two.is_empty() {
        let blocks: Vec<&[u8; BLOCK_LEN]> = parents.iter().collect();
        platform.hash_many(
            &blocks,
            &words,
            0,
            blake3::IncrementCounter::No,
            FLAG_KEYED_HASH | FLAG_PARENT | FLAG_ROOT,
            0,
            0,
            &mut roots,
        );
    }
    let mut next = roots.chunks_exact(32);
    for d in datagrams {
        let batched = d.len() > CHUNK_LEN && d.len() <= 2 * CHUNK_LEN && plain(d);
        let hash = match batched.then(|| next.next()).flatten() {
            Some(root) => {
                let mut t = [0u8; DIGEST_LEN];
                t.copy_from_slice(root);
                t
            }
            None if plain(d) => *blake3::keyed_hash(key, d).as_bytes(),
            None => {
                let mut h = blake3::Hasher::new_keyed(key);
                let mut header = [0u8; HEADER_LEN];
                header.copy_from_slice(&d[..HEADER_LEN]);
                header[3] &= !HOP_FLAGS;
                h.update(&header);
                h.update(&d[HEADER_LEN..]);
                *h.finalize().as_bytes()
            }
        };
        out.push(hash);
    }
}

/// The whole blocks (`blocks` of them, 1 to 15) before the last block of the second
/// chunk of the inputs `two[j]`, `j` in `group`, side by side: each CV in `cv1` becomes
/// the chaining value after them.
fn second_chunk_blocks(
    platform: blake3::platform::Platform,
    words: &[u32; 8],
    two: &[&[u8]],
    group: &[usize],
    blocks: usize,
    cv1: &mut [[u32; 8]],
) {
    fn run<const N: usize>(
        platform: blake3::platform::Platform,
        words: &[u32; 8],
        two: &[&[u8]],
        group: &[usize],
        cv1: &mut [[u32; 8]],
    ) {
        let inputs: Vec<&[u8; N]> = group
            .iter()
            .filter_map(|&j| two[j].get(CHUNK_LEN..).and_then(|r| r.first_chunk()))
            .collect();
        let mut out = vec![0u8; 32 * inputs.len()];
        platform.hash_many(
            &inputs,
            words,
            1,
            blake3::IncrementCounter::No,
            FLAG_KEYED_HASH,
            FLAG_CHUNK_START,
            0,
            &mut out,
        );
        for (&j, cv) in group.iter().zip(out.chunks_exact(32)) {
            if let (Some(slot), Ok(cv)) = (cv1.get_mut(j), <&[u8; 32]>::try_from(cv)) {
                *slot = blake3::platform::words_from_le_bytes_32(cv);
            }
        }
    }
    let f = match blocks {
        1 => run::<64>,
        2 => run::<128>,
        3 => run::<192>,
        4 => run::<256>,
        5 => run::<320>,
        6 => run::<384>,
        7 => run::<448>,
        8 => run::<512>,
        9 => run::<576>,
        10 => run::<640>,
        11 => run::<704>,
        12 => run::<768>,
        13 => run::<832>,
        14 => run::<896>,
        _ => run::<960>,
    };
    f(platform, words, two, group, cv1);
}

/// Constant-time comparison of two tags.
fn tags_equal(a: &[u8; TAG_LEN], b: &[u8]) -> bool {
    match <&[u8; TAG_LEN]>::try_from(b) {
        Ok(b) => constant_time_eq::constant_time_eq_16(a, b),
        Err(_) => false,
    }
}

impl OverlayKey {
    /// A key from its material (the contents of a key file): at least [`MIN_KEY_LEN`]
    /// bytes, all of them used.
    pub fn from_bytes(material: &[u8]) -> Result<Self, KeyError> {
        if material.len() < MIN_KEY_LEN {
            return Err(KeyError::TooShort {
                len: material.len(),
                min: MIN_KEY_LEN,
            });
        }
        Ok(Self {
            control: blake3::derive_key(CONTEXT_CONTROL, material),
            media: blake3::derive_key(CONTEXT_MEDIA, material),
            bootstrap: blake3::derive_key(CONTEXT_BOOTSTRAP, material),
        })
    }

    /// The media tag of `datagram` (header and payload, without a tag): keyed BLAKE3
    /// of its [`media_digest`] (which leaves the header's [`HOP_FLAGS`] bits out).
    pub fn media_tag(&self, datagram: &[u8]) -> [u8; TAG_LEN] {
        self.media_tag_of(&media_digest(datagram))
    }

    /// The media tag of a datagram whose [`media_digest`] is `digest`: one compression.
    pub fn media_tag_of(&self, digest: &[u8; DIGEST_LEN]) -> [u8; TAG_LEN] {
        tag_of(&self.media, digest)
    }

    /// Append the media tag to a datagram (header and payload).
    pub fn seal_media(&self, datagram: &mut Vec<u8>) {
        let tag = self.media_tag(datagram);
        datagram.extend_from_slice(&tag);
    }

    /// Check the trailing tag of a media datagram; on success, the datagram without it.
    pub fn open_media<'a>(&self, datagram: &'a [u8]) -> Result<&'a [u8], AuthError> {
        let Some(cut) = datagram.len().checked_sub(TAG_LEN) else {
            return Err(AuthError::Short(datagram.len()));
        };
        if cut < HEADER_LEN {
            return Err(AuthError::Short(datagram.len()));
        }
        let (body, tag) = datagram.split_at(cut);
        if tags_equal(&self.media_tag(body), tag) {
            Ok(body)
        } else {
            Err(AuthError::BadTag)
        }
    }

    /// Check the trailing tags of many media datagrams at once: `ok` is cleared and
    /// gets, for each datagram, whether [`OverlayKey::open_media`] accepts it (then its
    /// body is the datagram without its last [`TAG_LEN`] bytes), and `digests` the
    /// [`media_digest`] of each body (of an empty one for a datagram too short to carry
    /// a tag), for the tags to be made from it next ([`SessionKey::tag_of`]). Faster
    /// than one `open_media` per datagram (see [`media_digests_many`]); the same check,
    /// tags compared in constant time.
    pub fn check_media_many(
        &self,
        datagrams: &[&[u8]],
        ok: &mut Vec<bool>,
        digests: &mut Vec<[u8; DIGEST_LEN]>,
    ) {
        ok.clear();
        let mut bodies: Vec<&[u8]> = Vec::with_capacity(datagrams.len());
        for d in datagrams {
            match d.len().checked_sub(TAG_LEN).filter(|&c| c >= HEADER_LEN) {
                Some(cut) => bodies.push(&d[..cut]),
                None => bodies.push(&[]),
            }
        }
        media_digests_many(&bodies, digests);
        for ((d, body), digest) in datagrams.iter().zip(&bodies).zip(digests.iter()) {
            // An empty body stands for a datagram too short to carry a tag.
            ok.push(!body.is_empty() && tags_equal(&self.media_tag_of(digest), &d[body.len()..]));
        }
    }

    fn control_tag(&self, bytes: &[u8]) -> [u8; TAG_LEN] {
        truncate(blake3::keyed_hash(&self.control, bytes))
    }

    /// The tag of a bootstrap message: over the direction, the request's nonce and the
    /// exact body bytes.
    pub fn bootstrap_tag(
        &self,
        direction: BootstrapDirection,
        nonce: &[u8; NONCE_LEN],
        body: &[u8],
    ) -> [u8; TAG_LEN] {
        let mut h = blake3::Hasher::new_keyed(&self.bootstrap);
        h.update(match direction {
            BootstrapDirection::Request => b"request ",
            BootstrapDirection::Response => b"response",
        });
        h.update(nonce);
        h.update(body);
        truncate(h.finalize())
    }

    /// Check a bootstrap message's tag (see [`OverlayKey::bootstrap_tag`]).
    pub fn verify_bootstrap(
        &self,
        direction: BootstrapDirection,
        nonce: &[u8; NONCE_LEN],
        body: &[u8],
        tag: &[u8],
    ) -> Result<(), AuthError> {
        if tags_equal(&self.bootstrap_tag(direction, nonce, body), tag) {
            Ok(())
        } else {
            Err(AuthError::BadTag)
        }
    }
}

/// A stable 64-bit sender id for a node id and the socket it sends from (`"ctrl"`,
/// `"data"`): each sending socket has its own counter, so its own replay window.
pub fn sender_id(node: &str, socket: &str) -> u64 {
    let mut h = blake3::Hasher::new_derive_key(CONTEXT_SENDER);
    h.update(&(node.len() as u64).to_be_bytes());
    h.update(node.as_bytes());
    h.update(socket.as_bytes());
    let b = h.finalize();
    let mut id = [0u8; 8];
    id.copy_from_slice(&b.as_bytes()[..8]);
    u64::from_be_bytes(id)
}

/// Whether a datagram has the sealed control layout (starts with [`CONTROL_MAGIC`]);
/// says nothing about its tag.
pub fn is_sealed_control(datagram: &[u8]) -> bool {
    datagram.len() >= 2 && datagram[..2] == CONTROL_MAGIC
}

/// Seals the control datagrams of one sending socket: one sender id, one counter.
#[derive(Debug, Clone)]
pub struct ControlSealer {
    key: OverlayKey,
    sender: u64,
    next: u64,
}

impl ControlSealer {
    /// A sealer for `sender` whose first counter is `first_counter`. Give a value above
    /// every counter an earlier run of the same sender used (the programs give their
    /// incarnation, microseconds of the wall clock at start).
    pub fn new(key: OverlayKey, sender: u64, first_counter: u64) -> Self {
        Self {
            key,
            sender,
            next: first_counter,
        }
    }

    /// The counter the next datagram gets.
    pub fn next_counter(&self) -> u64 {
        self.next
    }

    /// Seal an encoded control envelope (see [`crate::encode`]).
    pub fn seal(&mut self, envelope: &[u8]) -> Vec<u8> {
        let counter = self.next;
        self.next = self.next.wrapping_add(1);
        let mut out = Vec::with_capacity(envelope.len() + SEAL_OVERHEAD);
        out.extend_from_slice(&CONTROL_MAGIC);
        out.push(AUTH_VERSION);
        out.extend_from_slice(&self.sender.to_be_bytes());
        out.extend_from_slice(&counter.to_be_bytes());
        out.extend_from_slice(envelope);
        let tag = self.key.control_tag(&out);
        out.extend_from_slice(&tag);
        out
    }

    /// Encode and seal a control message.
    pub fn seal_message(&mut self, msg: &crate::Message) -> Result<Vec<u8>, crate::EncodeError> {
        crate::encode(msg).map(|b| self.seal(&b))
    }
}

/// A sealed control datagram that passed its checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened<'a> {
    /// The sender id.
    pub sender: u64,
    /// Its counter.
    pub counter: u64,
    /// The control envelope, for [`crate::decode`].
    pub envelope: &'a [u8],
}

#[derive(Debug, Clone, Copy)]
struct Window {
    /// Newest counter accepted.
    top: u64,
    /// Bit `i` set: counter `top - i` was accepted.
    seen: u128,
    /// When it was last used (the guard's own operation count), for eviction.
    used: u64,
}

impl Window {
    fn check(&self, sender: u64, counter: u64) -> Result<(), AuthError> {
        if counter > self.top {
            return Ok(());
        }
        let behind = self.top - counter;
        if behind >= REPLAY_WINDOW {
            return Err(AuthError::TooOld {
                sender,
                counter,
                newest: self.top,
            });
        }
        if self.seen & (1u128 << behind) != 0 {
            return Err(AuthError::Replay { sender, counter });
        }
        Ok(())
    }

    /// Record `counter` (already [`Window::check`]ed).
    fn record(&mut self, counter: u64) {
        if counter > self.top {
            let shift = counter - self.top;
            self.seen = if shift >= REPLAY_WINDOW {
                0
            } else {
                self.seen << shift
            };
            self.seen |= 1;
            self.top = counter;
        } else {
            self.seen |= 1u128 << (self.top - counter);
        }
    }
}

/// The receiving side of sealed control datagrams: checks tags, then counters against a
/// sliding window per sender (bounded number of senders, the least recently heard one
/// forgotten first; only datagrams with a valid tag make an entry).
#[derive(Debug)]
pub struct ReplayGuard {
    key: OverlayKey,
    windows: HashMap<u64, Window>,
    max_senders: usize,
    ops: u64,
}

impl ReplayGuard {
    /// A guard for `key` remembering up to [`DEFAULT_MAX_SENDERS`] senders.
    pub fn new(key: OverlayKey) -> Self {
        Self::with_max_senders(key, DEFAULT_MAX_SENDERS)
    }

    /// A guard remembering up to `max` senders (at least one).
    pub fn with_max_senders(key: OverlayKey, max: usize) -> Self {
        Self {
            key,
            windows: HashMap::new(),
            max_senders: max.max(1),
            ops: 0,
        }
    }

    /// The key this guard checks with.
    pub fn key(&self) -> &OverlayKey {
        &self.key
    }

    /// Senders remembered.
    pub fn senders(&self) -> usize {
        self.windows.len()
    }

    /// Check a sealed control datagram: layout, tag, then counter. On success the counter
    /// is recorded, so the same datagram is refused next time.
    pub fn open<'a>(&mut self, datagram: &'a [u8]) -> Result<Opened<'a>, AuthError> {
        if !is_sealed_control(datagram) {
            return Err(AuthError::NotSealed);
        }
        if datagram.len() < SEAL_OVERHEAD + 1 {
            return Err(AuthError::Short(datagram.len()));
        }
        if datagram[2] != AUTH_VERSION {
            return Err(AuthError::Version(datagram[2]));
        }
        let (signed, tag) = datagram.split_at(datagram.len() - TAG_LEN);
        if !tags_equal(&self.key.control_tag(signed), tag) {
            return Err(AuthError::BadTag);
        }
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&signed[o..o + 8]);
            u64::from_be_bytes(b)
        };
        let sender = u64_at(3);
        let counter = u64_at(11);
        self.ops += 1;
        let ops = self.ops;
        match self.windows.get_mut(&sender) {
            Some(w) => {
                w.check(sender, counter)?;
                w.record(counter);
                w.used = ops;
            }
            None => {
                if self.windows.len() >= self.max_senders {
                    let oldest = self
                        .windows
                        .iter()
                        .min_by_key(|(_, w)| w.used)
                        .map(|(s, _)| *s);
                    if let Some(s) = oldest {
                        self.windows.remove(&s);
                    }
                }
                self.windows.insert(
                    sender,
                    Window {
                        top: counter,
                        seen: 1,
                        used: ops,
                    },
                );
            }
        }
        Ok(Opened {
            sender,
            counter,
            envelope: &signed[SEALED_PREFIX_LEN..],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode, encode, MediaHeader, Message};
    use proptest::prelude::*;

    fn session_media(seq: u32, payload: &[u8]) -> Vec<u8> {
        let h = MediaHeader {
            flags: flags::KEYFRAME,
            stream: 7,
            seq,
            frame: 1,
            frag_index: 0,
            frag_count: 1,
            timestamp: 0,
        };
        let mut d = vec![0u8; crate::HEADER_LEN];
        h.write(&mut d);
        d.extend_from_slice(payload);
        d
    }

    #[test]
    fn test_session_tag_verifies_only_with_its_key_and_bytes() {
        let secret = [9u8; 32];
        let viewer: std::net::SocketAddr = "10.0.0.5:9000".parse().expect("addr");
        let k = SessionKey::derive(&secret, viewer);
        // Stable for an address, different for another address or secret.
        assert_eq!(k, SessionKey::derive(&secret, viewer));
        let other = SessionKey::derive(&secret, "10.0.0.5:9001".parse().expect("addr"));
        assert_ne!(k, other);
        assert_ne!(k, SessionKey::derive(&[8u8; 32], viewer));
        let d = session_media(3, b"picture");
        let sealed = k.seal(&d);
        assert_eq!(sealed.len(), d.len() + TAG_LEN);
        assert_eq!(k.open(&sealed).expect("verifies"), &d[..]);
        // Another session's key, a flipped payload bit, a forged tag, no tag: refused.
        assert!(matches!(other.open(&sealed), Err(AuthError::BadTag)));
        let mut flipped = sealed.clone();
        flipped[crate::HEADER_LEN] ^= 1;
        assert!(matches!(k.open(&flipped), Err(AuthError::BadTag)));
        let mut forged = d.clone();
        forged.extend_from_slice(&[0u8; TAG_LEN]);
        assert!(k.open(&forged).is_err());
        assert!(matches!(k.open(&d[..10]), Err(AuthError::Short(10))));
        // The hop-local flags (retransmission, cached) may be set by the PoP afterwards.
        let mut resent = sealed.clone();
        MediaHeader::mark_retransmit(&mut resent);
        assert!(k.open(&resent).is_ok());
        // The overlay key's media tag never verifies as a session tag.
        let ok = key(1);
        let mut tagged = d.clone();
        ok.seal_media(&mut tagged);
        assert!(k.open(&tagged).is_err());
        assert_eq!(format!("{k:?}"), "SessionKey(..)");
    }

    #[test]
    fn test_cookie_depends_on_address_port_and_bucket() {
        let s = [1u8; 32];
        let a: std::net::SocketAddr = "10.0.0.5:9000".parse().expect("addr");
        let c = viewer_cookie(&s, a, 4);
        assert_eq!(c, viewer_cookie(&s, a, 4));
        assert_ne!(c, viewer_cookie(&s, a, 5));
        assert_ne!(
            c,
            viewer_cookie(&s, "10.0.0.5:9001".parse().expect("addr"), 4)
        );
        assert_ne!(
            c,
            viewer_cookie(&s, "10.0.0.6:9000".parse().expect("addr"), 4)
        );
        assert_ne!(c, viewer_cookie(&[2u8; 32], a, 4));
    }

    fn key(b: u8) -> OverlayKey {
        OverlayKey::from_bytes(&[b; 32]).expect("32 bytes")
    }

    fn media(payload: &[u8], flags: u8) -> Vec<u8> {
        let h = MediaHeader {
            flags,
            stream: 7,
            seq: 9,
            frame: 3,
            frag_index: 0,
            frag_count: 1,
            timestamp: 90,
        };
        let mut d = h.to_bytes().to_vec();
        d.extend_from_slice(payload);
        d
    }

    fn heartbeat() -> Message {
        Message::Heartbeat {
            from: "n1".into(),
            seq: 1,
            sent_us: 2,
            incarnation: 3,
        }
    }

    #[test]
    fn test_short_key_is_refused() {
        let err = OverlayKey::from_bytes(&[1; 31]).expect_err("short");
        assert_eq!(err, KeyError::TooShort { len: 31, min: 32 });
        assert!(err.to_string().contains("at least 32"));
        assert!(OverlayKey::from_bytes(&[1; 64]).is_ok());
        assert_eq!(format!("{:?}", key(1)), "OverlayKey(..)");
    }

    #[test]
    fn test_media_round_trip_and_hop_flags() {
        let k = key(1);
        let plain = media(&[0x47; 188], flags::KEYFRAME);
        let mut d = plain.clone();
        k.seal_media(&mut d);
        assert_eq!(d.len(), plain.len() + TAG_LEN);
        assert_eq!(k.open_media(&d), Ok(&plain[..]));
        // Relays set the hop-local bits on copies: the tag still verifies.
        MediaHeader::mark_retransmit(&mut d);
        d[3] |= flags::CACHED;
        let opened = k.open_media(&d).expect("hop flags are not covered");
        assert!(MediaHeader::parse(opened)
            .expect("header")
            .has(flags::RETRANSMIT));
        // Both ways of computing the tag agree.
        let mut cleared = d[..d.len() - TAG_LEN].to_vec();
        cleared[3] &= !HOP_FLAGS;
        assert_eq!(k.media_tag(&cleared), k.media_tag(&d[..d.len() - TAG_LEN]));
        // Any other flag is covered.
        let mut e = d.clone();
        e[3] ^= flags::KEYFRAME;
        assert_eq!(k.open_media(&e), Err(AuthError::BadTag));
        // Wrong key, untagged, short.
        assert_eq!(key(2).open_media(&d), Err(AuthError::BadTag));
        assert_eq!(k.open_media(&plain), Err(AuthError::BadTag));
        assert_eq!(k.open_media(&d[..20]), Err(AuthError::Short(20)));
        assert_eq!(
            k.open_media(&d[..HEADER_LEN + TAG_LEN - 1]),
            Err(AuthError::Short(HEADER_LEN + TAG_LEN - 1))
        );
    }

    #[test]
    fn test_control_round_trip_replay_and_window() {
        let k = key(3);
        let mut s = ControlSealer::new(k.clone(), 42, 1_000);
        let mut g = ReplayGuard::new(k);
        let first = s.seal_message(&heartbeat()).expect("encodes");
        assert!(is_sealed_control(&first));
        let o = g.open(&first).expect("valid");
        assert_eq!((o.sender, o.counter), (42, 1_000));
        assert_eq!(decode(o.envelope).expect("decodes"), heartbeat());
        assert_eq!(
            g.open(&first),
            Err(AuthError::Replay {
                sender: 42,
                counter: 1_000
            })
        );
        // Reordering within the window is fine, once.
        let later: Vec<Vec<u8>> = (0..10).map(|_| s.seal(b"\x92\x01\xc0")).collect();
        for d in later.iter().rev() {
            assert!(g.open(d).is_ok());
        }
        assert!(matches!(g.open(&later[3]), Err(AuthError::Replay { .. })));
        // Far behind the newest: too old.
        let mut far = ControlSealer::new(key(3), 42, 2_000);
        assert!(g.open(&far.seal(b"x")).is_ok());
        assert!(matches!(
            g.open(&later[0]),
            Err(AuthError::TooOld { newest: 2_000, .. })
        ));
    }

    #[test]
    fn test_restarted_sender_is_accepted() {
        let k = key(4);
        let mut g = ReplayGuard::new(k.clone());
        let mut before = ControlSealer::new(k.clone(), 7, 5_000_000);
        for _ in 0..300 {
            assert!(g.open(&before.seal(b"a")).is_ok());
        }
        // A restart a second later: its counter starts from its new incarnation.
        let mut after = ControlSealer::new(k, 7, 6_000_000);
        assert!(g.open(&after.seal(b"b")).is_ok());
    }

    #[test]
    fn test_control_refusals() {
        let k = key(5);
        let mut g = ReplayGuard::new(k.clone());
        let plain = encode(&heartbeat()).expect("encodes");
        assert_eq!(g.open(&plain), Err(AuthError::NotSealed));
        assert!(matches!(g.open(b"OC"), Err(AuthError::Short(2))));
        let mut s = ControlSealer::new(k, 1, 1);
        let mut d = s.seal(&plain);
        d[2] = 9;
        assert_eq!(g.open(&d), Err(AuthError::Version(9)));
        let mut other = ControlSealer::new(key(6), 1, 1);
        assert_eq!(g.open(&other.seal(&plain)), Err(AuthError::BadTag));
        // A refused datagram leaves no state.
        assert_eq!(g.senders(), 0);
    }

    #[test]
    fn test_senders_are_bounded() {
        let k = key(8);
        let mut g = ReplayGuard::with_max_senders(k.clone(), 4);
        let mut sealers: Vec<ControlSealer> = (0..10)
            .map(|i| ControlSealer::new(k.clone(), i, 100))
            .collect();
        for s in &mut sealers {
            assert!(g.open(&s.seal(b"z")).is_ok());
        }
        assert_eq!(g.senders(), 4);
    }

    #[test]
    fn test_bootstrap_tags() {
        let k = key(9);
        let nonce = [5u8; NONCE_LEN];
        let t = k.bootstrap_tag(BootstrapDirection::Request, &nonce, b"body");
        assert!(k
            .verify_bootstrap(BootstrapDirection::Request, &nonce, b"body", &t)
            .is_ok());
        assert_eq!(
            k.verify_bootstrap(BootstrapDirection::Response, &nonce, b"body", &t),
            Err(AuthError::BadTag)
        );
        assert_eq!(
            k.verify_bootstrap(BootstrapDirection::Request, &[6; NONCE_LEN], b"body", &t),
            Err(AuthError::BadTag)
        );
        assert_eq!(
            key(10).verify_bootstrap(BootstrapDirection::Request, &nonce, b"body", &t),
            Err(AuthError::BadTag)
        );
        assert_eq!(
            k.verify_bootstrap(BootstrapDirection::Request, &nonce, b"body", &t[..8]),
            Err(AuthError::BadTag)
        );
    }

    #[test]
    fn test_sender_ids_differ_per_socket() {
        assert_ne!(sender_id("n1", "ctrl"), sender_id("n1", "data"));
        assert_ne!(sender_id("n1", "ctrl"), sender_id("n2", "ctrl"));
        assert_eq!(sender_id("n1", "ctrl"), sender_id("n1", "ctrl"));
    }

    /// Datagrams of every length around the BLAKE3 chunk boundaries, some with hop flags.
    fn assorted() -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for len in [
            0, 1, 23, 24, 39, 40, 41, 64, 1000, 1023, 1024, 1025, 1040, 1041, 1088, 1340, 1356,
            1472, 2047, 2048, 2049, 3000, 5000,
        ] {
            for flagged in [0u8, flags::RETRANSMIT, flags::CACHED | 0x01] {
                let mut d: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
                if let Some(b) = d.get_mut(3) {
                    *b = flagged;
                }
                out.push(d);
            }
        }
        out
    }

    #[test]
    fn test_batched_tags_equal_one_at_a_time() {
        let s = SessionKey::from_bytes([9; 32]);
        let k = key(5);
        let data = assorted();
        let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
        // Batches of every size up to all of them, so that the SIMD routine sees full
        // and partial groups.
        for n in 1..=refs.len() {
            for batch in refs.chunks(n) {
                let mut tags = Vec::new();
                s.tags_many(batch, &mut tags);
                let one: Vec<[u8; TAG_LEN]> = batch.iter().map(|d| s.tag(d)).collect();
                assert_eq!(tags, one, "batch of {n}");
                let mut digests = Vec::new();
                media_digests_many(batch, &mut digests);
                let one: Vec<[u8; DIGEST_LEN]> = batch.iter().map(|d| media_digest(d)).collect();
                assert_eq!(digests, one, "batch of {n}");
                let media: Vec<[u8; TAG_LEN]> = digests.iter().map(|d| k.media_tag_of(d)).collect();
                let one: Vec<[u8; TAG_LEN]> = batch.iter().map(|d| k.media_tag(d)).collect();
                assert_eq!(media, one, "batch of {n}");
            }
        }
    }

    #[test]
    fn test_batched_media_check_equals_open_media() {
        let k = key(5);
        let mut data = Vec::new();
        for d in assorted() {
            let mut sealed = d.clone();
            k.seal_media(&mut sealed);
            let mut bad = sealed.clone();
            if let Some(b) = bad.last_mut() {
                *b ^= 1;
            }
            let mut early = sealed.clone();
            if let Some(b) = early.get_mut(30) {
                *b ^= 0x40;
            }
            data.extend([d, sealed, bad, early]);
        }
        data.push(media(&[1; 1316], 0));
        let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
        let (mut ok, mut digests) = (Vec::new(), Vec::new());
        k.check_media_many(&refs, &mut ok, &mut digests);
        let one: Vec<bool> = refs.iter().map(|d| k.open_media(d).is_ok()).collect();
        assert_eq!(ok, one);
        assert!(ok.iter().any(|&o| o) && ok.iter().any(|&o| !o));
        // The digests are those of the bodies, for the seals made next.
        for ((d, digest), ok) in refs.iter().zip(&digests).zip(&ok) {
            if *ok {
                assert_eq!(*digest, media_digest(&d[..d.len() - TAG_LEN]));
            }
        }
        key(6).check_media_many(&refs, &mut ok, &mut digests);
        assert!(ok.iter().all(|&o| !o));
    }

    proptest! {
        #[test]
        fn prop_batched_tags_equal_one_at_a_time(
            lens in proptest::collection::vec(0usize..2200, 1..40), seed in any::<u8>()) {
            let s = SessionKey::from_bytes([seed; 32]);
            let data: Vec<Vec<u8>> = lens
                .iter()
                .map(|&l| (0..l).map(|i| (i as u8).wrapping_mul(seed | 1)).collect())
                .collect();
            let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
            let mut tags = Vec::new();
            s.tags_many(&refs, &mut tags);
            let one: Vec<[u8; TAG_LEN]> = refs.iter().map(|d| s.tag(d)).collect();
            prop_assert_eq!(tags, one);
        }

        #[test]
        fn prop_tampered_media_is_rejected(payload in proptest::collection::vec(any::<u8>(), 0..1432),
                                           at in any::<usize>(), bit in 0u8..8) {
            let k = key(11);
            let mut d = media(&payload, flags::KEYFRAME);
            k.seal_media(&mut d);
            let i = at % d.len();
            // Flipping a hop-local flag bit is allowed; every other bit is covered.
            prop_assume!(!(i == 3 && (1u8 << bit) & HOP_FLAGS != 0));
            d[i] ^= 1 << bit;
            prop_assert!(k.open_media(&d).is_err());
        }

        #[test]
        fn prop_tampered_control_is_rejected(body in proptest::collection::vec(any::<u8>(), 1..200),
                                             at in any::<usize>(), bit in 0u8..8) {
            let k = key(12);
            let mut s = ControlSealer::new(k.clone(), 3, 77);
            let mut d = s.seal(&body);
            let i = at % d.len();
            d[i] ^= 1 << bit;
            let mut g = ReplayGuard::new(k);
            prop_assert!(g.open(&d).is_err());
            prop_assert_eq!(g.senders(), 0);
        }

        #[test]
        fn prop_wrong_key_is_rejected(body in proptest::collection::vec(any::<u8>(), 1..200),
                                      a in any::<[u8; 32]>(), b in any::<[u8; 32]>()) {
            prop_assume!(a != b);
            let (ka, kb) = (OverlayKey::from_bytes(&a).expect("32"), OverlayKey::from_bytes(&b).expect("32"));
            let mut s = ControlSealer::new(ka.clone(), 1, 1);
            let sealed = s.seal(&body);
            prop_assert_eq!(ReplayGuard::new(kb.clone()).open(&sealed), Err(AuthError::BadTag));
            let mut d = media(&body, 0);
            ka.seal_media(&mut d);
            prop_assert_eq!(kb.open_media(&d), Err(AuthError::BadTag));
        }

        #[test]
        fn prop_each_counter_is_accepted_once(order in proptest::collection::vec(0usize..64, 1..200)) {
            // Any arrival order of copies of 64 datagrams: each is accepted exactly once.
            let k = key(13);
            let mut s = ControlSealer::new(k.clone(), 5, 1 << 40);
            let sealed: Vec<Vec<u8>> = (0..64).map(|_| s.seal(b"m")).collect();
            let mut g = ReplayGuard::new(k);
            let mut accepted = [0u32; 64];
            let mut sent = [false; 64];
            for i in order {
                sent[i] = true;
                if g.open(&sealed[i]).is_ok() {
                    accepted[i] += 1;
                }
            }
            // All 64 fit the window: each one sent is accepted exactly once.
            for i in 0..64 {
                prop_assert_eq!(accepted[i], u32::from(sent[i]));
            }
        }

        #[test]
        fn prop_garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..128)) {
            let k = key(14);
            let _ = k.open_media(&b);
            let _ = ReplayGuard::new(k).open(&b);
        }
    }
}
