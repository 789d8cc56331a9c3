//! `vu-blk-bench`: drive any vhost-user-blk backend socket through the
//! test frontend (mic-test-support) and report IOPS, MB/s and latency percentiles.
//!
//! Workloads (one queue): 4 KiB random read/write at queue depth 1 and 32,
//! 128 KiB sequential read/write at queue depth 4 (configurable). With
//! `--queues N` (N > 1) the frontend sets up N queues and two more
//! workloads run 4 KiB random reads and writes at depth 32 on every queue
//! at once, a thread per queue (`randread-4k-qd32-Nq`).
//! Output: a header line, then one tab-separated line per workload:
//! `name  iops  MB/s  p50_us  p99_us`.
//!
//! With `--raw FILE` instead of `--socket`, the same workloads run as a
//! single-thread `pread`/`pwrite` loop on the file itself, one request at a
//! time whatever the workload's depth: the limit of the machine that any
//! backend serving that file pays on top of (`scripts/bench-blk`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use mic_test_support::{Desc, FrontendOptions, TestFrontend, VirtQueue};

#[derive(Parser, Debug)]
#[command(about = "vhost-user-blk benchmark over the test frontend (mic-test-support)")]
struct Args {
    /// vhost-user-blk socket of the backend to measure.
    #[arg(long, required_unless_present = "raw", conflicts_with = "raw")]
    socket: Option<PathBuf>,
    /// Measure `pread`/`pwrite` on this file instead of a backend.
    #[arg(long)]
    raw: Option<PathBuf>,
    /// Seconds per workload.
    #[arg(long, default_value_t = 5.0)]
    runtime: f64,
    /// Queue size to negotiate.
    #[arg(long, default_value_t = 128)]
    queue_size: u16,
    /// Queue depth of the sequential workloads.
    #[arg(long, default_value_t = 4)]
    seq_depth: usize,
    /// Ask the backend for its in-flight region, as QEMU's vhost-user-blk
    /// does, so that a backend that tracks in-flight requests does.
    #[arg(long)]
    inflight: bool,
    /// Only run workloads whose name contains this string.
    #[arg(long)]
    only: Option<String>,
    /// Queues to set up; with more than one, the multi-queue workloads run
    /// too. The backend must offer as many.
    #[arg(long, default_value_t = 1)]
    queues: usize,
}

struct Slot {
    hdr: u64,
    data: u64,
    status: u64,
    started: Instant,
}

struct Workload {
    name: String,
    write: bool,
    random: bool,
    bs: u64,
    /// Requests in flight on each queue.
    depth: usize,
    /// Queues driven at once, a thread each.
    queues: usize,
}

/// What one queue's run measured.
struct Measured {
    ops: u64,
    bytes: u64,
    elapsed: f64,
    lat: Vec<u32>,
}

/// IOPS, MB/s, p50 and p99 latency (µs) of runs made at the same time.
fn summarize(parts: Vec<Measured>) -> (f64, f64, f64, f64) {
    let elapsed = parts.iter().map(|m| m.elapsed).fold(0.0, f64::max);
    let ops: u64 = parts.iter().map(|m| m.ops).sum();
    let bytes: u64 = parts.iter().map(|m| m.bytes).sum();
    let mut lat: Vec<u32> = parts.into_iter().flat_map(|m| m.lat).collect();
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize] as f64;
    (
        ops as f64 / elapsed,
        bytes as f64 / elapsed / 1e6,
        pct(0.50),
        pct(0.99),
    )
}

use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN as T_IN, VIRTIO_BLK_T_OUT as T_OUT};

fn header(t: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&t.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Drives one queue with workload `w` for `runtime`; `seed` picks its
/// blocks. Allocates its buffers from the queue's guest memory (the caller
/// releases them).
fn run(q: &mut VirtQueue, capacity: u64, w: &Workload, runtime: Duration, seed: u64) -> Measured {
    let mem = q.mem().clone();
    let blocks = capacity / w.bs;
    let mut rng = Rng(0x1234_5678_9abc_def1 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut seq = 0u64;
    let mut slots: Vec<Slot> = (0..w.depth)
        .map(|i| {
            let data = mem.alloc(w.bs, 4096).unwrap();
            mem.write(data, &vec![i as u8 ^ 0x5a; w.bs as usize])
                .unwrap();
            Slot {
                hdr: mem.alloc(16, 16).unwrap(),
                data,
                status: mem.alloc(1, 1).unwrap(),
                started: Instant::now(),
            }
        })
        .collect();
    // head index -> slot
    let mut owner = vec![usize::MAX; q.size() as usize];
    let mut lat: Vec<u32> = Vec::with_capacity(1 << 20);
    let mut bytes = 0u64;
    let mut ops = 0u64;

    let mut submit = |q: &mut VirtQueue, slot: &mut Slot, idx: usize, owner: &mut Vec<usize>| {
        let block = if w.random {
            rng.next() % blocks
        } else {
            let b = seq % blocks;
            seq += 1;
            b
        };
        let t = if w.write { T_OUT } else { T_IN };
        mem.write(slot.hdr, &header(t, block * w.bs / 512)).unwrap();
        let data = if w.write {
            Desc::out(slot.data, w.bs as u32)
        } else {
            Desc::inp(slot.data, w.bs as u32)
        };
        slot.started = Instant::now();
        let head = q
            .add_chain(&[Desc::out(slot.hdr, 16), data, Desc::inp(slot.status, 1)])
            .unwrap();
        owner[head as usize] = idx;
    };

    let start = Instant::now();
    for (i, s) in slots.iter_mut().enumerate() {
        submit(q, s, i, &mut owner);
    }
    q.kick().unwrap();
    let deadline = start + runtime;
    let mut inflight = w.depth;
    let mut stopping = false;
    while inflight > 0 {
        let used = q
            .wait_used(Duration::from_secs(30))
            .expect("backend stalled");
        let now = Instant::now();
        if now >= deadline {
            stopping = true;
        }
        for u in used {
            let idx = owner[u.id as usize];
            let slot = &mut slots[idx];
            let st = mem.read(slot.status, 1).unwrap()[0];
            assert_eq!(st, 0, "request failed with status {st}");
            lat.push(now.duration_since(slot.started).as_micros() as u32);
            bytes += w.bs;
            ops += 1;
            inflight -= 1;
            if !stopping {
                submit(q, slot, idx, &mut owner);
                inflight += 1;
            }
        }
        if !stopping {
            q.kick().unwrap();
        }
    }
    Measured {
        ops,
        bytes,
        elapsed: start.elapsed().as_secs_f64(),
        lat,
    }
}

/// Runs `w` on its queues at once, a thread per queue.
fn run_queues(
    queues: &mut [VirtQueue],
    capacity: u64,
    w: &Workload,
    runtime: Duration,
) -> (f64, f64, f64, f64) {
    let mem = queues[0].mem().clone();
    let mark = mem.mark();
    let parts = std::thread::scope(|s| {
        let runs: Vec<_> = queues
            .iter_mut()
            .take(w.queues)
            .enumerate()
            .map(|(i, q)| s.spawn(move || run(q, capacity, w, runtime, i as u64)))
            .collect();
        runs.into_iter()
            .map(|r| r.join().expect("a queue's run"))
            .collect()
    });
    mem.release(mark);
    summarize(parts)
}

/// One workload as a single-thread `pread`/`pwrite` loop on `file`.
fn run_raw(
    file: &std::fs::File,
    capacity: u64,
    w: &Workload,
    runtime: Duration,
) -> (f64, f64, f64, f64) {
    use std::os::unix::fs::FileExt;
    let blocks = capacity / w.bs;
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut seq = 0u64;
    let mut buf = vec![0x5au8; w.bs as usize];
    let mut lat: Vec<u32> = Vec::with_capacity(1 << 20);
    let start = Instant::now();
    let deadline = start + runtime;
    let mut ops = 0u64;
    loop {
        let block = if w.random {
            rng.next() % blocks
        } else {
            let b = seq % blocks;
            seq += 1;
            b
        };
        let t = Instant::now();
        if w.write {
            file.write_all_at(&buf, block * w.bs).expect("pwrite");
        } else {
            file.read_exact_at(&mut buf, block * w.bs).expect("pread");
        }
        let now = Instant::now();
        lat.push(now.duration_since(t).as_micros() as u32);
        ops += 1;
        if now >= deadline {
            break;
        }
    }
    summarize(vec![Measured {
        ops,
        bytes: ops * w.bs,
        elapsed: start.elapsed().as_secs_f64(),
        lat,
    }])
}

fn main() {
    let args = Args::parse();
    let workloads = workloads(args.seq_depth, args.queues);
    println!("workload\tiops\tMB/s\tp50_us\tp99_us");
    let selected = || {
        workloads.iter().filter(|w| {
            args.only
                .as_ref()
                .is_none_or(|o| w.name.contains(o.as_str()))
        })
    };
    let runtime = Duration::from_secs_f64(args.runtime);
    let report = |w: &Workload, (iops, mbs, p50, p99): (f64, f64, f64, f64)| {
        println!(
            "{}\t{:.0}\t{:.1}\t{:.0}\t{:.0}",
            w.name, iops, mbs, p50, p99
        );
    };
    if let Some(path) = &args.raw {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .expect("open the file");
        let capacity = file.metadata().expect("the file's size").len();
        for w in selected() {
            report(w, run_raw(&file, capacity, w, runtime));
        }
        return;
    }
    let socket = args.socket.as_ref().expect("--socket or --raw");
    let mut f = TestFrontend::connect_with(
        socket,
        FrontendOptions {
            num_queues: args.queues.max(1),
            queue_size: args.queue_size,
            mem_size: 256 << 20,
            inflight: args.inflight,
            ..Default::default()
        },
    )
    .expect("connect to the backend");
    let cfg = f.get_config(0, 8).expect("read the capacity (CONFIG)");
    let capacity = u64::from_le_bytes(cfg[0..8].try_into().unwrap()) * 512;
    eprintln!(
        "capacity {} MiB, features {:#x}, in-flight region: {}",
        capacity >> 20,
        f.acked_features,
        if f.inflight.is_some() { "yes" } else { "no" }
    );
    for w in selected() {
        report(w, run_queues(&mut f.queues, capacity, w, runtime));
    }
}

/// The workloads, in the order they run; `sd` is the sequential depth, and
/// with `queues` > 1 the multi-queue workloads follow.
fn workloads(sd: usize, queues: usize) -> Vec<Workload> {
    let w = |name: &str, write, random, bs, depth, queues| Workload {
        name: name.to_string(),
        write,
        random,
        bs,
        depth,
        queues,
    };
    let mut all = vec![
        w("randread-4k-qd1", false, true, 4096, 1, 1),
        w("randwrite-4k-qd1", true, true, 4096, 1, 1),
        w("randread-4k-qd32", false, true, 4096, 32, 1),
        w("randwrite-4k-qd32", true, true, 4096, 32, 1),
        w("seqread-128k", false, false, 128 << 10, sd, 1),
        w("seqwrite-128k", true, false, 128 << 10, sd, 1),
    ];
    if queues > 1 {
        let n = format!("-qd32-{queues}q");
        all.push(w(&format!("randread-4k{n}"), false, true, 4096, 32, queues));
        all.push(w(&format!("randwrite-4k{n}"), true, true, 4096, 32, queues));
    }
    all
}
