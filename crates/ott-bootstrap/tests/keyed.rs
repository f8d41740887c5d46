//! A bootstrapper with the overlay key, over real TCP on 127.0.0.1.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use ott_bootstrap::{request, request_keyed, BootstrapError, Request, Service};
use ott_overlay::{AddressPlan, Role, Topology};
use ott_proto::auth::OverlayKey;

const TOPO: &str = r#"
name = "tiny"
bootstrapper = "s1"
[[node]]
id = "s1"
role = "server"
[[node]]
id = "p1"
role = "pop"
[[link]]
ends = ["s1", "p1"]
"#;

const WAIT: Duration = Duration::from_secs(10);

struct Running {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<std::io::Result<()>>>,
}

impl Running {
    fn start(key: Option<OverlayKey>) -> Self {
        let mut service = Service::new(
            Topology::parse(TOPO, "tiny.toml").expect("valid"),
            AddressPlan::Loopback,
        );
        if let Some(k) = key {
            service = service.with_key(k);
        }
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("bound");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let s = Arc::new(service);
        let thread = Some(thread::spawn(move || s.serve(listener, flag)));
        Self { addr, stop, thread }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn key(b: u8) -> OverlayKey {
    OverlayKey::from_bytes(&[b; 32]).expect("32 bytes")
}

fn node() -> Request {
    Request::Node { id: "p1".into() }
}

fn refusal(r: Result<ott_bootstrap::Assignment, BootstrapError>) -> String {
    match r {
        Err(BootstrapError::Refused(reason)) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn keyed_bootstrapper_answers_only_tagged_node_requests() {
    let b = Running::start(Some(key(1)));
    let a = request_keyed(b.addr, &node(), Some(&key(1)), WAIT).expect("tagged request");
    assert_eq!((a.id.as_str(), a.role), ("p1", Role::Pop));
    assert_eq!(a.neighbours.len(), 1);
    // Without the key, or with another one: refused, saying why.
    let why = refusal(request(b.addr, &node(), WAIT));
    assert!(why.contains("--key-file"), "{why}");
    let why = refusal(request_keyed(b.addr, &node(), Some(&key(2)), WAIT));
    assert!(why.contains("does not verify"), "{why}");
    // A viewer holds no key and still gets the PoPs, and nothing more.
    let c = request(b.addr, &Request::Client { id: None }, WAIT).expect("viewers are answered");
    assert_eq!(c.pops.len(), 1);
    assert!(c.neighbours.is_empty());
}

#[test]
fn keyed_node_refuses_an_unkeyed_bootstrapper() {
    let b = Running::start(None);
    let why = refusal(request_keyed(b.addr, &node(), Some(&key(1)), WAIT));
    assert!(why.contains("has none"), "{why}");
    // Plain requests work as before.
    assert_eq!(
        request(b.addr, &node(), WAIT).expect("plain").role,
        Role::Pop
    );
}
