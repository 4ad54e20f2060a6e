//! Connections kept between statements instead of going back to sqlx's pool.
//!
//! sqlx's pool checks every connection it is given back: it spawns a task that pings the
//! connection (on SQLite a round trip to the connection's thread, on PostgreSQL one to the
//! server) before anyone else may have it. A registration's read and its write each paid that
//! once more, and on SQLite the one writing connection was out of use until its ping came
//! back. `Kept` takes connections from the pool and, when a statement or transaction has
//! finished, keeps them for the next caller, who waits for a place in turn. A statement that
//! fails, or whose future is dropped, drops its connection instead, so the pool checks it as
//! before (and closes it if it broke). A connection kept for `HANDED_BACK_AFTER` goes back to
//! the pool too, when it is next used or when another caller finds it free, so that the pool's
//! own checks (its ping, the connections' maximum lifetime) still come round. Waiting for a
//! place times out like waiting for the pool (its acquire timeout).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::{Database, Transaction};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, SemaphorePermit};

/// How long a connection is kept before it goes back to the pool (and is checked there).
const HANDED_BACK_AFTER: Duration = Duration::from_secs(300);

/// A connection taken from the pool, and when.
type Taken<DB> = (PoolConnection<DB>, Instant);

/// A pool, the connections taken from it that are free, and the places: one per connection
/// the pool may open, taken by each lease and each transaction while it lasts, so that a
/// caller waits here (in turn) rather than for the pool, and whoever holds a place finds a
/// connection among the free ones or in the pool.
#[derive(Debug)]
pub(super) struct Kept<DB: Database> {
    pool: sqlx::Pool<DB>,
    free: Mutex<Vec<Taken<DB>>>,
    places: Arc<Semaphore>,
    handed_back_after: Duration,
}

/// A connection taken for a statement or a transaction: [`Lease::keep`] keeps it for the
/// next; dropped, it goes back to the pool.
pub(super) struct Lease<'a, DB: Database> {
    connection: PoolConnection<DB>,
    taken: Instant,
    kept: &'a Kept<DB>,
    _place: SemaphorePermit<'a>,
}

/// A transaction's place among the connections, held until it ends.
pub(super) type Place = OwnedSemaphorePermit;

impl<DB: Database> Kept<DB> {
    /// Keeps connections of `pool`: a place for each it may open.
    pub(super) fn new(pool: sqlx::Pool<DB>) -> Self {
        let size = pool.options().get_max_connections() as usize;
        Self {
            pool,
            free: Mutex::new(Vec::new()),
            places: Arc::new(Semaphore::new(size)),
            handed_back_after: HANDED_BACK_AFTER,
        }
    }

    /// A free kept connection, or one from the pool.
    pub(super) async fn lease(&self) -> Result<Lease<'_, DB>, sqlx::Error> {
        let place = self.in_time(self.places.acquire()).await?;
        let free = self.free_connection();
        let (connection, taken) = match free {
            Some(free) => free,
            None => (self.pool.acquire().await?, Instant::now()),
        };
        Ok(Lease {
            connection,
            taken,
            kept: self,
            _place: place,
        })
    }

    /// A transaction on a connection of the pool's, which goes back to the pool when the
    /// transaction ends, and its place. One free connection is given back to the pool first:
    /// with every connection the pool may open kept, it has one to give.
    pub(super) async fn begin(&self) -> Result<(Transaction<'static, DB>, Place), sqlx::Error> {
        let place = self.in_time(self.places.clone().acquire_owned()).await?;
        let given_back = self.free_connection();
        drop(given_back);
        Ok((self.pool.begin().await?, place))
    }

    /// Closes the pool, with the connections kept from it; leases fail from then on.
    #[cfg(test)]
    pub(super) async fn close(&self) {
        self.places.close();
        let kept = std::mem::take(&mut *self.free());
        drop(kept);
        self.pool.close().await;
    }

    /// A place, waited for no longer than the pool's acquire timeout.
    async fn in_time<P>(
        &self,
        place: impl Future<Output = Result<P, tokio::sync::AcquireError>>,
    ) -> Result<P, sqlx::Error> {
        match tokio::time::timeout(self.pool.options().get_acquire_timeout(), place).await {
            Ok(Ok(place)) => Ok(place),
            Ok(Err(_)) => Err(sqlx::Error::PoolClosed),
            Err(_) => Err(sqlx::Error::PoolTimedOut),
        }
    }

    /// The connection kept last, if any; connections kept too long are given back to the
    /// pool on the way.
    fn free_connection(&self) -> Option<Taken<DB>> {
        let stale = |(_, taken): &Taken<DB>| taken.elapsed() >= self.handed_back_after;
        let (found, stale) = {
            let mut free = self.free();
            // Seldom any: the list is taken apart only then.
            let stale = if free.iter().any(stale) {
                let (stale, fresh): (Vec<_>, Vec<_>) =
                    std::mem::take(&mut *free).into_iter().partition(stale);
                *free = fresh;
                stale
            } else {
                Vec::new()
            };
            (free.pop(), stale)
        };
        drop(stale);
        found
    }

    fn free(&self) -> std::sync::MutexGuard<'_, Vec<Taken<DB>>> {
        // The lock guards a list: a panic elsewhere while it was held left it whole.
        self.free
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<DB: Database> Lease<'_, DB> {
    pub(super) fn connection(&mut self) -> &mut DB::Connection {
        &mut self.connection
    }

    /// Keeps the connection for the next lease (its place is given up after), or gives it
    /// back to the pool if it was kept long enough.
    pub(super) fn keep(self) {
        if self.kept.places.is_closed() || self.taken.elapsed() >= self.kept.handed_back_after {
            return;
        }
        self.kept.free().push((self.connection, self.taken));
    }
}

impl<DB: Database> Drop for Kept<DB> {
    /// The pool goes with the kept connections: they are closed here rather than given back
    /// (which takes a task, and the runtime may be gone).
    fn drop(&mut self) {
        for (connection, _) in std::mem::take(&mut *self.free()) {
            drop(connection.detach());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::sqlite::SqlitePoolOptions;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    const SOON: Duration = Duration::from_secs(10);

    /// A pool of `size` connections to a database file, and how many times the pool got one
    /// back.
    async fn kept(
        dir: &tempfile::TempDir,
        size: u32,
    ) -> (Arc<Kept<sqlx::Sqlite>>, Arc<AtomicUsize>) {
        kept_waiting(dir, size, Duration::from_secs(30)).await
    }

    /// The same, whose callers wait for a connection at most `wait`.
    async fn kept_waiting(
        dir: &tempfile::TempDir,
        size: u32,
        wait: Duration,
    ) -> (Arc<Kept<sqlx::Sqlite>>, Arc<AtomicUsize>) {
        let released = Arc::new(AtomicUsize::new(0));
        let counter = released.clone();
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("kept.sqlite").display()
        );
        let pool = SqlitePoolOptions::new()
            .max_connections(size)
            .acquire_timeout(wait)
            .after_release(move |_, _| {
                counter.fetch_add(1, Ordering::SeqCst);
                Box::pin(async { Ok(true) })
            })
            .connect(&url)
            .await
            .unwrap();
        (Arc::new(Kept::new(pool)), released)
    }

    /// The same, whose connections are given back after 50 ms.
    async fn kept_briefly(
        dir: &tempfile::TempDir,
        size: u32,
    ) -> (Kept<sqlx::Sqlite>, Arc<AtomicUsize>) {
        let (kept, released) = kept(dir, size).await;
        let mut kept = Arc::into_inner(kept).unwrap();
        kept.handed_back_after = Duration::from_millis(50);
        (kept, released)
    }

    /// Runs a statement on `lease`'s connection.
    async fn run(lease: &mut Lease<'_, sqlx::Sqlite>) {
        sqlx::query("SELECT 1")
            .execute(lease.connection())
            .await
            .unwrap();
    }

    async fn select(kept: &Kept<sqlx::Sqlite>) {
        let mut lease = kept.lease().await.unwrap();
        run(&mut lease).await;
        lease.keep();
    }

    #[tokio::test]
    async fn leases_waiting_in_turn_get_the_kept_connection_without_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let (kept, released) = kept(&dir, 1).await;
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let kept = kept.clone();
                tokio::spawn(async move { select(&kept).await })
            })
            .collect();
        for task in tasks {
            tokio::time::timeout(SOON, task).await.unwrap().unwrap();
        }
        assert_eq!(
            released.load(Ordering::SeqCst),
            0,
            "a connection went to the pool"
        );
        assert_eq!(kept.free().len(), 1);
    }

    #[tokio::test]
    async fn a_transaction_gets_a_connection_when_every_one_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (kept, _) = kept(&dir, 1).await;
        select(&kept).await;
        let (tx, place) = tokio::time::timeout(SOON, kept.begin())
            .await
            .expect("the kept connection was given to the pool")
            .unwrap();
        tx.commit().await.unwrap();
        drop(place);
        tokio::time::timeout(SOON, select(&kept)).await.unwrap();
    }

    #[tokio::test]
    async fn a_lease_dropped_unkept_goes_back_to_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let (kept, released) = kept(&dir, 1).await;
        drop(kept.lease().await.unwrap());
        assert!(kept.free().is_empty());
        // The pool has it (after its check): the next lease gets it from there.
        tokio::time::timeout(SOON, select(&kept)).await.unwrap();
        assert_eq!(released.load(Ordering::SeqCst), 1);
        assert_eq!(kept.free().len(), 1);
    }

    #[tokio::test]
    async fn a_connection_kept_long_enough_goes_back_to_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let (kept, released) = kept_briefly(&dir, 1).await;
        select(&kept).await;
        select(&kept).await;
        assert_eq!(released.load(Ordering::SeqCst), 0);
        // Its time runs out while it is leased: kept, it goes back instead.
        let lease = kept.lease().await.unwrap();
        tokio::time::sleep(Duration::from_millis(60)).await;
        lease.keep();
        assert!(kept.free().is_empty(), "not given back");
        // Taken from the pool again (once the pool has it back), and kept from then on.
        tokio::time::timeout(SOON, select(&kept)).await.unwrap();
        assert_eq!(released.load(Ordering::SeqCst), 1);
        assert_eq!(kept.free().len(), 1);
    }

    #[tokio::test]
    async fn connections_kept_too_long_are_given_back_when_another_is_leased() {
        let dir = tempfile::tempdir().unwrap();
        let (kept, released) = kept_briefly(&dir, 2).await;
        let (mut a, mut b) = (kept.lease().await.unwrap(), kept.lease().await.unwrap());
        run(&mut a).await;
        run(&mut b).await;
        a.keep();
        b.keep();
        assert_eq!(kept.free().len(), 2);
        tokio::time::sleep(Duration::from_millis(60)).await;
        // Both were kept too long: this lease gives both back and takes one from the pool.
        let lease = tokio::time::timeout(SOON, kept.lease())
            .await
            .unwrap()
            .unwrap();
        assert!(kept.free().is_empty());
        drop(lease);
        tokio::time::timeout(SOON, select(&kept)).await.unwrap();
        assert!(released.load(Ordering::SeqCst) >= 2);
    }

    #[tokio::test]
    async fn waiting_for_a_place_times_out_like_waiting_for_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let (kept, _) = kept_waiting(&dir, 1, Duration::from_millis(200)).await;
        let (held, place) = kept.begin().await.unwrap();
        let waited = tokio::time::timeout(SOON, kept.lease())
            .await
            .expect("the wait had no end");
        assert!(
            matches!(waited, Err(sqlx::Error::PoolTimedOut)),
            "{:?}",
            waited.err()
        );
        let waited = tokio::time::timeout(SOON, kept.begin())
            .await
            .expect("the wait had no end");
        assert!(matches!(waited, Err(sqlx::Error::PoolTimedOut)));
        held.commit().await.unwrap();
        drop(place);
        tokio::time::timeout(SOON, select(&kept)).await.unwrap();
    }

    /// Leases and transactions mixed, more at once than there are connections: each gets
    /// one in turn, and none waits for ever.
    #[tokio::test]
    async fn leases_and_transactions_together_all_finish() {
        let dir = tempfile::tempdir().unwrap();
        let (kept, _) = kept(&dir, 2).await;
        let tasks: Vec<_> = (0..40)
            .map(|i| {
                let kept = kept.clone();
                tokio::spawn(async move {
                    if i % 3 == 0 {
                        let (tx, _place) = kept.begin().await.unwrap();
                        tokio::task::yield_now().await;
                        tx.commit().await.unwrap();
                    } else {
                        select(&kept).await;
                    }
                })
            })
            .collect();
        for task in tasks {
            tokio::time::timeout(SOON, task)
                .await
                .expect("a caller waited for ever")
                .unwrap();
        }
        assert!(kept.free().len() <= 2);
    }
}
