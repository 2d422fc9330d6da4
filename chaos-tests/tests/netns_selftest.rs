//! Self-test of the harness's network: namespaces, bridge, and every nemesis
//! rule (partition, one-way drop, random drop, heal), checked with plain TCP
//! connections and no `meshd`, so a scenario failure can be attributed to the
//! node rather than the harness. The binary re-executes itself inside the
//! namespaces as the listener and the client.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meshwork_chaos_tests::{Faults, Netns, skip_unless_capable};

const PORT: u16 = 7999;

fn listen(addr: &str) {
    let l = TcpListener::bind(addr).expect("bind");
    l.set_nonblocking(true).unwrap();
    let until = Instant::now() + Duration::from_secs(120);
    while Instant::now() < until {
        match l.accept() {
            Ok((mut s, _)) => {
                let _ = s.set_nonblocking(false);
                let _ = s.write_all(b"pong");
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn connect(addr: &str) -> bool {
    let addr: SocketAddr = addr.parse().unwrap();
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(700)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(700)));
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).is_ok() && &buf == b"pong"
}

/// Can host `from` open a TCP connection to host `to`?
fn reach(net: &Netns, from: usize, to: usize) -> bool {
    let exe = std::env::current_exe().unwrap();
    let target = format!("{}:{PORT}", net.host_ip(to));
    net.command(from, exe)
        .env("MW_SELFTEST_CONNECT", target)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn matrix(net: &Netns, n: usize) -> Vec<Vec<bool>> {
    (0..n)
        .map(|a| (0..n).map(|b| a == b || reach(net, a, b)).collect())
        .collect()
}

fn main() {
    if let Ok(addr) = std::env::var("MW_SELFTEST_LISTEN") {
        listen(&addr);
        return;
    }
    if let Ok(addr) = std::env::var("MW_SELFTEST_CONNECT") {
        std::process::exit(if connect(&addr) { 0 } else { 1 });
    }
    // Arguments cargo passes to harness tests (filters, --test-threads) are ignored.
    if skip_unless_capable("netns_selftest") {
        return;
    }
    let n = 3;
    let names;
    {
        let net = Netns::new().expect("bridge");
        let mut listeners: Vec<Child> = Vec::new();
        for i in 0..n {
            net.add_host(i).expect("host");
            let addr = format!("{}:{PORT}", net.host_ip(i));
            listeners.push(
                net.command(i, std::env::current_exe().unwrap())
                    .env("MW_SELFTEST_LISTEN", addr)
                    .stdin(Stdio::null())
                    .spawn()
                    .expect("listener"),
            );
        }
        names = net.hosts().into_iter().map(|h| h.ns).collect::<Vec<_>>();
        // Wait (bounded) until every listener answers from the root namespace.
        let until = Instant::now() + Duration::from_secs(20);
        for i in 0..n {
            let addr = format!("{}:{PORT}", net.host_ip(i));
            while !connect(&addr) {
                assert!(
                    Instant::now() < until,
                    "listener on host {i} never answered"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let all = vec![vec![true; n]; n];
        assert_eq!(matrix(&net, n), all, "full connectivity before faults");

        let part = Faults {
            partition: Some(vec![vec![0], vec![1, 2]]),
            ..Faults::default()
        };
        net.apply_faults(&part).unwrap();
        let m = matrix(&net, n);
        assert_eq!(
            m,
            vec![
                vec![true, false, false],
                vec![false, true, true],
                vec![false, true, true]
            ],
            "partition {{0}}|{{1,2}}; rules of host 0:\n{}",
            net.ruleset(0)
        );
        for i in 0..n {
            let addr = format!("{}:{PORT}", net.host_ip(i));
            assert!(connect(&addr), "root namespace still reaches host {i}");
        }

        let one_way = Faults {
            drop_into: [1].into_iter().collect(),
            ..Faults::default()
        };
        net.apply_faults(&one_way).unwrap();
        let m = matrix(&net, n);
        // TCP needs both directions, so host 1 is cut off both ways for TCP.
        assert!(
            !m[0][1] && !m[1][0] && !m[2][1] && m[0][2] && m[2][0],
            "{m:?}"
        );

        let all_drop = Faults {
            drop_percent: 100,
            ..Faults::default()
        };
        net.apply_faults(&all_drop).unwrap();
        let m = matrix(&net, n);
        assert!(!m[0][1] && !m[1][2] && !m[2][0], "100% drop: {m:?}");

        net.apply_faults(&Faults::default()).unwrap();
        assert_eq!(matrix(&net, n), all, "full connectivity after heal");
        for mut l in listeners {
            let _ = l.kill();
            let _ = l.wait();
        }
    }
    let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    for ns in names {
        assert!(!list.contains(&ns), "namespace {ns} left behind");
    }
    println!("netns_selftest: ok");
}
