//! The key table of the keyed layers (breaker, bulkhead, the rate limiter's
//! wait-mode lines): 16 hash tables by
//! key hash, each behind its own `std::sync::Mutex`, so that calls of
//! different keys on different threads seldom wait for each other. The
//! hash is computed once per lookup: it picks the shard and finds the
//! entry (hashbrown's `HashTable`; std's `HashMap` would hash again).
//!
//! A lookup holds one shard's lock, never across an await. The breaker and
//! the bulkhead add and remove entries under a lock of their own (their
//! table's), taken before any shard and never while one is held, so that
//! `len` and the bound it checks change only under that lock; the rate
//! limiter's lines, which have no bound, come and go under the shard's lock
//! alone ([`upsert`](Sharded::upsert), [`remove_if`](Sharded::remove_if)).

use hashbrown::HashTable;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

/// How many shards a table has: `1 << SHARD_BITS`.
const SHARDS: usize = 1 << SHARD_BITS;
const SHARD_BITS: u32 = 4;

/// A shard's entries, each with its key's hash.
pub(crate) type Map<K, V> = HashTable<(u64, K, V)>;

/// One shard, on cache lines of its own: two threads locking two shards
/// must not fight over one line.
#[repr(align(128))]
struct Shard<K, V>(Mutex<Map<K, V>>);

/// A poisoned lock is taken as it is: a panic elsewhere while one was held
/// (in a key's `Hash` or `Eq`, say) leaves nothing half done that matters
/// to these tables.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// See the [module docs](self).
pub(crate) struct Sharded<K, V> {
    shards: Box<[Shard<K, V>]>,
    hasher: RandomState,
    /// Entries across the shards.
    len: AtomicUsize,
}

impl<K, V> Sharded<K, V> {
    pub(crate) fn new() -> Self {
        Sharded {
            shards: (0..SHARDS)
                .map(|_| Shard(Mutex::new(HashTable::new())))
                .collect(),
            hasher: RandomState::new(),
            len: AtomicUsize::new(0),
        }
    }

    /// Entries across the shards.
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::SeqCst)
    }

    /// Each shard in turn, locked.
    pub(crate) fn each_shard(&self, mut f: impl FnMut(&mut Map<K, V>)) {
        for shard in &self.shards {
            f(&mut lock(&shard.0));
        }
    }

    /// Keeps the entries for which `keep` answers `true`, shard by shard.
    pub(crate) fn retain(&self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        self.each_shard(|map| {
            let before = map.len();
            map.retain(|(_, k, v)| keep(k, v));
            self.len.fetch_sub(before - map.len(), Ordering::SeqCst);
        });
    }
}

impl<K: Hash + Eq, V> Sharded<K, V> {
    /// `key`'s hash, which the other methods take with the key.
    pub(crate) fn hash(&self, key: &K) -> u64 {
        self.hasher.hash_one(key)
    }

    fn shard(&self, hash: u64) -> &Mutex<Map<K, V>> {
        // Four bits from just under the top seven: hashbrown takes a
        // bucket from the low bits and a control byte from the top seven,
        // so the shard's bits leave both spread within a shard.
        #[allow(clippy::cast_possible_truncation)]
        let i = (hash >> (64 - 7 - SHARD_BITS)) as usize & (SHARDS - 1);
        &self.shards[i].0
    }

    /// `f` on `key`'s value, under its shard's lock; `None` when absent.
    pub(crate) fn with<R>(&self, hash: u64, key: &K, f: impl FnOnce(&mut V) -> R) -> Option<R> {
        lock(self.shard(hash))
            .find_mut(hash, |(h, k, _)| *h == hash && k == key)
            .map(|(_, _, v)| f(v))
    }

    /// Adds `key`, which the caller knows to be absent (it holds the lock
    /// under which entries are added).
    pub(crate) fn insert(&self, hash: u64, key: K, value: V) {
        lock(self.shard(hash)).insert_unique(hash, (hash, key, value), |(h, _, _)| *h);
        self.len.fetch_add(1, Ordering::SeqCst);
    }

    /// `f` on `key`'s value, made by `make` first if absent; all under the
    /// shard's lock (for a table whose entries come and go with their
    /// users, with no lock of its own).
    pub(crate) fn upsert<R>(
        &self,
        hash: u64,
        key: &K,
        make: impl FnOnce() -> V,
        f: impl FnOnce(&mut V) -> R,
    ) -> R
    where
        K: Clone,
    {
        let mut map = lock(self.shard(hash));
        let entry = map.entry(hash, |(h, k, _)| *h == hash && k == key, |(h, _, _)| *h);
        let mut entry = match entry {
            hashbrown::hash_table::Entry::Occupied(e) => e,
            hashbrown::hash_table::Entry::Vacant(e) => {
                self.len.fetch_add(1, Ordering::SeqCst);
                e.insert((hash, key.clone(), make()))
            }
        };
        f(&mut entry.get_mut().2)
    }

    /// Runs `f` on `key`'s value under its shard's lock, and removes the
    /// entry if `f` answers `true`.
    pub(crate) fn remove_if(&self, hash: u64, key: &K, f: impl FnOnce(&mut V) -> bool) {
        let mut map = lock(self.shard(hash));
        if let Ok(mut e) = map.find_entry(hash, |(h, k, _)| *h == hash && k == key)
            && f(&mut e.get_mut().2)
        {
            e.remove();
            self.len.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Removes `key`; whether it was there.
    pub(crate) fn remove(&self, hash: u64, key: &K) -> bool {
        let mut map = lock(self.shard(hash));
        match map.find_entry(hash, |(h, k, _)| *h == hash && k == key) {
            Ok(e) => {
                e.remove();
                self.len.fetch_sub(1, Ordering::SeqCst);
                true
            }
            Err(_) => false,
        }
    }
}
