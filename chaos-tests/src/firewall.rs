//! The nemesis's network faults as nftables rules inside each host namespace.
//!
//! Every host namespace gets one `inet` table ([`TABLE`]) with an input and an
//! output chain; every fault drops on receipt (input), so senders see silent
//! loss as on a real network, never an EPERM. Rules match on the IPv4 addresses of the *other hosts* only,
//! so traffic on a namespace's loopback (where the harness runs `meshctl`) and
//! to or from the bridge address in the root namespace (health checks) is
//! never affected. Rules inside the namespaces need no `br_netfilter`.
//!
//! The whole fault state lives in [`Faults`]; after every nemesis action the
//! harness re-renders the complete ruleset of every namespace and loads it
//! atomically (create, delete, create in one `nft -f` transaction).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

/// Name of the nftables table the harness owns in every host namespace.
pub const TABLE: &str = "mwchaos";

/// The network faults currently in force, for the whole cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    /// Symmetric partition: hosts talk only to hosts of their own group.
    /// A host listed in no group is isolated from every other host.
    pub partition: Option<Vec<Vec<usize>>>,
    /// Hosts that receive nothing from other hosts (they can still send).
    pub drop_into: BTreeSet<usize>,
    /// Percentage (0..=100) of packets between hosts dropped at random, on
    /// receipt, so each packet on each link is dropped with this probability.
    pub drop_percent: u8,
    /// (host, port): TCP to that port of that host from other hosts is dropped (a firewall
    /// that forgot one port).
    pub drop_tcp_port: BTreeSet<(usize, u16)>,
}

impl Faults {
    /// True when no fault is in force.
    pub fn is_clear(&self) -> bool {
        self.partition.is_none()
            && self.drop_into.is_empty()
            && self.drop_percent == 0
            && self.drop_tcp_port.is_empty()
    }

    /// The hosts among `peers` that `host` may not talk to because of the partition.
    pub fn partitioned_from(&self, host: usize, peers: &[usize]) -> Vec<usize> {
        let Some(groups) = &self.partition else {
            return Vec::new();
        };
        let mine = groups.iter().find(|g| g.contains(&host));
        peers
            .iter()
            .copied()
            .filter(|&p| p != host && !mine.is_some_and(|g| g.contains(&p)))
            .collect()
    }

    /// One line describing the faults, for the history.
    pub fn describe(&self) -> String {
        if self.is_clear() {
            return "no faults".to_string();
        }
        let mut parts = Vec::new();
        if let Some(groups) = &self.partition {
            let g: Vec<String> = groups
                .iter()
                .map(|g| {
                    let m: Vec<String> = g.iter().map(|i| format!("n{i}")).collect();
                    format!("{{{}}}", m.join(","))
                })
                .collect();
            parts.push(format!("partition {}", g.join(" | ")));
        }
        if !self.drop_into.is_empty() {
            let m: Vec<String> = self.drop_into.iter().map(|i| format!("n{i}")).collect();
            parts.push(format!("drop all traffic into {}", m.join(",")));
        }
        if self.drop_percent > 0 {
            parts.push(format!("{}% random drop on every link", self.drop_percent));
        }
        for (host, port) in &self.drop_tcp_port {
            parts.push(format!("drop TCP to n{host} port {port}"));
        }
        parts.join("; ")
    }
}

fn ip_set(ips: &[Ipv4Addr]) -> String {
    let v: Vec<String> = ips.iter().map(Ipv4Addr::to_string).collect();
    format!("{{ {} }}", v.join(", "))
}

/// Renders the `nft -f` script that installs `faults` in `host`'s namespace.
///
/// `hosts` maps every host index of the run (including `host`) to its address.
/// The script replaces the previous table atomically.
pub fn render(faults: &Faults, host: usize, hosts: &[(usize, Ipv4Addr)]) -> String {
    let ip_of = |i: usize| hosts.iter().find(|(h, _)| *h == i).map(|(_, ip)| *ip);
    let indices: Vec<usize> = hosts.iter().map(|(h, _)| *h).collect();
    let peers: Vec<Ipv4Addr> = hosts
        .iter()
        .filter(|(h, _)| *h != host)
        .map(|(_, ip)| *ip)
        .collect();
    let cut: Vec<Ipv4Addr> = faults
        .partitioned_from(host, &indices)
        .into_iter()
        .filter_map(ip_of)
        .collect();

    let mut input = Vec::new();
    // Every fault drops on receipt: a drop in the output chain would fail
    // the sender's sendmsg with EPERM, which a real network never does. Both
    // sides of a partition drop what arrives from the other, so it is still
    // symmetric. The output chain stays, empty, for faults that need it.
    let output: Vec<String> = Vec::new();
    if !cut.is_empty() {
        input.push(format!("ip saddr {} drop", ip_set(&cut)));
    }
    if faults.drop_into.contains(&host) && !peers.is_empty() {
        input.push(format!("ip saddr {} drop", ip_set(&peers)));
    }
    if faults.drop_percent >= 100 && !peers.is_empty() {
        // numgen's range is 0..=99, so "< 100" is not accepted: drop all.
        input.push(format!("ip saddr {} drop", ip_set(&peers)));
    } else if faults.drop_percent > 0 && !peers.is_empty() {
        input.push(format!(
            "ip saddr {} numgen random mod 100 < {} drop",
            ip_set(&peers),
            faults.drop_percent
        ));
    }

    for port in faults
        .drop_tcp_port
        .iter()
        .filter(|(h, _)| *h == host)
        .map(|(_, p)| p)
    {
        if !peers.is_empty() {
            input.push(format!("ip saddr {} tcp dport {port} drop", ip_set(&peers)));
        }
    }

    let mut s = String::new();
    // "add, delete, define" makes the replacement atomic and idempotent.
    let _ = writeln!(s, "table inet {TABLE}");
    let _ = writeln!(s, "delete table inet {TABLE}");
    let _ = writeln!(s, "table inet {TABLE} {{");
    for (chain, rules) in [("input", &input), ("output", &output)] {
        let _ = writeln!(s, "  chain {chain} {{");
        let _ = writeln!(s, "    type filter hook {chain} priority 0; policy accept;");
        for r in rules.iter() {
            let _ = writeln!(s, "    {r}");
        }
        let _ = writeln!(s, "  }}");
    }
    let _ = writeln!(s, "}}");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(n: usize) -> Vec<(usize, Ipv4Addr)> {
        (0..n)
            .map(|i| (i, Ipv4Addr::new(10, 1, 2, 10 + i as u8)))
            .collect()
    }

    #[test]
    fn clear_renders_empty_chains() {
        let s = render(&Faults::default(), 0, &hosts(3));
        assert!(!s.contains("drop"), "{s}");
        assert!(s.contains("hook input"));
        assert!(s.contains("hook output"));
    }

    #[test]
    fn partition_is_symmetric() {
        let f = Faults {
            partition: Some(vec![vec![0, 1], vec![2, 3, 4]]),
            ..Faults::default()
        };
        let s0 = render(&f, 0, &hosts(5));
        assert!(
            s0.contains("ip saddr { 10.1.2.12, 10.1.2.13, 10.1.2.14 } drop"),
            "{s0}"
        );
        assert!(
            !s0.contains("daddr"),
            "silent loss, no EPERM for the sender: {s0}"
        );
        let s3 = render(&f, 3, &hosts(5));
        assert!(
            s3.contains("ip saddr { 10.1.2.10, 10.1.2.11 } drop"),
            "{s3}"
        );
        assert_eq!(f.partitioned_from(1, &[0, 1, 2, 3, 4]), vec![2, 3, 4]);
        // A host in no group is isolated.
        assert_eq!(f.partitioned_from(7, &[0, 1, 7]), vec![0, 1]);
        assert_eq!(f.describe(), "partition {n0,n1} | {n2,n3,n4}");
    }

    #[test]
    fn one_way_and_random_drop() {
        let f = Faults {
            drop_into: [1].into_iter().collect(),
            drop_percent: 10,
            ..Faults::default()
        };
        let s1 = render(&f, 1, &hosts(3));
        assert!(
            s1.contains("ip saddr { 10.1.2.10, 10.1.2.12 } drop"),
            "{s1}"
        );
        assert!(s1.contains("numgen random mod 100 < 10 drop"), "{s1}");
        assert!(
            !s1.contains("daddr"),
            "one-way drop must not block sending: {s1}"
        );
        let s0 = render(&f, 0, &hosts(3));
        assert!(!s0.contains("} drop\n    ip"), "{s0}");
        let port = Faults {
            drop_tcp_port: [(2, 7001)].into_iter().collect(),
            ..Faults::default()
        };
        let s2 = render(&port, 2, &hosts(3));
        assert!(
            s2.contains("ip saddr { 10.1.2.10, 10.1.2.11 } tcp dport 7001 drop"),
            "{s2}"
        );
        assert!(!render(&port, 1, &hosts(3)).contains("dport"));
        assert!(
            s0.contains("ip saddr { 10.1.2.11, 10.1.2.12 } numgen"),
            "{s0}"
        );
    }
}
