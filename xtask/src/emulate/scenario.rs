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
//! node = "n12"               # client_start | client_stop | switch
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
pub(crate) struct Event {
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
    pub(crate) events: Vec<Event>,
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
                Action::AllLinks { .. } => {}
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
"#,
            &t,
        )
        .expect("valid");
        assert_eq!(s.events.len(), 9);
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
}
