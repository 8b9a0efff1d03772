//! [`DiskQueue`]: the embedded, durable queue on [redb].
//!
//! # Durability
//!
//! [`Queue::submit`] returns only after the job's write transaction has
//! been committed with `Durability::Immediate`, that is, fsynced. A process
//! killed at any moment after that, even with SIGKILL, finds the job when it
//! opens the file again (the crash test `tests/disk_crash.rs` checks this).
//!
//! # Group commit
//!
//! Every write runs on one dedicated writer thread. The thread takes
//! the first waiting request, then every other request that is already
//! waiting (up to [`max_batch`](DiskQueueBuilder::max_batch)); when recent
//! batches were larger, it waits up to [`linger`](DiskQueueBuilder::linger)
//! (1 ms) for the batch to fill again. It applies the whole batch in one
//! write transaction and commits once: one fsync for all of it. While one
//! commit syncs, the next batch gathers, so throughput grows with the
//! number of concurrent producers, and a lone producer never waits for a
//! batch to fill. Each request is answered (through a oneshot channel)
//! only after its batch is durable; if the commit fails, every request in
//! the batch fails and none of them is stored (but see "A full disk"
//! below for the one exception). An operation that writes nothing (a
//! `lease` that finds nothing due) is not committed and costs no fsync.
//!
//! Reads (`status`, `oldest_age`, `dead_letters`) run in a read transaction
//! on tokio's blocking pool: they see every committed batch and never wait
//! for one. `depth` is kept in memory by the writer. Only
//! [`DiskQueue::compact`], and the writer opening the file again after an
//! I/O error (below), make reads and writes wait.
//!
//! No blocking I/O runs on the async caller: [`DiskQueue::open`] is the one
//! blocking call (it opens the file and recovers leases) and belongs at
//! startup, or in `spawn_blocking`.
//!
//! # One handle per file
//!
//! redb locks the file, so a file is open in one process, through one
//! [`DiskQueue`] (clone it to share it); a second `open` of the same file
//! fails with [`QueueError::AlreadyOpen`]. Because no other process can hold
//! a lease on the file, `open` returns every lease left by a previous
//! process to the queue at once (its attempt still counts), and expired
//! leases are recovered on every `lease` call. Dropping the last handle
//! waits for the writer thread to finish the batch it is committing.
//!
//! # A full disk, and other I/O errors
//!
//! A batch whose write or fsync fails (a full disk, a disk past the
//! process's file-size limit, an I/O error) fails every request in it with
//! [`QueueError::Unavailable`] naming the file and the cause. None of them
//! is stored, with the exception no storage can rule out: an fsync that
//! reports a failure after the data did reach the disk; a retry with the
//! same idempotency key then gets [`Enqueued::Existing`].
//!
//! redb then refuses every transaction on the handle, reads included,
//! until the file is opened again, which repairs it. So the writer closes
//! the file and opens it again: at once with the next batch, then, while
//! that does not help, no sooner than 1 s after the last attempt ended,
//! the pause doubling up to 30 s; it also tries on its own, with no batch
//! waiting, so that reads come back without a write. A repair reads the
//! whole file, and reads and writes wait for it. So the queue takes jobs,
//! and answers reads, again by itself once the disk has room: within 1 to
//! 30 s, with no restart. `tests/disk_full.rs` fills the disk with the
//! file-size limit and checks all of this (a write that fails as the file
//! grows; a fault inside the commit's writes is not injected).
//!
//! While the writer reopens the file, redb's lock on it is released for
//! that moment, and until the file could be opened if that fails. So on
//! Unix the handle also holds an `flock` on a lock file beside the queue
//! file (`<file>.lock`, created by `open` and never removed) for its whole
//! life: a second `open`, from this process or another, gets
//! [`QueueError::AlreadyOpen`] in that moment too.
//!
//! # Corruption
//!
//! A file that is not a redb database, is empty, or is truncated or
//! otherwise damaged gives [`QueueError::Corrupt`] naming the file, at
//! `open` or at the operation that meets the damage, never a panic. redb
//! itself panics on some truncated files; the queue catches that with
//! `catch_unwind`, so this holds with the default `panic = "unwind"` (with
//! `panic = "abort"` the process would abort), and redb's panic message
//! still reaches the panic hook.
//!
//! A single job record that does not decode, in a sound file (written by a
//! newer version, or by a build with the `prost` feature when this one has
//! none), is dead-lettered as it is when it is next due, with the reason
//! `corrupt job record: …` in its status; the jobs behind it go on, and the
//! dead-letter listing leaves it out.
//!
//! [redb]: https://docs.rs/redb

use super::clock::Clock;
use super::codec::{
    Format, JsonHeaderValue, b64_decode, b64_encode, headers_from_json, headers_to_json,
};
use super::state::{self, IdemRec, LeaseRec, Outcome, Read, Store};
use super::{
    DeadLetter, DeliveredResponse, Enqueued, Job, JobId, JobStatus, Lease, Leased, Policy, Queue,
    QueueError,
};
use crate::ConfigError;
use redb::{
    Database, DatabaseError, Durability, ReadOnlyTable, ReadTransaction, ReadableTable,
    ReadableTableMetadata, StorageError, Table, TableDefinition, TransactionError,
    WriteTransaction,
};
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::oneshot;

/// `io!(self, expr)`: a redb call whose error fails the batch.
macro_rules! io {
    ($s:ident, $e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return Err(record(&mut $s.failure, &$s.path, e)),
        }
    };
}

const JOBS: TableDefinition<'_, u128, &[u8]> = TableDefinition::new("jobs");
const READY: TableDefinition<'_, (u64, u128), ()> = TableDefinition::new("ready");
const LEASES: TableDefinition<'_, u128, (u64, u128)> = TableDefinition::new("leases");
const LEASE_EXPIRY: TableDefinition<'_, (u64, u128), ()> = TableDefinition::new("lease_expiry");
const OUTCOMES: TableDefinition<'_, u128, &[u8]> = TableDefinition::new("outcomes");
const PURGE: TableDefinition<'_, (u64, u128), ()> = TableDefinition::new("purge");
const DEAD: TableDefinition<'_, u128, &[u8]> = TableDefinition::new("dead");
const IDEM: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("idempotency");
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");

/// The layout of the tables above; a file with another layout is refused.
const SCHEMA: u64 = 1;

const TAG_JSON: u8 = b'J';
#[cfg(feature = "prost")]
const TAG_PROTOBUF: u8 = b'P';

/// An embedded, durable [`Queue`] in one file. See the [module docs](self).
///
/// ```
/// use tower_firebreak::queue::{disk::DiskQueue, Job, JobStatus, Queue};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// let queue = DiskQueue::builder()
///     .capacity(100_000)
///     .open(dir.path().join("deferred.redb"))?;
/// let id = queue.enqueue(Job::new(http::Method::POST, "/orders".parse()?)).await?;
/// assert_eq!(queue.status(&id).await?, Some(JobStatus::Queued));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct DiskQueue {
    inner: Arc<Inner>,
}

struct Inner {
    /// Shared by the writer's batches and the reads; taken exclusively by
    /// [`DiskQueue::compact`], and by the writer to open the file again
    /// after an I/O error (`None` until it could).
    db: Arc<RwLock<Option<Database>>>,
    path: Arc<Path>,
    policy: Policy,
    format: Format,
    clock: Clock,
    depth: Arc<AtomicU64>,
    sender: Option<mpsc::Sender<Work>>,
    writer: Option<JoinHandle<()>>,
    /// Dropped after the writer has been joined (see `Drop`).
    _lock: LockFile,
}

/// The lock file beside the queue file (`<file>.lock`), locked with
/// `flock` for the handle's whole life. redb locks the queue file too, but
/// lets go of it while the writer opens the file again after an I/O error;
/// a second process opening the file in that moment would get it, and hand
/// out this process's leases again. The lock file is never removed:
/// removing it would let two processes lock two different files.
#[derive(Debug)]
struct LockFile {
    #[cfg(unix)]
    _file: std::fs::File,
}

impl LockFile {
    fn path(queue: &Path) -> std::path::PathBuf {
        let mut name = queue.as_os_str().to_os_string();
        name.push(".lock");
        name.into()
    }

    #[cfg(unix)]
    fn acquire(queue: &Path) -> Result<LockFile, QueueError> {
        use rustix::fs::{FlockOperation, flock};
        let path = Self::path(queue);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| {
                QueueError::unavailable(format!(
                    "cannot open the queue's lock file {}: {e}",
                    path.display()
                ))
            })?;
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(LockFile { _file: file }),
            Err(rustix::io::Errno::WOULDBLOCK) => Err(QueueError::AlreadyOpen {
                path: queue.to_path_buf(),
            }),
            Err(e) => Err(QueueError::unavailable(format!(
                "cannot lock the queue's lock file {}: {e}",
                path.display()
            ))),
        }
    }

    /// Elsewhere redb's own lock is the only one.
    #[cfg(not(unix))]
    fn acquire(_queue: &Path) -> Result<LockFile, QueueError> {
        Ok(LockFile {})
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel stops the writer; joining it releases the
        // file lock before the drop returns, so the file can be opened again.
        self.sender.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl fmt::Debug for DiskQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiskQueue")
            .field("path", &self.inner.path)
            .field("policy", &self.inner.policy)
            .field("depth", &self.inner.depth.load(Ordering::Relaxed))
            .finish()
    }
}

/// Settings for a [`DiskQueue`]; [`open`](Self::open) checks them.
#[derive(Clone, Debug)]
pub struct DiskQueueBuilder {
    policy: Policy,
    max_batch: usize,
    linger: Duration,
    format: Format,
}

impl Default for DiskQueueBuilder {
    fn default() -> Self {
        DiskQueueBuilder {
            policy: Policy::default(),
            max_batch: DiskQueueBuilder::DEFAULT_MAX_BATCH,
            linger: DiskQueueBuilder::DEFAULT_LINGER,
            format: Format::Json,
        }
    }
}

impl DiskQueueBuilder {
    /// The default [`max_batch`](Self::max_batch).
    pub const DEFAULT_MAX_BATCH: usize = 1024;

    /// The default [`linger`](Self::linger).
    pub const DEFAULT_LINGER: Duration = Duration::from_millis(1);

    /// The most unfinished (queued or in-flight) jobs the file holds; one
    /// more is refused with [`QueueError::Full`]. Default: 1,000,000.
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.policy.capacity = capacity;
        self
    }

    /// How many leases a job gets before it is dead-lettered. Default: 10.
    pub fn max_attempts(mut self, max_attempts: u32) -> Self {
        self.policy.max_attempts = max_attempts;
        self
    }

    /// How long a delivered job's status and response are kept. Default: 24 h.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.policy.retention = retention;
        self
    }

    /// How long a dead letter is kept before it is purged (with its
    /// idempotency key). Default: until it is redriven.
    pub fn dead_letter_retention(mut self, retention: Duration) -> Self {
        self.policy.dead_letter_retention = Some(retention);
        self
    }

    /// The most operations in one group commit. Default: 1024.
    pub fn max_batch(mut self, max_batch: usize) -> Self {
        self.max_batch = max_batch;
        self
    }

    /// How long the writer may hold a batch open for more requests, when
    /// recent batches were larger than the one it has. Default: 1 ms; zero
    /// commits whatever is waiting at once. A lone producer never waits: its
    /// batches hold one request, so the writer expects no more.
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// The envelope format for jobs written from now on. Jobs already in the
    /// file keep theirs; both are read. Default: [`Format::Json`].
    pub fn format(mut self, format: Format) -> Self {
        self.format = format;
        self
    }

    /// Opens (or creates) the queue file at `path`. This blocks: it opens
    /// the file, checks its layout, and returns leftover leases to the queue.
    ///
    /// # Errors
    ///
    /// [`QueueError::Corrupt`] for a file that is not a queue or is
    /// damaged, [`QueueError::AlreadyOpen`] when the file is open elsewhere,
    /// [`QueueError::Unavailable`] for an I/O error, and
    /// [`QueueError::Config`] for bad settings.
    pub fn open(self, path: impl AsRef<Path>) -> Result<DiskQueue, QueueError> {
        self.policy.validate()?;
        if self.max_batch == 0 {
            return Err(ConfigError::new("max_batch", self.max_batch, "must be above zero").into());
        }
        let path: Arc<Path> = path.as_ref().into();
        if std::fs::metadata(&path).is_ok_and(|m| m.is_file() && m.len() == 0) {
            // redb would silently start a new database in an empty file; a
            // queue file is never empty once it has been opened, so an empty
            // one has been truncated, and its jobs are lost.
            return Err(QueueError::corrupt(
                path.to_path_buf(),
                "the file is empty (truncated?); remove it to start a new queue",
            ));
        }
        // Before redb's own lock: that one is let go while the writer opens
        // the file again after an I/O error, this one never is.
        let lock = LockFile::acquire(&path)?;
        let db = guard(&path, || {
            Database::builder()
                .create(&path)
                .map_err(|e| open_error(&path, e))
        })?;
        let clock = Clock::new();
        let depth = guard(&path, || {
            init(&db, &path, self.format, &self.policy, clock.now_ms())
        })?;
        let depth = Arc::new(AtomicU64::new(depth));
        let db = Arc::new(RwLock::new(Some(db)));
        let (sender, receiver) = mpsc::channel();
        let writer = Writer {
            db: db.clone(),
            suspect: Cell::new(false),
            reopen_at: Cell::new(None),
            reopen_wait: Cell::new(REOPEN_WAIT),
            path: path.clone(),
            format: self.format,
            max_batch: self.max_batch,
            linger: self.linger,
            depth: depth.clone(),
        };
        let writer = std::thread::Builder::new()
            .name("firebreak-queue-writer".into())
            .spawn(move || writer.run(receiver))
            .map_err(|e| QueueError::unavailable(format!("cannot start the writer thread: {e}")))?;
        Ok(DiskQueue {
            inner: Arc::new(Inner {
                db,
                path,
                policy: self.policy,
                format: self.format,
                clock,
                depth,
                sender: Some(sender),
                writer: Some(writer),
                _lock: lock,
            }),
        })
    }
}

impl DiskQueue {
    /// Opens (or creates) the queue file at `path` with the default
    /// settings. See [`DiskQueueBuilder::open`].
    pub fn open(path: impl AsRef<Path>) -> Result<DiskQueue, QueueError> {
        DiskQueueBuilder::default().open(path)
    }

    /// Settings for a queue.
    pub fn builder() -> DiskQueueBuilder {
        DiskQueueBuilder::default()
    }

    /// The queue file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Gives the file's free space back to the filesystem, and returns how
    /// many bytes the file shrank by.
    ///
    /// The file grows to hold the most jobs it has held at once (after an
    /// outage, the whole backlog) and redb reuses the freed pages, but it
    /// never shrinks by itself. This rewrites it compactly (redb's
    /// [`compact`](redb::Database::compact), with two-phase commits: a crash
    /// meanwhile leaves the last committed state, which the next
    /// [`open`](Self::open) repairs, however long that takes for a large
    /// file). Every job is kept.
    ///
    /// It needs the file to itself, so every write and read waits until it
    /// is done (it runs on the blocking pool; callers are not blocked,
    /// they wait): run it when the queue is quiet, for instance after a
    /// backlog has drained, on a schedule of your own.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), tower_firebreak::queue::QueueError> {
    /// use tower_firebreak::queue::Queue;
    /// use tower_firebreak::queue::disk::DiskQueue;
    ///
    /// let queue = DiskQueue::open("jobs.redb")?;
    /// if queue.depth().await? == 0 {
    ///     let freed = queue.compact().await?;
    ///     println!("the queue file shrank by {freed} bytes");
    /// }
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// [`QueueError::Unavailable`] for an I/O error, [`QueueError::Corrupt`]
    /// for a damaged file; the jobs are as they were.
    pub async fn compact(&self) -> Result<u64, QueueError> {
        let (db, path) = (self.inner.db.clone(), self.inner.path.clone());
        tokio::task::spawn_blocking(move || {
            let size = || {
                std::fs::metadata(&path)
                    .map(|m| m.len())
                    .map_err(|e| Failure::of(&path, e.into()).to_error())
            };
            let mut db = db.write().unwrap_or_else(|e| e.into_inner());
            let db = db.as_mut().ok_or_else(|| closed(&path).to_error())?;
            let before = size()?;
            guard(&path.clone(), || {
                // With the lock held, no transaction is open, and the queue
                // makes no savepoints: only storage errors are left.
                db.compact().map_err(|e| match e {
                    redb::CompactionError::Storage(e) => Failure::of(&path, e.into()).to_error(),
                    other => QueueError::unavailable(format!(
                        "{}: cannot compact: {other}",
                        path.display()
                    )),
                })
            })?;
            Ok(before.saturating_sub(size()?))
        })
        .await
        .map_err(|e| QueueError::unavailable(format!("queue compaction task failed: {e}")))?
    }

    /// Runs `op` on the writer thread, in the next group commit, and returns
    /// its result once that commit is durable.
    async fn call<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut DiskStore<'_>, &Policy, u64) -> Result<T, QueueError> + Send + 'static,
    ) -> Result<T, QueueError> {
        self.call_at(self.inner.clock.now_ms(), op).await
    }

    /// Runs `op` in a read transaction on the blocking pool: reads see
    /// every committed batch and never wait for one.
    async fn read<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut ReadStore) -> Result<T, QueueError> + Send + 'static,
    ) -> Result<T, QueueError> {
        let (db, path) = (self.inner.db.clone(), self.inner.path.clone());
        tokio::task::spawn_blocking(move || {
            let db = shared(&db);
            let db = db.as_ref().ok_or_else(|| closed(&path).to_error())?;
            guard(&path.clone(), || {
                let txn = db
                    .begin_read()
                    .map_err(|e| Failure::of(&path, e.into()).to_error())?;
                op(&mut ReadStore::open(&txn, path)?)
            })
        })
        .await
        .map_err(|e| QueueError::unavailable(format!("queue read task failed: {e}")))?
    }

    async fn call_at<T: Send + 'static>(
        &self,
        now: u64,
        op: impl FnOnce(&mut DiskStore<'_>, &Policy, u64) -> Result<T, QueueError> + Send + 'static,
    ) -> Result<T, QueueError> {
        let (tx, rx) = oneshot::channel();
        let policy = self.inner.policy;
        let work: Work = Box::new(move |store: Result<&mut DiskStore<'_>, &Failure>| {
            let result = match store {
                Ok(store) => op(store, &policy, now),
                Err(failure) => Err(failure.to_error()),
            };
            Box::new(move |failure: Option<&Failure>| {
                let _ = tx.send(match failure {
                    Some(f) => Err(f.to_error()),
                    None => result,
                });
            })
        });
        let stopped = || QueueError::unavailable("the queue's writer dropped the request");
        let sender = self.inner.sender.as_ref().ok_or_else(stopped)?;
        sender.send(work).map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

impl Queue for DiskQueue {
    async fn submit(&self, mut job: Job) -> Result<Enqueued, QueueError> {
        let id = JobId::new();
        let now = self.inner.clock.now_ms();
        // Stamp, hash and encode here, on the caller's task, so that the one
        // writer thread only writes.
        job.enqueued_at_ms = now;
        job.attempts = 0;
        let fingerprint = job.fingerprint();
        let encoded = encode_job(self.inner.format, &job);
        let key = job.idempotency_key.take();
        drop(job);
        self.call_at(now, move |s, p, now| {
            state::submit(s, p, id, key.as_deref(), fingerprint, encoded, now)
        })
        .await
    }

    async fn lease(&self, max: usize, visibility: Duration) -> Result<Vec<Leased>, QueueError> {
        self.call(move |s, p, now| state::lease(s, p, now, max, visibility))
            .await
    }

    async fn ack(&self, lease: &Lease, response: DeliveredResponse) -> Result<(), QueueError> {
        let lease = lease.clone();
        self.call(move |s, p, now| state::ack(s, p, now, &lease, response))
            .await
    }

    async fn nack(&self, lease: &Lease, delay: Duration) -> Result<(), QueueError> {
        let lease = lease.clone();
        self.call(move |s, p, now| state::nack(s, p, now, &lease, delay))
            .await
    }

    async fn dead_letter(&self, lease: &Lease, reason: &str) -> Result<(), QueueError> {
        let (lease, reason) = (lease.clone(), reason.to_owned());
        self.call(move |s, p, now| state::dead_letter(s, p, now, &lease, &reason))
            .await
    }

    async fn status(&self, id: &JobId) -> Result<Option<JobStatus>, QueueError> {
        let id = *id;
        self.read(move |s| state::status(s, &id)).await
    }

    async fn depth(&self) -> Result<usize, QueueError> {
        // Kept by the writer after each commit: no round trip.
        Ok(self.inner.depth.load(Ordering::Acquire) as usize)
    }

    async fn oldest_age(&self) -> Result<Option<Duration>, QueueError> {
        let now = self.inner.clock.now_ms();
        self.read(move |s| state::oldest_age(s, now)).await
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        self.read(move |s| state::dead_letters(s, limit)).await
    }

    async fn dead_letter_count(&self) -> Result<usize, QueueError> {
        self.read(state::dead_count).await
    }

    async fn redrive(&self, id: &JobId) -> Result<bool, QueueError> {
        let id = *id;
        self.call(move |s, p, now| state::redrive(s, p, now, &id))
            .await
    }
}

/// One operation for the writer thread. It runs inside the batch's write
/// transaction and returns what to do once the commit has succeeded or
/// failed.
type Work = Box<dyn FnOnce(Result<&mut DiskStore<'_>, &Failure>) -> Reply + Send>;
type Reply = Box<dyn FnOnce(Option<&Failure>)>;

/// Why a batch was not committed; every request in it gets this error.
#[derive(Clone, Debug)]
struct Failure {
    path: Arc<Path>,
    corrupt: bool,
    message: String,
}

impl Failure {
    fn to_error(&self) -> QueueError {
        if self.corrupt {
            QueueError::corrupt(self.path.to_path_buf(), self.message.clone())
        } else {
            QueueError::unavailable(format!("{}: {}", self.path.display(), self.message))
        }
    }

    fn panicked(path: &Arc<Path>) -> Failure {
        Failure {
            path: path.clone(),
            corrupt: true,
            message: "the storage engine panicked reading the file".into(),
        }
    }

    fn of(path: &Arc<Path>, e: redb::Error) -> Failure {
        Failure {
            path: path.clone(),
            corrupt: match &e {
                redb::Error::Corrupted(_) => true,
                redb::Error::Io(io) => is_damage(io),
                _ => false,
            },
            message: e.to_string(),
        }
    }
}

struct Writer {
    db: Arc<RwLock<Option<Database>>>,
    /// A batch failed with an I/O error: until a transaction can begin
    /// again, the writer also tries on its own, so that reads recover
    /// without waiting for a write.
    suspect: Cell<bool>,
    /// No reopen before this instant (real time: this thread is outside
    /// the runtime).
    reopen_at: Cell<Option<tokio::time::Instant>>,
    /// The pause after the next reopen: doubles from [`REOPEN_WAIT`] to
    /// [`MAX_REOPEN_WAIT`] while reopens do not help, back to the start
    /// after a commit.
    reopen_wait: Cell<Duration>,
    path: Arc<Path>,
    format: Format,
    max_batch: usize,
    linger: Duration,
    depth: Arc<AtomicU64>,
}

impl Writer {
    fn run(self, receiver: mpsc::Receiver<Work>) {
        let mut batch = Vec::with_capacity(self.max_batch);
        // How many requests the recent batches held: the writer lingers for
        // a batch to grow this large again. Without it, the producers that
        // a commit releases trickle back one by one, and the first of them
        // gets a commit (and an fsync) of its own.
        let mut expected = 1usize;
        loop {
            let first = if self.suspect.get() {
                let now = tokio::time::Instant::now();
                let wait = self
                    .reopen_at
                    .get()
                    .map_or(REOPEN_WAIT, |at| at.saturating_duration_since(now))
                    .max(Duration::from_millis(10));
                match receiver.recv_timeout(wait) {
                    Ok(first) => first,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        // Reopen (when due) with no batch waiting.
                        if self.begin().is_ok() {
                            self.suspect.set(false);
                        }
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match receiver.recv() {
                    Ok(first) => first,
                    Err(_) => break,
                }
            };
            batch.push(first);
            self.gather(&receiver, &mut batch, expected);
            expected = batch.len().max(expected * 3 / 4).max(1);
            self.commit(&mut batch);
        }
    }

    /// Adds every waiting request to `batch`, then waits up to `linger` for
    /// it to reach `expected`.
    fn gather(&self, receiver: &mpsc::Receiver<Work>, batch: &mut Vec<Work>, expected: usize) {
        while batch.len() < self.max_batch {
            match receiver.try_recv() {
                Ok(work) => batch.push(work),
                Err(_) => break,
            }
        }
        let expected = expected.min(self.max_batch);
        if batch.len() >= expected || self.linger.is_zero() {
            return;
        }
        // An OS thread outside the runtime: tokio's Instant reads the real
        // clock here, even under paused time.
        let until = crate::later(tokio::time::Instant::now(), self.linger);
        while batch.len() < expected {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            match receiver.recv_timeout(left) {
                Ok(work) => batch.push(work),
                Err(_) => break,
            }
        }
    }

    /// Begins a batch's write transaction, under the shared lock.
    ///
    /// After an I/O error in a commit (a full disk, say) redb refuses every
    /// later transaction on the handle (`PreviousIo`) until the file is
    /// opened again, which repairs it. So the writer closes and opens it
    /// again here: at once the first time, then no sooner than
    /// [`REOPEN_WAIT`] after the last reopen ended, doubling up to
    /// [`MAX_REOPEN_WAIT`] while the error persists. Until then each batch
    /// fails with the error.
    fn begin(&self) -> Result<(RwLockReadGuard<'_, Option<Database>>, WriteTransaction), Failure> {
        loop {
            let db = shared(&self.db);
            let failure = match db.as_ref().map(Database::begin_write) {
                Some(Ok(txn)) => return Ok((db, txn)),
                Some(Err(TransactionError::Storage(StorageError::PreviousIo))) => reopening(
                    &self.path,
                    "an earlier write failed with an I/O error (a full disk?)",
                ),
                Some(Err(e)) => return Err(Failure::of(&self.path, e.into())),
                None => closed(&self.path),
            };
            drop(db);
            self.suspect.set(true);
            let due = self.reopen_at.get();
            if due.is_some_and(|at| tokio::time::Instant::now() < at) {
                return Err(failure);
            }
            let reopened = self.reopen();
            let wait = self.reopen_wait.get();
            self.reopen_at.set(Some(tokio::time::Instant::now() + wait));
            self.reopen_wait.set((wait * 2).min(MAX_REOPEN_WAIT));
            reopened?;
        }
    }

    /// Closes the file (releasing redb's lock on it, for the moment it
    /// takes) and opens it again: `open`, not `create`, so a file that has
    /// gone is an error rather than a new, empty queue.
    fn reopen(&self) -> Result<(), Failure> {
        let mut slot = self.db.write().unwrap_or_else(|e| e.into_inner());
        *slot = None;
        let db = catch_unwind(AssertUnwindSafe(|| Database::builder().open(&*self.path)))
            .map_err(|_| Failure::panicked(&self.path))?
            .map_err(|e| Failure::of(&self.path, e.into()))?;
        *slot = Some(db);
        tracing::warn!(path = %self.path.display(), "opened the queue file again after an I/O error");
        Ok(())
    }

    fn commit(&self, batch: &mut Vec<Work>) {
        let fail_all = |batch: &mut Vec<Work>, failure: &Failure| {
            tracing::error!(path = %self.path.display(), error = %failure.message, "queue write failed");
            for work in batch.drain(..) {
                work(Err(failure))(Some(failure));
            }
        };
        let (_db, mut txn) = match self.begin() {
            Ok(begun) => begun,
            Err(failure) => return fail_all(batch, &failure),
        };
        txn.set_durability(Durability::Immediate);
        let mut store = match catch_unwind(AssertUnwindSafe(|| {
            DiskStore::open(&txn, self.path.clone(), self.format)
        })) {
            Ok(Ok(store)) => store,
            Ok(Err(failure)) => return fail_all(batch, &failure),
            Err(_) => return fail_all(batch, &Failure::panicked(&self.path)),
        };
        // A panic inside redb (a damaged page) drops the rest of the batch;
        // their callers see the request dropped, and nothing is committed.
        let replies = catch_unwind(AssertUnwindSafe(|| {
            let replies = batch
                .drain(..)
                .map(|work| work(Ok(&mut store)))
                .collect::<Vec<Reply>>();
            // An error here is recorded in `store.failure`.
            let _ = store.flush();
            replies
        }));
        let (failure, dirty, depth) = (store.failure.take(), store.dirty, store.depth);
        drop(store);
        let Ok(replies) = replies else {
            tracing::error!(path = %self.path.display(), "queue storage panicked; batch dropped");
            drop(txn);
            return;
        };
        let failure = match failure {
            Some(f) => {
                // Dropped, not `abort()`ed: after an I/O error redb's abort
                // panics (its rollback asserts the storage is sound), while
                // its drop leaves the rollback to the reopen.
                drop(txn);
                Some(f)
            }
            None if dirty => txn
                .commit()
                .err()
                .map(|e| Failure::of(&self.path, e.into())),
            None => {
                drop(txn);
                None
            }
        };
        match &failure {
            None => {
                self.depth.store(depth, Ordering::Release);
                if dirty {
                    self.reopen_at.set(None);
                    self.reopen_wait.set(REOPEN_WAIT);
                }
            }
            Some(f) => {
                tracing::error!(path = %self.path.display(), error = %f.message, "queue commit failed");
                self.suspect.set(true);
            }
        }
        for reply in replies {
            reply(failure.as_ref());
        }
    }
}

/// The writer's first pause between reopens of the file after an I/O
/// error, and its last.
const REOPEN_WAIT: Duration = Duration::from_secs(1);
const MAX_REOPEN_WAIT: Duration = Duration::from_secs(30);

/// The database for a batch or a read. A panic that poisoned the lock
/// (inside redb, on a damaged file) was already turned into an error for
/// its caller; the database itself is what it was.
fn shared(db: &RwLock<Option<Database>>) -> RwLockReadGuard<'_, Option<Database>> {
    db.read().unwrap_or_else(|e| e.into_inner())
}

/// The file is closed: the writer could not open it again yet after an I/O
/// error.
fn closed(path: &Arc<Path>) -> Failure {
    reopening(path, "the file is closed after an I/O error")
}

/// An I/O error that the writer's reopen of the file should clear.
fn reopening(path: &Arc<Path>, what: &str) -> Failure {
    Failure {
        path: path.clone(),
        corrupt: false,
        message: format!("{what}; the queue's writer is opening the file again"),
    }
}

/// An I/O error that means the file is shorter or other than redb wrote it.
fn is_damage(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
    )
}

/// Wraps a call into redb so that a panic on a damaged file becomes an
/// error naming the file.
fn guard<T>(path: &Path, f: impl FnOnce() -> Result<T, QueueError>) -> Result<T, QueueError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| {
        Err(QueueError::corrupt(
            path.to_path_buf(),
            "the storage engine panicked reading the file",
        ))
    })
}

fn open_error(path: &Path, e: DatabaseError) -> QueueError {
    use redb::StorageError;
    match e {
        DatabaseError::DatabaseAlreadyOpen => QueueError::AlreadyOpen {
            path: path.to_path_buf(),
        },
        DatabaseError::Storage(StorageError::Corrupted(msg)) => {
            QueueError::corrupt(path.to_path_buf(), msg)
        }
        DatabaseError::Storage(StorageError::Io(io))
            if io.kind() == std::io::ErrorKind::InvalidData =>
        {
            QueueError::corrupt(path.to_path_buf(), "not a queue file (bad header)")
        }
        DatabaseError::Storage(StorageError::Io(io)) if is_damage(&io) => {
            QueueError::corrupt(path.to_path_buf(), format!("truncated: {io}"))
        }
        DatabaseError::UpgradeRequired(v) => QueueError::corrupt(
            path.to_path_buf(),
            format!("written in redb file format {v}, which this version cannot read"),
        ),
        other => QueueError::unavailable(format!("{}: {other}", path.display())),
    }
}

/// Creates the tables, checks the layout, and returns every leftover lease
/// to the queue. Returns the depth.
fn init(
    db: &Database,
    path: &Arc<Path>,
    format: Format,
    policy: &Policy,
    now: u64,
) -> Result<u64, QueueError> {
    let mut txn = db
        .begin_write()
        .map_err(|e| Failure::of(path, e.into()).to_error())?;
    txn.set_durability(Durability::Immediate);
    let depth = {
        let mut store = DiskStore::open(&txn, path.clone(), format).map_err(|f| f.to_error())?;
        let schema = store
            .meta
            .get("schema")
            .map_err(|e| Failure::of(path, e.into()).to_error())?
            .map(|v| v.value());
        match schema {
            Some(SCHEMA) => {}
            Some(other) => {
                return Err(QueueError::corrupt(
                    path.to_path_buf(),
                    format!("queue layout {other}, this version reads {SCHEMA}"),
                ));
            }
            None => {
                let empty = store
                    .jobs
                    .is_empty()
                    .map_err(|e| Failure::of(path, e.into()).to_error())?;
                if !empty {
                    return Err(QueueError::corrupt(
                        path.to_path_buf(),
                        "jobs without a layout version",
                    ));
                }
                store
                    .meta
                    .insert("schema", SCHEMA)
                    .map_err(|e| Failure::of(path, e.into()).to_error())?;
            }
        }
        // One process holds the file, so every lease in it belongs to a
        // process that is gone.
        let recovered = state::recover(&mut store, policy, now, u64::MAX)?;
        if recovered > 0 {
            tracing::info!(path = %path.display(), recovered, "returned leftover leases to the queue");
        }
        store.flush()?;
        if let Some(f) = store.failure.take() {
            return Err(f.to_error());
        }
        store.depth
    };
    txn.commit()
        .map_err(|e| Failure::of(path, e.into()).to_error())?;
    Ok(depth)
}

/// The tables of one write transaction.
struct DiskStore<'t> {
    jobs: Table<'t, u128, &'static [u8]>,
    ready: Table<'t, (u64, u128), ()>,
    leases: Table<'t, u128, (u64, u128)>,
    lease_expiry: Table<'t, (u64, u128), ()>,
    outcomes: Table<'t, u128, &'static [u8]>,
    purge: Table<'t, (u64, u128), ()>,
    dead: Table<'t, u128, &'static [u8]>,
    idem: Table<'t, &'static str, &'static [u8]>,
    meta: Table<'t, &'static str, u64>,
    depth: u64,
    depth_dirty: bool,
    dirty: bool,
    failure: Option<Failure>,
    path: Arc<Path>,
    format: Format,
}

impl<'t> DiskStore<'t> {
    fn open(txn: &'t WriteTransaction, path: Arc<Path>, format: Format) -> Result<Self, Failure> {
        let fail = |e: redb::TableError| Failure::of(&path, e.into());
        let meta = txn.open_table(META).map_err(fail)?;
        let depth = meta
            .get("depth")
            .map_err(|e| Failure::of(&path, e.into()))?
            .map_or(0, |v| v.value());
        Ok(DiskStore {
            jobs: txn.open_table(JOBS).map_err(fail)?,
            ready: txn.open_table(READY).map_err(fail)?,
            leases: txn.open_table(LEASES).map_err(fail)?,
            lease_expiry: txn.open_table(LEASE_EXPIRY).map_err(fail)?,
            outcomes: txn.open_table(OUTCOMES).map_err(fail)?,
            purge: txn.open_table(PURGE).map_err(fail)?,
            dead: txn.open_table(DEAD).map_err(fail)?,
            idem: txn.open_table(IDEM).map_err(fail)?,
            meta,
            depth,
            depth_dirty: false,
            dirty: false,
            failure: None,
            path,
            format,
        })
    }

    /// Writes what the batch's operations kept in memory: the depth.
    fn flush(&mut self) -> Result<(), QueueError> {
        if self.depth_dirty && self.failure.is_none() {
            io!(self, self.meta.insert("depth", self.depth));
            self.depth_dirty = false;
        }
        Ok(())
    }

    /// A record that does not decode: the file is damaged.
    fn corrupt(&mut self, what: &str, e: impl fmt::Display) -> QueueError {
        let failure = Failure {
            path: self.path.clone(),
            corrupt: true,
            message: format!("{what}: {e}"),
        };
        let err = failure.to_error();
        self.failure.get_or_insert(failure);
        err
    }
}

/// A job record: a format tag, then the envelope.
fn encode_job(format: Format, job: &Job) -> Vec<u8> {
    let tag = match format {
        Format::Json => TAG_JSON,
        #[cfg(feature = "prost")]
        Format::Protobuf => TAG_PROTOBUF,
    };
    let mut bytes = vec![tag];
    bytes.extend_from_slice(&format.encode(job));
    bytes
}

/// A dead letter's job for a listing; a record that does not decode (one
/// dead-lettered for that reason, whose status says why) is left out.
fn listed(id: u128, bytes: &[u8]) -> Option<Job> {
    decode_job(bytes)
        .inspect_err(|e| {
            tracing::warn!(target: "tower_firebreak", layer = "queue", job_id = %JobId::from_u128(id), error = %e, "dead letter does not decode; left out of the listing");
        })
        .ok()
}

/// Decodes a job record (format tag, envelope).
fn decode_job(bytes: &[u8]) -> Result<Job, String> {
    match bytes.split_first() {
        Some((&TAG_JSON, rest)) => Format::Json.decode(rest).map_err(|e| e.to_string()),
        #[cfg(feature = "prost")]
        Some((&TAG_PROTOBUF, rest)) => Format::Protobuf.decode(rest).map_err(|e| e.to_string()),
        Some((tag, _)) => Err(format!("unknown format tag {tag}")),
        None => Err("empty".into()),
    }
}

/// Records a storage error: the batch will not be committed.
fn record(
    failure: &mut Option<Failure>,
    path: &Arc<Path>,
    e: impl Into<redb::Error>,
) -> QueueError {
    let f = Failure::of(path, e.into());
    let err = f.to_error();
    failure.get_or_insert(f);
    err
}

fn due(
    table: &Table<'_, (u64, u128), ()>,
    now: u64,
    max: usize,
) -> Result<Vec<(u64, u128)>, redb::StorageError> {
    let mut out = Vec::new();
    for entry in table.range(..=(now, u128::MAX))?.take(max) {
        out.push(entry?.0.value());
    }
    Ok(out)
}

/// The tables that reads need, in a read-only transaction.
struct ReadStore {
    jobs: ReadOnlyTable<u128, &'static [u8]>,
    leases: ReadOnlyTable<u128, (u64, u128)>,
    outcomes: ReadOnlyTable<u128, &'static [u8]>,
    dead: ReadOnlyTable<u128, &'static [u8]>,
    path: Arc<Path>,
}

impl ReadStore {
    fn open(txn: &ReadTransaction, path: Arc<Path>) -> Result<ReadStore, QueueError> {
        let fail = |e: redb::TableError| Failure::of(&path, e.into()).to_error();
        Ok(ReadStore {
            jobs: txn.open_table(JOBS).map_err(fail)?,
            leases: txn.open_table(LEASES).map_err(fail)?,
            outcomes: txn.open_table(OUTCOMES).map_err(fail)?,
            dead: txn.open_table(DEAD).map_err(fail)?,
            path,
        })
    }

    fn err(&self, e: impl Into<redb::Error>) -> QueueError {
        Failure::of(&self.path, e.into()).to_error()
    }

    fn corrupt(&self, what: &str, e: impl fmt::Display) -> QueueError {
        QueueError::corrupt(self.path.to_path_buf(), format!("{what}: {e}"))
    }
}

impl Read for ReadStore {
    fn has_job(&mut self, id: u128) -> Result<bool, QueueError> {
        Ok(self.jobs.get(id).map_err(|e| self.err(e))?.is_some())
    }
    fn lease(&mut self, id: u128) -> Result<Option<LeaseRec>, QueueError> {
        let rec = self.leases.get(id).map_err(|e| self.err(e))?;
        Ok(rec.map(|g| {
            let (expires, token) = g.value();
            LeaseRec { expires, token }
        }))
    }
    fn outcome(&mut self, id: u128) -> Result<Option<Outcome>, QueueError> {
        let bytes = self.outcomes.get(id).map_err(|e| self.err(e))?;
        match bytes {
            None => Ok(None),
            Some(g) => decode_outcome(g.value())
                .map(Some)
                .map_err(|e| self.corrupt("outcome record", e)),
        }
    }
    fn oldest_job(&mut self) -> Result<Option<u64>, QueueError> {
        // A record that does not decode is skipped: its next lease
        // dead-letters it, and it must not hide the age of the rest.
        for entry in self.jobs.iter().map_err(|e| self.err(e))? {
            let (_, v) = entry.map_err(|e| self.err(e))?;
            if let Ok(j) = decode_job(v.value()) {
                return Ok(Some(j.enqueued_at_ms));
            }
        }
        Ok(None)
    }
    fn dead_count(&mut self) -> Result<usize, QueueError> {
        let n = self.dead.len().map_err(|e| self.err(e))?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }
    fn dead_list(&mut self, limit: usize) -> Result<Vec<(u128, Job)>, QueueError> {
        let mut out = Vec::new();
        for entry in self.dead.iter().map_err(|e| self.err(e))?.take(limit) {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            if let Some(job) = listed(k.value(), v.value()) {
                out.push((k.value(), job));
            }
        }
        Ok(out)
    }
}

/// The stored form of an [`Outcome`].
#[derive(Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum OutcomeRecord {
    Delivered {
        status: u16,
        #[serde(default)]
        headers: Vec<(String, JsonHeaderValue)>,
        #[serde(default)]
        body: String,
        attempts: u32,
        at: u64,
        #[serde(default)]
        key: Option<String>,
    },
    Dead {
        reason: String,
        attempts: u32,
        at: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        purge_at: Option<u64>,
    },
}

fn encode_outcome(o: &Outcome) -> Vec<u8> {
    let record = match o {
        Outcome::Delivered {
            status,
            headers,
            body,
            attempts,
            at,
            key,
        } => OutcomeRecord::Delivered {
            status: *status,
            headers: headers_to_json(headers),
            body: b64_encode(body),
            attempts: *attempts,
            at: *at,
            key: key.clone(),
        },
        Outcome::Dead {
            reason,
            attempts,
            at,
            purge_at,
        } => OutcomeRecord::Dead {
            reason: reason.clone(),
            attempts: *attempts,
            at: *at,
            purge_at: *purge_at,
        },
    };
    serde_json::to_vec(&record).expect("an outcome always serializes")
}

fn decode_outcome(bytes: &[u8]) -> Result<Outcome, String> {
    let record: OutcomeRecord = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    Ok(match record {
        OutcomeRecord::Delivered {
            status,
            headers,
            body,
            attempts,
            at,
            key,
        } => Outcome::Delivered {
            status,
            headers: headers_from_json(headers).map_err(|e| e.to_string())?,
            body: b64_decode(&body).map_err(|e| e.to_string())?,
            attempts,
            at,
            key,
        },
        OutcomeRecord::Dead {
            reason,
            attempts,
            at,
            purge_at,
        } => Outcome::Dead {
            reason,
            attempts,
            at,
            purge_at,
        },
    })
}

impl Store for DiskStore<'_> {
    type New = Vec<u8>;

    fn put_new(&mut self, id: u128, job: Vec<u8>) -> Result<(), QueueError> {
        self.dirty = true;
        io!(self, self.jobs.insert(id, job.as_slice()));
        Ok(())
    }
    fn job(&mut self, id: u128) -> Result<Option<Job>, QueueError> {
        self.job_checked(id)?
            .map(|r| r.map_err(|e| self.corrupt("job record", e)))
            .transpose()
    }
    fn job_checked(&mut self, id: u128) -> Result<Option<Result<Job, String>>, QueueError> {
        let bytes = io!(self, self.jobs.get(id)).map(|g| g.value().to_vec());
        Ok(bytes.map(|b| decode_job(&b)))
    }
    fn dead_job_checked(&mut self, id: u128) -> Result<Option<Result<Job, String>>, QueueError> {
        let bytes = io!(self, self.dead.get(id)).map(|g| g.value().to_vec());
        Ok(bytes.map(|b| decode_job(&b)))
    }
    fn quarantine(&mut self, id: u128) -> Result<(), QueueError> {
        self.dirty = true;
        let bytes = io!(self, self.jobs.remove(id)).map(|g| g.value().to_vec());
        if let Some(bytes) = bytes {
            io!(self, self.dead.insert(id, bytes.as_slice()));
        }
        Ok(())
    }
    fn put_job(&mut self, id: u128, job: &Job) -> Result<(), QueueError> {
        self.dirty = true;
        let bytes = encode_job(self.format, job);
        io!(self, self.jobs.insert(id, bytes.as_slice()));
        Ok(())
    }
    fn remove_job(&mut self, id: u128) -> Result<(), QueueError> {
        self.dirty = true;
        io!(self, self.jobs.remove(id));
        Ok(())
    }
    fn ready_insert(&mut self, at: u64, id: u128) -> Result<(), QueueError> {
        self.dirty = true;
        io!(self, self.ready.insert((at, id), ()));
        Ok(())
    }
    fn ready_remove(&mut self, at: u64, id: u128) -> Result<(), QueueError> {
        self.dirty = true;
        io!(self, self.ready.remove((at, id)));
        Ok(())
    }
    fn ready_due(&mut self, now: u64, max: usize) -> Result<Vec<(u64, u128)>, QueueError> {
        Ok(io!(self, due(&self.ready, now, max)))
    }
    fn lease_insert(&mut self, id: u128, rec: LeaseRec) -> Result<(), QueueError> {
        self.dirty = true;
        io!(self, self.leases.insert(id, (rec.expires, rec.token)));
        io!(self, self.lease_expiry.insert((rec.expires, id), ()));
        Ok(())
    }
    fn lease_remove(&mut self, id: u128, rec: LeaseRec) -> Result<(), QueueError> {
        self.dirty = true;
        io!(self, self.leases.remove(id));
        io!(self, self.lease_expiry.remove((rec.expires, id)));
        Ok(())
    }
    fn leases_expired(&mut self, now: u64, max: usize) -> Result<Vec<(u64, u128)>, QueueError> {
        Ok(io!(self, due(&self.lease_expiry, now, max)))
    }
    fn outcome_insert(&mut self, id: u128, outcome: &Outcome) -> Result<(), QueueError> {
        self.dirty = true;
        let bytes = encode_outcome(outcome);
        io!(self, self.outcomes.insert(id, bytes.as_slice()));
        Ok(())
    }
    fn outcome_remove(&mut self, id: u128) -> Result<(), QueueError> {
        self.dirty = true;
        io!(self, self.outcomes.remove(id));
        Ok(())
    }
    fn purge_insert(&mut self, at: u64, id: u128) -> Result<(), QueueError> {
        self.dirty = true;
        io!(self, self.purge.insert((at, id), ()));
        Ok(())
    }
    fn purge_remove(&mut self, at: u64, id: u128) -> Result<(), QueueError> {
        self.dirty = true;
        io!(self, self.purge.remove((at, id)));
        Ok(())
    }
    fn purge_due(&mut self, now: u64, max: usize) -> Result<Vec<(u64, u128)>, QueueError> {
        Ok(io!(self, due(&self.purge, now, max)))
    }
    fn dead_insert(&mut self, id: u128, job: &Job) -> Result<(), QueueError> {
        self.dirty = true;
        let bytes = encode_job(self.format, job);
        io!(self, self.dead.insert(id, bytes.as_slice()));
        Ok(())
    }
    fn dead_job(&mut self, id: u128) -> Result<Option<Job>, QueueError> {
        self.dead_job_checked(id)?
            .map(|r| r.map_err(|e| self.corrupt("job record", e)))
            .transpose()
    }
    fn dead_remove(&mut self, id: u128) -> Result<(), QueueError> {
        self.dirty = true;
        io!(self, self.dead.remove(id));
        Ok(())
    }
    fn idem(&mut self, key: &str) -> Result<Option<IdemRec>, QueueError> {
        let bytes = io!(self, self.idem.get(key)).map(|g| g.value().to_vec());
        match bytes {
            None => Ok(None),
            Some(b) if b.len() == 48 => {
                let id = u128::from_le_bytes(b[..16].try_into().expect("16 bytes"));
                let fingerprint = b[16..].try_into().expect("32 bytes");
                Ok(Some(IdemRec { id, fingerprint }))
            }
            Some(b) => Err(self.corrupt(
                "idempotency record",
                format_args!("{} bytes, expected 48", b.len()),
            )),
        }
    }
    fn idem_insert(&mut self, key: &str, rec: IdemRec) -> Result<(), QueueError> {
        self.dirty = true;
        let mut bytes = [0u8; 48];
        bytes[..16].copy_from_slice(&rec.id.to_le_bytes());
        bytes[16..].copy_from_slice(&rec.fingerprint);
        io!(self, self.idem.insert(key, bytes.as_slice()));
        Ok(())
    }
    fn idem_remove(&mut self, key: &str) -> Result<(), QueueError> {
        self.dirty = true;
        io!(self, self.idem.remove(key));
        Ok(())
    }
    fn depth(&mut self) -> Result<u64, QueueError> {
        Ok(self.depth)
    }
    fn set_depth(&mut self, depth: u64) -> Result<(), QueueError> {
        // Written once per batch, by `flush`.
        self.dirty = true;
        self.depth_dirty = true;
        self.depth = depth;
        Ok(())
    }
}

impl Read for DiskStore<'_> {
    fn has_job(&mut self, id: u128) -> Result<bool, QueueError> {
        Ok(io!(self, self.jobs.get(id)).is_some())
    }
    fn lease(&mut self, id: u128) -> Result<Option<LeaseRec>, QueueError> {
        Ok(io!(self, self.leases.get(id)).map(|g| {
            let (expires, token) = g.value();
            LeaseRec { expires, token }
        }))
    }
    fn outcome(&mut self, id: u128) -> Result<Option<Outcome>, QueueError> {
        let bytes = io!(self, self.outcomes.get(id)).map(|g| g.value().to_vec());
        match bytes {
            None => Ok(None),
            Some(b) => decode_outcome(&b)
                .map(Some)
                .map_err(|e| self.corrupt("outcome record", e)),
        }
    }
    fn oldest_job(&mut self) -> Result<Option<u64>, QueueError> {
        // Undecodable records are skipped, as in the read-only twin.
        for entry in io!(self, self.jobs.iter()) {
            let (_, v) = io!(self, entry);
            if let Ok(j) = decode_job(v.value()) {
                return Ok(Some(j.enqueued_at_ms));
            }
        }
        Ok(None)
    }
    fn dead_count(&mut self) -> Result<usize, QueueError> {
        let n = io!(self, self.dead.len());
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }
    fn dead_list(&mut self, limit: usize) -> Result<Vec<(u128, Job)>, QueueError> {
        let mut records = Vec::new();
        for entry in io!(self, self.dead.iter()).take(limit) {
            let (k, v) = io!(self, entry);
            records.push((k.value(), v.value().to_vec()));
        }
        Ok(records
            .into_iter()
            .filter_map(|(id, b)| Some((id, listed(id, &b)?)))
            .collect())
    }
}
