//! Embedding `ott_tree::Node` in another program.
//!
//! Four nodes (a server, two relays and a PoP, in a square) exchange messages over an
//! in-memory queue with a fake clock: every link delays by 5 ms, except one slow link of
//! 30 ms. The program follows the drain rule, round-trips each message through the wire
//! codec like a real driver would, and prints each node's route and the PoP's
//! forwarding set once a client has joined a stream.
//!
//! Run with `cargo run -p ott-tree --example embed`.
// An example program: it reads the clock once, for the origin of its fake time.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ott_proto::{MediaKind, Message, StreamInfo};
use ott_tree::{Event, Node, NodeConfig, Role};

fn addr(i: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, i], 7000))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ids = [
        ("s1", Role::Server),
        ("r1", Role::Relay),
        ("r2", Role::Relay),
        ("p1", Role::Pop),
    ];
    let links = [
        ("s1", "r1", 5),
        ("s1", "r2", 30),
        ("r1", "p1", 5),
        ("r2", "p1", 5),
    ];
    let index: BTreeMap<&str, u8> = ids.iter().zip(1u8..).map(|((id, _), i)| (*id, i)).collect();
    let id_at = |a: SocketAddr| {
        index
            .iter()
            .find(|(_, i)| addr(**i) == a)
            .map(|(id, _)| *id)
    };
    let delay = |a: &str, b: &str| {
        links
            .iter()
            .find(|(x, y, _)| (*x == a && *y == b) || (*x == b && *y == a))
            .map(|(_, _, d)| Duration::from_millis(*d))
    };

    // The fake clock starts at an arbitrary instant; only differences matter.
    let epoch = Instant::now();
    let mut now = epoch;
    let mut nodes: BTreeMap<&str, Node> = BTreeMap::new();
    for (id, role) in ids {
        let neighbours = links
            .iter()
            .filter_map(|(a, b, _)| match (*a == id, *b == id) {
                (true, _) => Some(*b),
                (_, true) => Some(*a),
                _ => None,
            })
            .map(|n| (n.to_owned(), addr(index[n])))
            .collect();
        let config = NodeConfig::new(id, role, 7001);
        nodes.insert(id, Node::new(config, neighbours, epoch, now));
    }
    let news = StreamInfo::new("news", MediaKind::Mjpeg, 25_000);
    if let Some(s1) = nodes.get_mut("s1") {
        s1.set_catalogue(now, vec![news.clone()]);
    }

    // In-flight datagrams: (arrival, order, from, to, bytes).
    let mut wire: Vec<(Instant, u64, SocketAddr, SocketAddr, Vec<u8>)> = Vec::new();
    let mut order = 0u64;
    let client: SocketAddr = "127.0.0.9:9000".parse()?;
    let mut joined = false;
    let mut echo: Option<Message> = None;
    let end = epoch + Duration::from_secs(5);
    while now < end {
        // Drain rule: after every input, drain transmits and events, then read the timeout.
        for (id, node) in nodes.iter_mut() {
            let from = addr(index[id]);
            while let Some(t) = node.poll_transmit() {
                let bytes = ott_proto::encode(&t.msg)?;
                if t.to == client {
                    println!("{:>6.1} ms  {id} -> client: {:?}", ms(now - epoch), t.msg);
                    // The client proves it receives at its address: it echoes the cookie.
                    if let Message::Cookie {
                        stream,
                        data_port,
                        cookie,
                    } = t.msg
                    {
                        echo = Some(Message::ViewerJoin {
                            stream,
                            data_port,
                            cookie,
                        });
                    }
                    continue;
                }
                let Some(d) = id_at(t.to).and_then(|to| delay(id, to)) else {
                    continue;
                };
                order += 1;
                wire.push((now + d, order, from, t.to, bytes));
            }
            while let Some(ev) = node.poll_event() {
                match ev {
                    Event::ParentChanged { server, old, new } => {
                        println!(
                            "{:>6.1} ms  {id}: parent towards {server}: {old:?} -> {new:?}",
                            ms(now - epoch)
                        );
                    }
                    Event::Forwarding {
                        stream, children, ..
                    } => {
                        println!(
                            "{:>6.1} ms  {id}: forward {stream:#x} to {children:?}",
                            ms(now - epoch)
                        );
                    }
                    Event::NeighbourUp(_) | Event::NeighbourDown(_) => {}
                }
            }
        }
        // A client joins "news" at the PoP after two seconds.
        if !joined && now >= epoch + Duration::from_secs(2) {
            joined = true;
            let join = Message::Join {
                stream: news.id,
                data_port: 9000,
                from: None,
            };
            if let Some(p1) = nodes.get_mut("p1") {
                p1.handle(now, client, join);
            }
            continue;
        }
        if let Some(msg) = echo.take() {
            if let Some(p1) = nodes.get_mut("p1") {
                p1.handle(now, client, msg);
            }
            continue;
        }
        // Advance the fake clock to the next arrival or timer.
        wire.sort_by_key(|(at, o, ..)| (*at, *o));
        let next_timer = nodes.values().filter_map(Node::poll_timeout).min();
        let next_wire = wire.first().map(|(at, ..)| *at);
        let Some(next) = [next_timer, next_wire].into_iter().flatten().min() else {
            break;
        };
        now = next.max(now);
        if next_wire == Some(next) {
            let (_, _, from, to, bytes) = wire.remove(0);
            let msg = ott_proto::decode(&bytes)?;
            if let Some(node) = id_at(to).and_then(|id| nodes.get_mut(id)) {
                node.handle(now, from, msg);
            }
        } else {
            for node in nodes.values_mut() {
                if node.poll_timeout().is_some_and(|t| t <= now) {
                    node.handle_timeout(now);
                }
            }
        }
    }

    println!();
    for (id, node) in &nodes {
        let st = node.status();
        println!(
            "{id}: parent={:?} path={:?} latency={:?} ms hops={:?}",
            st.parent, st.path, st.latency_ms, st.hops
        );
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
