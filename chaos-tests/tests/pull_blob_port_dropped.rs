//! A firewall that drops the blob port: every node takes direct blob connections on
//! `--blob-port 7010`, and TCP to n0's 7010 from other hosts is dropped (nftables, on
//! receipt, so a connect gets no answer at all). n0 holds an image; a pull on n1 must still
//! complete, over libp2p streams once the direct connection fails, with the pushed bytes.

mod common;

use anyhow::Result;
use common::{build_image, check_recorded_layer, layer_hash_on, mib};
use meshwork_chaos_tests::gateway::http_get;
use meshwork_chaos_tests::{Cluster, ClusterOptions, Outcome, deadline, secs};

const REF: &str = "chaos/pull-blob-port-dropped:v1";
const PAYLOAD: usize = 24 << 20;
// The harness gives each node p2p 7000, gRPC 7001 and HTTP 7002.
const BLOB_PORT: u16 = 7010;

#[test]
fn a_pull_falls_back_to_libp2p_streams_when_the_blob_port_is_dropped() -> Result<()> {
    let options = ClusterOptions {
        extra_args: vec!["--blob-port".into(), BLOB_PORT.to_string()],
        ..ClusterOptions::default()
    };
    let Some(c) = Cluster::start_or_skip("pull_blob_port_dropped", 2, options) else {
        return Ok(());
    };
    let h = c.history().clone();
    let (holder, puller) = (0, 1);
    let op_timeout = deadline(secs(60.0));

    let img = build_image(&c.work_dir(), "image", "pull_blob_port_dropped", PAYLOAD)?;
    h.event(format!(
        "built {}: layer {} ({} chunks)",
        img.tar.display(),
        mib(img.layer_size as f64),
        img.layer_chunks()
    ));
    let push = c.image_push(holder, &img.tar, REF, 1, &img.layer_blake3, op_timeout);
    h.ensure(push.is_ok(), format!("push to n{holder}: {push}"))?;
    check_recorded_layer(&c.image_inspect(holder, REF)?, &img).map_err(|e| h.fail(e))?;
    let n0 = c.name(holder);
    c.wait_for(
        deadline(secs(15.0)),
        &format!("n{puller} lists {REF} held by {n0}"),
        || match c.image_holders_alive(puller, REF) {
            Ok(v) if v == [n0.clone()] => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )?;

    c.drop_tcp_port(holder, BLOB_PORT)?;
    let pull = c.image_pull(puller, REF, op_timeout);
    h.ensure(
        matches!(pull, Outcome::Ok(_)),
        format!("the pull on n{puller} must complete without the blob port: {pull}"),
    )?;
    let found = [(
        puller,
        layer_hash_on(&c, puller, &img.layer_blake3, op_timeout),
    )]
    .into_iter()
    .collect();
    h.check_images_intact(REF, &found)?;

    // It tried the blob port, gave up on it, and moved the pieces over libp2p streams.
    let (status, metrics) = http_get(c.http_addr(puller), "/metrics", secs(10.0))?;
    h.ensure(status == 200, format!("n{puller} /metrics: {status}"))?;
    let opened = |via: &str| {
        let prefix = format!("mesh_blob_streams_opened_total{{via=\"{via}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    h.ensure(
        opened("direct") == 0.0 && opened("libp2p") > 0.0,
        format!(
            "n{puller} opened {} direct and {} libp2p blob streams; expected libp2p only",
            opened("direct"),
            opened("libp2p")
        ),
    )?;
    h.ensure(
        c.log(puller).contains("no direct blob connection"),
        format!("n{puller} never tried the blob port of n{holder}"),
    )?;
    eprintln!(
        "pull_blob_port_dropped: ok; {} libp2p streams; {}",
        opened("libp2p"),
        pull
    );
    Ok(())
}
