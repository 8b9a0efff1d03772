//! Durable enqueue throughput of the disk queue, with fsync on.
//!
//! ```text
//! cargo bench --bench queue                      # 6 rounds of 0.5 s per setup
//! QUEUE_BENCH_ROUNDS=20 cargo bench --bench queue
//! ```
//!
//! For 1, 16 and 256 concurrent producers it reports durable jobs per
//! second and the p50/p99 enqueue latency, and beside them, from the same
//! run and the same disk, redb's single-commit rate: one write transaction
//! with `Durability::Immediate` per job, which is what a queue without
//! group commit could at best do.
//!
//! On a shared machine the cost of an fsync swings by an order of magnitude
//! from one second to the next, so the setups run in interleaved slices
//! of 0.5 s (baseline, 1, 16, 256, baseline, 1, ...) and each row sums its
//! slices: every ratio compares setups measured under the same conditions.
//!
//! Built with the `redis`, `nats` or `amqp` features, the run adds the broker
//! backends at 1 and 64 producers, interleaved with the same slices, with
//! the disk queue at 64 producers beside them. They talk to the brokers on
//! this machine (Redis 127.0.0.1:6379, NATS 127.0.0.1:4222, RabbitMQ
//! 127.0.0.1:5672) and panic if one is unreachable:
//!
//! ```text
//! cargo bench --bench queue --features redis,nats,amqp
//! ```
//!
//! (`amqp` also needs Redis, for its status store.)
//!
//! A second table measures draining: after the enqueue rounds, one consumer
//! per queue leases up to 16 jobs at a time and acks each, as a `Replayer`
//! does, in the same interleaved slices, until the queue is empty or the
//! rounds end. It reports acked jobs per second and the p50/p99 of one ack,
//! with the disk queue as the baseline of the ratio column.

use hdrhistogram::Histogram;
use redb::{Database, Durability, TableDefinition};
use std::time::Duration;
use tokio::time::Instant;
use tower_firebreak::queue::disk::DiskQueue;
use tower_firebreak::queue::{DeliveredResponse, Job, Queue};

const BODY: usize = 256;
const SLICE: Duration = Duration::from_millis(500);
const BASELINE: TableDefinition<'_, u128, &[u8]> = TableDefinition::new("jobs");

fn job(producer: usize, i: u64) -> Job {
    Job::new(http::Method::POST, "/orders".parse().unwrap())
        .with_body(vec![b'x'; BODY])
        .with_idempotency_key(format!("{producer}-{i}"))
}

struct Row {
    name: String,
    secs: f64,
    hist: Histogram<u64>,
}

impl Row {
    fn new(name: String) -> Row {
        Row {
            name,
            secs: 0.0,
            hist: Histogram::new(3).unwrap(),
        }
    }

    fn rate(&self) -> f64 {
        self.hist.len() as f64 / self.secs
    }

    fn quantile_ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1e3
    }
}

/// `producers` tasks enqueue for one slice; every latency goes in `row`.
async fn disk_slice(queue: &DiskQueue, producers: usize, offset: &mut u64, row: &mut Row) {
    let start = Instant::now();
    let base = *offset;
    let tasks: Vec<_> = (0..producers)
        .map(|p| {
            let queue = queue.clone();
            tokio::spawn(async move {
                let mut hist = Histogram::<u64>::new(3).unwrap();
                let mut i = base;
                while start.elapsed() < SLICE {
                    let t = Instant::now();
                    queue.enqueue(job(p, i)).await.unwrap();
                    hist.record(t.elapsed().as_micros() as u64).unwrap();
                    i += 1;
                }
                hist
            })
        })
        .collect();
    for t in tasks {
        let hist = t.await.unwrap();
        *offset = (*offset).max(base + hist.len());
        row.hist.add(hist).unwrap();
    }
    row.secs += start.elapsed().as_secs_f64();
}

/// One redb write transaction, fsynced, per job, for one slice: the rate
/// without group commit. Same record size as the queue's JSON envelope.
fn baseline_slice(db: &Database, record: &[u8], next: &mut u128, row: &mut Row) {
    let start = Instant::now();
    while start.elapsed() < SLICE {
        let t = Instant::now();
        let mut txn = db.begin_write().unwrap();
        txn.set_durability(Durability::Immediate);
        txn.open_table(BASELINE)
            .unwrap()
            .insert(*next, record)
            .unwrap();
        txn.commit().unwrap();
        row.hist.record(t.elapsed().as_micros() as u64).unwrap();
        *next += 1;
    }
    row.secs += start.elapsed().as_secs_f64();
}

/// [`disk_slice`] for any queue: `producers` tasks enqueue for one slice.
#[cfg(any(feature = "redis", feature = "nats", feature = "amqp"))]
async fn queue_slice<Q: Queue + Clone>(
    queue: &Q,
    producers: usize,
    offset: &mut u64,
    row: &mut Row,
) {
    let start = Instant::now();
    let base = *offset;
    let tasks: Vec<_> = (0..producers)
        .map(|p| {
            let queue = queue.clone();
            tokio::spawn(async move {
                let mut hist = Histogram::<u64>::new(3).unwrap();
                let mut i = base;
                while start.elapsed() < SLICE {
                    let t = Instant::now();
                    queue.enqueue(job(p, i)).await.unwrap();
                    hist.record(t.elapsed().as_micros() as u64).unwrap();
                    i += 1;
                }
                hist
            })
        })
        .collect();
    for t in tasks {
        let hist = t.await.unwrap();
        *offset = (*offset).max(base + hist.len());
        row.hist.add(hist).unwrap();
    }
    row.secs += start.elapsed().as_secs_f64();
}

/// One consumer for one slice, as a `Replayer` drains: lease up to 16 jobs,
/// ack each. Returns false once the queue had nothing left to lease.
async fn drain_slice<Q: Queue>(queue: &Q, row: &mut Row) -> bool {
    let start = Instant::now();
    let mut more = true;
    while start.elapsed() < SLICE {
        let leased = queue.lease(16, Duration::from_secs(60)).await.unwrap();
        if leased.is_empty() {
            more = false;
            break;
        }
        for l in leased {
            let t = Instant::now();
            queue
                .ack(&l.lease, DeliveredResponse::default())
                .await
                .unwrap();
            row.hist.record(t.elapsed().as_micros() as u64).unwrap();
        }
    }
    row.secs += start.elapsed().as_secs_f64();
    more
}

/// The broker setups: each a closure that runs one slice into its row.
#[cfg(any(feature = "redis", feature = "nats", feature = "amqp"))]
mod brokers {
    use super::{Row, drain_slice, queue_slice};
    use std::future::Future;
    use std::pin::Pin;
    use tower_firebreak::queue::Queue;

    type Slice<'a> = Pin<Box<dyn Future<Output = ()> + 'a>>;
    type RunSlice = Box<dyn for<'a> Fn(&'a mut u64, &'a mut Row) -> Slice<'a>>;
    type Later<T> = Box<dyn Fn() -> Pin<Box<dyn Future<Output = T>>>>;
    type DrainSlice = Box<dyn for<'a> Fn(&'a mut Row) -> Pin<Box<dyn Future<Output = bool> + 'a>>>;

    /// A queue under test, its producer count, its row, and its cleanup.
    pub(super) struct Setup {
        pub(super) row: Row,
        offset: u64,
        run: RunSlice,
        drain: DrainSlice,
        pub(super) drain_row: Row,
        pub(super) drained: bool,
        depth: Later<usize>,
        pub(super) cleanup: Later<()>,
    }

    impl Setup {
        pub(super) fn new<Q: Queue + Clone>(
            name: String,
            queue: Q,
            producers: usize,
            cleanup: Later<()>,
        ) -> Setup {
            let q2 = queue.clone();
            let q3 = queue.clone();
            Setup {
                drain_row: Row::new(format!("{name}, drained by one consumer")),
                drained: false,
                drain: Box::new(move |row| {
                    let queue = q3.clone();
                    Box::pin(async move { drain_slice(&queue, row).await })
                }),
                row: Row::new(name),
                offset: 0,
                run: Box::new(move |offset, row| {
                    let queue = queue.clone();
                    Box::pin(async move { queue_slice(&queue, producers, offset, row).await })
                }),
                depth: Box::new(move || {
                    let q = q2.clone();
                    Box::pin(async move { q.depth().await.unwrap() })
                }),
                cleanup,
            }
        }

        pub(super) async fn slice(&mut self) {
            let Setup {
                row, offset, run, ..
            } = self;
            run(offset, row).await;
        }

        /// One drain slice, unless the queue was found empty before.
        pub(super) async fn drain_slice(&mut self) {
            if !self.drained {
                self.drained = !(self.drain)(&mut self.drain_row).await;
            }
        }

        pub(super) async fn depth(&self) -> usize {
            (self.depth)().await
        }
    }

    pub(super) async fn setups(dir: &std::path::Path) -> Vec<Setup> {
        let mut out = Vec::new();
        let disk =
            tower_firebreak::queue::disk::DiskQueue::open(dir.join("queue-64.redb")).unwrap();
        out.push(Setup::new(
            "DiskQueue, 64 producers".into(),
            disk,
            64,
            Box::new(|| Box::pin(async {})),
        ));
        // The shared Redis runs without an AOF (as `.ci/run` starts it), so
        // the run also starts its own Redis with `appendfsync always`: the
        // setting under which an acknowledged job survives a crash, as the
        // disk queue's do.
        #[cfg(feature = "redis")]
        let own_redis = {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let child = std::process::Command::new("redis-server")
                .args([
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                ])
                .args(["--appendonly", "yes", "--appendfsync", "always"])
                .args(["--dir", dir.to_str().unwrap()])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("start redis-server for the AOF-always setup");
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            (
                port,
                std::sync::Arc::new(std::sync::Mutex::new(Some(child))),
            )
        };
        #[cfg(feature = "redis")]
        for (label, url, producers) in [
            (
                "shared server, no AOF",
                "redis://127.0.0.1:6379".to_owned(),
                1,
            ),
            (
                "shared server, no AOF",
                "redis://127.0.0.1:6379".to_owned(),
                64,
            ),
            (
                "AOF, appendfsync always",
                format!("redis://127.0.0.1:{}", own_redis.0),
                1,
            ),
            (
                "AOF, appendfsync always",
                format!("redis://127.0.0.1:{}", own_redis.0),
                64,
            ),
        ] {
            let name = format!("bench-{}", uuid::Uuid::now_v7().simple());
            let q = tower_firebreak::queue::redis::RedisQueue::builder()
                .name(&name)
                .op_timeout(std::time::Duration::from_secs(10))
                .connect(&url)
                .await
                .unwrap_or_else(|e| panic!("Redis at {url} is unreachable: {e}"));
            let own = own_redis.1.clone();
            let cleanup = move || -> Pin<Box<dyn Future<Output = ()>>> {
                let name = name.clone();
                let url = url.clone();
                let own = own.clone();
                Box::pin(async move {
                    if !url.ends_with(":6379") {
                        if let Some(mut child) = own.lock().unwrap().take() {
                            let _ = child.kill();
                            let _ = child.wait();
                        }
                        return;
                    }
                    let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
                    let keys: Vec<String> = redis::cmd("KEYS")
                        .arg(format!("fb:{{{name}}}:*"))
                        .query(&mut c)
                        .unwrap();
                    if !keys.is_empty() {
                        let _: () = redis::cmd("DEL").arg(keys).query(&mut c).unwrap();
                    }
                })
            };
            out.push(Setup::new(
                format!("RedisQueue ({label}), {producers} producers"),
                q,
                producers,
                Box::new(cleanup),
            ));
        }
        #[cfg(feature = "nats")]
        for producers in [1, 64] {
            const URL: &str = "nats://127.0.0.1:4222";
            let name = format!("bench-{}", uuid::Uuid::now_v7().simple());
            let q = tower_firebreak::queue::nats::NatsQueue::builder()
                .name(&name)
                .op_timeout(std::time::Duration::from_secs(10))
                .connect(URL)
                .await
                .unwrap_or_else(|e| panic!("NATS at {URL} is unreachable: {e}"));
            let cleanup = move || -> Pin<Box<dyn Future<Output = ()>>> {
                let name = name.clone();
                Box::pin(async move {
                    let js = async_nats::jetstream::new(async_nats::connect(URL).await.unwrap());
                    for s in [
                        format!("FB_{name}"),
                        format!("FB_{name}_DEAD"),
                        format!("KV_fb_{name}_live"),
                        format!("KV_fb_{name}_done"),
                    ] {
                        let _ = js.delete_stream(&s).await;
                    }
                })
            };
            out.push(Setup::new(
                format!("NatsQueue (shared server), {producers} producers"),
                q,
                producers,
                Box::new(cleanup),
            ));
        }
        #[cfg(feature = "amqp")]
        for producers in [1, 64] {
            use tower_firebreak::queue::amqp::{AmqpQueue, RedisStatusStore};
            const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
            const REDIS: &str = "redis://127.0.0.1:6379";
            let name = format!("bench-{}", uuid::Uuid::now_v7().simple());
            let timeout = std::time::Duration::from_secs(10);
            let store = RedisStatusStore::connect_with_timeout(REDIS, &name, timeout)
                .await
                .unwrap_or_else(|e| panic!("Redis at {REDIS} is unreachable: {e}"));
            let q = AmqpQueue::builder()
                .name(&name)
                .op_timeout(timeout)
                .connect(URL, store)
                .await
                .unwrap_or_else(|e| panic!("RabbitMQ at {URL} is unreachable: {e}"));
            let cleanup = move || -> Pin<Box<dyn Future<Output = ()>>> {
                let name = name.clone();
                Box::pin(async move {
                    let conn =
                        lapin::Connection::connect(URL, lapin::ConnectionProperties::default())
                            .await
                            .unwrap();
                    let ch = conn.create_channel().await.unwrap();
                    for q in [format!("fb.{name}"), format!("fb.{name}.dead")] {
                        let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
                    }
                    let _ = ch
                        .exchange_delete(
                            format!("fb.{name}.dlx").as_str().into(),
                            Default::default(),
                        )
                        .await;
                    let mut c = redis::Client::open(REDIS)
                        .unwrap()
                        .get_connection()
                        .unwrap();
                    let keys: Vec<String> = redis::cmd("KEYS")
                        .arg(format!("fba:{{{name}}}:*"))
                        .query(&mut c)
                        .unwrap();
                    if !keys.is_empty() {
                        let _: () = redis::cmd("DEL").arg(keys).query(&mut c).unwrap();
                    }
                })
            };
            out.push(Setup::new(
                format!(
                    "AmqpQueue (shared RabbitMQ, status in shared Redis), {producers} producers"
                ),
                q,
                producers,
                Box::new(cleanup),
            ));
        }
        out
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not, and
    // then one round is enough to show it runs.
    let bench = std::env::args().any(|a| a == "--bench");
    let rounds: usize = std::env::var("QUEUE_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if bench { 6 } else { 1 });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();

    let db = Database::create(dir.path().join("baseline.redb")).unwrap();
    let record = tower_firebreak::queue::codec::Format::Json.encode(&job(0, 0));
    let mut baseline = Row::new("redb, one fsynced txn per job".into());
    let mut next = 0u128;

    let setups = [1usize, 16, 256];
    let queues: Vec<DiskQueue> = setups
        .iter()
        .map(|p| DiskQueue::open(dir.path().join(format!("queue-{p}.redb"))).unwrap())
        .collect();
    let mut rows: Vec<Row> = setups
        .iter()
        .map(|p| Row::new(format!("DiskQueue, {p} producers")))
        .collect();
    let mut offsets = vec![0u64; setups.len()];

    #[cfg(any(feature = "redis", feature = "nats", feature = "amqp"))]
    let mut broker_setups = rt.block_on(brokers::setups(dir.path()));

    for _ in 0..rounds {
        baseline_slice(&db, &record, &mut next, &mut baseline);
        #[cfg(any(feature = "redis", feature = "nats", feature = "amqp"))]
        for setup in &mut broker_setups {
            rt.block_on(setup.slice());
        }
        for (i, &producers) in setups.iter().enumerate() {
            rt.block_on(disk_slice(
                &queues[i],
                producers,
                &mut offsets[i],
                &mut rows[i],
            ));
        }
    }
    for (queue, row) in queues.iter().zip(&rows) {
        let depth = rt.block_on(queue.depth()).unwrap() as u64;
        assert_eq!(
            depth,
            row.hist.len(),
            "{}: every acknowledged job is stored",
            row.name
        );
    }

    #[cfg(any(feature = "redis", feature = "nats", feature = "amqp"))]
    for setup in &broker_setups {
        let depth = rt.block_on(setup.depth()) as u64;
        assert_eq!(
            depth,
            setup.row.hist.len(),
            "{}: every acknowledged job is stored",
            setup.row.name
        );
    }
    // Drain: the same interleaving, one consumer per queue.
    let mut disk_drain = Row::new("DiskQueue, 256 producers' jobs, drained by one consumer".into());
    let mut disk_drained = false;
    for _ in 0..rounds {
        #[cfg(any(feature = "redis", feature = "nats", feature = "amqp"))]
        for setup in &mut broker_setups {
            rt.block_on(setup.drain_slice());
        }
        if !disk_drained {
            disk_drained = !rt.block_on(drain_slice(&queues[2], &mut disk_drain));
        }
    }
    #[cfg(any(feature = "redis", feature = "nats", feature = "amqp"))]
    for setup in &broker_setups {
        rt.block_on((setup.cleanup)());
    }
    #[cfg(any(feature = "redis", feature = "nats", feature = "amqp"))]
    let (rows, drain_rows): (Vec<Row>, Vec<Row>) = {
        let (enq, drain): (Vec<Row>, Vec<Row>) = broker_setups
            .into_iter()
            .map(|s| (s.row, s.drain_row))
            .unzip();
        (rows.into_iter().chain(enq).collect(), drain)
    };
    #[cfg(not(any(feature = "redis", feature = "nats", feature = "amqp")))]
    let drain_rows: Vec<Row> = Vec::new();

    println!("| setup | durable jobs/s | vs redb single commit | p50 | p99 |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for row in std::iter::once(&baseline).chain(&rows) {
        println!(
            "| {} | {:.0} | {:.1}x | {:.2} ms | {:.2} ms |",
            row.name,
            row.rate(),
            row.rate() / baseline.rate(),
            row.quantile_ms(0.5),
            row.quantile_ms(0.99),
        );
    }
    println!();
    println!("| drain (lease 16, ack each) | acked jobs/s | vs DiskQueue | ack p50 | ack p99 |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for row in std::iter::once(&disk_drain).chain(&drain_rows) {
        println!(
            "| {} | {:.0} | {:.2}x | {:.2} ms | {:.2} ms |",
            row.name,
            row.rate(),
            row.rate() / disk_drain.rate(),
            row.quantile_ms(0.5),
            row.quantile_ms(0.99),
        );
    }
    println!(
        "({rounds} interleaved rounds of {} ms per setup, {BODY}-byte bodies, {} cores)",
        SLICE.as_millis(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
}
