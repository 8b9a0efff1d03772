//! The queue's state machine held against a simple model: random sequences
//! of submit, lease, ack, nack, dead-letter, redrive and clock steps, with
//! every job's status, the depth and the dead letters compared after each
//! step. Run on `MemoryQueue`, and with fewer cases on `DiskQueue` (every
//! write there is an fsync).

use proptest::prelude::*;
use std::collections::HashMap;
use std::time::Duration;
use tower_firebreak::queue::memory::MemoryQueue;
use tower_firebreak::queue::{
    DeliveredResponse, Enqueued, Job, JobId, JobStatus, Lease, Queue, QueueError,
};

const CAPACITY: usize = 6;
const MAX_ATTEMPTS: u32 = 3;

#[derive(Clone, Debug)]
enum Op {
    Submit { key: Option<u8>, body: u8 },
    Lease { max: usize, visibility: u64 },
    Ack { pick: usize },
    Nack { pick: usize, delay: u64 },
    DeadLetter { pick: usize },
    Redrive { pick: usize },
    Advance { ms: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (proptest::option::of(0u8..4), 0u8..2).prop_map(|(key, body)| Op::Submit { key, body }),
        3 => (0usize..4, 1u64..40).prop_map(|(max, visibility)| Op::Lease { max, visibility }),
        2 => any::<usize>().prop_map(|pick| Op::Ack { pick }),
        2 => (any::<usize>(), 0u64..30).prop_map(|(pick, delay)| Op::Nack { pick, delay }),
        1 => any::<usize>().prop_map(|pick| Op::DeadLetter { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Redrive { pick }),
        2 => (1u64..50).prop_map(|ms| Op::Advance { ms }),
    ]
}

#[derive(Clone, Debug, PartialEq)]
enum State {
    Queued { visible_at: u64 },
    InFlight { expires: u64, lease: Lease },
    Delivered,
    Dead,
}

#[derive(Debug)]
struct MJob {
    id: JobId,
    body: u8,
    attempts: u32,
    state: State,
}

#[derive(Default, Debug)]
struct Model {
    now: u64,
    jobs: Vec<MJob>,
    keys: HashMap<u8, usize>,
}

impl Model {
    fn depth(&self) -> usize {
        self.jobs
            .iter()
            .filter(|j| matches!(j.state, State::Queued { .. } | State::InFlight { .. }))
            .count()
    }

    /// Where a job goes when it comes back (nack, expired lease).
    fn requeue(&mut self, i: usize, visible_at: u64) {
        let j = &mut self.jobs[i];
        j.state = if j.attempts >= MAX_ATTEMPTS {
            State::Dead
        } else {
            State::Queued { visible_at }
        };
    }

    fn holder(&self, lease: &Lease) -> Option<usize> {
        self.jobs
            .iter()
            .position(|j| matches!(&j.state, State::InFlight { lease: l, .. } if l == lease))
    }

    fn lease(&mut self, max: usize, visibility: u64) -> Vec<(JobId, u32)> {
        let now = self.now;
        for i in 0..self.jobs.len() {
            if matches!(self.jobs[i].state, State::InFlight { expires, .. } if expires <= now) {
                self.requeue(i, now);
            }
        }
        let mut due: Vec<(u64, JobId, usize)> = self
            .jobs
            .iter()
            .enumerate()
            .filter_map(|(i, j)| match j.state {
                State::Queued { visible_at } if visible_at <= now => Some((visible_at, j.id, i)),
                _ => None,
            })
            .collect();
        due.sort();
        let mut out = Vec::new();
        for (_, id, i) in due {
            if out.len() == max {
                break;
            }
            let j = &mut self.jobs[i];
            if j.attempts >= MAX_ATTEMPTS {
                j.state = State::Dead;
                continue;
            }
            j.attempts += 1;
            // The lease itself is filled in from the queue's answer.
            j.state = State::InFlight {
                expires: now + visibility,
                lease: Lease::new(id, ""),
            };
            out.push((id, j.attempts));
        }
        out
    }
}

fn job(body: u8, key: Option<u8>) -> Job {
    let job = Job::new(http::Method::POST, "/m".parse().unwrap()).with_body(vec![body]);
    match key {
        Some(k) => job.with_idempotency_key(format!("k{k}")),
        None => job,
    }
}

async fn run<Q: Queue>(q: Q, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut m = Model::default();
    let mut leases: Vec<Lease> = Vec::new();
    for op in ops {
        match op {
            Op::Submit { key, body } => {
                let got = q.submit(job(body, key)).await;
                match key.and_then(|k| m.keys.get(&k).copied()) {
                    Some(i) if m.jobs[i].body == body => {
                        prop_assert_eq!(got.unwrap(), Enqueued::Existing(m.jobs[i].id));
                    }
                    Some(i) => match got {
                        Err(QueueError::Conflict { existing, .. }) => {
                            prop_assert_eq!(existing, m.jobs[i].id)
                        }
                        other => prop_assert!(false, "expected Conflict, got {:?}", other),
                    },
                    None if m.depth() >= CAPACITY => {
                        prop_assert!(matches!(got, Err(QueueError::Full { .. })), "{:?}", got);
                    }
                    None => {
                        let Ok(Enqueued::Created(id)) = got else {
                            return Err(TestCaseError::fail(format!("expected Created: {got:?}")));
                        };
                        if let Some(k) = key {
                            m.keys.insert(k, m.jobs.len());
                        }
                        m.jobs.push(MJob {
                            id,
                            body,
                            attempts: 0,
                            state: State::Queued { visible_at: m.now },
                        });
                    }
                }
            }
            Op::Lease { max, visibility } => {
                let got = q
                    .lease(max, Duration::from_millis(visibility))
                    .await
                    .unwrap();
                let want = m.lease(max, visibility);
                let got_ids: Vec<(JobId, u32)> = got
                    .iter()
                    .map(|l| (*l.lease.id(), l.job.attempts()))
                    .collect();
                prop_assert_eq!(&got_ids, &want);
                for l in got {
                    let i = m.jobs.iter().position(|j| j.id == *l.lease.id()).unwrap();
                    if let State::InFlight { lease, .. } = &mut m.jobs[i].state {
                        *lease = l.lease.clone();
                    }
                    leases.push(l.lease);
                }
            }
            Op::Ack { pick } | Op::Nack { pick, .. } | Op::DeadLetter { pick } => {
                if leases.is_empty() {
                    continue;
                }
                let lease = leases[pick % leases.len()].clone();
                let got = match op {
                    Op::Ack { .. } => q.ack(&lease, DeliveredResponse::default()).await,
                    Op::Nack { delay, .. } => q.nack(&lease, Duration::from_millis(delay)).await,
                    _ => q.dead_letter(&lease, "test").await,
                };
                // A lease counts until the job is leased again: its expiry
                // is only acted on by the next lease call.
                match m.holder(&lease) {
                    Some(i) => {
                        prop_assert!(got.is_ok(), "{:?}", got);
                        match op {
                            Op::Ack { .. } => m.jobs[i].state = State::Delivered,
                            Op::Nack { delay, .. } => m.requeue(i, m.now + delay),
                            _ => m.jobs[i].state = State::Dead,
                        }
                    }
                    None => {
                        prop_assert!(
                            matches!(got, Err(QueueError::LeaseLost { .. })),
                            "{:?}",
                            got
                        )
                    }
                }
            }
            Op::Redrive { pick } => {
                if m.jobs.is_empty() {
                    continue;
                }
                let i = pick % m.jobs.len();
                let got = q.redrive(&m.jobs[i].id).await;
                if m.jobs[i].state != State::Dead {
                    prop_assert!(!got.unwrap());
                } else if m.depth() >= CAPACITY {
                    prop_assert!(matches!(got, Err(QueueError::Full { .. })), "{:?}", got);
                } else {
                    prop_assert!(got.unwrap());
                    m.jobs[i].attempts = 0;
                    m.jobs[i].state = State::Queued { visible_at: m.now };
                }
            }
            Op::Advance { ms } => {
                tokio::time::advance(Duration::from_millis(ms)).await;
                m.now += ms;
            }
        }
        prop_assert_eq!(q.depth().await.unwrap(), m.depth());
        for j in &m.jobs {
            let status = q.status(&j.id).await.unwrap();
            let ok = match (&j.state, &status) {
                (State::Queued { .. }, Some(JobStatus::Queued)) => true,
                (State::InFlight { .. }, Some(JobStatus::InFlight)) => true,
                (State::Delivered, Some(JobStatus::Delivered { attempts, .. })) => {
                    *attempts == j.attempts
                }
                (State::Dead, Some(JobStatus::DeadLettered { attempts, .. })) => {
                    *attempts == j.attempts
                }
                _ => false,
            };
            prop_assert!(ok, "job {}: model {:?}, queue {:?}", j.id, j.state, status);
        }
        let dead = q.dead_letters(100).await.unwrap().len();
        prop_assert_eq!(
            dead,
            m.jobs.iter().filter(|j| j.state == State::Dead).count()
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn memory_queue_follows_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        let q = MemoryQueue::builder()
            .capacity(CAPACITY)
            .max_attempts(MAX_ATTEMPTS)
            .retention(Duration::from_secs(1_000_000))
            .build()
            .unwrap();
        paused_runtime().block_on(run(q, ops))?;
    }
}

#[cfg(feature = "disk")]
proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn disk_queue_follows_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let rt = paused_runtime();
        // Made inside the runtime, so that its clock is the paused one.
        let q = rt.block_on(async {
            tower_firebreak::queue::disk::DiskQueue::builder()
                .capacity(CAPACITY)
                .max_attempts(MAX_ATTEMPTS)
                .retention(Duration::from_secs(1_000_000))
                .open(dir.path().join("model.redb"))
                .unwrap()
        });
        rt.block_on(run(q, ops))?;
    }
}

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}
