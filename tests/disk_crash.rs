//! Zero loss under SIGKILL: a child process enqueues through `DiskQueue`
//! from 16 concurrent producers and prints each id once `enqueue` has
//! returned; the parent kills it mid-stream with SIGKILL, reopens the file,
//! and finds every printed id. Twenty rounds.
//!
//! The child is this test binary run again with `FIREBREAK_CRASH_CHILD`
//! set, so `cargo test --test disk_crash` needs nothing else built.
#![cfg(all(feature = "disk", unix))]

use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tower_firebreak::queue::disk::DiskQueue;
use tower_firebreak::queue::{Job, JobId, JobStatus, Queue};

const CHILD_ENV: &str = "FIREBREAK_CRASH_CHILD";
const ROUNDS: usize = 20;

/// The child's entry point; a no-op in a normal test run.
#[test]
fn crash_child() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let queue = DiskQueue::open(&path).expect("child opens the queue");
        println!("READY");
        let producers: Vec<_> = (0..16)
            .map(|p| {
                let queue = queue.clone();
                tokio::spawn(async move {
                    for i in 0u64.. {
                        let job = Job::new(http::Method::POST, "/crash".parse().unwrap())
                            .with_body(format!("producer {p} job {i}"))
                            .with_idempotency_key(format!("{p}-{i}"));
                        let id = queue.enqueue(job).await.expect("enqueue");
                        // Printed only once the job is durable.
                        println!("ID {id}");
                    }
                })
            })
            .collect();
        for p in producers {
            p.await.unwrap();
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_job_survives_sigkill() {
    let exe = std::env::current_exe().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let started = tokio::time::Instant::now();
    let mut total = 0;
    for round in 0..ROUNDS {
        let path = dir.path().join(format!("crash-{round}.redb"));
        // Kill after a different number of acknowledged jobs each round.
        let kill_after = 5 + (round * 37) % 200;
        let ids = run_child(&exe, &path, kill_after).await;
        assert!(
            ids.len() >= kill_after,
            "round {round}: child printed too few ids"
        );

        let queue = DiskQueue::open(&path).unwrap_or_else(|e| panic!("round {round}: reopen: {e}"));
        for id in &ids {
            let status = queue.status(id).await.unwrap();
            assert_eq!(
                status,
                Some(JobStatus::Queued),
                "round {round}: job {id} lost"
            );
        }
        // Jobs committed after the last printed id may be there too; none
        // may be missing, and nothing else may be.
        assert!(queue.depth().await.unwrap() >= ids.len());
        total += ids.len();
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "crash test took too long"
        );
    }
    eprintln!("{ROUNDS} rounds, {total} acknowledged jobs, none lost");
}

/// Runs the child until it has printed `kill_after` ids, SIGKILLs it, and
/// returns every id it printed (including lines still in the pipe). A child
/// that stalls for 60 s fails the test and is killed.
async fn run_child(exe: &std::path::Path, path: &std::path::Path, kill_after: usize) -> Vec<JobId> {
    let mut child = tokio::process::Command::new(exe)
        .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let read = async {
        let mut ids = Vec::new();
        let mut killed = false;
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(id) = line.strip_prefix("ID ") {
                ids.push(id.parse::<JobId>().unwrap());
                if ids.len() == kill_after && !killed {
                    child.start_kill().unwrap(); // SIGKILL
                    killed = true;
                }
            }
        }
        (ids, killed)
    };
    let (ids, killed) = tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("the child stalled");
    assert!(killed, "child exited before it was killed");
    let status = child.wait().await.unwrap();
    assert!(!status.success());
    ids
}
