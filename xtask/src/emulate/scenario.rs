//! Scenario files (TOML, `topologies/scenarios/`): clients and timed events.
//!
//! ```toml
//! name = "kill-relay"
//! duration_s = 14            # how long clients watch (the --duration flag overrides it)
//!
//! [[client]]                 # started at start_s (default 0), stopped at the end
//! id = "n16"                 # a client node of the topology
//! stream = "countdown"
//!
//! [[event]]
//! at_s = 6.0
//! action = "kill"            # kill | restart | link | link_down | link_up |
//! node = "n12"               # client_start | client_stop | switch | kill_active_relay
//!
//! [[event]]
//! at_s = 8.0
//! action = "kill_active_relay" # SIGKILL the relay carrying the most of the tree
//!
//! [[event]]
//! at_s = 6.0
//! action = "link"            # set some of delay_ms, jitter_ms, loss_pct, rate_mbit
//! ends = ["n8", "n7"]        # (both directions)
//! delay_ms = 40.0
//!
//! [[event]]
//! at_s = 0.0
//! action = "all_links"       # the same fields, on every link of the topology
//! loss_pct = 5.0
//! ```
//!
//! Times are seconds from the moment the tree has formed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;

use anyhow::{bail, Context};
use ott_overlay::{Role, Topology};
use serde::Deserialize;

/// A client of a scenario.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClientSpec {
    /// A client node of the topology (where it runs).
    pub(crate) id: String,
    pub(crate) stream: String,
    #[serde(default)]
    pub(crate) start_s: f64,
}

/// What an event does.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "action", rename_all = "snake_case")]
pub(crate) enum Action {
    /// SIGKILL a node's program (a crash).
    Kill { node: String },
    /// SIGKILL the relay, chosen when the event fires, that carries a stream to a
    /// child and has the most PoPs below it in the tree, preferring those whose loss
    /// leaves every PoP an overlay path to a server (see [`pick_active_relay`]).
    KillActiveRelay,
    /// Start a killed node's program again.
    Restart { node: String },
    /// Change a link's parameters, both directions; unset fields stay as they are.
    Link {
        ends: [String; 2],
        delay_ms: Option<f64>,
        jitter_ms: Option<f64>,
        loss_pct: Option<f64>,
        rate_mbit: Option<f64>,
    },
    /// Change every link's parameters, both directions; unset fields stay as they are.
    AllLinks {
        delay_ms: Option<f64>,
        jitter_ms: Option<f64>,
        loss_pct: Option<f64>,
        rate_mbit: Option<f64>,
    },
    /// Take a link down (it drops everything; routes move around it).
    LinkDown { ends: [String; 2] },
    /// Bring a link back up.
    LinkUp { ends: [String; 2] },
    /// Start a client.
    ClientStart { client: String, stream: String },
    /// Stop a client (SIGTERM: it leaves its stream and prints its summary).
    ClientStop { client: String },
    /// Make a running client switch stream.
    Switch { client: String, stream: String },
}

/// The link parameters an event sets (unset ones stay as they are).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct LinkChange {
    pub(crate) delay_ms: Option<f64>,
    pub(crate) jitter_ms: Option<f64>,
    pub(crate) loss_pct: Option<f64>,
    pub(crate) rate_mbit: Option<f64>,
}

impl LinkChange {
    /// Every value set is a finite, non-negative number, and a loss at most 100 %.
    fn check(&self) -> anyhow::Result<()> {
        let values = [
            ("delay_ms", self.delay_ms, f64::INFINITY),
            ("jitter_ms", self.jitter_ms, f64::INFINITY),
            ("loss_pct", self.loss_pct, 100.0),
            ("rate_mbit", self.rate_mbit, f64::INFINITY),
        ];
        for (name, v, max) in values {
            if let Some(v) = v {
                if !(v.is_finite() && (0.0..=max).contains(&v)) {
                    bail!("{name} = {v} is out of range (0 to {max})");
                }
            }
        }
        Ok(())
    }
}

impl Action {
    /// The parameters a `link` or `all_links` event sets.
    pub(crate) fn link_change(&self) -> Option<LinkChange> {
        match *self {
            Self::Link {
                delay_ms,
                jitter_ms,
                loss_pct,
                rate_mbit,
                ..
            }
            | Self::AllLinks {
                delay_ms,
                jitter_ms,
                loss_pct,
                rate_mbit,
            } => Some(LinkChange {
                delay_ms,
                jitter_ms,
                loss_pct,
                rate_mbit,
            }),
            _ => None,
        }
    }
}

/// One timed event.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub(crate) struct ScenarioEvent {
    pub(crate) at_s: f64,
    #[serde(flatten)]
    pub(crate) action: Action,
}

/// A whole scenario.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct Scenario {
    pub(crate) name: String,
    /// Free text shown in the report.
    #[serde(default)]
    pub(crate) description: String,
    #[serde(default = "default_duration")]
    pub(crate) duration_s: f64,
    #[serde(default, rename = "client")]
    pub(crate) clients: Vec<ClientSpec>,
    #[serde(default, rename = "event")]
    pub(crate) events: Vec<ScenarioEvent>,
}

fn default_duration() -> f64 {
    10.0
}

impl Scenario {
    /// The scenario of a run without a file: every client node of the topology (at most
    /// two, if there are more, the first two) watching the streams in turn.
    pub(crate) fn default_for(t: &Topology, streams: &[String]) -> Self {
        let clients = t
            .clients()
            .iter()
            .take(2)
            .enumerate()
            .filter_map(|(i, n)| {
                Some(ClientSpec {
                    id: n.id.clone(),
                    stream: streams.get(i % streams.len().max(1))?.clone(),
                    start_s: 0.0,
                })
            })
            .collect();
        Self {
            name: "baseline".into(),
            description: String::new(),
            duration_s: default_duration(),
            clients,
            events: Vec::new(),
        }
    }

    /// A viewer on every client node of the topology, watching the streams in turn from
    /// `start_s`, for `duration_s`; with `loss_pct`, that loss on every link from t = 0;
    /// with `kill_relay_at_s`, a [`Action::KillActiveRelay`] then.
    pub(crate) fn every_client(
        t: &Topology,
        streams: &[String],
        duration_s: f64,
        loss_pct: Option<f64>,
        kill_relay_at_s: Option<f64>,
    ) -> Self {
        // With loss, the loss is in place before the viewers start.
        let start_s = if loss_pct.is_some() { 0.5 } else { 0.0 };
        let clients = t
            .clients()
            .iter()
            .enumerate()
            .filter_map(|(i, n)| {
                Some(ClientSpec {
                    id: n.id.clone(),
                    stream: streams.get(i % streams.len().max(1))?.clone(),
                    start_s,
                })
            })
            .collect();
        let mut events = Vec::new();
        let mut what = vec![format!("a viewer on each of {} clients", t.clients().len())];
        if let Some(loss) = loss_pct {
            events.push(ScenarioEvent {
                at_s: 0.0,
                action: Action::AllLinks {
                    delay_ms: None,
                    jitter_ms: None,
                    loss_pct: Some(loss),
                    rate_mbit: None,
                },
            });
            what.push(format!("{loss} % loss on every link"));
        }
        if let Some(at_s) = kill_relay_at_s {
            events.push(ScenarioEvent {
                at_s,
                action: Action::KillActiveRelay,
            });
            what.push(format!("a relay on an active path killed at {at_s} s"));
        }
        Self {
            name: "every-client".into(),
            description: what.join(", "),
            duration_s,
            clients,
            events,
        }
    }

    /// Reads and checks a scenario against its topology.
    pub(crate) fn load(path: &Path, t: &Topology) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read scenario {}", path.display()))?;
        Self::parse(&text, t).with_context(|| format!("scenario {}", path.display()))
    }

    /// Parses and checks a scenario: every node, link and client it names exists, and
    /// times are finite and not negative.
    pub(crate) fn parse(text: &str, t: &Topology) -> anyhow::Result<Self> {
        let s: Self = toml::from_str(text)?;
        if !(s.duration_s.is_finite() && s.duration_s > 0.0) {
            bail!("duration_s must be a positive number of seconds");
        }
        let client_node = |id: &str| match t.node(id) {
            Some(n) if n.role == Role::Client => Ok(()),
            Some(n) => bail!("{id} is a {}, not a client node", n.role),
            None => bail!("unknown client node {id}"),
        };
        for c in &s.clients {
            client_node(&c.id)?;
            if !(c.start_s.is_finite() && c.start_s >= 0.0) {
                bail!("client {}: start_s must be >= 0", c.id);
            }
        }
        for e in &s.events {
            if !(e.at_s.is_finite() && e.at_s >= 0.0) {
                bail!("event at {}: at_s must be >= 0", e.at_s);
            }
            match &e.action {
                Action::Kill { node } | Action::Restart { node } => match t.node(node) {
                    Some(n) if n.role.is_overlay() => {}
                    Some(n) => bail!(
                        "event at {} s: {node} is a {} and runs no overlay program",
                        e.at_s,
                        n.role
                    ),
                    None => bail!("event at {} s: unknown node {node}", e.at_s),
                },
                Action::Link { ends, .. } | Action::LinkDown { ends } | Action::LinkUp { ends } => {
                    if t.link_between(&ends[0], &ends[1]).is_none() {
                        bail!(
                            "event at {} s: no link between {} and {}",
                            e.at_s,
                            ends[0],
                            ends[1]
                        );
                    }
                }
                Action::ClientStart { client, .. }
                | Action::ClientStop { client }
                | Action::Switch { client, .. } => client_node(client)?,
                Action::AllLinks { .. } | Action::KillActiveRelay => {}
            }
            if let Some(change) = e.action.link_change() {
                change
                    .check()
                    .with_context(|| format!("event at {} s", e.at_s))?;
            }
        }
        Ok(s)
    }
}
/// The relay a [`Action::KillActiveRelay`] kills: among the `alive` relays that carry a
/// stream to a child (`carrying`) and whose loss leaves some alive PoP an overlay path
/// to a server, first those whose loss leaves every alive PoP such a path (else the
/// viewers of the PoPs cut off must move to another PoP); then the one with the most
/// PoPs below it in the tree (`parents`), the most stream children, the first id.
/// `None` if no relay qualifies (none carries a stream, or each one is the only way to
/// every PoP).
pub(crate) fn pick_active_relay(
    t: &Topology,
    parents: &BTreeMap<String, Option<String>>,
    carrying: &BTreeMap<String, usize>,
    alive: impl Fn(&str) -> bool,
) -> Option<String> {
    let pops: Vec<&str> = t
        .pops()
        .iter()
        .map(|p| p.id.as_str())
        .filter(|p| alive(p))
        .collect();
    // PoPs below `r`: those whose chain of parents passes through `r`.
    let below = |r: &str| {
        pops.iter()
            .filter(|p| {
                let mut at = parents.get(**p).cloned().flatten();
                // A chain is never longer than the node count (guards against a loop).
                for _ in 0..t.nodes.len() {
                    match at {
                        Some(x) if x == r => return true,
                        Some(x) => at = parents.get(&x).cloned().flatten(),
                        None => return false,
                    }
                }
                false
            })
            .count()
    };
    // How many alive PoPs keep an overlay path to a server without `r`.
    let left = |r: &str| {
        let mut reached: BTreeSet<String> = BTreeSet::new();
        let mut queue: VecDeque<String> = VecDeque::new();
        for s in t.servers() {
            if alive(&s.id) {
                reached.insert(s.id.clone());
                queue.push_back(s.id.clone());
            }
        }
        while let Some(x) = queue.pop_front() {
            for y in t.overlay_neighbours(&x) {
                if y != r && alive(&y) && reached.insert(y.clone()) {
                    queue.push_back(y);
                }
            }
        }
        pops.iter().filter(|p| reached.contains(**p)).count()
    };
    t.with_role(Role::Relay)
        .iter()
        .map(|n| n.id.as_str())
        .filter(|r| alive(r) && carrying.get(*r).copied().unwrap_or(0) > 0)
        .filter_map(|r| {
            let left = left(r);
            (left > 0).then(|| {
                let key = (
                    left == pops.len(),
                    below(r),
                    carrying.get(r).copied().unwrap_or(0),
                );
                (key, r)
            })
        })
        .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(a.1)))
        .map(|(_, r)| r.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed() -> Topology {
        Topology::load(&crate::project_root().join("topologies/seed.toml")).expect("seed")
    }

    #[test]
    fn the_shipped_scenarios_parse() {
        let root = crate::project_root();
        let dir = root.join("topologies/scenarios");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).expect("scenarios dir").flatten() {
            let p = e.path();
            let name = p
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            // A scenario is named after its topology: seed-*.toml runs on seed.toml
            // (the longest such prefix that names a topology: multihomed-pops-*.toml
            // runs on multihomed-pops.toml).
            let Some(topo) = name
                .match_indices('-')
                .map(|(i, _)| &name[..i])
                .rev()
                .find(|t| root.join(format!("topologies/{t}.toml")).exists())
            else {
                continue;
            };
            let t = Topology::load(&root.join(format!("topologies/{topo}.toml")))
                .unwrap_or_else(|e| panic!("{name}: topology {topo}: {e}"));
            Scenario::load(&p, &t).unwrap_or_else(|e| panic!("{name}: {e:#}"));
            n += 1;
        }
        assert!(
            n >= 6,
            "baseline, kill, delay and the two loss scenarios of the seed, and the sparse one"
        );
    }

    #[test]
    fn every_action_parses() {
        let t = seed();
        let s = Scenario::parse(
            r#"
name = "all"
duration_s = 5
[[client]]
id = "n16"
stream = "bars"
[[event]]
at_s = 1
action = "kill"
node = "n8"
[[event]]
at_s = 2
action = "restart"
node = "n8"
[[event]]
at_s = 2
action = "link"
ends = ["n8", "n7"]
delay_ms = 30
[[event]]
at_s = 2
action = "all_links"
loss_pct = 5
jitter_ms = 20
[[event]]
at_s = 3
action = "link_down"
ends = ["n7", "n8"]
[[event]]
at_s = 3
action = "link_up"
ends = ["n7", "n8"]
[[event]]
at_s = 3
action = "client_start"
client = "n18"
stream = "countdown"
[[event]]
at_s = 4
action = "switch"
client = "n18"
stream = "bars"
[[event]]
at_s = 4.5
action = "client_stop"
client = "n18"
[[event]]
at_s = 5
action = "kill_active_relay"
"#,
            &t,
        )
        .expect("valid");
        assert_eq!(s.events.len(), 10);
        assert_eq!(s.events[9].action, Action::KillActiveRelay);
        assert_eq!(
            s.events[2].action,
            Action::Link {
                ends: ["n8".into(), "n7".into()],
                delay_ms: Some(30.0),
                jitter_ms: None,
                loss_pct: None,
                rate_mbit: None
            }
        );
        assert_eq!(
            s.events[3].action,
            Action::AllLinks {
                delay_ms: None,
                jitter_ms: Some(20.0),
                loss_pct: Some(5.0),
                rate_mbit: None
            }
        );
    }

    #[test]
    fn bad_scenarios_are_refused_with_the_reason() {
        let t = seed();
        let err = |text: &str| format!("{:#}", Scenario::parse(text, &t).expect_err("invalid"));
        assert!(
            err("name = \"x\"\n[[event]]\nat_s = 1\naction = \"kill\"\nnode = \"zz\"\n")
                .contains("unknown node zz")
        );
        assert!(
            err("name = \"x\"\n[[event]]\nat_s = 1\naction = \"kill\"\nnode = \"n1\"\n")
                .contains("router")
        );
        assert!(err(
            "name = \"x\"\n[[event]]\nat_s = 1\naction = \"link_down\"\nends = [\"s1\", \"n7\"]\n"
        )
        .contains("no link between s1 and n7"));
        assert!(
            err("name = \"x\"\n[[client]]\nid = \"n8\"\nstream = \"a\"\n").contains("not a client")
        );
        assert!(
            err("name = \"x\"\n[[event]]\nat_s = 1\naction = \"explode\"\n").contains("explode")
        );
        assert!(err("name = \"x\"\nduration_s = -1\n").contains("positive"));
        assert!(
            err("name = \"x\"\n[[event]]\nat_s = 1\naction = \"all_links\"\nloss_pct = 150\n")
                .contains("loss_pct = 150 is out of range")
        );
    }

    /// The diamond: s1 reaches p1 through ra (fast) and rb (slow).
    fn diamond() -> Topology {
        Topology::load(&crate::project_root().join("topologies/diamond.toml")).expect("diamond")
    }

    fn tree(pairs: &[(&str, Option<&str>)]) -> BTreeMap<String, Option<String>> {
        pairs
            .iter()
            .map(|(n, p)| (n.to_string(), p.map(String::from)))
            .collect()
    }

    fn counts(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
        pairs.iter().map(|(n, c)| (n.to_string(), *c)).collect()
    }

    #[test]
    fn the_active_relay_is_the_one_carrying_the_stream_whose_loss_the_overlay_survives() {
        let t = diamond();
        let parents = tree(&[
            ("s1", None),
            ("ra", Some("s1")),
            ("rb", Some("s1")),
            ("p1", Some("ra")),
        ]);
        let carrying = counts(&[("s1", 1), ("ra", 1), ("p1", 1)]);
        let all = |_: &str| true;
        assert_eq!(
            pick_active_relay(&t, &parents, &carrying, all).as_deref(),
            Some("ra")
        );
        // The tree moved to rb.
        let moved = tree(&[
            ("s1", None),
            ("ra", Some("s1")),
            ("rb", Some("s1")),
            ("p1", Some("rb")),
        ]);
        let carrying_b = counts(&[("s1", 1), ("rb", 1)]);
        assert_eq!(
            pick_active_relay(&t, &moved, &carrying_b, all).as_deref(),
            Some("rb")
        );
        // With rb dead, ra is p1's only way to s1: nothing to kill.
        let rb_dead = |n: &str| n != "rb";
        assert_eq!(pick_active_relay(&t, &parents, &carrying, rb_dead), None);
        // No relay carries a stream (no viewer yet): nothing to kill.
        assert_eq!(pick_active_relay(&t, &parents, &counts(&[]), all), None);
    }

    #[test]
    fn of_several_active_relays_the_one_with_most_pops_below_is_picked() {
        let t = seed();
        // s1 - n12 - n14 - {n8 - n7, n10 - n6}, n12 - n11 - n9 - n5: n12 is above all
        // three PoPs but s1-n13 keeps them reachable without it.
        let parents = tree(&[
            ("s1", None),
            ("n12", Some("s1")),
            ("n13", Some("s1")),
            ("n14", Some("n12")),
            ("n11", Some("n12")),
            ("n9", Some("n11")),
            ("n8", Some("n14")),
            ("n10", Some("n14")),
            ("n7", Some("n8")),
            ("n6", Some("n10")),
            ("n5", Some("n9")),
        ]);
        let carrying = counts(&[
            ("n12", 2),
            ("n14", 2),
            ("n8", 1),
            ("n10", 1),
            ("n11", 1),
            ("n9", 1),
        ]);
        let all = |_: &str| true;
        assert_eq!(
            pick_active_relay(&t, &parents, &carrying, all).as_deref(),
            Some("n12")
        );
        // n12 dead already: n14 carries two PoPs, n11 and n9 one.
        let n12_dead = |n: &str| n != "n12";
        assert_eq!(
            pick_active_relay(&t, &parents, &carrying, n12_dead).as_deref(),
            Some("n14")
        );
    }

    #[test]
    fn every_client_watches_and_faults_are_timed() {
        let t = seed();
        let streams = ["a".to_string(), "b".to_string()];
        let s = Scenario::every_client(&t, &streams, 20.0, Some(3.0), Some(10.0));
        assert_eq!(s.clients.len(), t.clients().len());
        assert!(s.clients.iter().all(|c| c.start_s == 0.5));
        assert_eq!(s.clients[1].stream, "b");
        assert_eq!(s.events.len(), 2);
        assert_eq!(
            s.events[0].action.link_change().and_then(|c| c.loss_pct),
            Some(3.0)
        );
        assert_eq!(
            (s.events[1].at_s, &s.events[1].action),
            (10.0, &Action::KillActiveRelay)
        );
        let quiet = Scenario::every_client(&t, &streams, 10.0, None, None);
        assert!(quiet.events.is_empty() && quiet.clients.iter().all(|c| c.start_s == 0.0));
    }

    #[test]
    fn a_relay_that_cuts_some_pops_off_is_killed_only_if_none_cuts_none() {
        let t = seed();
        // n5's only overlay neighbour is n9: killing n9 cuts n5 off, not n6 or n7.
        let parents = tree(&[
            ("s1", None),
            ("n12", Some("s1")),
            ("n11", Some("n12")),
            ("n9", Some("n11")),
            ("n5", Some("n9")),
        ]);
        let all = |_: &str| true;
        let only_n9 = counts(&[("n9", 1)]);
        assert_eq!(
            pick_active_relay(&t, &parents, &only_n9, all).as_deref(),
            Some("n9")
        );
        // n11 is as high above n5, and its loss cuts no PoP off: it goes first.
        let both = counts(&[("n9", 1), ("n11", 1)]);
        assert_eq!(
            pick_active_relay(&t, &parents, &both, all).as_deref(),
            Some("n11")
        );
    }
}
