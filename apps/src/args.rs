//! Command-line values shared by the four programs: network addresses and times.
//!
//! Every address flag (`--bootstrap`, `--listen`, `--status`, `--http`, `--report-to`)
//! takes `IP:PORT`, `HOST:PORT` (resolved once, at start, IPv4 preferred) or a bare
//! `PORT`, which means [`DEFAULT_HOST`]: every program of a topology on one host is the
//! common case, and a bare port never exposes a server beyond the machine. Clap puts
//! the flag's name in front of the error, e.g.
//! `invalid value 'nohost:1' for '--bootstrap <ADDR>': cannot resolve host "nohost"`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

/// The host a bare port means.
pub const DEFAULT_HOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Parse an address flag: `IP:PORT`, `[IPv6]:PORT`, `HOST:PORT` or `PORT` (on
/// [`DEFAULT_HOST`]). The error says what was expected and what was wrong.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty address (expected IP:PORT, HOST:PORT or PORT)".into());
    }
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return match s.parse::<u16>() {
            Ok(port) => Ok(SocketAddr::new(DEFAULT_HOST, port)),
            Err(_) => Err(format!("port {s} is out of range (0 to 65535)")),
        };
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        if s.parse::<IpAddr>().is_ok() {
            return Err(format!("{s} has no port (expected IP:PORT, e.g. {s}:7070)"));
        }
        return Err(format!(
            "{s:?} is not an address (expected IP:PORT, HOST:PORT or PORT)"
        ));
    };
    let port: u16 = port.parse().map_err(|_| {
        format!("{port:?} is not a port number (expected IP:PORT, HOST:PORT or PORT)")
    })?;
    if host.is_empty() {
        return Err(format!(
            "no host before :{port} (give PORT alone for {DEFAULT_HOST})"
        ));
    }
    if host.contains(':') && !host.starts_with('[') {
        return Err(format!(
            "write an IPv6 address in brackets: [{host}]:{port}"
        ));
    }
    let found: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|_| format!("cannot resolve host {host:?}"))?
        .collect();
    found
        .iter()
        .find(|a| a.is_ipv4())
        .or(found.first())
        .copied()
        .ok_or_else(|| format!("host {host:?} has no address"))
}

/// Longest time any time flag takes: a day. Beyond it a value is a slip of the keyboard,
/// and far beyond it the clock cannot hold the deadline it makes.
pub const MAX_FLAG_SECS: u64 = 86_400;

/// Parse a time flag in seconds that may have a fraction (`--duration-secs 2.5`): more
/// than 0, at most [`MAX_FLAG_SECS`]. A negative, NaN or infinite value is an error
/// here, not a panic where it becomes a `Duration`.
pub fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(v > 0.0 && v <= MAX_FLAG_SECS as f64) {
        return Err(format!(
            "{s} seconds: expected more than 0 and at most {MAX_FLAG_SECS} (a day)"
        ));
    }
    Ok(Duration::from_secs_f64(v))
}

/// An error and its causes on one line, each cause once: `a: b: c`, leaving out a cause
/// whose text the line already holds (many errors print their source themselves and
/// also give it as their source, which `{:#}` would print twice).
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_seconds_are_positive_finite_and_at_most_a_day() {
        assert_eq!(parse_secs("2.5"), Ok(Duration::from_millis(2500)));
        assert_eq!(parse_secs("86400"), Ok(Duration::from_secs(86_400)));
        for bad in ["-1", "0", "nan", "inf", "1e300", "86401", "", "soon"] {
            let e = parse_secs(bad).expect_err(bad);
            assert!(e.contains("seconds"), "{bad}: {e}");
        }
    }

    #[test]
    fn test_error_line_prints_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        #[derive(Debug)]
        struct Wrap(std::io::Error);
        impl std::fmt::Display for Wrap {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "cannot read x: {}", self.0)
            }
        }
        impl std::error::Error for Wrap {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = anyhow::Error::new(Wrap(io)).context("loading clips");
        assert_eq!(error_line(&e), "loading clips: cannot read x: no such file");
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_line(&plain), "outer: inner");
    }

    #[test]
    fn test_ip_port_host_port_and_bare_port() {
        assert_eq!(
            parse_addr("127.3.0.1:7070"),
            Ok("127.3.0.1:7070".parse().unwrap())
        );
        assert_eq!(parse_addr("[::1]:80"), Ok("[::1]:80".parse().unwrap()));
        assert_eq!(parse_addr("8080"), Ok("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(
            parse_addr("localhost:9000").map(|a| a.port()),
            Ok(9000),
            "a host name resolves"
        );
    }

    #[test]
    fn test_errors_say_what_is_wrong() {
        assert!(parse_addr("").unwrap_err().contains("empty"));
        assert!(parse_addr("70000").unwrap_err().contains("out of range"));
        assert!(parse_addr("127.0.0.1").unwrap_err().contains("no port"));
        assert!(parse_addr("127.0.0.1:x")
            .unwrap_err()
            .contains("not a port"));
        assert!(parse_addr(":80").unwrap_err().contains("no host"));
        assert!(parse_addr("no-such-host.invalid:80")
            .unwrap_err()
            .contains("cannot resolve host"));
        assert!(parse_addr("fe80::1:80").unwrap_err().contains("brackets"));
    }
}
