//! Cancelling a client's statement when the call that runs it is dropped.
//!
//! The service runs each statement on a task of its own, to completion whatever happens to the
//! call (so a branch's state never depends on when a caller gave up). Without more, a caller that
//! gave up (its deadline passed, it disconnected, or the coordinator's call was dropped because its
//! own client's was: tonic drops the handler's future when the HTTP/2 stream is reset) left its
//! statement running in PostgreSQL until the transaction's statement timeout. Here the call holds a
//! [`CancelOnDrop`]; dropped before the statement finished, it has PostgreSQL cancel the statement
//! (`pg_cancel_backend` from a connection of its own), and the statement's error (57014) then
//! abandons the branch through the ordinary failure path: the transaction aborts.
//!
//! The statement is handed to the agent in a task-local ([`CURRENT`]) rather than through every
//! `Agent` method, because only the gRPC service's calls can be dropped by a caller; the agent's
//! other users (in-process participants, recovery) never cancel.
//!
//! A cancel never reaches another statement: the canceller signals only while the statement is
//! registered as running, and the agent, once the statement returned, waits for any cancel in
//! progress before the branch may continue or its connection be reused.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

use crate::pool::Pool;

/// Attempts at cancelling: a cancel that arrives between statements (the backend is reading the
/// next command) is ignored by PostgreSQL, so it is sent again until the statement ends.
const CANCEL_ATTEMPTS: u32 = 20;
/// How long to wait for the statement to end before cancelling again.
const CANCEL_RETRY_AFTER: Duration = Duration::from_millis(250);

tokio::task_local! {
    /// The statement of the call the current task runs for, when that call can be cancelled.
    pub static CURRENT: Arc<Cancellable>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The statement has not started (its branch's lock is still awaited, say).
    Waiting,
    /// Running on the backend with this pid.
    Running(i32),
    /// The caller gave up before the statement started: it must not start.
    CallerGone,
    /// The caller gave up while it ran: being cancelled.
    Cancelling(i32),
    /// The statement returned.
    Ended,
}

/// One call's statement, shared by the call (which may give up) and the task running it.
pub struct Cancellable {
    state: Mutex<State>,
    /// Held across each `pg_cancel_backend`, so the agent can wait for one in flight.
    signalling: tokio::sync::Mutex<()>,
    ended: Notify,
}

impl Cancellable {
    pub fn new() -> Arc<Cancellable> {
        Arc::new(Cancellable {
            state: Mutex::new(State::Waiting),
            signalling: tokio::sync::Mutex::new(()),
            ended: Notify::new(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Only plain assignments happen under the lock.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The statement starts on backend `pid`; false when its caller already gave up (then it must
    /// not run).
    pub fn start(&self, pid: i32) -> bool {
        let mut state = self.state();
        if *state == State::CallerGone {
            return false;
        }
        *state = State::Running(pid);
        true
    }

    /// The statement returned. Waits for a cancel being sent, so none lands after this.
    pub async fn end(&self) {
        let cancelling = {
            let mut state = self.state();
            let cancelling = matches!(*state, State::Cancelling(_));
            *state = State::Ended;
            cancelling
        };
        self.ended.notify_waiters();
        if cancelling {
            drop(self.signalling.lock().await);
        }
    }

    /// The caller gave up: the backend to cancel, if the statement is running.
    fn caller_gone(&self) -> Option<i32> {
        let mut state = self.state();
        match *state {
            State::Waiting => {
                *state = State::CallerGone;
                None
            }
            State::Running(pid) => {
                *state = State::Cancelling(pid);
                Some(pid)
            }
            State::CallerGone | State::Cancelling(_) | State::Ended => None,
        }
    }

    fn still_cancelling(&self) -> bool {
        matches!(*self.state(), State::Cancelling(_))
    }
}

/// Held by a call while its statement runs; dropped early (the call was dropped), it cancels the
/// statement. `finished` disarms it.
pub struct CancelOnDrop {
    statement: Arc<Cancellable>,
    pool: Pool,
    armed: bool,
}

impl CancelOnDrop {
    pub fn new(statement: Arc<Cancellable>, pool: Pool) -> Self {
        Self {
            statement,
            pool,
            armed: true,
        }
    }

    /// The call got its answer: nothing to cancel.
    pub fn finished(mut self) {
        self.armed = false;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Some(pid) = self.statement.caller_gone() else {
            return;
        };
        // Dropped inside the server's runtime (tonic drops the handler there); without one there
        // is no statement to cancel either.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let statement = Arc::clone(&self.statement);
        let pool = self.pool.clone();
        runtime.spawn(cancel(statement, pool, pid));
    }
}

/// Sends `pg_cancel_backend(pid)` until the statement ends (bounded), each under `signalling`
/// and only while the statement is still registered as running.
async fn cancel(statement: Arc<Cancellable>, pool: Pool, pid: i32) {
    let connection = match pool.connect_outside().await {
        Ok(connection) => connection,
        Err(error) => {
            tracing::warn!(pid, %error, "cannot cancel a dropped call's statement: no connection");
            return;
        }
    };
    for _ in 0..CANCEL_ATTEMPTS {
        let ended = statement.ended.notified();
        {
            let _signalling = statement.signalling.lock().await;
            if !statement.still_cancelling() {
                break;
            }
            if let Err(error) = connection
                .client()
                .query_typed(
                    "SELECT pg_cancel_backend($1)",
                    &[(&pid, tokio_postgres::types::Type::INT4)],
                )
                .await
            {
                tracing::warn!(pid, %error, "cancelling a dropped call's statement failed");
                break;
            }
        }
        tracing::info!(pid, "cancelled the statement of a call its caller dropped");
        let _ = tokio::time::timeout(CANCEL_RETRY_AFTER, ended).await;
    }
    // Dropping the connection ends its session.
    drop(connection);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_statement_whose_caller_left_before_it_started_does_not_start() {
        let statement = Cancellable::new();
        assert_eq!(statement.caller_gone(), None);
        assert!(!statement.start(7));
    }

    #[tokio::test]
    async fn only_a_running_statement_is_cancelled() {
        let statement = Cancellable::new();
        assert!(statement.start(7));
        assert_eq!(statement.caller_gone(), Some(7));
        assert!(statement.still_cancelling());
        statement.end().await;
        assert!(!statement.still_cancelling());
        assert_eq!(statement.caller_gone(), None);
    }
}
