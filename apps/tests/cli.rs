//! What a new user meets first, run through the real binaries: `--version`, address
//! flags and their errors, the words said while waiting, the client's exit status when
//! nothing arrived, and `ott-bootstrap --net` placing two topologies side by side.
//!
//! Addresses: 127.152.x.y and 127.153.x.y only (no other test uses them).

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ott_bootstrap::{request_until, Request};

const BINS: [(&str, &str); 4] = [
    ("ott-bootstrap", env!("CARGO_BIN_EXE_ott-bootstrap")),
    ("ott-node", env!("CARGO_BIN_EXE_ott-node")),
    ("ott-server", env!("CARGO_BIN_EXE_ott-server")),
    ("ott-client", env!("CARGO_BIN_EXE_ott-client")),
];

fn bin(name: &str) -> &'static str {
    BINS.iter()
        .find(|(n, _)| *n == name)
        .map(|(_, p)| *p)
        .expect("a known binary")
}

fn seed() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../topologies/seed.toml")
}

/// Run to completion, with a deadline (a hung program fails the test).
fn run(name: &str, args: &[&str], deadline: Duration) -> Output {
    let mut child = Command::new(bin(name))
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let end = Instant::now() + deadline;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut stdout = Vec::new();
            let mut stderr = Vec::new();
            if let Some(mut o) = child.stdout.take() {
                let _ = o.read_to_end(&mut stdout);
            }
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_end(&mut stderr);
            }
            return Output {
                status,
                stdout,
                stderr,
            };
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{name} {args:?} still running after {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A program that runs until the test ends; killed (by its own handle) on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_bootstrap(args: &[&str]) -> Running {
    let seed = seed();
    let child = Command::new(bin("ott-bootstrap"))
        .arg("--topology")
        .arg(&seed)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ott-bootstrap");
    Running(child)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn test_version_names_each_program() {
    for (name, _) in BINS {
        let out = run(name, &["--version"], Duration::from_secs(10));
        assert!(out.status.success(), "{name} --version failed");
        let line = text(&out.stdout);
        assert!(
            line.starts_with(&format!("{name} ")),
            "{name} --version printed {line:?}"
        );
    }
}

#[test]
fn test_bad_addresses_are_refused_naming_the_flag() {
    let cases: [(&str, &[&str], &str, &str); 4] = [
        (
            "ott-client",
            &["--bootstrap", "127.152.0.1", "--stream", "x"],
            "--bootstrap",
            "no port",
        ),
        (
            "ott-node",
            &["--id", "n5", "--status", "no-such-host.invalid:80"],
            "--status",
            "cannot resolve host",
        ),
        (
            "ott-server",
            &["--id", "s1", "--videos", ".", "--bootstrap", "70000"],
            "--bootstrap",
            "out of range",
        ),
        (
            "ott-bootstrap",
            &["--topology", "x.toml", "--listen", "127.152.0.1:port"],
            "--listen",
            "not a port",
        ),
    ];
    for (name, args, flag, why) in cases {
        refused(name, args, flag, why);
    }
}

/// Runs `name` with `args`, checks that it exits 2 with an error naming `flag` and saying
/// `why`, and returns that error.
fn refused(name: &str, args: &[&str], flag: &str, why: &str) -> String {
    let out = run(name, args, Duration::from_secs(10));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{name} {args:?}: {err}");
    assert!(
        err.contains(flag) && err.contains(why),
        "{name} {args:?}: the error should name {flag} and say {why:?}: {err}"
    );
    err
}

/// Time flags out of range: each used to panic (a negative, NaN or infinite
/// `--duration-secs` in `Duration::from_secs_f64`, a huge `--bootstrap-wait-secs` adding
/// to the clock) or be bent in silence (`--heartbeat-ms 0`, a dead-after shorter than a
/// heartbeat). Each is refused at once, before the bootstrapper is asked, naming the flag.
#[test]
fn test_senseless_times_are_refused_naming_the_flag() {
    let cases: [(&str, &[&str], &str, &str); 9] = [
        (
            "ott-client",
            &["--stream", "x", "--duration-secs=-1"],
            "--duration-secs",
            "more than 0",
        ),
        (
            "ott-client",
            &["--stream", "x", "--duration-secs", "nan"],
            "--duration-secs",
            "more than 0",
        ),
        (
            "ott-client",
            &["--stream", "x", "--duration-secs", "inf"],
            "--duration-secs",
            "at most 86400",
        ),
        (
            "ott-client",
            &[
                "--stream",
                "x",
                "--bootstrap-wait-secs",
                "18446744073709551615",
            ],
            "--bootstrap-wait-secs",
            "0..=86400",
        ),
        (
            "ott-client",
            &["--stream", "x", "--latency-ms", "99999999"],
            "--latency-ms",
            "0..=60000",
        ),
        (
            "ott-node",
            &["--id", "n5", "--heartbeat-ms", "0"],
            "--heartbeat-ms",
            "1..=60000",
        ),
        (
            "ott-node",
            &["--id", "n5", "--dead-after-ms", "60"],
            "--dead-after-ms 60",
            "two heartbeat periods",
        ),
        (
            "ott-server",
            &[
                "--id",
                "s1",
                "--videos",
                ".",
                "--heartbeat-ms",
                "100",
                "--dead-after-ms",
                "150",
            ],
            "--dead-after-ms 150",
            "give at least 200",
        ),
        (
            "ott-node",
            &["--id", "n5", "--report-ms", "99999999999"],
            "--report-ms",
            "0..=3600000",
        ),
    ];
    for (name, args, flag, why) in cases {
        let err = refused(name, args, flag, why);
        assert!(!err.contains("panicked"), "{name} {args:?}: {err}");
        assert!(!err.contains("no bootstrapper"), "{name} {args:?}: {err}");
    }
}

#[test]
fn test_client_waiting_for_no_bootstrapper_says_so_and_fails() {
    let out = run(
        "ott-client",
        &[
            "--bootstrap",
            "127.152.200.1:7070",
            "--stream",
            "x",
            "--bootstrap-wait-secs",
            "3",
        ],
        Duration::from_secs(20),
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("no bootstrapper at 127.152.200.1:7070: is ott-bootstrap running?"),
        "{err}"
    );
    // Said with a back-off, not at each retry (every 200 ms): at 1 s and 3 s at most.
    let hints = err.matches("is ott-bootstrap running?").count();
    assert!((1..=2).contains(&hints), "{hints} hints: {err}");
    // The cause once, not repeated down the chain.
    assert_eq!(
        err.matches("127.152.200.1:7070").count(),
        hints + 1,
        "{err}"
    );
}

#[test]
fn test_client_that_received_nothing_exits_2_and_says_why() {
    // A bootstrapper, but no server and no PoP: the client gets the PoP list, nothing
    // answers, and after --duration-secs it must not exit as if it had watched.
    let _b = start_bootstrap(&["--net", "152", "--listen", "127.152.255.250:7070"]);
    let out = run(
        "ott-client",
        &[
            "--bootstrap",
            "127.152.255.250:7070",
            "--stream",
            "countdown",
            "--duration-secs",
            "4",
        ],
        Duration::from_secs(40),
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("received no frame"), "{err}");
    assert!(
        err.contains("no PoP answers"),
        "the client should say that no PoP answers: {err}"
    );
    let summary = text(&out.stdout);
    assert!(summary.contains("frames=0"), "{summary}");
    assert!(
        !err.contains('\u{1b}') && !summary.contains('\u{1b}'),
        "colour codes in output that is not a terminal"
    );
}

#[test]
fn test_two_bootstrappers_with_net_place_two_topologies_side_by_side() {
    let _a = start_bootstrap(&["--net", "152"]);
    let _b = start_bootstrap(&["--net", "153"]);
    for net in [152u8, 153] {
        let at = SocketAddr::from(([127, net, 255, 254], 7070));
        let req = Request::Node { id: "n9".into() };
        let a = request_until(at, &req, Instant::now() + Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("bootstrapper --net {net} at {at}: {e}"));
        let ip = match a.bind_ctrl.ip() {
            std::net::IpAddr::V4(ip) => ip,
            other => panic!("n9 got {other}"),
        };
        assert_eq!(ip.octets()[..2], [127, net], "n9 of --net {net} got {ip}");
        for p in &a.neighbours {
            assert!(
                p.control_addrs()
                    .all
                    .iter()
                    .all(|x| x.to_string().starts_with(&format!("127.{net}."))),
                "neighbour {p:?} of --net {net}"
            );
        }
    }
}

#[test]
fn test_an_errors_cause_is_printed_once() {
    let dir = std::env::temp_dir().join(format!("ott-cli-{}", std::process::id()));
    let missing = dir.join("missing.toml");
    let missing_s = missing.display().to_string();
    let cases: [(&str, Vec<&str>); 2] = [
        ("ott-bootstrap", vec!["--topology", &missing_s]),
        ("ott-server", vec!["--id", "s1", "--videos", &missing_s]),
    ];
    for (name, args) in cases {
        let out = run(name, &args, Duration::from_secs(10));
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        let line = err
            .lines()
            .find(|l| l.starts_with(&format!("{name}: error: ")))
            .unwrap_or_else(|| panic!("no error line: {err}"));
        assert!(line.contains(&missing_s), "{line}");
        assert_eq!(line.matches("os error 2").count(), 1, "{line}");
    }
}

/// The `--flag`s of a text, in order of first appearance, `--help` and `--version` left out.
fn flags_in(text: &str) -> Vec<String> {
    let mut flags: Vec<String> = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("--") {
        let after = &rest[at + 2..];
        let len = after
            .find(|c: char| !(c.is_ascii_lowercase() || c == '-'))
            .unwrap_or(after.len());
        let flag = format!("--{}", &after[..len]);
        if len > 0 && !["--help", "--version"].contains(&flag.as_str()) && !flags.contains(&flag) {
            flags.push(flag);
        }
        rest = &after[len..];
    }
    flags
}

#[test]
fn test_readme_synopsis_matches_help() {
    let readme =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .expect("README.md");
    for (name, _) in BINS {
        let synopsis = readme
            .lines()
            .find(|l| l.starts_with(&format!("- `{name} ")))
            .unwrap_or_else(|| panic!("no synopsis of {name} in the README"));
        let out = run(name, &["--help"], Duration::from_secs(10));
        let help = text(&out.stdout);
        // The options, one a line: `  --flag <VALUE>` or `  -h, --help`.
        let options: String = help
            .lines()
            .filter_map(|l| {
                let t = l.trim_start();
                let t = t
                    .strip_prefix("-h, ")
                    .or(t.strip_prefix("-V, "))
                    .unwrap_or(t);
                t.starts_with("--")
                    .then(|| t.split_whitespace().next().unwrap_or_default().to_owned())
            })
            .collect::<Vec<_>>()
            .join(" ");
        let mut a = flags_in(synopsis);
        let mut b = flags_in(&options);
        a.sort();
        b.sort();
        assert_eq!(a, b, "README synopsis of {name} vs its --help");
    }
}
