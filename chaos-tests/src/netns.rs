//! Host setup: one network namespace per simulated host, joined by a bridge.
//!
//! Real multi-host faults (partitions, one-way loss, random loss) need real
//! separate network stacks, and network namespaces are the cheapest ones a
//! single machine has. A run owns:
//!
//! * a bridge `mwb<id>` in the root namespace with address `10.<a>.<b>.1/24`;
//! * per host `i` a namespace `mw<id>h<i>` with loopback up and a veth pair
//!   (`mw<id>v<i>` on the bridge, `eth0` inside) addressed `10.<a>.<b>.<i+10>/24`.
//!
//! `<id>` is the test process's pid in base 36 plus one base-36 character of a
//! per-process counter, so parallel test binaries (and several clusters in one
//! binary) never share names; `<a>.<b>` is derived from the same number and
//! checked against the addresses already in use. Everything is removed on
//! [`Drop`] (which also runs while a test panics), and [`cleanup_stale`]
//! removes what runs whose process is gone left behind.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

use crate::exec::{run_ok, run_ok_stdin};
use crate::firewall::{self, Faults};

/// Prefix shared by every namespace and interface the harness creates.
pub const PREFIX: &str = "mw";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Why this machine cannot run the namespace scenarios, or `Ok` if it can.
///
/// Needs: effective uid 0, a working `ip netns`, and `nft`.
pub fn capability_check() -> Result<(), String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .map(str::to_string);
    if euid.as_deref() != Some("0") {
        return Err("needs root (network namespaces, bridges and nftables)".into());
    }
    if run_ok("ip", &["netns", "list"]).is_err() {
        return Err("needs root and a working `ip netns` (apt-get install iproute2)".into());
    }
    if run_ok("nft", &["--version"]).is_err() {
        return Err("needs root and `nft` (apt-get install nftables)".into());
    }
    Ok(())
}

/// Prints the standard skip line and returns true when the scenarios cannot
/// run here; tests call it first and return early on true.
pub fn skip_unless_capable(test: &str) -> bool {
    match capability_check() {
        Ok(()) => false,
        Err(why) => {
            eprintln!("skipped: needs root: {test}: {why}");
            println!("skipped: needs root: {test}: {why}");
            true
        }
    }
}

/// Encodes `n` in lowercase base 36.
pub fn base36(mut n: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    if n == 0 {
        return "0".into();
    }
    let mut out = Vec::new();
    while n > 0 {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
    }
    out.reverse();
    String::from_utf8(out).expect("ascii")
}

/// The owning pid encoded in a run id (`<pid base36><one counter char>`).
pub fn pid_of_run_id(id: &str) -> Option<u32> {
    if id.len() < 2
        || !id
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
    {
        return None;
    }
    u32::from_str_radix(&id[..id.len() - 1], 36).ok()
}

/// The run id inside a namespace name `mw<id>h<i>`.
pub fn run_id_of_namespace(name: &str) -> Option<&str> {
    let rest = name.strip_prefix(PREFIX)?;
    let h = rest.rfind('h')?;
    let (id, idx) = (&rest[..h], &rest[h + 1..]);
    (!idx.is_empty() && idx.bytes().all(|b| b.is_ascii_digit()) && pid_of_run_id(id).is_some())
        .then_some(id)
}

/// The run id inside a bridge name `mwb<id>`.
pub fn run_id_of_bridge(name: &str) -> Option<&str> {
    let id = name.strip_prefix(PREFIX)?.strip_prefix('b')?;
    pid_of_run_id(id).is_some().then_some(id)
}

fn owner_gone(id: &str) -> bool {
    pid_of_run_id(id).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

fn kill_namespace_processes(ns: &str) {
    if let Ok(pids) = run_ok("ip", &["netns", "pids", ns]) {
        for pid in pids.split_whitespace() {
            let _ = run_ok("kill", &["-KILL", pid]);
        }
    }
}

fn delete_namespace(ns: &str) {
    kill_namespace_processes(ns);
    let _ = run_ok("ip", &["netns", "delete", ns]);
}

/// Removes namespaces and bridges left by earlier runs whose process is gone.
///
/// Returns how many objects were removed. Runs of live processes (parallel
/// test binaries) are left alone.
pub fn cleanup_stale() -> usize {
    let mut removed = 0;
    if let Ok(list) = run_ok("ip", &["netns", "list"]) {
        for line in list.lines() {
            let Some(name) = line.split_whitespace().next() else {
                continue;
            };
            if run_id_of_namespace(name).is_some_and(owner_gone) {
                delete_namespace(name);
                removed += 1;
            }
        }
    }
    if let Ok(list) = run_ok("ip", &["-o", "link", "show", "type", "bridge"]) {
        for line in list.lines() {
            // "12: mwbxyz: <...>"
            let Some(name) = line.split(':').nth(1).map(str::trim) else {
                continue;
            };
            let name = name.split('@').next().unwrap_or(name);
            if run_id_of_bridge(name).is_some_and(owner_gone) {
                let _ = run_ok("ip", &["link", "delete", name]);
                removed += 1;
            }
        }
    }
    if removed > 0 {
        eprintln!("chaos: removed {removed} stale namespaces/bridges of dead runs");
    }
    removed
}

/// One simulated host: a namespace and its address on the bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// Index of the host in the run (0-based).
    pub index: usize,
    /// Name of its network namespace.
    pub ns: String,
    /// Name of the root-namespace end of its veth pair (on the bridge).
    pub veth: String,
    /// Its address on the bridge.
    pub ip: Ipv4Addr,
}

/// The network of one run: a bridge and one namespace per host.
///
/// Dropping it kills every process still inside its namespaces and deletes
/// namespaces and bridge.
#[derive(Debug)]
pub struct Netns {
    id: String,
    bridge: String,
    net: [u8; 2],
    hosts: Mutex<BTreeMap<usize, Host>>,
}

fn subnet_in_use(a: u8, b: u8) -> bool {
    let prefix = format!("10.{a}.{b}.");
    let addrs = run_ok("ip", &["-o", "-4", "addr", "show"]).unwrap_or_default();
    let routes = run_ok("ip", &["-4", "route", "show"]).unwrap_or_default();
    addrs.contains(&prefix) || routes.contains(&prefix)
}

impl Netns {
    /// Removes stale leftovers, then creates this run's bridge.
    pub fn new() -> Result<Self> {
        if let Err(why) = capability_check() {
            bail!("cannot set up network namespaces: {why}");
        }
        cleanup_stale();
        let pid = std::process::id();
        let counter = COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = format!(
            "{}{}",
            base36(u64::from(pid)),
            base36(u64::from(counter % 36))
        );
        let bridge = format!("{PREFIX}b{id}");
        // Pick 10.<a>.<b>.0/24 from pid and counter, skipping subnets in use.
        let mut n = u64::from(pid) * 37 + u64::from(counter);
        let net = loop {
            let a = 64 + ((n >> 8) % 128) as u8;
            let b = (n & 0xff) as u8;
            if !subnet_in_use(a, b) {
                break [a, b];
            }
            n = n.wrapping_add(7919);
        };
        let this = Netns {
            id,
            bridge,
            net,
            hosts: Mutex::new(BTreeMap::new()),
        };
        let gw = format!("{}/24", this.gateway());
        run_ok("ip", &["link", "add", &this.bridge, "type", "bridge"])
            .context("creating the bridge")?;
        run_ok("ip", &["addr", "add", &gw, "dev", &this.bridge])?;
        run_ok("ip", &["link", "set", &this.bridge, "up"])?;
        Ok(this)
    }

    /// The run id embedded in every name of this run.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Name of the bridge in the root namespace.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The bridge's own address (the root namespace's side).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.net[0], self.net[1], 1)
    }

    /// The address host `index` has (or will have).
    pub fn host_ip(&self, index: usize) -> Ipv4Addr {
        assert!(index <= 240, "at most 241 hosts per run");
        Ipv4Addr::new(10, self.net[0], self.net[1], 10 + index as u8)
    }

    /// Namespace name of host `index`.
    pub fn namespace_name(&self, index: usize) -> String {
        format!("{PREFIX}{}h{index}", self.id)
    }

    /// Creates host `index`: namespace, loopback up, veth into the bridge, address.
    pub fn add_host(&self, index: usize) -> Result<Host> {
        let host = Host {
            index,
            ns: self.namespace_name(index),
            veth: format!("{PREFIX}{}v{index}", self.id),
            ip: self.host_ip(index),
        };
        if let Some(h) = self.hosts.lock().unwrap().get(&index) {
            return Ok(h.clone());
        }
        assert!(
            host.veth.len() <= 15,
            "interface name too long: {}",
            host.veth
        );
        run_ok("ip", &["netns", "add", &host.ns]).context("creating a namespace")?;
        // Registered before the rest so Drop removes a half-made host too.
        self.hosts.lock().unwrap().insert(index, host.clone());
        let ns = host.ns.as_str();
        run_ok("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        run_ok(
            "ip",
            &[
                "link", "add", &host.veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ],
        )?;
        run_ok(
            "ip",
            &["link", "set", &host.veth, "master", &self.bridge, "up"],
        )?;
        let cidr = format!("{}/24", host.ip);
        run_ok("ip", &["-n", ns, "addr", "add", &cidr, "dev", "eth0"])?;
        run_ok("ip", &["-n", ns, "link", "set", "eth0", "up"])?;
        Ok(host)
    }

    /// Host `index`, if created.
    pub fn host(&self, index: usize) -> Option<Host> {
        self.hosts.lock().unwrap().get(&index).cloned()
    }

    /// Every host created so far, by index.
    pub fn hosts(&self) -> Vec<Host> {
        self.hosts.lock().unwrap().values().cloned().collect()
    }

    /// A command that runs `program` inside host `index`'s namespace
    /// (`ip netns exec`, which execs, so the child's pid is the program's).
    pub fn command(&self, index: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.arg("netns")
            .arg("exec")
            .arg(self.namespace_name(index))
            .arg(program);
        c
    }

    /// Installs `faults` in every host namespace (replacing earlier rules).
    pub fn apply_faults(&self, faults: &Faults) -> Result<()> {
        let hosts = self.hosts();
        let addrs: Vec<(usize, Ipv4Addr)> = hosts.iter().map(|h| (h.index, h.ip)).collect();
        for h in &hosts {
            let script = firewall::render(faults, h.index, &addrs);
            run_ok_stdin(
                "ip",
                &["netns", "exec", &h.ns, "nft", "-f", "-"],
                Some(script.as_bytes()),
            )
            .with_context(|| format!("loading nft rules into {}:\n{script}", h.ns))?;
        }
        Ok(())
    }

    /// The rules currently loaded in host `index`'s namespace (for diagnostics).
    pub fn ruleset(&self, index: usize) -> String {
        run_ok(
            "ip",
            &[
                "netns",
                "exec",
                &self.namespace_name(index),
                "nft",
                "list",
                "ruleset",
            ],
        )
        .unwrap_or_else(|e| format!("<{e}>"))
    }

    /// Kills everything in the namespaces and deletes namespaces and bridge.
    /// Idempotent; [`Drop`] calls it.
    pub fn cleanup(&self) {
        let hosts: Vec<Host> = std::mem::take(&mut *self.hosts.lock().unwrap())
            .into_values()
            .collect();
        for h in hosts {
            // Deleting the namespace destroys its veth end and so the pair;
            // the nftables tables live in the namespace and go with it.
            delete_namespace(&h.ns);
            let _ = run_ok("ip", &["link", "delete", &h.veth]);
        }
        let _ = run_ok("ip", &["link", "delete", &self.bridge]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.cleanup();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let id = format!("{}{}", base36(4_194_303), base36(35));
        assert_eq!(pid_of_run_id(&id), Some(4_194_303));
        let ns = format!("mw{id}h12");
        assert_eq!(run_id_of_namespace(&ns), Some(id.as_str()));
        let br = format!("mwb{id}");
        assert_eq!(run_id_of_bridge(&br), Some(id.as_str()));
        // Longest names still fit IFNAMSIZ.
        assert!(format!("mw{id}v240").len() <= 15);
        assert!(br.len() <= 15);
        // An id containing 'h' still parses from the right.
        let id2 = format!("{}0", base36(17)); // "h0"
        assert_eq!(
            run_id_of_namespace(&format!("mw{id2}h3")),
            Some(id2.as_str())
        );
        assert_eq!(run_id_of_namespace("mwhello"), None);
        assert_eq!(run_id_of_namespace("other"), None);
    }
}
