use crate::support::{Broker, Stall, fleet, outage, spare_port, unique};
use std::time::Duration;
use tower_firebreak::queue::nats::NatsQueue;

const SHARED: &str = "nats://127.0.0.1:4222";

async fn connect(url: &str, name: &str, op_timeout: Duration) -> NatsQueue {
    NatsQueue::builder()
        .name(name)
        .op_timeout(op_timeout)
        .connect(url)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "NATS at {url} is unreachable ({e}); start it with JetStream (see shared/DESIGN.md)"
            )
        })
}

async fn cleanup(name: &str) {
    let js = async_nats::jetstream::new(async_nats::connect(SHARED).await.unwrap());
    for stream in [
        format!("FB_{name}"),
        format!("FB_{name}_DEAD"),
        format!("KV_fb_{name}_live"),
        format!("KV_fb_{name}_done"),
    ] {
        let _ = js.delete_stream(&stream).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_of_two_shares_one_queue() {
    let name = unique("fleet");
    let a = connect(SHARED, &name, Duration::from_secs(5)).await;
    let b = connect(SHARED, &name, Duration::from_secs(5)).await;
    fleet(a, b).await;
    cleanup(&name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_answers_503_fast_and_delivers_every_202() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = private_nats(dir.path());
    let url = format!("nats://127.0.0.1:{}", broker.port);
    let q = connect(&url, "outage", Duration::from_millis(300)).await;
    outage(q, &mut broker, Duration::from_secs(1), 1).await;
}

/// The server paused (SIGSTOP) rather than killed, so what a client writes
/// meanwhile is read when it resumes: no request sent during the stall and
/// answered 503 is delivered (`outage` allows the one in flight at the
/// stop), and every 202 is delivered once. (notes/fleet.md ran this by hand
/// once; this keeps it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_delivers_none_of_its_503s() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = private_nats(dir.path());
    let url = format!("nats://127.0.0.1:{}", broker.port);
    let q = connect(&url, "stall", Duration::from_millis(300)).await;
    outage(q, &mut Stall(&mut broker), Duration::from_secs(1), 1).await;
}

/// `Duration::MAX` as a nack delay or a visibility timeout ("not before a
/// long while") hides the job, where the server would refuse so large a
/// delay and redeliver at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_delay_of_duration_max_hides_the_job() {
    use tower_firebreak::queue::{Job, Queue};
    let name = unique("forever");
    let q = connect(SHARED, &name, Duration::from_secs(5)).await;
    q.enqueue(Job::new(http::Method::POST, "/x".parse().unwrap()))
        .await
        .unwrap();
    let leased = q.lease(1, Duration::MAX).await.unwrap();
    assert_eq!(leased.len(), 1);
    assert!(q.lease(1, Duration::from_secs(1)).await.unwrap().is_empty());
    q.nack(&leased[0].lease, Duration::MAX).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        q.lease(1, Duration::from_secs(1)).await.unwrap().is_empty(),
        "a job nacked for Duration::MAX came back at once"
    );
    cleanup(&name).await;
}

/// The delivery past `max_attempts` is the one that dead-letters a job. If
/// that delivery goes unanswered (its handle died, or its lease call timed
/// out after the fetch), the server delivers it again, and the job is still
/// dead-lettered: it never stays in flight for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_last_delivery_still_dead_letters_the_job() {
    use tower_firebreak::queue::{Job, JobStatus, Queue};
    let name = unique("lastdelivery");
    let q = NatsQueue::builder()
        .name(&name)
        .max_attempts(1)
        .ack_wait(Duration::from_secs(1))
        .connect(SHARED)
        .await
        .unwrap();
    let id = q
        .enqueue(Job::new(http::Method::POST, "/x".parse().unwrap()))
        .await
        .unwrap();
    // Attempt 1, whose lease runs out.
    assert_eq!(
        q.lease(1, Duration::from_millis(200)).await.unwrap().len(),
        1
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    // The next delivery is fetched by a handle that dies without answering.
    let js = async_nats::jetstream::new(async_nats::connect(SHARED).await.unwrap());
    let consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream(format!("FB_{name}"))
        .await
        .unwrap()
        .get_consumer("fb")
        .await
        .unwrap();
    let mut batch = consumer.fetch().max_messages(1).messages().await.unwrap();
    let lost = futures_util::StreamExt::next(&mut batch)
        .await
        .unwrap()
        .unwrap();
    drop(lost);
    // After ack_wait the server delivers it again; a lease buries it.
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match q.lease(1, Duration::from_secs(30)).await {
            Ok(leased) => assert!(leased.is_empty(), "a job past max_attempts was leased"),
            Err(e) => eprintln!("lease: {e}"),
        }
        if let Some(JobStatus::DeadLettered { .. }) = q.status(&id).await.unwrap() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "the job is still {:?}",
            q.status(&id).await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cleanup(&name).await;
}

/// A JetStream server of its own, storing in `dir`, for a test that stops
/// it.
fn private_nats(dir: &std::path::Path) -> Broker {
    let port = spare_port();
    let args = [
        "-a",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-js",
        "-sd",
        dir.to_str().unwrap(),
    ]
    .map(str::to_owned)
    .to_vec();
    Broker::start(nats_server(), args, port)
}

/// Debian installs the server in /usr/sbin, which is not on every PATH.
fn nats_server() -> &'static str {
    if std::path::Path::new("/usr/sbin/nats-server").exists() {
        "/usr/sbin/nats-server"
    } else {
        "nats-server"
    }
}
