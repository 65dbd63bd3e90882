//! The search pool: connections of their own for searches, each armed once with the slot its
//! statements' deadline is read from (see [`Dialect::arm_search`]).

use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use sqlx::pool::PoolConnection;
use tokio::sync::{Semaphore, SemaphorePermit};

use super::*;
use crate::dialect::SearchSlot;

/// A search connection and the slot it was armed with.
struct Armed<D: Dialect> {
    conn: PoolConnection<D::Db>,
    slot: Arc<SearchSlot>,
}

/// At most `size` searches at once, on connections armed once and kept between searches.
///
/// Armed connections stay checked out of the sqlx pool while idle here: sqlx cannot tell an
/// armed connection from a new one, and arming on every checkout would cost a round trip to
/// the driver per search. The permits bound the connections in use and idle together, so a
/// search that needs a new one always finds room in the sqlx pool.
pub(crate) struct SearchPool<D: Dialect> {
    pool: sqlx::Pool<D::Db>,
    /// Where cancel requests go (`Dialect::CANCEL_BACKEND`): not this pool, which may be full.
    control: sqlx::Pool<D::Db>,
    size: u32,
    permits: Semaphore,
    idle: Mutex<Vec<Armed<D>>>,
}

impl<D: Dialect> SearchPool<D> {
    /// Searches on `pool`, at most `size` at once (the pool must allow as many connections);
    /// cancel requests go through `control`.
    pub(crate) fn new(pool: sqlx::Pool<D::Db>, control: sqlx::Pool<D::Db>, size: u32) -> Self {
        let size = size.max(1);
        SearchPool {
            pool,
            control,
            size,
            permits: Semaphore::new(size as usize),
            idle: Mutex::new(Vec::new()),
        }
    }

    /// A connection for one search running until `deadline`.
    pub(crate) async fn acquire(&self, deadline: Instant) -> Result<SearchConn<'_, D>> {
        let permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| Error::backend_msg("the store is closed", false))?;
        let reused = self.idle.lock().pop();
        let armed = match reused {
            Some(a) => a,
            None => {
                let mut conn = self.pool.acquire().await.map_err(db_err::<D>)?;
                let slot = Arc::new(SearchSlot::default());
                D::arm_search(&mut conn, slot.clone()).await?;
                Armed { conn, slot }
            }
        };
        armed.slot.open_until(deadline);
        Ok(SearchConn {
            pool: self,
            armed: Some(armed),
            finished: false,
            _permit: permit,
        })
    }

    /// Searches running now.
    pub(crate) fn in_use(&self) -> u32 {
        let free = u32::try_from(self.permits.available_permits()).unwrap_or(u32::MAX);
        self.size.saturating_sub(free)
    }

    /// Refuses new searches and closes the connections.
    pub(crate) async fn close(&self) {
        self.permits.close();
        self.idle.lock().clear();
        self.pool.close().await;
    }
}

/// A search's hold on a connection. Dropped unfinished (the search failed or its caller went
/// away mid-statement), the connection's slot is closed and, where the dialect needs it, a
/// cancel request sent, so whatever still runs on it stops; the connection then goes back to
/// sqlx, which waits for it to be idle. Finished, it is kept armed for the next search.
pub(crate) struct SearchConn<'p, D: Dialect> {
    pool: &'p SearchPool<D>,
    armed: Option<Armed<D>>,
    finished: bool,
    _permit: SemaphorePermit<'p>,
}

impl<D: Dialect> SearchConn<'_, D> {
    /// The connection.
    pub(crate) fn conn(&mut self) -> Result<&mut Conn<D>> {
        match self.armed.as_mut() {
            Some(a) => Ok(&mut *a.conn),
            None => Err(Error::backend_msg(
                "search connection already released",
                false,
            )),
        }
    }

    /// Whether the search's time is up.
    pub(crate) fn due(&self) -> bool {
        self.armed.as_ref().is_none_or(|a| a.slot.due())
    }

    /// The search ran to its end: no statement of it is running.
    pub(crate) fn finish(mut self) {
        self.finished = true;
    }
}

impl<D: Dialect> Drop for SearchConn<'_, D> {
    fn drop(&mut self) {
        if let Some(a) = self.armed.take() {
            a.slot.close();
            if self.finished {
                self.pool.idle.lock().push(a);
            } else {
                cancel_abandoned(&self.pool.control, a);
            }
        }
    }
}

/// Sends the dialect's cancel request for what `a` may still be running, then lets the
/// connection go: only after the request, so that it cannot reach a later search's statement.
fn cancel_abandoned<D: Dialect>(control: &sqlx::Pool<D::Db>, a: Armed<D>) {
    let (Some(cancel), Some(backend)) = (D::CANCEL_BACKEND, a.slot.backend()) else {
        return;
    };
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let control = control.clone();
    runtime.spawn(async move {
        let sent = async {
            let mut conn = control.acquire().await.map_err(db_err::<D>)?;
            D::sql(cancel).bind(backend).execute(&mut *conn).await
        };
        if let Err(e) = sent.await {
            tracing::warn!(error = %e, "could not cancel an abandoned search's statement");
        }
        drop(a.conn);
    });
}
