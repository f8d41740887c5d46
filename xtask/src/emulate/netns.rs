//! Network namespaces, TAP devices and the `ip` commands that configure them.
//!
//! Every namespace of a run is named `ott-<pid>x<n>-<node>`: `pid` is the emulator's
//! process id and `n` counts runs inside that process. [`cleanup_stale`] removes the
//! namespaces (and every process inside them) of runs whose emulator is gone, and never
//! touches a name that is not ours or a run that is still alive.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context};

/// Prefix of every namespace we create.
pub(crate) const PREFIX: &str = "ott-";

static RUNS: AtomicU32 = AtomicU32::new(0);

/// A fresh run id, `<pid>x<n>`.
pub(crate) fn new_run_id() -> String {
    format!(
        "{}x{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::SeqCst)
    )
}

/// The namespace name of `node` in run `run`.
pub(crate) fn ns_name(run: &str, node: &str) -> String {
    format!("{PREFIX}{run}-{node}")
}

/// The emulator pid in one of our namespace names, or `None` for a name that is not ours.
pub(crate) fn owner_pid(ns: &str) -> Option<u32> {
    let rest = ns.strip_prefix(PREFIX)?;
    let (run, _node) = rest.split_once('-')?;
    let (pid, n) = run.split_once('x')?;
    n.parse::<u32>().ok()?;
    pid.parse().ok()
}

/// Runs `ip ARGS`, failing with its error output.
pub(crate) fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run `ip` (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `ip -n NS -batch -` with `commands`, one a line.
pub(crate) fn ip_batch(ns: &str, commands: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["-n", ns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run `ip` (install iproute2)")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(commands.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "ip -n {ns} -batch: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Every namespace name `ip netns list` shows.
pub(crate) fn list() -> Vec<String> {
    Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Pids of the processes inside `ns`.
pub(crate) fn pids(ns: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Kill every process in `ns` and delete it.
pub(crate) fn destroy(ns: &str) {
    for pid in pids(ns) {
        // SAFETY: kill(2) with a pid read from the namespace; no memory involved.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
    let _ = ip(&["netns", "del", ns]);
}

/// Remove the namespaces of runs whose emulator process is gone (a crashed run).
/// Returns the names removed.
pub(crate) fn cleanup_stale() -> Vec<String> {
    let mut removed = Vec::new();
    for ns in list() {
        let Some(pid) = owner_pid(&ns) else { continue };
        if pid == std::process::id() || alive(pid) {
            continue;
        }
        destroy(&ns);
        removed.push(ns);
    }
    removed
}

/// Runs `f` on a thread that has joined namespace `ns`: sockets it opens and TAP
/// devices it creates belong to `ns`. The calling thread stays where it is.
pub(crate) fn in_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::Builder::new()
        .name(format!("in-{ns}"))
        .spawn(move || {
            enter(&path)?;
            f()
        })?
        .join()
        .map_err(|_| anyhow::anyhow!("a thread in namespace panicked"))?
}

/// Moves the calling thread into the network namespace at `path`.
pub(crate) fn enter(path: &str) -> anyhow::Result<()> {
    let f = File::open(path).with_context(|| format!("cannot open {path}"))?;
    // SAFETY: setns on an fd we own; affects only the calling thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!(
            "cannot join namespace {path}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// `struct ifreq` as TUNSETIFF reads it: a name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// Creates TAP device `name` (no packet-information header) in the calling thread's
/// namespace and returns its file; the device lives while the file is open.
pub(crate) fn open_tap(name: &str) -> anyhow::Result<File> {
    if name.len() >= 16 {
        bail!("interface name {name:?} is longer than 15 bytes");
    }
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .context("cannot open /dev/net/tun")?;
    let mut req = IfReq {
        name: [0; 16],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads a struct ifreq, which IfReq lays out (40 bytes).
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF as _, &mut req) };
    if rc != 0 {
        bail!(
            "cannot create TAP device {name}: {}",
            std::io::Error::last_os_error()
        );
    }
    // std opens files close-on-exec: the programs we start do not inherit it.
    Ok(tun)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_their_run() {
        let run = new_run_id();
        let ns = ns_name(&run, "n12");
        assert!(ns.starts_with("ott-"));
        assert_eq!(owner_pid(&ns), Some(std::process::id()));
        assert_eq!(owner_pid("ott-probe"), None);
        assert_eq!(owner_pid("other-123x0-a"), None);
        assert_eq!(owner_pid("ott-12x-a"), None);
    }
}
