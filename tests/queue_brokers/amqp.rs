use crate::support::{
    Broker, Freeze, Proxy, Stall, fleet, key, outage, private_redis, spare_port,
    stored_none_after_the_stop, unique,
};
use std::time::Duration;
use tower_firebreak::queue::amqp::{AmqpQueue, AmqpQueueBuilder, RedisStatusStore};
use tower_firebreak::queue::{DeliveredResponse, Job, JobId, Queue};

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const REDIS: &str = "redis://127.0.0.1:6379";

async fn connect(url: &str, name: &str, op_timeout: Duration) -> AmqpQueue<RedisStatusStore> {
    connect_with(url, name, |b| b.op_timeout(op_timeout)).await
}

/// A handle with an `op_timeout` of 5 s and then `settings` applied.
async fn connect_with(
    url: &str,
    name: &str,
    settings: impl FnOnce(AmqpQueueBuilder) -> AmqpQueueBuilder,
) -> AmqpQueue<RedisStatusStore> {
    let store = RedisStatusStore::connect_with_timeout(REDIS, name, Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("Redis at {REDIS} (the status store) is unreachable ({e})"));
    settings(
        AmqpQueue::builder()
            .name(name)
            .op_timeout(Duration::from_secs(5)),
    )
    .connect(url, store)
    .await
    .unwrap_or_else(|e| {
        panic!("RabbitMQ at {AMQP} is unreachable ({e}); start it (`bash .ci/test` starts it)")
    })
}

/// Deletes a run's queues, exchange and status records: the lease timers
/// still parked in retry queues would otherwise come back to a queue no one
/// reads.
async fn cleanup(name: &str) {
    let conn = lapin::Connection::connect(AMQP, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    for q in [format!("fb.{name}"), format!("fb.{name}.dead")] {
        ch.queue_delete(q.as_str().into(), Default::default())
            .await
            .unwrap();
    }
    ch.exchange_delete(format!("fb.{name}.dlx").as_str().into(), Default::default())
        .await
        .unwrap();
    cleanup_store(name);
}

/// Deletes a run's records in the shared status store.
fn cleanup_store(name: &str) {
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_of_two_shares_one_queue() {
    let name = unique("fleet");
    let a = connect(AMQP, &name, Duration::from_secs(5)).await;
    let b = connect(AMQP, &name, Duration::from_secs(5)).await;
    fleet(a, b).await;
    cleanup(&name).await;
}

/// The shared RabbitMQ must not be stopped, so the test cuts the
/// connection with a proxy instead: `503`s while the broker is unreachable,
/// no false `202`, reconnection, and every `202` delivered. (RabbitMQ's own
/// kill and restart: `a_killed_rabbitmq_keeps_every_202`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_connection_answers_503_fast_and_delivers_every_202() {
    let name = unique("outage");
    let mut proxy = Proxy::start(5672).await;
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port);
    let q = connect(&url, &name, Duration::from_millis(500)).await;
    // The status store is not behind the proxy, so no request is left
    // half-stored by the cut: none answered 503 may be delivered.
    outage(q, &mut proxy, Duration::from_secs(1), 0).await;
    proxy.cut().await;
    cleanup(&name).await;
}

/// Whether request `i`'s idempotency key is in the index of queue `name`'s
/// status store at `redis_url` (which keeps every key stored within
/// retention, delivered or not).
fn in_index(redis_url: &str, name: &str) -> impl FnMut(usize) -> bool {
    let mut c = redis::Client::open(redis_url)
        .unwrap()
        .get_connection()
        .unwrap();
    let index = format!("fba:{{{name}}}:i");
    move |i| {
        redis::cmd("HEXISTS")
            .arg(&index)
            .arg(key(i))
            .query(&mut c)
            .unwrap()
    }
}

/// RabbitMQ stalled (paused) rather than gone, behind a proxy that passes
/// no byte either way but keeps every connection open (the shared broker
/// must not be paused). A copy published during the stall reaches RabbitMQ
/// when it resumes, after its submit answered 503; the submit claims only
/// once its publish is confirmed, so that copy has no record and is
/// dropped as an orphan: no request answered 503 is stored or delivered,
/// and every 202 is delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_rabbitmq_stores_none_of_its_503s() {
    let name = unique("freeze");
    let mut proxy = Proxy::start(5672).await;
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port);
    let q = connect(&url, &name, Duration::from_millis(300)).await;
    let log = outage(q, &mut Freeze(&proxy), Duration::from_secs(1), 0).await;
    stored_none_after_the_stop(&log, in_index(REDIS, &name));
    proxy.cut().await;
    cleanup(&name).await;
}

/// The status store's Redis paused (SIGSTOP) rather than killed. Each
/// submit publishes its copy to RabbitMQ first, so during the stall every
/// copy is there while its claim waits in the stalled Redis's socket, to run
/// when Redis resumes. The claim carries the instant its submit gives up,
/// on Redis's clock: one that Redis runs later stores nothing, and its copy
/// is dropped as stale. So no request sent during the stall and answered
/// 503 is stored or delivered (`outage` checks the deliveries; at most the
/// one in flight at the stop may be), and every 202 is delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_status_store_stores_none_of_its_503s() {
    let dir = tempfile::tempdir().unwrap();
    let mut store_redis = private_redis(dir.path());
    let url = format!("redis://127.0.0.1:{}", store_redis.port);
    let name = unique("stall");
    let store = RedisStatusStore::connect_with_timeout(&url, &name, Duration::from_millis(300))
        .await
        .unwrap_or_else(|e| panic!("the private Redis at {url} is unreachable ({e})"));
    let q = AmqpQueue::builder()
        .name(&name)
        .op_timeout(Duration::from_millis(300))
        .connect(AMQP, store)
        .await
        .unwrap_or_else(|e| {
            panic!("RabbitMQ at {AMQP} is unreachable ({e}); start it (`bash .ci/test` starts it)")
        });
    let log = outage(q, &mut Stall(&mut store_redis), Duration::from_secs(1), 1).await;
    stored_none_after_the_stop(&log, in_index(&url, &name));
    cleanup(&name).await;
}

/// A RabbitMQ node of its own, killed with SIGKILL and started again on the
/// same data: `503`s while it is down, and every `202` (its copy was
/// confirmed, so persisted) delivered exactly once after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_rabbitmq_keeps_every_202() {
    let dir = tempfile::tempdir().unwrap();
    let mut rabbit = private_rabbitmq(dir.path());
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", rabbit.port);
    let name = unique("killed");
    let q = connect(&url, &name, Duration::from_millis(500)).await;
    outage(q, &mut rabbit, Duration::from_secs(1), 1).await;
    cleanup_store(&name);
}

/// A RabbitMQ node of its own (name, ports, data and logs in `dir`, no
/// plugins, no config file), for a test that kills it.
fn private_rabbitmq(dir: &std::path::Path) -> Broker {
    let (port, dist) = (spare_port(), spare_port());
    let d = |sub: &str| dir.join(sub).to_str().unwrap().to_owned();
    std::fs::write(dir.join("plugins"), "[].").unwrap();
    let script = if std::path::Path::new("/usr/lib/rabbitmq/bin/rabbitmq-server").exists() {
        // Debian's /usr/sbin wrapper would switch to the rabbitmq user.
        "/usr/lib/rabbitmq/bin/rabbitmq-server"
    } else {
        "rabbitmq-server"
    };
    let args = vec![
        format!("RABBITMQ_NODENAME=fbtest{port}@localhost"),
        "RABBITMQ_NODE_IP_ADDRESS=127.0.0.1".to_owned(),
        format!("RABBITMQ_NODE_PORT={port}"),
        format!("RABBITMQ_DIST_PORT={dist}"),
        format!("RABBITMQ_MNESIA_BASE={}", d("mnesia")),
        format!("RABBITMQ_LOG_BASE={}", d("log")),
        format!("RABBITMQ_ENABLED_PLUGINS_FILE={}", d("plugins")),
        format!("RABBITMQ_CONFIG_FILE={}", d("no-config")),
        script.to_owned(),
    ];
    Broker::start("env", args, port)
}

// The consumer with prefetch: what a handle holds ahead of its leases, and
// when it gives that back to the rest of a fleet; and the operator copies
// of dead letters under `dead_letter_retention`.

async fn enqueue(q: &impl Queue, n: usize) -> Vec<JobId> {
    let mut ids = Vec::new();
    for i in 0..n {
        let job = Job::new(http::Method::POST, format!("/p/{i}").parse().unwrap());
        ids.push(q.enqueue(job).await.unwrap());
    }
    ids
}

async fn lease_all(q: &impl Queue, max: usize) -> Vec<JobId> {
    let leased = q.lease(max, Duration::from_secs(60)).await.unwrap();
    let mut ids = Vec::new();
    for l in leased {
        ids.push(*l.lease.id());
        q.ack(&l.lease, DeliveredResponse::default()).await.unwrap();
    }
    ids
}

/// A handle that stops leasing holds what RabbitMQ pushed ahead to it
/// (no other handle sees it), and gives it back after `prefetch_hold`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_copies_go_back_to_the_fleet_after_prefetch_hold() {
    let name = unique("prefetch");
    let a = connect_with(AMQP, &name, |b| {
        b.prefetch(8).prefetch_hold(Duration::from_millis(400))
    })
    .await;
    let b = connect_with(AMQP, &name, |b| b).await;
    let ids = enqueue(&a, 5).await;

    assert_eq!(lease_all(&a, 1).await, ids[..1]);
    // The other four were pushed to `a` with the first: they are held, not
    // leased, so `b` finds none yet...
    assert_eq!(
        lease_all(&b, 10).await,
        [],
        "copies held by a were leased by b"
    );
    // ...until `a` has not leased for its hold time.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut rest = lease_all(&b, 10).await;
    rest.sort();
    assert_eq!(rest, ids[1..], "held copies were not given back");
    drop((a, b));
    cleanup(&name).await;
}

/// A batch larger than the prefetch window is still served in one call:
/// each ack lets RabbitMQ push more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_larger_than_the_prefetch_takes_its_whole_batch() {
    let name = unique("prefetch");
    let q = connect_with(AMQP, &name, |b| b.prefetch(2)).await;
    let ids = enqueue(&q, 10).await;
    assert_eq!(lease_all(&q, 10).await, ids);
    drop(q);
    cleanup(&name).await;
}

/// Dropping a handle gives back what it held at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_handle_gives_back_what_it_held() {
    let name = unique("prefetch");
    let a = connect_with(AMQP, &name, |b| b.prefetch_hold(Duration::from_secs(600))).await;
    let b = connect_with(AMQP, &name, |b| b).await;
    let ids = enqueue(&a, 4).await;
    assert_eq!(lease_all(&a, 1).await, ids[..1]);
    drop(a);
    let mut rest = Vec::new();
    for _ in 0..20 {
        rest.extend(lease_all(&b, 10).await);
        if rest.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    rest.sort();
    assert_eq!(rest, ids[1..], "a dropped handle kept its copies");
    drop(b);
    cleanup(&name).await;
}

#[tokio::test]
async fn prefetch_and_hold_must_be_above_zero() {
    for settings in [
        AmqpQueue::builder().prefetch(0),
        AmqpQueue::builder().prefetch_hold(Duration::ZERO),
    ] {
        let store = RedisStatusStore::connect(REDIS, "unused").await.unwrap();
        let err = settings.connect(AMQP, store).await.unwrap_err();
        assert!(err.to_string().contains("prefetch"), "{err}");
    }
}

/// A passive declare of `queue`, on a channel of its own (a failed one
/// closes it): the queue as RabbitMQ has it, or the error if it has none.
async fn passive_declare(queue: &str) -> Result<lapin::Queue, lapin::Error> {
    let conn = lapin::Connection::connect(AMQP, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        queue.into(),
        lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        Default::default(),
    )
    .await
}

/// How many messages wait in the operators' dead-letter queue.
async fn dead_copies(name: &str) -> u32 {
    passive_declare(&format!("fb.{name}.dead"))
        .await
        .unwrap()
        .message_count()
}

/// With `dead_letter_retention`, the copy of a dead job published for
/// operators expires with it; without, it stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_copies_of_dead_letters_expire_with_dead_letter_retention() {
    let kept = unique("deadcopy");
    let purged = unique("deadcopy");
    let k = connect_with(AMQP, &kept, |b| b).await;
    let p = connect_with(AMQP, &purged, |b| {
        b.dead_letter_retention(Duration::from_millis(300))
    })
    .await;
    for q in [&k, &p] {
        enqueue(q, 2).await;
        for l in q.lease(2, Duration::from_secs(60)).await.unwrap() {
            q.dead_letter(&l.lease, "bad").await.unwrap();
        }
    }
    assert_eq!(dead_copies(&kept).await, 2);
    assert_eq!(dead_copies(&purged).await, 2);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        dead_copies(&kept).await,
        2,
        "copies expired without the setting"
    );
    assert_eq!(
        dead_copies(&purged).await,
        0,
        "copies kept past dead_letter_retention"
    );
    assert_eq!(
        p.dead_letters(10).await.unwrap().len(),
        2,
        "purged before a lease"
    );
    let _ = p.lease(1, Duration::from_secs(1)).await.unwrap();
    assert!(
        p.dead_letters(10).await.unwrap().is_empty(),
        "not purged by the lease"
    );
    drop((k, p));
    cleanup(&kept).await;
    cleanup(&purged).await;
}

/// Whether RabbitMQ has the queue `queue`.
async fn queue_exists(queue: &str) -> bool {
    passive_declare(queue).await.is_ok()
}

/// Delays that differ by the millisecond (an open breaker's `retry_after`)
/// share a retry queue: each is rounded up to two significant digits, so
/// 1201 ms and 1234 ms both wait in `….retry.1300`, and no queue is
/// declared per millisecond. Both jobs still come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_delays_share_one_retry_queue() {
    let name = unique("bucket");
    let q = connect(AMQP, &name, Duration::from_secs(5)).await;
    let mut ids = Vec::new();
    for (i, delay) in [1201u64, 1234].into_iter().enumerate() {
        let id = q
            .enqueue(Job::new(
                http::Method::POST,
                format!("/b{i}").parse().unwrap(),
            ))
            .await
            .unwrap();
        let leased = q.lease(1, Duration::from_secs(30)).await.unwrap();
        assert_eq!(*leased[0].lease.id(), id);
        q.nack(&leased[0].lease, Duration::from_millis(delay))
            .await
            .unwrap();
        ids.push(id);
    }
    assert!(queue_exists(&format!("fb.{name}.retry.1300")).await);
    for exact in [1201, 1234] {
        assert!(
            !queue_exists(&format!("fb.{name}.retry.{exact}")).await,
            "a retry queue of its own for {exact} ms"
        );
    }
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut back = Vec::new();
    while back.len() < 2 {
        for l in q.lease(2, Duration::from_secs(30)).await.unwrap() {
            back.push(*l.lease.id());
            q.ack(&l.lease, DeliveredResponse::default()).await.unwrap();
        }
        assert!(tokio::time::Instant::now() < until, "{back:?} came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    back.sort();
    ids.sort();
    assert_eq!(back, ids);
    let conn = lapin::Connection::connect(AMQP, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let _ = ch
        .queue_delete(
            format!("fb.{name}.retry.1300").as_str().into(),
            Default::default(),
        )
        .await;
    cleanup(&name).await;
}

/// A retry queue that is gone (RabbitMQ deletes one a minute after its last
/// declare: it has no consumer, and publishing does not count as use; here
/// it is deleted by hand) does not swallow the copies parked in it after:
/// the publish is mandatory, so the copy comes back, the queue is declared
/// again and the copy parked there. Before, it was dropped, confirmed, and
/// the nacked job never came back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_after_its_retry_queue_is_gone_still_comes_back() {
    let name = unique("retryq");
    let q = connect(AMQP, &name, Duration::from_secs(5)).await;
    // A job nacked for 100 ms, which comes back: that makes the retry
    // queue, and proves it works.
    let nacked_and_back = async |path: &str| {
        let id = q
            .enqueue(Job::new(http::Method::POST, path.parse().unwrap()))
            .await
            .unwrap();
        let leased = q.lease(1, Duration::from_secs(30)).await.unwrap();
        assert_eq!(*leased[0].lease.id(), id);
        q.nack(&leased[0].lease, Duration::from_millis(100))
            .await
            .unwrap();
        let until = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(l) = q.lease(1, Duration::from_secs(30)).await.unwrap().first() {
                assert_eq!(*l.lease.id(), id);
                q.ack(&l.lease, DeliveredResponse::default()).await.unwrap();
                return;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "the job nacked to {path} never came back"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    nacked_and_back("/a").await;

    let conn = lapin::Connection::connect(AMQP, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let retry = format!("fb.{name}.retry.100");
    ch.queue_delete(retry.as_str().into(), Default::default())
        .await
        .unwrap();
    nacked_and_back("/b").await;

    let _ = ch
        .queue_delete(retry.as_str().into(), Default::default())
        .await;
    cleanup(&name).await;
}

/// A status store whose claims land late (each waits `delay` first: a slow
/// or briefly stalled Redis) or whose claims' answers are lost (the claim
/// runs, then the caller gets an error); the rest passes straight through.
struct SlowClaims {
    inner: RedisStatusStore,
    delay: Duration,
    lose_answers: bool,
}

impl tower_firebreak::queue::amqp::StatusStore for SlowClaims {
    async fn claim(
        &self,
        id: &JobId,
        ticket: &str,
        job: &Job,
        envelope: &[u8],
        capacity: usize,
    ) -> Result<tower_firebreak::queue::amqp::Claim, tower_firebreak::queue::QueueError> {
        tokio::time::sleep(self.delay).await;
        self.inner.claim(id, ticket, job, envelope, capacity).await
    }
    async fn claim_before(
        &self,
        id: &JobId,
        ticket: &str,
        job: &Job,
        envelope: &[u8],
        capacity: usize,
        give_up: tokio::time::Instant,
    ) -> Result<tower_firebreak::queue::amqp::Claim, tower_firebreak::queue::QueueError> {
        tokio::time::sleep(self.delay).await;
        let claimed = self
            .inner
            .claim_before(id, ticket, job, envelope, capacity, give_up)
            .await;
        if self.lose_answers {
            return Err(tower_firebreak::queue::QueueError::unavailable(
                "the claim's answer was lost",
            ));
        }
        claimed
    }
    fn void_claim(
        &self,
        id: &JobId,
        ticket: &str,
    ) -> impl Future<Output = Result<bool, tower_firebreak::queue::QueueError>> + Send {
        self.inner.void_claim(id, ticket)
    }
    fn take(
        &self,
        id: &JobId,
        ticket: &str,
        new_ticket: &str,
        now_ms: u64,
        max_attempts: u32,
    ) -> impl Future<
        Output = Result<tower_firebreak::queue::amqp::Take, tower_firebreak::queue::QueueError>,
    > + Send {
        self.inner
            .take(id, ticket, new_ticket, now_ms, max_attempts)
    }
    fn ack(
        &self,
        id: &JobId,
        token: &str,
        response: &DeliveredResponse,
        now_ms: u64,
        retention: Duration,
    ) -> impl Future<Output = Result<bool, tower_firebreak::queue::QueueError>> + Send {
        self.inner.ack(id, token, response, now_ms, retention)
    }
    fn nack(
        &self,
        id: &JobId,
        token: &str,
        new_ticket: &str,
        now_ms: u64,
        max_attempts: u32,
    ) -> impl Future<
        Output = Result<tower_firebreak::queue::amqp::Nacked, tower_firebreak::queue::QueueError>,
    > + Send {
        self.inner.nack(id, token, new_ticket, now_ms, max_attempts)
    }
    fn dead_letter(
        &self,
        id: &JobId,
        token: &str,
        reason: &str,
        now_ms: u64,
    ) -> impl Future<Output = Result<bool, tower_firebreak::queue::QueueError>> + Send {
        self.inner.dead_letter(id, token, reason, now_ms)
    }
    fn redrive(
        &self,
        id: &JobId,
        new_ticket: &str,
        capacity: usize,
    ) -> impl Future<Output = Result<Option<Vec<u8>>, tower_firebreak::queue::QueueError>> + Send
    {
        self.inner.redrive(id, new_ticket, capacity)
    }
    fn envelope(
        &self,
        id: &JobId,
    ) -> impl Future<Output = Result<Option<Vec<u8>>, tower_firebreak::queue::QueueError>> + Send
    {
        self.inner.envelope(id)
    }
    fn status(
        &self,
        id: &JobId,
    ) -> impl Future<
        Output = Result<
            Option<tower_firebreak::queue::JobStatus>,
            tower_firebreak::queue::QueueError,
        >,
    > + Send {
        self.inner.status(id)
    }
    fn depth(
        &self,
    ) -> impl Future<Output = Result<usize, tower_firebreak::queue::QueueError>> + Send {
        self.inner.depth()
    }
    fn oldest(
        &self,
    ) -> impl Future<Output = Result<Option<u64>, tower_firebreak::queue::QueueError>> + Send {
        self.inner.oldest()
    }
    fn dead(
        &self,
        limit: usize,
    ) -> impl Future<
        Output = Result<
            Vec<tower_firebreak::queue::amqp::DeadRecord>,
            tower_firebreak::queue::QueueError,
        >,
    > + Send {
        self.inner.dead(limit)
    }
    fn purge_dead(
        &self,
        before_ms: u64,
        limit: usize,
    ) -> impl Future<Output = Result<usize, tower_firebreak::queue::QueueError>> + Send {
        self.inner.purge_dead(before_ms, limit)
    }
}

/// A handle whose status store is [`SlowClaims`].
async fn meddled(
    name: &str,
    op_timeout: Duration,
    delay: Duration,
    lose_answers: bool,
) -> AmqpQueue<SlowClaims> {
    let store = RedisStatusStore::connect_with_timeout(REDIS, name, Duration::from_secs(5))
        .await
        .unwrap();
    AmqpQueue::builder()
        .name(name)
        .op_timeout(op_timeout)
        .connect(
            AMQP,
            SlowClaims {
                inner: store,
                delay,
                lose_answers,
            },
        )
        .await
        .unwrap()
}

/// A replayer can find a submit's copy before its claim has landed (the
/// copy goes first); it puts the copy back and looks again. It must go on
/// looking for as long as the claim may land (the submitter's
/// `op_timeout`, carried by the copy), or a claim that lands later makes a
/// 202 for a job whose only copy was dropped. Here the claim lands 1.5 s
/// late, under a 3 s `op_timeout`; before, the copy was dropped after five
/// looks (about 1 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_that_lands_late_still_finds_its_copy() {
    let name = unique("lateclaim");
    let slow = meddled(
        &name,
        Duration::from_secs(3),
        Duration::from_millis(1500),
        false,
    )
    .await;
    let replayer = connect(AMQP, &name, Duration::from_secs(5)).await;
    let looking = tokio::spawn(async move {
        let until = tokio::time::Instant::now() + Duration::from_secs(6);
        let mut got = Vec::new();
        while got.is_empty() && tokio::time::Instant::now() < until {
            got = replayer.lease(1, Duration::from_secs(30)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (replayer, got)
    });
    let id = slow
        .enqueue(Job::new(http::Method::POST, "/late".parse().unwrap()))
        .await
        .expect("the late claim landed within op_timeout");
    let (replayer, got) = looking.await.unwrap();
    assert_eq!(
        got.len(),
        1,
        "a 202'd job whose claim landed late was never leased"
    );
    assert_eq!(*got[0].lease.id(), id);
    replayer
        .ack(&got[0].lease, DeliveredResponse::default())
        .await
        .unwrap();
    cleanup(&name).await;
}

/// A claim that ran but whose answer was lost: the submit fails (503), and
/// is undone, so the job it stored is never delivered and its key is free
/// again: a retry with the key makes one new job, delivered once. Before,
/// the job was delivered after its 503, and the retry got `Existing`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_answer_is_lost_is_undone() {
    use tower_firebreak::queue::Enqueued;
    let name = unique("lostclaim");
    let lossy = meddled(&name, Duration::from_secs(2), Duration::ZERO, true).await;
    let q = connect(AMQP, &name, Duration::from_secs(5)).await;
    let job =
        || Job::new(http::Method::POST, "/lost".parse().unwrap()).with_idempotency_key("k-lost");
    assert!(lossy.submit(job()).await.is_err());

    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < until {
        let got = q.lease(10, Duration::from_secs(30)).await.unwrap();
        assert!(got.is_empty(), "a job whose submit failed was leased");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let again = q.submit(job()).await.unwrap();
    assert!(matches!(again, Enqueued::Created(_)), "{again:?}");
    let got = q.lease(10, Duration::from_secs(30)).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(*got[0].lease.id(), again.id());
    q.ack(&got[0].lease, DeliveredResponse::default())
        .await
        .unwrap();
    cleanup(&name).await;
}

/// A delivered job's idempotency key is forgotten once its record has
/// expired (after retention): the key index held one entry per key ever
/// used, for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_index_forgets_keys_after_retention() {
    let name = unique("keyidx");
    let q = connect_with(AMQP, &name, |b| b.retention(Duration::from_millis(100))).await;
    let deliver = async |key: &str| {
        q.enqueue(Job::new(http::Method::POST, "/k".parse().unwrap()).with_idempotency_key(key))
            .await
            .unwrap();
        let leased = q.lease(1, Duration::from_secs(30)).await.unwrap();
        q.ack(&leased[0].lease, DeliveredResponse::default())
            .await
            .unwrap();
    };
    let index = || -> Vec<String> {
        let mut c = redis::Client::open(REDIS)
            .unwrap()
            .get_connection()
            .unwrap();
        redis::cmd("HKEYS")
            .arg(format!("fba:{{{name}}}:i"))
            .query(&mut c)
            .unwrap()
    };
    deliver("k-1").await;
    assert_eq!(index(), ["k-1"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    deliver("k-2").await;
    assert_eq!(index(), ["k-2"], "the expired job's key is still indexed");
    cleanup(&name).await;
}

/// A job that does not decode for the handle that leases it (here written
/// by a handle set to protobuf, read by one set to JSON, as a deploy that
/// changes the format would) is dead-lettered as it is, with the reason,
/// and the jobs behind it are leased. Before, every lease failed on it.
#[cfg(feature = "prost")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_job_is_dead_lettered_and_the_rest_are_leased() {
    use tower_firebreak::queue::codec::Format;
    use tower_firebreak::queue::{Job, Queue};
    let name = unique("undecodable");
    let proto = connect_with(AMQP, &name, |b| b.format(Format::Protobuf)).await;
    let json = connect(AMQP, &name, Duration::from_secs(5)).await;
    let job = || Job::new(http::Method::POST, "/x".parse().unwrap());
    let bad = proto.enqueue(job()).await.unwrap();
    let good = json.enqueue(job()).await.unwrap();
    let mut leased = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while leased.is_empty() && tokio::time::Instant::now() < until {
        leased = json.lease(10, Duration::from_secs(60)).await.unwrap();
    }
    let ids: Vec<_> = leased.iter().map(|l| *l.lease.id()).collect();
    assert_eq!(ids, [good]);
    crate::support::assert_dead_as_corrupt(&json, &bad).await;
    cleanup(&name).await;
}
