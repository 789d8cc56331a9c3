//! Rate limits and stats from outside (`backends/README.md`, "Rate limits"
//! and "Stats"), sandbox on: a host frontend drives mic-blk at queue depth
//! 1 under `--iops 500`, raises the limit on the stats socket, and checks
//! the achieved rates and the socket's counts against what it sent.

mod common;

use std::time::{Duration, Instant};

use common::*;
use mic_test_support::ask;
use mic_test_support::{Desc, VirtQueue};

/// Sends one command line to the stats socket; the JSON answer.
/// Reads 4 KiB blocks at queue depth 1 for `warmup` (not counted in the
/// rate: it empties the burst), then for `measure`; returns (requests
/// completed in all, requests per second over `measure`).
fn qd1_reads(q: &mut VirtQueue, warmup: Duration, measure: Duration) -> (u64, f64) {
    let r = Req::alloc(q, 4096);
    q.mem().write(r.hdr, &header(T_IN, 0)).unwrap();
    let descs = [
        Desc::out(r.hdr, 16),
        Desc::inp(r.data, 4096),
        Desc::inp(r.status, 1),
    ];
    let start = Instant::now();
    let mut done = 0u64;
    let mut counted = 0u64;
    let mut window: Option<Instant> = None;
    loop {
        let (st, _) = submit(q, &descs, r.status);
        assert_eq!(st, S_OK);
        done += 1;
        let now = Instant::now();
        match window {
            None if now >= start + warmup => window = Some(now),
            None => {}
            Some(w) => {
                counted += 1;
                if now >= w + measure {
                    let secs = now.duration_since(w).as_secs_f64();
                    return (done, counted as f64 / secs);
                }
            }
        }
    }
}

fn within(got: f64, want: f64, tolerance: f64) -> bool {
    (got - want).abs() <= want * tolerance
}

#[test]
fn iops_limit_holds_and_changes_at_run_time() {
    let s = Setup::new(4 << 20, 0x3c);
    let stats = s.dir.path().join("stats.sock");
    let _d = s.spawn(&[
        "--num-queues",
        "1",
        "--iops",
        "500",
        "--stats-socket",
        stats.to_str().unwrap(),
    ]);
    let before = ask(&stats, "stats");
    assert_eq!(before["device"], "mic-blk");
    assert_eq!(before["limits"]["iops"], 500);
    assert_eq!(before["limits"]["iops_burst"], 500);
    assert_eq!(before["limits"]["bps"], 0);
    let mut f = connect(&s, 1);
    let q = &mut f.queues[0];

    let warmup = Duration::from_millis(1500);
    let (n1, rate1) = qd1_reads(q, warmup, Duration::from_secs(10));
    eprintln!("--iops 500: {rate1:.1} IOPS");
    assert!(
        within(rate1, 500.0, 0.10),
        "{rate1:.0} IOPS under --iops 500"
    );

    let answer = ask(&stats, "limit iops=1000");
    assert_eq!(answer["limits"]["iops"], 1000, "{answer}");
    let (n2, rate2) = qd1_reads(q, warmup, Duration::from_secs(10));
    eprintln!("limit iops=1000: {rate2:.1} IOPS");
    assert!(
        within(rate2, 1000.0, 0.10),
        "{rate2:.0} IOPS after limit iops=1000"
    );

    let after = ask(&stats, "stats");
    assert_eq!(after["limits"]["iops"], 1000);
    let q0 = &after["queues"][0];
    assert_eq!(q0["queue"], "0");
    assert_eq!(q0["requests"], n1 + n2, "{after}");
    assert_eq!(q0["bytes_read"], (n1 + n2) * 4096);
    assert_eq!(q0["bytes_written"], 0);
    assert_eq!(q0["errors"], 0);
    assert!(q0["throttled"].as_u64().unwrap() > 0);
    let l = &q0["latency_ns"];
    let (p50, p99) = (l["p50"].as_u64().unwrap(), l["p99"].as_u64().unwrap());
    assert!(
        p50 > 0 && p50 <= p99 && p99 <= l["max"].as_u64().unwrap(),
        "{l}"
    );
}

#[test]
fn stats_count_requests_by_kind_and_survive_sigusr1() {
    let s = Setup::new(1 << 20, 0);
    let stats = s.dir.path().join("stats.sock");
    let mut d = s.spawn(&[
        "--num-queues",
        "2",
        "--io-threads",
        "1",
        "--stats-socket",
        stats.to_str().unwrap(),
    ]);
    let mut f = connect(&s, 2);
    // Queue 1: two writes (one large, through the helper threads' path),
    // one read, one request beyond the image (an error).
    let q = &mut f.queues[1];
    assert_eq!(write(q, 0, &pattern(1, 4096)), S_OK);
    assert_eq!(write(q, 8, &pattern(2, 128 << 10)), S_OK);
    assert_eq!(read(q, 0, 8192).0, S_OK);
    assert_eq!(read(q, 1 << 20, 512).0, S_IOERR);

    // SIGUSR1 dumps to the log; the daemon goes on (and the sandbox lets
    // the stats thread read the signal).
    // SAFETY: kill only sends a signal to the daemon's process.
    assert_eq!(unsafe { libc::kill(d.child.id() as i32, libc::SIGUSR1) }, 0);
    std::thread::sleep(Duration::from_millis(200));
    assert!(d.alive());

    let v = ask(&stats, "stats");
    let qs = v["queues"].as_array().unwrap();
    assert_eq!(qs.len(), 2);
    assert_eq!(qs[0]["requests"], 0);
    let q1 = &qs[1];
    assert_eq!(q1["requests"], 4, "{v}");
    assert_eq!(q1["bytes_written"], 4096 + (128 << 10));
    assert_eq!(q1["bytes_read"], 8192);
    assert_eq!(q1["errors"], 1);
    assert_eq!(q1["throttled"], 0);
    // No limits: all zero.
    assert_eq!(v["limits"]["iops"], 0);
    assert_eq!(v["limits"]["bps"], 0);
    // A bad command changes nothing and the connection goes on.
    assert!(ask(&stats, "limit iops=fast")["error"].is_string());
    assert_eq!(ask(&stats, "stats")["limits"]["iops"], 0);
    drop(f);
    // Clean exit removes the stats socket.
    let st = d.signal_and_wait(libc::SIGTERM, TIMEOUT).unwrap();
    assert!(st.success(), "{st:?}");
    assert!(!stats.exists());
}

#[test]
fn bps_limit_holds() {
    let s = Setup::new(8 << 20, 0);
    let stats = s.dir.path().join("stats.sock");
    let _d = s.spawn(&[
        "--num-queues",
        "1",
        "--bps",
        "2Mi",
        "--stats-socket",
        stats.to_str().unwrap(),
    ]);
    let mut f = connect(&s, 1);
    let q = &mut f.queues[0];
    // 64 KiB reads: the 2 MiB burst, then 32 a second.
    let r = Req::alloc(q, 64 << 10);
    q.mem().write(r.hdr, &header(T_IN, 0)).unwrap();
    let descs = [
        Desc::out(r.hdr, 16),
        Desc::inp(r.data, 64 << 10),
        Desc::inp(r.status, 1),
    ];
    for _ in 0..32 {
        assert_eq!(submit(q, &descs, r.status).0, S_OK);
    }
    let start = Instant::now();
    for _ in 0..96 {
        assert_eq!(submit(q, &descs, r.status).0, S_OK);
    }
    let rate = (96u64 << 16) as f64 / start.elapsed().as_secs_f64();
    eprintln!("--bps 2Mi: {rate:.0} B/s");
    assert!(
        within(rate, f64::from(2u32 << 20), 0.10),
        "{rate:.0} B/s under --bps 2Mi"
    );
    assert_eq!(ask(&stats, "stats")["limits"]["bps"], 2 << 20);
}

/// A queue waiting under a limit goes by a new one at once: under `--bps
/// 1Ki`, a 64 KiB read leaves a debt of a minute; lifting the limit lets
/// the next request through (the frontend's wait is 10 s).
#[test]
fn lifting_a_limit_wakes_a_waiting_queue() {
    let s = Setup::new(1 << 20, 0);
    let stats = s.dir.path().join("stats.sock");
    let _d = s.spawn(&[
        "--num-queues",
        "1",
        "--bps",
        "1Ki",
        "--stats-socket",
        stats.to_str().unwrap(),
    ]);
    let mut f = connect(&s, 1);
    let q = &mut f.queues[0];
    assert_eq!(read(q, 0, 64 << 10).0, S_OK);
    // The next request waits in the ring.
    let r = Req::alloc(q, 4096);
    q.mem().write(r.hdr, &header(T_IN, 0)).unwrap();
    q.mem().write(r.status, &[0xff]).unwrap();
    let head = q
        .add_chain(&[
            Desc::out(r.hdr, 16),
            Desc::inp(r.data, 4096),
            Desc::inp(r.status, 1),
        ])
        .unwrap();
    q.kick().unwrap();
    assert!(q.no_used_within(Duration::from_millis(500)));
    assert!(
        ask(&stats, "stats")["queues"][0]["throttled"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert_eq!(ask(&stats, "limit bps=0")["limits"]["bps"], 0);
    q.wait_for(head, TIMEOUT).unwrap();
    assert_eq!(q.mem().read(r.status, 1).unwrap()[0], S_OK);
    assert_eq!(ask(&stats, "stats")["queues"][0]["requests"], 2);
}
