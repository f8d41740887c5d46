//! The overlay key of a program (`--key-file`) and the one place that tells overlay
//! members (whose datagrams carry tags) from viewers (who hold no key, so their traffic
//! stays untagged).
//!
//! With a key, a node:
//! - seals every control datagram it sends to a member and tags the media datagrams it
//!   originates (the server) — relays forward the server's tag unchanged;
//! - refuses, counted as `auth_failed` and before decoding, every sealed datagram whose
//!   tag or counter fails, every untagged datagram from a member's address, and every
//!   untagged datagram at a node that serves no viewers (servers and relays);
//! - at a PoP, decodes untagged datagrams from other addresses as viewer traffic and
//!   accepts only what viewers send (`Probe`, `ListStreams`, `Join` without a node id,
//!   `Leave`, `Nack`);
//! - strips the tag from media it sends to a viewer.
//!
//! Members are known by IP address: the addresses the bootstrapper gave for the node's
//! overlay neighbours, and every address a datagram with a valid tag came from (a
//! neighbour with several interfaces may send from another of its addresses; learning
//! needs the key, and a replayed datagram is refused before it teaches anything). At most
//! [`MAX_LEARNED`] addresses are learned. A viewer never runs on a member's address.

use std::collections::HashSet;
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, RwLock};

use anyhow::Context;
use ott_bootstrap::Assignment;
use ott_overlay::Role;
use ott_proto::auth::{AuthError, ControlSealer, OverlayKey, ReplayGuard, TAG_LEN};
use ott_proto::{DecodeError, EncodeError, Message};

/// Read an overlay key file: at least [`ott_proto::auth::MIN_KEY_LEN`] bytes, all used.
/// Errors name the file.
pub fn load_key_file(path: &Path) -> anyhow::Result<OverlayKey> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(1 << 20).read_to_end(&mut bytes))
        .with_context(|| format!("cannot read the overlay key file {}", path.display()))?;
    OverlayKey::from_bytes(&bytes)
        .with_context(|| format!("overlay key file {} is not usable", path.display()))
}

/// Write a fresh key file: 32 random bytes from the system's generator, readable by
/// its owner only.
pub fn write_key_file(path: &Path) -> anyhow::Result<()> {
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .context("cannot read 32 random bytes from /dev/urandom")?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("cannot create the key file {}", path.display()))?;
    std::io::Write::write_all(&mut f, &key)
        .with_context(|| format!("cannot write the key file {}", path.display()))
}

/// The key of `--key-file`, or `None` with one warning that the overlay is unprotected.
pub fn key_from_flag(path: Option<&Path>) -> anyhow::Result<Option<OverlayKey>> {
    match path {
        Some(p) => load_key_file(p).map(Some),
        None => {
            tracing::warn!(
                "no --key-file: overlay datagrams are neither tagged nor checked; anyone \
                 who can reach this node can forge them"
            );
            Ok(None)
        }
    }
}

/// Most member addresses learned from tagged datagrams (beyond the bootstrapper's).
pub const MAX_LEARNED: usize = 4096;

/// The addresses of overlay members: given, and learned from tagged datagrams.
#[derive(Debug, Default)]
struct Members {
    given: HashSet<IpAddr>,
    learned: RwLock<HashSet<IpAddr>>,
}

impl Members {
    fn new(given: impl IntoIterator<Item = IpAddr>) -> Arc<Self> {
        Arc::new(Self {
            given: given.into_iter().collect(),
            learned: RwLock::default(),
        })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        self.given.contains(&ip) || self.learned.read().is_ok_and(|l| l.contains(&ip))
    }

    fn learn(&self, ip: IpAddr) {
        if self.contains(ip) {
            return;
        }
        if let Ok(mut l) = self.learned.write() {
            if l.len() < MAX_LEARNED && l.insert(ip) {
                tracing::debug!(%ip, "overlay member address learned from a tagged datagram");
            }
        }
    }
}

/// A program's key and who its overlay members are. Clones share the member set, so
/// what one thread learns the others know.
#[derive(Debug, Clone)]
pub struct Keying {
    key: Option<OverlayKey>,
    members: Arc<Members>,
    serves_viewers: bool,
    /// Node id, for the sender ids of sealed control datagrams.
    id: String,
}

/// Why an incoming control datagram was refused.
#[derive(Debug)]
pub enum Refused {
    /// Its tag, counter or layout failed, or it lacks a tag it needs: count `auth_failed`.
    Auth(String),
    /// It does not decode: count `malformed`.
    Malformed(DecodeError),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auth(why) => f.write_str(why),
            Self::Malformed(e) => e.fmt(f),
        }
    }
}

impl From<DecodeError> for Refused {
    fn from(e: DecodeError) -> Self {
        Self::Malformed(e)
    }
}

impl Keying {
    /// No key: nothing is tagged or checked.
    pub fn unkeyed() -> Self {
        Self {
            key: None,
            members: Arc::default(),
            serves_viewers: true,
            id: String::new(),
        }
    }

    /// A keying for node `id` whose overlay members are at `members`; `serves_viewers`
    /// for a PoP (untagged viewer traffic is accepted), else only sealed traffic is.
    pub fn new(
        key: Option<OverlayKey>,
        id: &str,
        members: impl IntoIterator<Item = IpAddr>,
        serves_viewers: bool,
    ) -> Self {
        Self {
            key,
            members: Members::new(members),
            serves_viewers,
            id: id.to_string(),
        }
    }

    /// The keying of an overlay node from its assignment: its neighbours are the members.
    pub fn for_node(key: Option<OverlayKey>, a: &Assignment) -> Self {
        Self {
            key,
            // Every address the bootstrapper gave for a neighbour is a member's.
            members: Members::new(a.neighbours.iter().flat_map(|p| {
                [p.ctrl.ip(), p.data.ip()]
                    .into_iter()
                    .chain(p.addrs.iter().copied())
            })),
            serves_viewers: a.role == Role::Pop,
            id: a.id.clone(),
        }
    }

    /// The key, if any.
    pub fn key(&self) -> Option<&OverlayKey> {
        self.key.as_ref()
    }

    /// Whether `addr` is an overlay member's (its traffic is tagged). Without a key,
    /// nothing is.
    pub fn is_member(&self, addr: SocketAddr) -> bool {
        self.key.is_some() && self.members.contains(addr.ip())
    }

    /// Record that a datagram with a valid tag came from `addr`: its address is a
    /// member's (see the module doc). Without a key, nothing.
    pub fn learn(&self, addr: SocketAddr) {
        if self.key.is_some() {
            self.members.learn(addr.ip());
        }
    }

    /// How many bytes of a (tagged, when keyed) media datagram of `len` bytes go to `to`:
    /// all of it to a member, without the tag to a viewer.
    pub fn media_len_for(&self, to: SocketAddr, len: usize) -> usize {
        if self.key.is_some() && !self.is_member(to) {
            len.saturating_sub(TAG_LEN)
        } else {
            len
        }
    }

    /// Check the tag of a media datagram received from upstream; the length of the
    /// datagram without its tag. Without a key, the whole datagram.
    pub fn open_media(&self, datagram: &[u8]) -> Result<usize, AuthError> {
        match &self.key {
            Some(k) => k.open_media(datagram).map(<[u8]>::len),
            None => Ok(datagram.len()),
        }
    }

    /// A gate for control datagrams received on one socket (`socket`: `"ctrl"`, `"data"`).
    pub fn gate(&self) -> ControlGate {
        ControlGate {
            keying: self.clone(),
            guard: self.key.clone().map(ReplayGuard::new),
        }
    }

    /// A sealer for control datagrams sent from one socket (`"ctrl"`, `"data"`), with
    /// counters from `first_counter` on (the incarnation).
    pub fn sealer(&self, socket: &str, first_counter: u64) -> ControlSender {
        ControlSender {
            keying: self.clone(),
            sealer: self.key.clone().map(|k| {
                ControlSealer::new(
                    k,
                    ott_proto::auth::sender_id(&self.id, socket),
                    first_counter,
                )
            }),
        }
    }
}

/// 32 random bytes from the kernel (`/dev/urandom`): a PoP's secret for viewers'
/// cookies and session keys ([`ott_tree::NodeConfig::admission_secret`]).
pub fn random_secret() -> std::io::Result<[u8; 32]> {
    use std::io::Read;
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b)
}

/// Whether a viewer may send `msg` (untagged, to a PoP).
pub fn is_viewer_message(msg: &Message) -> bool {
    matches!(
        msg,
        Message::Probe { .. }
            | Message::ListStreams
            | Message::Join { from: None, .. }
            | Message::ViewerJoin { .. }
            | Message::ViewerLeave { .. }
            | Message::Leave { .. }
            | Message::Nack { .. }
            | Message::Avoid { .. }
    )
}

/// Checks and decodes the control datagrams of one receiving socket.
#[derive(Debug)]
pub struct ControlGate {
    keying: Keying,
    guard: Option<ReplayGuard>,
}

impl ControlGate {
    /// Whether `addr` is an overlay member's (always `false` without a key).
    pub fn is_member(&self, addr: SocketAddr) -> bool {
        self.keying.is_member(addr)
    }

    /// Check and decode a control datagram from `from`.
    pub fn open(&mut self, from: Option<SocketAddr>, bytes: &[u8]) -> Result<Message, Refused> {
        let Some(guard) = self.guard.as_mut() else {
            return Ok(ott_proto::decode(bytes)?);
        };
        if ott_proto::auth::is_sealed_control(bytes) {
            let opened = guard
                .open(bytes)
                .map_err(|e| Refused::Auth(e.to_string()))?;
            if let Some(f) = from {
                self.keying.learn(f);
            }
            return Ok(ott_proto::decode(opened.envelope)?);
        }
        if from.is_some_and(|f| self.keying.is_member(f)) {
            return Err(Refused::Auth(
                "untagged datagram from an overlay member's address".into(),
            ));
        }
        if !self.keying.serves_viewers {
            return Err(Refused::Auth(
                "untagged datagram at a node that serves no viewers".into(),
            ));
        }
        let msg = ott_proto::decode(bytes)?;
        if is_viewer_message(&msg) {
            Ok(msg)
        } else {
            Err(Refused::Auth(format!(
                "untagged {} is not a viewer's message",
                msg.kind()
            )))
        }
    }
}

/// Encodes the control datagrams of one sending socket: sealed to members, plain to
/// viewers.
#[derive(Debug)]
pub struct ControlSender {
    keying: Keying,
    sealer: Option<ControlSealer>,
}

impl ControlSender {
    /// The datagram that carries `msg` to `to`.
    pub fn encode(&mut self, to: SocketAddr, msg: &Message) -> Result<Vec<u8>, EncodeError> {
        match self.sealer.as_mut() {
            Some(s) if self.keying.is_member(to) => s.seal_message(msg),
            _ => ott_proto::encode(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ott_bootstrap::Peer;

    fn assignment(role: Role) -> Assignment {
        let peer = |id: &str, ip: &str| Peer {
            id: id.into(),
            ctrl: format!("{ip}:7000").parse().expect("addr"),
            data: format!("{ip}:7001").parse().expect("addr"),
            addrs: vec![ip.parse().expect("ip")],
        };
        Assignment {
            id: "p1".into(),
            role,
            bind_ctrl: "127.9.0.3:7000".parse().expect("addr"),
            bind_data: "127.9.0.3:7001".parse().expect("addr"),
            addresses: vec!["127.9.0.3".parse().expect("ip")],
            neighbours: vec![peer("r1", "127.9.0.2")],
            pops: Vec::new(),
            topology: "t".into(),
        }
    }

    fn key() -> OverlayKey {
        OverlayKey::from_bytes(&[9; 32]).expect("32 bytes")
    }

    #[test]
    fn test_key_file_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("ott-keying-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let short = dir.join("short.key");
        std::fs::write(&short, [1u8; 31]).expect("write");
        let err = format!("{:#}", load_key_file(&short).expect_err("short"));
        assert!(
            err.contains("short.key") && err.contains("at least 32"),
            "{err}"
        );
        let missing = dir.join("missing.key");
        let err = format!("{:#}", load_key_file(&missing).expect_err("missing"));
        assert!(err.contains("missing.key"), "{err}");
        let good = dir.join("good.key");
        write_key_file(&good).expect("written");
        assert_eq!(std::fs::read(&good).expect("read").len(), 32);
        assert!(load_key_file(&good).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn test_members_are_tagged_viewers_are_not() {
        let k = Keying::for_node(Some(key()), &assignment(Role::Pop));
        let member: SocketAddr = "127.9.0.2:7000".parse().expect("addr");
        let viewer: SocketAddr = "127.0.0.1:5555".parse().expect("addr");
        assert!(k.is_member(member) && !k.is_member(viewer));
        assert_eq!(k.media_len_for(member, 100), 100);
        assert_eq!(k.media_len_for(viewer, 100), 100 - TAG_LEN);
        let mut tx = k.sealer("ctrl", 1);
        let hb = Message::Bye { from: "p1".into() };
        assert!(ott_proto::auth::is_sealed_control(
            &tx.encode(member, &hb).expect("encodes")
        ));
        assert_eq!(
            tx.encode(viewer, &Message::ListStreams).expect("encodes"),
            ott_proto::encode(&Message::ListStreams).expect("encodes")
        );
        // Unkeyed: nothing is a member, nothing is tagged.
        let u = Keying::unkeyed();
        assert!(!u.is_member(member));
        assert_eq!(u.media_len_for(viewer, 100), 100);
    }

    #[test]
    fn test_gate() {
        let pop = Keying::for_node(Some(key()), &assignment(Role::Pop));
        let member: SocketAddr = "127.9.0.2:7000".parse().expect("addr");
        let viewer: SocketAddr = "127.0.0.1:5555".parse().expect("addr");
        let bye = Message::Bye { from: "r1".into() };
        let plain_bye = ott_proto::encode(&bye).expect("encodes");
        let list = ott_proto::encode(&Message::ListStreams).expect("encodes");
        let mut gate = pop.gate();
        // Sealed by a member: accepted once.
        let mut r1 = Keying::for_node(Some(key()), &assignment(Role::Relay)).sealer("ctrl", 5);
        let sealed = r1.encode(member, &bye).expect("encodes");
        assert_eq!(gate.open(Some(member), &sealed).expect("valid"), bye);
        assert!(matches!(
            gate.open(Some(member), &sealed),
            Err(Refused::Auth(_))
        ));
        // Untagged from a member, or an overlay message from a viewer: refused.
        assert!(matches!(
            gate.open(Some(member), &list),
            Err(Refused::Auth(_))
        ));
        assert!(matches!(
            gate.open(Some(viewer), &plain_bye),
            Err(Refused::Auth(_))
        ));
        // A viewer's message at a PoP: accepted.
        assert_eq!(
            gate.open(Some(viewer), &list).expect("viewer"),
            Message::ListStreams
        );
        assert!(matches!(
            gate.open(Some(viewer), b"\xc1"),
            Err(Refused::Malformed(_))
        ));
        // A relay serves no viewers.
        let relay = Keying::for_node(Some(key()), &assignment(Role::Relay));
        assert!(matches!(
            relay.gate().open(Some(viewer), &list),
            Err(Refused::Auth(_))
        ));
        // Another key: refused.
        let other = OverlayKey::from_bytes(&[8; 32]).expect("32 bytes");
        let mut forged = Keying::for_node(Some(other), &assignment(Role::Relay)).sealer("ctrl", 9);
        let f = forged.encode(member, &bye).expect("encodes");
        assert!(matches!(
            pop.gate().open(Some(member), &f),
            Err(Refused::Auth(_))
        ));
        // A member sending from an address the bootstrapper did not name: learned from
        // its valid tag, then sealed to and required to seal.
        let other_if: SocketAddr = "127.9.1.2:7000".parse().expect("addr");
        assert!(!pop.is_member(other_if));
        let sealed = r1.encode(member, &bye).expect("encodes");
        assert_eq!(gate.open(Some(other_if), &sealed).expect("valid"), bye);
        assert!(pop.is_member(other_if));
        assert!(matches!(
            gate.open(Some(other_if), &list),
            Err(Refused::Auth(_))
        ));
        // A forged or replayed datagram teaches nothing.
        let stranger: SocketAddr = "127.9.2.2:7000".parse().expect("addr");
        assert!(gate.open(Some(stranger), &sealed).is_err());
        assert!(gate.open(Some(stranger), &f).is_err());
        assert!(!pop.is_member(stranger));
        // Unkeyed: everything decodes as before.
        assert_eq!(
            Keying::unkeyed()
                .gate()
                .open(Some(member), &plain_bye)
                .expect("plain"),
            bye
        );
    }
}
