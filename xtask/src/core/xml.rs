//! CORE's scenario XML (CORE 8 and later): a writer for our [`CoreScenario`] and a small
//! reader for the elements it writes.
//!
//! The shape follows CORE's own files: `<scenario>` holding `<networks/>`, `<devices>`
//! (one `<device id name type>` with `<position>` and `<services>`), `<links>` (one
//! `<link node1 node2>` with `<iface1>`/`<iface2>` carrying `ip4`/`ip4_mask`, and
//! `<options>` with `delay`/`jitter` in µs, `bandwidth` in bit/s and `loss` in %), and
//! `<service_configurations>` giving each node's `UserDefined` files and start-up
//! commands.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::{bail, Context};

use super::CoreScenario;

/// Escapes text for an XML attribute or element.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            c => o.push(c),
        }
    }
    o
}

fn unesc(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// Writes `s` as CORE scenario XML.
pub(crate) fn render(s: &CoreScenario) -> String {
    let id = |name: &str| {
        s.nodes
            .iter()
            .position(|n| n.name == name)
            .map_or(0, |i| i + 1)
    };
    let mut o = String::new();
    // `write!` to a String cannot fail.
    let _ = writeln!(o, "<?xml version='1.0' encoding='UTF-8'?>");
    let _ = writeln!(o, "<scenario name=\"{}\">", esc(&s.name));
    let _ = writeln!(o, "  <networks/>");
    let _ = writeln!(o, "  <devices>");
    for (i, n) in s.nodes.iter().enumerate() {
        let _ = writeln!(
            o,
            "    <device id=\"{}\" name=\"{}\" icon=\"\" canvas=\"1\" type=\"{}\" class=\"\" image=\"\">",
            i + 1,
            esc(&n.name),
            esc(&n.model)
        );
        let _ = writeln!(o, "      <position x=\"{:.1}\" y=\"{:.1}\"/>", n.x, n.y);
        let _ = writeln!(o, "      <services>");
        for sv in &n.services {
            let _ = writeln!(o, "        <service name=\"{}\"/>", esc(sv));
        }
        let _ = writeln!(o, "      </services>");
        let _ = writeln!(o, "    </device>");
    }
    let _ = writeln!(o, "  </devices>");
    let _ = writeln!(o, "  <links>");
    for l in &s.links {
        let _ = writeln!(
            o,
            "    <link node1=\"{}\" node2=\"{}\">",
            id(&l.ends[0]),
            id(&l.ends[1])
        );
        for (k, end) in l.ends.iter().enumerate() {
            let iface = s
                .nodes
                .iter()
                .find(|n| &n.name == end)
                .and_then(|n| n.ifaces.iter().find(|i| i.name == l.ifaces[k]));
            if let Some(i) = iface {
                let num = i.name.trim_start_matches("eth");
                let _ = writeln!(
                    o,
                    "      <iface{} id=\"{}\" name=\"{}\" ip4=\"{}\" ip4_mask=\"{}\"/>",
                    k + 1,
                    num,
                    esc(&i.name),
                    i.ip,
                    i.prefix
                );
            }
        }
        let _ = writeln!(
            o,
            "      <options delay=\"{}\" bandwidth=\"{}\" loss=\"{}\" dup=\"0\" jitter=\"{}\" unidirectional=\"0\" buffer=\"0\"/>",
            l.delay_us, l.bandwidth_bps, l.loss_pct, l.jitter_us
        );
        let _ = writeln!(o, "    </link>");
    }
    let _ = writeln!(o, "  </links>");
    let _ = writeln!(o, "  <service_configurations>");
    for (i, n) in s.nodes.iter().enumerate() {
        if n.startup.is_empty() && n.files.is_empty() {
            continue;
        }
        let _ = writeln!(o, "    <service name=\"UserDefined\" node=\"{}\">", i + 1);
        let _ = writeln!(o, "      <startups>");
        for c in &n.startup {
            let _ = writeln!(o, "        <startup>{}</startup>", esc(c));
        }
        let _ = writeln!(o, "      </startups>");
        let _ = writeln!(o, "      <files>");
        for (name, text) in &n.files {
            let _ = writeln!(
                o,
                "        <file name=\"{}\">{}</file>",
                esc(name),
                esc(text)
            );
        }
        let _ = writeln!(o, "      </files>");
        let _ = writeln!(o, "    </service>");
    }
    let _ = writeln!(o, "  </service_configurations>");
    let _ = writeln!(o, "  <session_options>");
    let _ = writeln!(o, "    <configuration name=\"controlnet\" value=\"\"/>");
    let _ = writeln!(o, "  </session_options>");
    let _ = writeln!(o, "</scenario>");
    o
}

/// One XML element: name, attributes, children and text.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Element {
    pub(crate) name: String,
    pub(crate) attrs: BTreeMap<String, String>,
    pub(crate) children: Vec<Element>,
    pub(crate) text: String,
}

impl Element {
    /// The attribute `k`, or "".
    pub(crate) fn attr(&self, k: &str) -> &str {
        self.attrs.get(k).map_or("", String::as_str)
    }

    /// Children named `name`.
    pub(crate) fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// The first child named `name`.
    pub(crate) fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }
}

/// Parses the XML subset CORE's files use (declaration, elements, attributes in single or
/// double quotes, text, comments); enough for our files and CORE's samples.
pub(crate) fn parse(text: &str) -> anyhow::Result<Element> {
    let mut stack: Vec<Element> = vec![Element::default()];
    let mut rest = text;
    while !rest.is_empty() {
        let Some(lt) = rest.find('<') else {
            if let Some(top) = stack.last_mut() {
                top.text.push_str(&unesc(rest));
            }
            break;
        };
        if let Some(top) = stack.last_mut() {
            top.text.push_str(&unesc(&rest[..lt]));
        }
        rest = &rest[lt..];
        if rest.starts_with("<?") {
            let end = rest.find("?>").context("unterminated <? declaration")?;
            rest = &rest[end + 2..];
        } else if rest.starts_with("<!--") {
            let end = rest.find("-->").context("unterminated comment")?;
            rest = &rest[end + 3..];
        } else if let Some(after) = rest.strip_prefix("</") {
            let end = after.find('>').context("unterminated closing tag")?;
            let name = after[..end].trim();
            let done = stack.pop().context("closing tag without an element")?;
            if done.name != name {
                bail!("</{name}> closes <{}>", done.name);
            }
            let Some(parent) = stack.last_mut() else {
                bail!("</{name}> closes the document");
            };
            parent.children.push(done);
            rest = &after[end + 1..];
        } else {
            let end = rest.find('>').context("unterminated tag")?;
            let inner = &rest[1..end];
            let self_closing = inner.ends_with('/');
            let inner = inner.trim_end_matches('/');
            let (name, mut attrs_text) =
                inner.split_once(char::is_whitespace).unwrap_or((inner, ""));
            let mut el = Element {
                name: name.to_string(),
                ..Element::default()
            };
            loop {
                attrs_text = attrs_text.trim_start();
                if attrs_text.is_empty() {
                    break;
                }
                let eq = attrs_text.find('=').context("attribute without a value")?;
                let key = attrs_text[..eq].trim().to_string();
                let v = attrs_text[eq + 1..].trim_start();
                let quote = v.chars().next().context("attribute without a value")?;
                if quote != '"' && quote != '\'' {
                    bail!("attribute {key} is not quoted");
                }
                let close = v[1..].find(quote).context("unterminated attribute")?;
                el.attrs.insert(key, unesc(&v[1..1 + close]));
                attrs_text = &v[close + 2..];
            }
            if self_closing {
                let Some(parent) = stack.last_mut() else {
                    bail!("element outside the document");
                };
                parent.children.push(el);
            } else {
                stack.push(el);
            }
            rest = &rest[end + 1..];
        }
    }
    if stack.len() != 1 {
        bail!(
            "<{}> is never closed",
            stack.last().map_or("", |e| e.name.as_str())
        );
    }
    let mut doc = stack.pop().unwrap_or_default();
    let root = doc.children.pop().context("no root element")?;
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_round_trips_through_xml() {
        let (t, s) = super::super::tests::seed();
        let doc = parse(&render(&s)).expect("our XML parses");
        assert_eq!(doc.name, "scenario");
        let devices: Vec<&Element> = doc
            .child("devices")
            .expect("devices")
            .all("device")
            .collect();
        assert_eq!(devices.len(), t.nodes.len());
        let name_of = |id: &str| {
            devices
                .iter()
                .find(|d| d.attr("id") == id)
                .map(|d| d.attr("name").to_string())
                .unwrap_or_default()
        };
        for (d, n) in devices.iter().zip(&t.nodes) {
            assert_eq!(d.attr("name"), n.id);
            assert!(d.child("position").is_some());
        }
        let links: Vec<&Element> = doc.child("links").expect("links").all("link").collect();
        assert_eq!(links.len(), t.links.len());
        for (k, (l, want)) in links.iter().zip(&t.links).enumerate() {
            assert_eq!(
                [name_of(l.attr("node1")), name_of(l.attr("node2"))],
                want.ends
            );
            let i1 = l.child("iface1").expect("iface1");
            let i2 = l.child("iface2").expect("iface2");
            assert_eq!(i1.attr("ip4"), format!("10.0.{k}.1"));
            assert_eq!(i2.attr("ip4"), format!("10.0.{k}.2"));
            assert_eq!(i1.attr("ip4_mask"), "24");
            let o = l.child("options").expect("options");
            assert_eq!(
                o.attr("delay"),
                ((want.delay_ms * 1000.0) as u64).to_string()
            );
            assert_eq!(
                o.attr("bandwidth"),
                want.rate_mbit.map_or(0, |r| (r * 1e6) as u64).to_string()
            );
            assert_eq!(o.attr("loss").parse::<f64>().ok(), Some(want.loss_pct));
        }
        let services: Vec<&Element> = doc
            .child("service_configurations")
            .expect("service configurations")
            .all("service")
            .collect();
        let s1 = services
            .iter()
            .find(|s| name_of(s.attr("node")) == "s1")
            .expect("s1 starts programs");
        let startup = s1
            .child("startups")
            .and_then(|s| s.child("startup"))
            .expect("startup");
        assert_eq!(startup.text, "sh ott.sh");
        let script = s1
            .child("files")
            .expect("files")
            .all("file")
            .find(|f| f.attr("name") == "ott.sh")
            .expect("ott.sh");
        assert!(script.text.contains("ott-bootstrap"));
        assert!(script.text.contains("--id s1"));
    }

    #[test]
    fn reader_rejects_broken_xml() {
        assert!(parse("<a><b></a>").is_err());
        assert!(parse("<a x=1/>").is_err());
        assert!(parse("<a>").is_err());
        let e = parse("<a x='1 &amp; 2'><b/>t</a>").expect("valid");
        assert_eq!(e.attr("x"), "1 & 2");
        assert_eq!(e.text, "t");
    }
}
