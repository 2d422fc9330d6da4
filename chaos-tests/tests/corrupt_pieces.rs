//! Scenario 10: a holder that serves corrupted pieces. Four nodes; n3 runs
//! with the hidden `--test-lie corrupt-pieces` (it stores what it receives
//! correctly, but flips a byte in every chunk it sends). An image with a
//! 40 MiB layer is pushed to n0 (`--replicas 1`) and pulled on n3, so the
//! liar holds a correct copy; then n2 pulls with n0 and n3 as holders. The
//! pull must exit 0, n2 must have dropped the liar (`mesh_blob_liars_total`
//! or its log) and never the honest n0, its layer bytes must hash to what was
//! pushed, and every chunk n2 stored must hash to its name. Pushes and pulls
//! are recorded in the history and checked with `check_images_intact`.
//! Last, with both honest holders killed, a pull on n1 from the liar alone
//! must fail cleanly (exit 1, naming the corrupt piece) and store nothing.

mod common;

use std::collections::BTreeMap;

use anyhow::Result;
use common::{build_image, check_recorded_layer, layer_hash_on, mib};
use meshwork_chaos_tests::{Cluster, ClusterOptions, Outcome, deadline, secs};

const REF: &str = "chaos/corrupt-pieces:v1";
const SERVED: &str = "mesh_blob_bytes_served_total";
const LIARS: &str = "mesh_blob_liars_total";
const PAYLOAD: usize = 40 << 20;
/// What n2 logs when it catches a bad piece, and when it drops the holder.
const CAUGHT: &str = "corrupt piece; dropping holder";
const DROPPED: &str = "dropped a holder that served corrupt pieces";

/// The `peer=...` field of a log line.
fn peer_field(line: &str) -> Option<&str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("peer="))
        .map(|p| p.trim_matches('"'))
}

#[test]
fn corrupt_pieces_are_rejected_and_fetched_elsewhere() -> Result<()> {
    let (honest, puller, liar) = (0, 2, 3);
    let mut opts = ClusterOptions::default();
    opts.node_args.insert(
        liar,
        vec!["--test-lie".to_string(), "corrupt-pieces".to_string()],
    );
    let Some(c) = Cluster::start_or_skip("corrupt_pieces", 4, opts) else {
        return Ok(());
    };
    let h = c.history().clone();
    let op_timeout = deadline(secs(60.0));
    let peer_of = |i: usize| -> Result<String> {
        let name = c.name(i);
        c.nodes(0)?
            .into_iter()
            .find(|n| n.name == name)
            .map(|n| n.peer_id)
            .ok_or_else(|| anyhow::anyhow!("n0 does not list {name}"))
    };
    let (honest_peer, liar_peer) = (peer_of(honest)?, peer_of(liar)?);
    h.event(format!(
        "n{liar} ({liar_peer}) serves corrupt pieces; n{honest} is {honest_peer}"
    ));

    let img = build_image(&c.work_dir(), "image", "corrupt_pieces", PAYLOAD)?;
    h.event(format!(
        "built {}: layer {} ({} chunks), blake3 {}",
        img.tar.display(),
        mib(img.layer_size as f64),
        img.layer_chunks(),
        img.layer_blake3
    ));
    let push = c.image_push(honest, &img.tar, REF, 1, &img.layer_blake3, op_timeout);
    h.ensure(push.is_ok(), format!("push to n{honest}: {push}"))?;
    check_recorded_layer(&c.image_inspect(honest, REF)?, &img).map_err(|e| h.fail(e))?;

    // The liar pulls from the honest node: it now holds a correct copy.
    let n0 = c.name(honest);
    c.wait_for(
        deadline(secs(15.0)),
        &format!("n{liar} lists {REF} held by {n0}"),
        || match c.image_holders_alive(liar, REF) {
            Ok(v) if v == [n0.clone()] => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )?;
    let first = c.image_pull(liar, REF, op_timeout);
    h.ensure(first.is_ok(), format!("pull on the liar n{liar}: {first}"))?;
    let bad = c.corrupt_chunks(liar)?;
    h.ensure(
        bad.is_empty(),
        format!("the liar n{liar} must store correctly (only what it sends is wrong): {bad:?}"),
    )?;

    let both = {
        let mut v = vec![c.name(honest), c.name(liar)];
        v.sort();
        v
    };
    c.wait_for(
        deadline(secs(15.0)),
        &format!("n{puller} lists {REF} held by {both:?}, alive"),
        || match c.image_holders_alive(puller, REF) {
            Ok(v) if v == both => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )?;

    let liar_served_before = c.metric(liar, SERVED)?;
    let liars_before = c.metric(puller, LIARS)?;
    let pull = c.image_pull(puller, REF, op_timeout);
    let liar_served = c.metric(liar, SERVED)? - liar_served_before;
    let liars = c.metric(puller, LIARS)? - liars_before;
    let log = c.log(puller);
    let accused: Vec<String> = log
        .lines()
        .filter(|l| l.contains(CAUGHT) || l.contains(DROPPED))
        .map(|l| peer_field(l).unwrap_or("?").to_string())
        .collect();
    h.event(format!(
        "n{puller}'s pull: {pull}; the liar served it {}; {LIARS} +{liars}; pieces rejected \
         from {:?}",
        mib(liar_served),
        accused
    ));

    h.ensure(
        pull.is_ok(),
        format!("the pull on n{puller} must succeed despite the liar: {pull}"),
    )?;
    h.ensure(
        liar_served > 0.0,
        format!(
            "the liar n{liar} served n{puller} nothing: the pull never met a corrupt piece, \
             nothing was tested"
        ),
    )?;
    h.ensure(
        liars >= 1.0 || accused.contains(&liar_peer),
        format!(
            "n{puller} took pieces from the liar but did not drop it ({LIARS} +{liars}, no \
             {CAUGHT:?} / {DROPPED:?} naming {liar_peer} in its log)"
        ),
    )?;
    h.ensure(
        accused.iter().all(|p| *p == liar_peer),
        format!("n{puller} accused a node other than the liar {liar_peer}: {accused:?}"),
    )?;

    // What the nodes give back is what was pushed; nothing corrupt was stored.
    let mut found = BTreeMap::new();
    for i in [honest, puller, liar] {
        found.insert(i, layer_hash_on(&c, i, &img.layer_blake3, op_timeout));
    }
    h.check_images_intact(REF, &found)?;
    let bad = c.corrupt_chunks(puller)?;
    h.ensure(
        bad.is_empty(),
        format!("n{puller} stored corrupt chunks: {bad:?}"),
    )?;

    // The liar alone: with both honest holders dead, a pull on n1 must fail
    // cleanly (exit 1 naming the corrupt piece, in bounded time) and store
    // nothing corrupt.
    let lonely = 1;
    c.kill(honest)?;
    c.kill(puller)?;
    for dead in [honest, puller] {
        c.wait_state(
            &[lonely],
            dead,
            deadline(secs(15.0)),
            &format!("n{lonely} sees n{dead} dead"),
            |s| s == Some("dead"),
        )?;
    }
    let lonely_liars_before = c.metric(lonely, LIARS)?;
    let only_liar = c.image_pull(lonely, REF, op_timeout);
    let lonely_liars = c.metric(lonely, LIARS)? - lonely_liars_before;
    h.event(format!(
        "pull on n{lonely} with only the liar alive: {only_liar}; {LIARS} +{lonely_liars}"
    ));
    h.ensure(
        matches!(&only_liar, Outcome::Fail(msg) if msg.contains("corrupt")),
        format!(
            "a pull whose only holder is the liar must fail, naming the corrupt piece: \
             {only_liar}"
        ),
    )?;
    let bad = c.corrupt_chunks(lonely)?;
    h.ensure(
        bad.is_empty(),
        format!("n{lonely} stored corrupt chunks from the liar: {bad:?}"),
    )?;
    found.clear();
    found.insert(lonely, None);
    found.insert(liar, layer_hash_on(&c, liar, &img.layer_blake3, op_timeout));
    h.check_images_intact(REF, &found)?;
    if lonely_liars < 1.0 {
        eprintln!(
            "NOTE: n{lonely} dropped the liar in a pull that failed, but its {LIARS} did not \
             move (+{lonely_liars}): the counter only counts liars of pulls that complete"
        );
    }

    eprintln!(
        "corrupt_pieces: ok; the liar served {} and was dropped ({LIARS} +{liars}, {} log \
         lines); alone it made a pull fail cleanly; {}",
        mib(liar_served),
        accused.len(),
        h.summary()
    );
    Ok(())
}
