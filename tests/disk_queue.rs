//! DiskQueue behaviour beyond the conformance suite: persistence across
//! reopen, the file lock, and damaged files.
#![cfg(feature = "disk")]

use std::path::Path;
use std::time::Duration;
use tower_firebreak::queue::disk::DiskQueue;
use tower_firebreak::queue::{Enqueued, Job, JobStatus, Queue, QueueError};

fn job(i: usize) -> Job {
    Job::new(http::Method::POST, format!("/j/{i}").parse().unwrap())
        .with_body(vec![b'x'; 1024])
        .with_idempotency_key(format!("key-{i}"))
}

#[tokio::test]
async fn jobs_and_keys_survive_reopen_and_leases_are_returned() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.redb");
    let (a, b);
    {
        let q = DiskQueue::open(&path).unwrap();
        a = q.enqueue(job(1)).await.unwrap();
        b = q.enqueue(job(2)).await.unwrap();
        let l = q.lease(1, Duration::from_secs(3600)).await.unwrap();
        assert_eq!(l[0].lease.id(), &a);
        assert_eq!(q.status(&a).await.unwrap(), Some(JobStatus::InFlight));
    }
    let q = DiskQueue::open(&path).unwrap();
    assert_eq!(q.depth().await.unwrap(), 2);
    // The lease belonged to the previous process: returned at open.
    assert_eq!(q.status(&a).await.unwrap(), Some(JobStatus::Queued));
    assert_eq!(q.status(&b).await.unwrap(), Some(JobStatus::Queued));
    assert_eq!(q.submit(job(2)).await.unwrap(), Enqueued::Existing(b));
    let leased = q.lease(10, Duration::from_secs(60)).await.unwrap();
    assert_eq!(leased.len(), 2);
    let first = leased.iter().find(|l| l.lease.id() == &a).unwrap();
    assert_eq!(
        first.job.attempts(),
        2,
        "the interrupted attempt still counts"
    );
    assert_eq!(first.job.body().len(), 1024);
}

#[tokio::test]
async fn one_handle_per_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.redb");
    let q = DiskQueue::open(&path).unwrap();
    match DiskQueue::open(&path) {
        Err(QueueError::AlreadyOpen { path: p }) => assert_eq!(p, path),
        other => panic!("expected AlreadyOpen, got {other:?}"),
    }
    let clone = q.clone();
    drop(q);
    assert!(matches!(
        DiskQueue::open(&path),
        Err(QueueError::AlreadyOpen { .. })
    ));
    drop(clone);
    // The last handle's drop releases the file.
    DiskQueue::open(&path).unwrap();
}

fn assert_corrupt(path: &Path, result: Result<DiskQueue, QueueError>) {
    match result {
        Err(e @ QueueError::Corrupt { .. }) => {
            let QueueError::Corrupt { path: p, .. } = &e else {
                unreachable!()
            };
            assert_eq!(p, path);
            assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        }
        other => panic!("expected Corrupt for {}, got {other:?}", path.display()),
    }
}

#[test]
fn garbage_files_are_refused_with_their_name() {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in [
        ("short.redb", b"abc".to_vec()),
        ("text.redb", b"this is not a queue file\n".repeat(1000)),
        ("zeros.redb", vec![0u8; 64 * 1024]),
        (
            "noise.redb",
            (0..200_000u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect(),
        ),
        ("empty.redb", Vec::new()),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        assert_corrupt(&path, DiskQueue::open(&path));
    }
}

#[tokio::test]
async fn truncated_files_are_refused_or_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let original = dir.path().join("full.redb");
    {
        let q = DiskQueue::open(&original).unwrap();
        for i in 0..300 {
            q.enqueue(job(i)).await.unwrap();
        }
    }
    let bytes = std::fs::read(&original).unwrap();
    for cut in [
        10,
        100,
        512,
        4096,
        bytes.len() / 4,
        bytes.len() / 2,
        bytes.len() - 4096,
    ] {
        let path = dir.path().join(format!("cut-{cut}.redb"));
        std::fs::write(&path, &bytes[..cut]).unwrap();
        match DiskQueue::open(&path) {
            Err(QueueError::Corrupt { path: p, source }) => {
                eprintln!("cut at {cut} of {}: corrupt: {source}", bytes.len());
                assert_eq!(p, path);
            }
            Err(other) => panic!("cut at {cut}: expected Corrupt, got {other}"),
            Ok(q) => {
                eprintln!("cut at {cut} of {}: opened", bytes.len());
                // redb accepted the header; reading the lost pages must then
                // fail with an error, never panic nor show all 300 jobs.
                let leased = q.lease(1000, Duration::from_secs(60)).await;
                match leased {
                    Ok(jobs) => assert!(jobs.len() < 300, "cut at {cut}: no data lost?"),
                    Err(e) => assert!(
                        matches!(
                            e,
                            QueueError::Corrupt { .. } | QueueError::Unavailable { .. }
                        ),
                        "cut at {cut}: {e}"
                    ),
                }
            }
        }
    }
}

#[cfg(feature = "prost")]
#[tokio::test]
async fn formats_can_be_mixed_in_one_file() {
    use tower_firebreak::queue::codec::Format;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.redb");
    let a = {
        let q = DiskQueue::builder()
            .format(Format::Protobuf)
            .open(&path)
            .unwrap();
        q.enqueue(job(1)).await.unwrap()
    };
    let q = DiskQueue::open(&path).unwrap();
    let b = q.enqueue(job(2)).await.unwrap();
    let leased = q.lease(10, Duration::from_secs(60)).await.unwrap();
    let ids: Vec<_> = leased.iter().map(|l| *l.lease.id()).collect();
    assert_eq!(ids, [a, b]);
    assert!(leased.iter().all(|l| l.job.body().len() == 1024));
}

#[test]
fn bad_settings_are_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    for builder in [
        DiskQueue::builder().capacity(0),
        DiskQueue::builder().max_attempts(0),
        DiskQueue::builder().max_batch(0),
    ] {
        let err = builder.open(dir.path().join("q.redb")).unwrap_err();
        assert!(matches!(err, QueueError::Config(_)), "{err}");
    }
}

/// After a backlog has drained, `compact` gives the file's space back, and
/// keeps every job: those still queued, those submitted while it runs, and
/// the delivered ones' responses, across a reopen too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compact_shrinks_the_file_after_a_backlog_and_keeps_every_job() {
    use tower_firebreak::queue::DeliveredResponse;
    const BACKLOG: usize = 400;
    const LEFT: usize = 10;
    const DURING: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.redb");
    let q = DiskQueue::open(&path).unwrap();
    let big =
        |i: usize| {
            Job::new(http::Method::POST, format!("/b/{i}").parse().unwrap())
                .with_body(vec![(i % 251) as u8; 16 * 1024])
        };
    let mut submits = tokio::task::JoinSet::new();
    for i in 0..BACKLOG {
        let q = q.clone();
        submits.spawn(async move { (i, q.enqueue(big(i)).await.unwrap()) });
    }
    let backlog: std::collections::HashMap<_, _> = submits
        .join_all()
        .await
        .into_iter()
        .map(|(i, id)| (id, i))
        .collect();
    let delivered = q
        .lease(BACKLOG - LEFT, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(delivered.len(), BACKLOG - LEFT);
    for l in &delivered {
        let response = DeliveredResponse {
            status: 200,
            headers: http::HeaderMap::new(),
            body: "ok".into(),
        };
        q.ack(&l.lease, response).await.unwrap();
    }
    let before = std::fs::metadata(&path).unwrap().len();

    // On a quiet queue, the bytes freed are exactly the file's shrink.
    let freed = q.compact().await.unwrap();
    let after = std::fs::metadata(&path).unwrap().len();
    eprintln!("compact: {before} bytes -> {after} ({freed} freed)");
    assert!(
        after <= before / 4,
        "the file went from {before} to only {after} bytes"
    );
    assert_eq!(
        freed,
        before - after,
        "compact reported {freed} bytes freed, the file shrank by {}",
        before - after
    );

    // Submits while it compacts (again) wait for it, and are kept. (Their
    // own commits may shrink the file too, so the bytes freed are not
    // compared here.)
    let mut during = tokio::task::JoinSet::new();
    for i in 0..DURING {
        let q = q.clone();
        during.spawn(async move { q.enqueue(job(1000 + i)).await.unwrap() });
    }
    q.compact().await.unwrap();
    let during = during.join_all().await;
    assert_eq!(q.depth().await.unwrap(), LEFT + DURING);

    // Every job survives, across a reopen too.
    drop(q);
    let q = DiskQueue::open(&path).unwrap();
    let first = delivered[0].lease.id();
    match q.status(first).await.unwrap() {
        Some(JobStatus::Delivered { body, .. }) => assert_eq!(body, "ok"),
        other => panic!("a delivered job reads {other:?} after compaction"),
    }
    let rest = q.lease(1000, Duration::from_secs(60)).await.unwrap();
    assert_eq!(rest.len(), LEFT + DURING);
    for l in &rest {
        if let Some(&i) = backlog.get(l.lease.id()) {
            assert_eq!(l.job.body().len(), 16 * 1024);
            assert!(l.job.body().iter().all(|&b| b == (i % 251) as u8));
        } else {
            assert!(during.contains(l.lease.id()), "an unknown job {l:?}");
        }
    }
}

/// Rewrites job `id`'s record in the file at `path` (no handle open).
fn overwrite_job(path: &Path, id: &tower_firebreak::queue::JobId, bytes: &[u8]) {
    use redb::ReadableTable;
    const JOBS: redb::TableDefinition<'_, u128, &[u8]> = redb::TableDefinition::new("jobs");
    let db = redb::Database::open(path).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut jobs = txn.open_table(JOBS).unwrap();
        assert!(jobs.get(id.as_u128()).unwrap().is_some(), "no such record");
        jobs.insert(id.as_u128(), bytes).unwrap();
    }
    txn.commit().unwrap();
}

/// A job record that does not decode (here, a format tag no build knows,
/// as a newer version could write) is dead-lettered as it is, with the
/// reason: the jobs behind it are leased, a submit in the same write batch
/// is stored, and nothing else is lost. Before, every lease failed on it
/// for good, and so did the submits committed with each lease.
#[tokio::test]
async fn an_undecodable_job_record_is_dead_lettered_and_holds_nothing_up() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.redb");
    let (a, b, c);
    {
        let q = DiskQueue::open(&path).unwrap();
        a = q.enqueue(job(1)).await.unwrap();
        b = q.enqueue(job(2)).await.unwrap();
        // Leased (so due back to the queue at the next open), then bad.
        c = q.enqueue(job(3)).await.unwrap();
        let l = q.lease(3, Duration::from_secs(3600)).await.unwrap();
        for l in l.iter().filter(|l| l.lease.id() != &c) {
            q.nack(&l.lease, Duration::ZERO).await.unwrap();
        }
    }
    overwrite_job(&path, &a, b"X{\"from\":\"a newer version\"}");
    overwrite_job(&path, &c, b"");
    // The open returns every lease, and so dead-letters job 3 already.
    let q = DiskQueue::open(&path).unwrap();
    assert_eq!(q.depth().await.unwrap(), 2);
    // The age of the backlog skips the bad head record: job 2's.
    assert!(q.oldest_age().await.unwrap().is_some());
    let (leased, submitted) = tokio::join!(q.lease(10, Duration::from_secs(60)), q.submit(job(4)));
    let leased = leased.unwrap();
    assert!(matches!(submitted.unwrap(), Enqueued::Created(_)));
    let ids: Vec<_> = leased.iter().map(|l| *l.lease.id()).collect();
    assert!(ids.contains(&b), "{ids:?}");
    assert!(!ids.contains(&a) && !ids.contains(&c), "{ids:?}");
    for bad in [&a, &c] {
        match q.status(bad).await.unwrap() {
            Some(JobStatus::DeadLettered { reason, .. }) => {
                assert!(reason.contains("corrupt job record"), "{reason}");
            }
            other => panic!("{bad}: {other:?}"),
        }
    }
    assert_eq!(q.dead_letter_count().await.unwrap(), 2);
    // The listing leaves out what it cannot show, and still answers.
    assert!(q.dead_letters(10).await.unwrap().is_empty());
    // The job submitted alongside and job 2 are all that is left.
    assert_eq!(q.depth().await.unwrap(), 2);
    // Nothing to send again; the queue goes on.
    assert!(!q.redrive(&a).await.unwrap());
    q.enqueue(job(5)).await.unwrap();
}

/// Past its retention, a quarantined record is purged like any dead
/// letter, and the purge (which runs with every lease) does not fail.
#[tokio::test(start_paused = true)]
async fn a_quarantined_record_is_purged_after_its_retention() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.redb");
    let open = || {
        DiskQueue::builder()
            .dead_letter_retention(Duration::from_secs(60))
            .open(&path)
            .unwrap()
    };
    let a;
    {
        let q = open();
        a = q.enqueue(job(1)).await.unwrap();
    }
    overwrite_job(&path, &a, b"X{}");
    let q = open();
    assert!(
        q.lease(10, Duration::from_secs(60))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(matches!(
        q.status(&a).await.unwrap(),
        Some(JobStatus::DeadLettered { .. })
    ));
    tokio::time::advance(Duration::from_secs(61)).await;
    let b = q.enqueue(job(2)).await.unwrap();
    let leased = q.lease(10, Duration::from_secs(60)).await.unwrap();
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].lease.id(), &b);
    assert_eq!(q.status(&a).await.unwrap(), None);
    assert_eq!(q.dead_letter_count().await.unwrap(), 0);
}
