//! Scenario 9: `kill -9` a holder in the middle of a pull it is serving. Four
//! nodes; an image with a 40 MiB layer is pushed to n0 (`--replicas 1`) and
//! pulled on n1, so n0 and n1 hold it; a pull on n2 starts, and as soon as n0
//! has served n2 a whole chunk of it, n0 is killed. The pull on n2 must still
//! exit 0 (n0's pieces in flight go to n1), n2's layer bytes must hash to what
//! was pushed, and every chunk n2 stored must hash to its name. Pushes, pulls
//! and the kill are recorded in the history and checked with
//! `check_images_intact`; the timeline is printed on failure.

mod common;

use std::time::{Duration, Instant};

use anyhow::Result;
use common::{CHUNK, build_image, check_recorded_layer, layer_hash_on, mib};
use meshwork_chaos_tests::{Cluster, ClusterOptions, Outcome, deadline, secs};

const REF: &str = "chaos/pull-holder-killed:v1";
const SERVED: &str = "mesh_blob_bytes_served_total";
const PAYLOAD: usize = 40 << 20;

#[test]
fn pull_completes_when_a_holder_dies_mid_transfer() -> Result<()> {
    let Some(c) = Cluster::start_or_skip("pull_holder_killed", 4, ClusterOptions::default()) else {
        return Ok(());
    };
    let h = c.history().clone();
    let victim = 0;
    let (seeder, puller) = (1, 2);
    let op_timeout = deadline(secs(60.0));

    let img = build_image(&c.work_dir(), "image", "pull_holder_killed", PAYLOAD)?;
    h.event(format!(
        "built {}: layer {} ({} chunks), blake3 {}",
        img.tar.display(),
        mib(img.layer_size as f64),
        img.layer_chunks(),
        img.layer_blake3
    ));

    // n0 holds it (push), then n1 (pull): two complete holders.
    let push = c.image_push(victim, &img.tar, REF, 1, &img.layer_blake3, op_timeout);
    h.ensure(push.is_ok(), format!("push to n{victim}: {push}"))?;
    check_recorded_layer(&c.image_inspect(victim, REF)?, &img).map_err(|e| h.fail(e))?;
    let n0 = c.name(victim);
    c.wait_for(
        deadline(secs(15.0)),
        &format!("n{seeder} lists {REF} held by {n0}"),
        || match c.image_holders_alive(seeder, REF) {
            Ok(v) if v == [n0.clone()] => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )?;
    let first = c.image_pull(seeder, REF, op_timeout);
    h.ensure(first.is_ok(), format!("first pull on n{seeder}: {first}"))?;
    let both = {
        let mut v = vec![c.name(victim), c.name(seeder)];
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

    // The pull on n2 in the background; kill n0 once it has served n2 a chunk.
    let served_before = [c.metric(victim, SERVED)?, c.metric(seeder, SERVED)?];
    let chunks_before = c.stored_chunks(puller).len();
    let image_chunks = img.layer_chunks() as usize + 2; // + manifest and config
    // Progress of n2 after the kill: (time since the pull started, chunks stored).
    let mut trace: Vec<(Duration, usize)> = Vec::new();
    let started = Instant::now();
    let (outcome, kill) = std::thread::scope(|s| -> Result<_> {
        let pull = s.spawn(|| c.image_pull(puller, REF, op_timeout));
        let mut kill = None;
        let mut polls = 0u32;
        while !pull.is_finished() && started.elapsed() < op_timeout && polls < 100_000 {
            polls += 1;
            if kill.is_some() {
                let have = c.stored_chunks(puller).len() - chunks_before;
                if trace.last().is_none_or(|&(_, n)| n != have) {
                    trace.push((started.elapsed(), have));
                }
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            let served = c.metric(victim, SERVED).unwrap_or(served_before[0]) - served_before[0];
            if served >= CHUNK as f64 {
                let have = c.stored_chunks(puller).len() - chunks_before;
                c.kill(victim)?;
                kill = Some((started.elapsed(), served, have));
                trace.push((started.elapsed(), have));
            } else {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let outcome = pull.join().expect("pull thread");
        Ok((outcome, kill))
    })?;
    let pull_op = h
        .ops()
        .into_iter()
        .rfind(|o| o.node == puller)
        .expect("the pull is recorded");
    // The longest time n2 stored nothing after the kill (until the pull ended).
    let stall = {
        let mut points: Vec<Duration> = trace.iter().map(|&(t, _)| t).collect();
        points.push(pull_op.end.saturating_sub(h.at(started)));
        points
            .windows(2)
            .map(|w| w[1].saturating_sub(w[0]))
            .max()
            .unwrap_or_default()
    };
    let Some((kill_at, served_by_victim, had_at_kill)) = kill else {
        return Err(h.fail(format!(
            "n{victim} never served n{puller} a whole chunk while the pull ran (pull: {outcome}); \
             nothing was killed mid-transfer"
        )));
    };
    h.event(format!(
        "n{victim} was killed {:.2}s into the pull, after serving {}; n{puller} had {} of \
         {image_chunks} chunks; after the kill n{puller} had (s, chunks) {:?}, longest stall {:.2}s",
        kill_at.as_secs_f64(),
        mib(served_by_victim),
        had_at_kill,
        trace
            .iter()
            .map(|(t, n)| (format!("{:.2}", t.as_secs_f64()), *n))
            .collect::<Vec<_>>(),
        stall.as_secs_f64()
    ));

    // The pull completes although a holder died under it.
    h.ensure(
        matches!(outcome, Outcome::Ok(_)),
        format!("the pull on n{puller} must exit 0 after n{victim} died: {outcome}"),
    )?;
    h.ensure(
        h.events_during(&pull_op)
            .iter()
            .any(|e| e.what == format!("kill -9 n{victim}")),
        format!(
            "the kill of n{victim} must land inside the pull (op #{})",
            pull_op.id
        ),
    )?;
    h.ensure(
        had_at_kill < image_chunks,
        format!(
            "n{puller} already had {had_at_kill} of {image_chunks} chunks when n{victim} was \
             killed: the kill came too late to test anything"
        ),
    )?;
    let served_by_seeder = c.metric(seeder, SERVED)? - served_before[1];
    h.ensure(
        served_by_seeder > 0.0,
        format!("n{seeder} served nothing to n{puller}; where did the rest come from?"),
    )?;

    // What n2 (and the surviving holder) give back is what was pushed, and
    // nothing corrupt was stored on n2.
    let mut found = std::collections::BTreeMap::new();
    for i in [seeder, puller] {
        found.insert(i, layer_hash_on(&c, i, &img.layer_blake3, op_timeout));
    }
    h.check_images_intact(REF, &found)?;
    let bad = c.corrupt_chunks(puller)?;
    h.ensure(
        bad.is_empty(),
        format!("n{puller} stored corrupt chunks: {bad:?}"),
    )?;
    let me = c.name(puller);
    c.wait_for(
        deadline(secs(15.0)),
        &format!("n{seeder} lists {me} as a holder of {REF}"),
        || match c.image_holders_alive(seeder, REF) {
            Ok(v) if v.contains(&me) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )?;

    if stall > secs(2.0) {
        eprintln!(
            "NOTE: n{puller} stored nothing for {:.2}s after the kill: pieces in flight to the \
             dead n{victim} were only given back when its connection went (for QUIC, when \
             the failure detector declared it dead)",
            stall.as_secs_f64()
        );
    }
    eprintln!(
        "pull_holder_killed: ok; pull {:.2}s, kill at {:.2}s (n{victim} had served {}, n{puller} \
         had {had_at_kill}/{image_chunks} chunks), longest stall after the kill {:.2}s, {} from \
         n{seeder}; {}",
        (pull_op.end - pull_op.start).as_secs_f64(),
        kill_at.as_secs_f64(),
        mib(served_by_victim),
        stall.as_secs_f64(),
        mib(served_by_seeder),
        h.summary()
    );
    Ok(())
}
