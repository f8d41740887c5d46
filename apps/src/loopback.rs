//! Placing a topology on loopback: every node gets its own 127.`net`.y.z addresses, so
//! a whole overlay runs on one host with the real port numbers (`ott-bootstrap --net`,
//! the demo and the tests).

use std::net::Ipv4Addr;

use anyhow::Context;

/// Rewrite a topology so that every node has explicit addresses in 127.`net`.0.0/16.
///
/// A node whose given addresses all lie in 127.`net`.0.0/16 already keeps them (a test
/// can place a multi-homed node and its clients precisely). Every other node at index
/// `i` gets 127.`net`.`i / 250`.`i % 250 + 1`, and a node with several `addresses` gets
/// as many, its `k`-th one in 127.`net`.`64 k + i / 250`.`i % 250 + 1`.
pub fn with_loopback_addresses(text: &str, net: u8) -> anyhow::Result<String> {
    let mut doc: toml::Table = text.parse().context("topology is not TOML")?;
    let nodes = doc
        .get_mut("node")
        .and_then(|n| n.as_array_mut())
        .context("topology has no [[node]]")?;
    let in_run = |v: &toml::Value| {
        v.as_str()
            .and_then(|s| s.parse::<Ipv4Addr>().ok())
            .is_some_and(|ip| ip.octets()[..2] == [127, net])
    };
    for (i, node) in nodes.iter_mut().enumerate() {
        let table = node.as_table_mut().context("a [[node]] is not a table")?;
        let given: Vec<toml::Value> = match (table.get("address"), table.get("addresses")) {
            (Some(a), _) => vec![a.clone()],
            (None, Some(list)) => list.as_array().cloned().unwrap_or_default(),
            (None, None) => Vec::new(),
        };
        if !given.is_empty() && given.iter().all(in_run) {
            continue;
        }
        let hi = u8::try_from(i / 250).context("too many nodes for one loopback /16")?;
        let lo = (i % 250 + 1) as u8;
        let ips: Vec<toml::Value> = (0..given.len().max(1))
            .map(|k| {
                let third = u8::try_from(64 * k + usize::from(hi))
                    .ok()
                    .filter(|_| hi < 64)
                    .context("too many addresses for the loopback launcher (at most 4 a node)")?;
                Ok(toml::Value::String(
                    Ipv4Addr::new(127, net, third, lo).to_string(),
                ))
            })
            .collect::<anyhow::Result<_>>()?;
        if table.contains_key("addresses") {
            table.insert("addresses".into(), toml::Value::Array(ips));
        } else if let Some(first) = ips.into_iter().next() {
            table.insert("address".into(), first);
        }
    }
    Ok(toml::to_string(&doc)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ott_overlay::Topology;

    #[test]
    fn loopback_rewrite_keeps_every_address_of_a_node() {
        let text = r#"
name = "t"
bootstrapper = "s"
[[node]]
id = "s"
role = "server"
address = "10.9.9.9"
[[node]]
id = "p"
role = "pop"
addresses = ["10.0.0.1", "10.0.2.1"]
[[node]]
id = "c"
role = "client"
[[node]]
id = "q"
role = "pop"
addresses = ["127.61.0.4", "127.61.1.4"]
[[link]]
ends = ["s", "p"]
[[link]]
ends = ["p", "c"]
[[link]]
ends = ["s", "q"]
"#;
        let out = with_loopback_addresses(text, 61).expect("rewritten");
        let t = Topology::parse(&out, "out.toml").expect("still valid");
        let ips = |id: &str| -> Vec<String> {
            t.node(id)
                .map(|n| n.addresses.iter().map(|a| a.to_string()).collect())
                .unwrap_or_default()
        };
        assert_eq!(ips("s"), ["127.61.0.1"]);
        assert_eq!(ips("p"), ["127.61.0.2", "127.61.64.2"]);
        assert_eq!(ips("c"), ["127.61.0.3"]);
        // Already in the run's range: kept.
        assert_eq!(ips("q"), ["127.61.0.4", "127.61.1.4"]);
    }
}
