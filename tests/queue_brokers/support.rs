//! What the broker tests share: the fleet driver, the outage driver and
//! broker processes of their own.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tower_firebreak::queue::{DeliveredResponse, Job, JobId, Queue, QueueError};

/// A name no other test (or earlier run) uses.
pub(crate) fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

/// A loopback port nothing listens on now.
pub(crate) fn spare_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind a spare port")
        .local_addr()
        .unwrap()
        .port()
}

/// A broker process this test started; killed when dropped.
pub(crate) struct Broker {
    child: Option<Child>,
    program: String,
    args: Vec<String>,
    pub(crate) port: u16,
}

impl Broker {
    pub(crate) fn start(program: &str, args: Vec<String>, port: u16) -> Broker {
        let mut b = Broker {
            child: None,
            program: program.to_owned(),
            args,
            port,
        };
        b.restart();
        b
    }

    /// Starts the process (again, with the same arguments) and waits until
    /// its port accepts connections.
    pub(crate) fn restart(&mut self) {
        assert!(self.child.is_none(), "broker already running");
        let child = Command::new(&self.program)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.program));
        self.child = Some(child);
        let mut waited = Duration::ZERO;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            waited += Duration::from_millis(20);
            assert!(
                waited < Duration::from_secs(15),
                "{} did not listen on port {} within 15 s",
                self.program,
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process (SIGKILL: no chance to flush anything more).
    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

fn job(i: usize) -> Job {
    Job::new(http::Method::POST, format!("/fleet/{i}").parse().unwrap())
        .with_body(format!("job {i}"))
        .with_idempotency_key(format!("key-{i}"))
}

/// Two handles (separate connections) share one queue: 1,000 jobs are
/// enqueued across both, while one lease/ack loop per handle drains it.
/// Every key must be acked exactly once, and both loops must do work.
pub(crate) async fn fleet<Q: Queue + Clone>(a: Q, b: Q) {
    const JOBS: usize = 1_000;
    let acked: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let per_worker: Arc<Mutex<[usize; 2]>> = Arc::default();

    let mut workers = Vec::new();
    for (w, q) in [a.clone(), b.clone()].into_iter().enumerate() {
        let acked = acked.clone();
        let per_worker = per_worker.clone();
        workers.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                if acked.lock().unwrap().len() >= JOBS {
                    return;
                }
                assert!(Instant::now() < deadline, "fleet did not drain in 120 s");
                let leased = q.lease(16, Duration::from_secs(60)).await.unwrap();
                if leased.is_empty() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                for l in leased {
                    let key = l.job.idempotency_key().unwrap().to_owned();
                    q.ack(
                        &l.lease,
                        DeliveredResponse {
                            status: 200,
                            ..Default::default()
                        },
                    )
                    .await
                    .unwrap();
                    *acked.lock().unwrap().entry(key).or_default() += 1;
                    per_worker.lock().unwrap()[w] += 1;
                }
            }
        }));
    }

    // Producers on both handles; every job is also resubmitted through the
    // other handle, which must find it rather than store it twice.
    let producers: Vec<_> = [(a.clone(), b.clone(), 0), (b.clone(), a.clone(), 1)]
        .into_iter()
        .map(|(q, other, parity)| {
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in (parity..JOBS).step_by(2) {
                    let id = q.enqueue(job(i)).await.unwrap();
                    assert_eq!(
                        other.enqueue(job(i)).await.unwrap(),
                        id,
                        "key-{i} stored twice"
                    );
                    ids.push(id);
                }
                ids
            })
        })
        .collect();
    let mut ids: Vec<JobId> = Vec::new();
    for p in producers {
        ids.extend(p.await.unwrap());
    }
    for w in workers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert_eq!(acked.len(), JOBS, "not every key was delivered");
    let twice: Vec<_> = acked.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "keys delivered more than once: {twice:?}");
    let split = *per_worker.lock().unwrap();
    assert!(
        split[0] >= JOBS / 10 && split[1] >= JOBS / 10,
        "work not split between the consumers: {split:?}"
    );
    eprintln!("fleet: consumers acked {split:?}");
    assert_eq!(a.depth().await.unwrap(), 0);
    assert_eq!(b.depth().await.unwrap(), 0);
}

/// What a producer saw across a broker outage.
#[derive(Debug, Default)]
pub(crate) struct OutageLog {
    pub(crate) acked: Vec<JobId>,
    pub(crate) errors: usize,
    pub(crate) slowest_error: Duration,
    pub(crate) other_errors: Vec<String>,
    /// The path of each job whose enqueue failed, with the error.
    pub(crate) failed: HashMap<String, String>,
}

/// Enqueues on `q` every few milliseconds until `stop` is set.
pub(crate) fn produce<Q: Queue + Clone>(
    q: Q,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<OutageLog> {
    tokio::spawn(async move {
        let mut log = OutageLog::default();
        let mut i = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let started = Instant::now();
            match q.enqueue(job(i)).await {
                Ok(id) => log.acked.push(id),
                Err(e @ QueueError::Unavailable { .. }) => {
                    log.failed.insert(format!("/fleet/{i}"), e.to_string());
                    log.errors += 1;
                    log.slowest_error = log.slowest_error.max(started.elapsed());
                }
                Err(e) => log.other_errors.push(e.to_string()),
            }
            i += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        log
    })
}

/// Runs a producer across a kill and restart of `broker`, then checks
/// that it saw fast errors while the broker was down, and that every job it
/// was told was stored is still there and leasable.
pub(crate) async fn outage<Q: Queue + Clone>(q: Q, broker: &mut Broker, bound: Duration) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = Arc::new(AtomicBool::new(false));
    let producer = produce(q.clone(), stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    broker.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    broker.restart();
    // Wait until the queue takes jobs again, then a little more.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(
            Instant::now() < deadline,
            "queue did not recover within 30 s of the restart"
        );
        if q.depth().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let log = producer.await.unwrap();
    eprintln!(
        "outage: {} acknowledged, {} unavailable (slowest {:?})",
        log.acked.len(),
        log.errors,
        log.slowest_error
    );
    assert!(
        log.other_errors.is_empty(),
        "unexpected errors: {:?}",
        log.other_errors
    );
    assert!(
        log.errors > 0,
        "no enqueue failed while the broker was down"
    );
    assert!(
        log.slowest_error <= bound,
        "an enqueue took {:?} to fail (bound {bound:?})",
        log.slowest_error
    );
    let acked: HashSet<JobId> = log.acked.iter().copied().collect();
    assert_eq!(acked.len(), log.acked.len());

    let mut leased = HashSet::new();
    let mut uris = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while leased.len() < acked.len() && Instant::now() < deadline {
        let batch = q.lease(100, Duration::from_secs(60)).await.unwrap();
        if batch.is_empty() {
            break;
        }
        for l in batch {
            leased.insert(*l.lease.id());
            uris.insert(*l.lease.id(), l.job.uri().to_string());
            q.ack(&l.lease, DeliveredResponse::default()).await.unwrap();
        }
    }
    let lost: Vec<_> = acked.difference(&leased).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged jobs lost: {lost:?}",
        lost.len()
    );
    let phantom: Vec<_> = leased
        .difference(&acked)
        .map(|id| (uris[id].clone(), log.failed.get(&uris[id]).cloned()))
        .collect();
    // A request in flight when the broker dies is ambiguous: the broker may
    // have stored it (and fsynced it) and died before answering. With one
    // sequential producer at most one request is in flight at the kill; any
    // other job stored without an acknowledgement is a bug.
    if !phantom.is_empty() {
        eprintln!("outage: stored though the enqueue failed (in flight at the kill): {phantom:?}");
    }
    assert!(
        phantom.len() <= 1 && phantom.iter().all(|(_, e)| e.is_some()),
        "jobs stored though their enqueue failed: {phantom:?}"
    );
}

/// A TCP proxy in front of a broker this test cannot stop: `cut` closes
/// every connection through it and stops listening, as a broker crash
/// looks to a client; `restore` listens again on the same port.
pub(crate) struct Proxy {
    pub(crate) port: u16,
    upstream: u16,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    pub(crate) async fn start(upstream: u16) -> Proxy {
        let mut p = Proxy {
            port: spare_port(),
            upstream,
            task: None,
        };
        p.restore().await;
        p
    }

    pub(crate) async fn restore(&mut self) {
        assert!(self.task.is_none(), "proxy already running");
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("bind the proxy port again");
        let upstream = self.upstream;
        self.task = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                conns.spawn(async move {
                    if let Ok(mut server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        }));
    }

    /// Dropping the accept task drops its `JoinSet`, which aborts every
    /// connection task and so closes both sides of each connection.
    pub(crate) async fn cut(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }
}
