//! A full disk under `DiskQueue`: clear `Unavailable` errors while there is
//! no room, no accepted job lost, and recovery by itself, without a restart,
//! once there is room again.
//!
//! The disk fills by the process's file-size limit (`RLIMIT_FSIZE`): a
//! write past it fails with `EFBIG`, as one on a full filesystem fails with
//! `ENOSPC`, and needs no privileges or mounts. The limit is per process,
//! so this test has a binary of its own.
#![cfg(all(feature = "disk", target_os = "linux"))]

use rlimit::Resource;
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;
use tower_firebreak::queue::disk::DiskQueue;
use tower_firebreak::queue::{Job, JobStatus, Queue, QueueError};

/// `SIGXFSZ` on Linux (x86-64, arm64 and the rest but MIPS, SPARC, Alpha).
const SIGXFSZ: i32 = 25;

fn job(i: usize) -> Job {
    Job::new(http::Method::POST, format!("/full/{i}").parse().unwrap())
        .with_body(vec![b'x'; 4096])
        .with_idempotency_key(format!("full-{i}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_cleanly_and_the_queue_recovers_when_there_is_room() {
    // A write past the limit raises SIGXFSZ, which kills the process unless
    // handled; with a handler the write fails with EFBIG instead.
    let _xfsz = signal(SignalKind::from_raw(SIGXFSZ)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.redb");
    let q = DiskQueue::open(&path).unwrap();
    let (soft, hard) = rlimit::getrlimit(Resource::FSIZE).unwrap();
    let size = std::fs::metadata(&path).unwrap().len();
    rlimit::setrlimit(Resource::FSIZE, size + 512 * 1024, hard).unwrap();

    let mut accepted = Vec::new();
    let mut i = 0;
    let full = loop {
        assert!(i < 10_000, "the queue never filled the disk");
        match q.enqueue(job(i)).await {
            Ok(id) => accepted.push(id),
            Err(e) => break e,
        }
        i += 1;
    };
    eprintln!("full after {} jobs: {full}", accepted.len());
    assert!(
        matches!(full, QueueError::Unavailable { .. }),
        "a full disk gave {full:?}"
    );
    assert!(
        full.to_string().contains(&*path.to_string_lossy()),
        "the error does not name the file: {full}"
    );
    // Still full: still clear errors, and nothing stored.
    for k in 0..3 {
        let e = q.enqueue(job(20_000 + k)).await.unwrap_err();
        assert!(matches!(e, QueueError::Unavailable { .. }), "{e:?}");
    }
    // Room again. Reads come back within seconds with no write to prompt
    // it (the writer reopens the file on its own), and the queue takes
    // jobs again, with no restart.
    rlimit::setrlimit(Resource::FSIZE, soft, hard).unwrap();
    let since = Instant::now();
    loop {
        match q.status(&accepted[0]).await {
            Ok(status) => {
                assert_eq!(status, Some(JobStatus::Queued));
                break;
            }
            Err(e) if since.elapsed() < Duration::from_secs(5) => {
                assert!(matches!(e, QueueError::Unavailable { .. }), "{e:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("reads did not recover within 5 s of room returning: {e}"),
        }
    }
    eprintln!("reads back after {:?}", since.elapsed());
    let again = loop {
        match q.enqueue(job(30_000)).await {
            Ok(id) => break id,
            Err(e) if since.elapsed() < Duration::from_secs(5) => {
                eprintln!("not yet: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the queue did not recover within 5 s of room returning: {e}"),
        }
    };
    eprintln!("recovered after {:?}", since.elapsed());
    accepted.push(again);

    // Every accepted job is there, and nothing else; across a reopen too.
    assert_eq!(q.depth().await.unwrap(), accepted.len());
    for id in &accepted {
        assert_eq!(q.status(id).await.unwrap(), Some(JobStatus::Queued), "{id}");
    }

    // Full again, and this time the writer cannot open the file at all (it
    // was moved away): redb's lock went with the close, but the file is
    // still this handle's, and a second open, which would start a new
    // queue where the writer looks for its file, is refused.
    let size = std::fs::metadata(&path).unwrap().len();
    rlimit::setrlimit(Resource::FSIZE, size + 64 * 1024, hard).unwrap();
    let mut k = 40_000;
    while let Ok(id) = q.enqueue(job(k)).await {
        accepted.push(id);
        k += 1;
        assert!(k < 50_000, "the queue never filled the disk again");
    }
    let moved = dir.path().join("q.redb.moved");
    std::fs::rename(&path, &moved).unwrap();
    let since = Instant::now();
    loop {
        match q.status(&accepted[0]).await {
            Err(e) if e.to_string().contains("closed") => break,
            _ if since.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("the writer did not close the file: {other:?}"),
        }
    }
    match DiskQueue::open(&path) {
        Err(QueueError::AlreadyOpen { path: p }) => assert_eq!(p, path),
        Err(e) => panic!("a second open while the writer reopens the file gave {e:?}"),
        Ok(_) => panic!("a second open got the file while the writer was reopening it"),
    }
    assert!(!path.exists(), "the refused open made a file");
    std::fs::rename(&moved, &path).unwrap();
    rlimit::setrlimit(Resource::FSIZE, soft, hard).unwrap();

    drop(q);
    let q = DiskQueue::open(&path).unwrap();
    let leased = q
        .lease(accepted.len() + 10, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(leased.len(), accepted.len());
    for l in &leased {
        assert!(accepted.contains(l.lease.id()));
        assert_eq!(l.job.body().len(), 4096);
    }
}
