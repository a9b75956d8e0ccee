//! An interactive transaction, pinned to the coordinator instance that began it, and the calls
//! that go to one named instance and nowhere else.

use crate::trace_context::{self, CallMetadata, Coordinator};
use tonic::Status;
use tonic::transport::Channel;
use treaty_proto::pb;

use crate::error::{ClientError, Failure, Rpc, classify};

/// Calls bound to one coordinator instance: never failed over, since the txid they carry means
/// nothing (or another transaction) on any other instance.
#[derive(Debug, Clone)]
pub(crate) struct Pinned {
    endpoint: String,
    channel: Channel,
    metadata: CallMetadata,
}

impl Pinned {
    pub(crate) fn new(endpoint: String, channel: Channel, metadata: CallMetadata) -> Self {
        Self {
            endpoint,
            channel,
            metadata,
        }
    }

    fn client(&self) -> Coordinator {
        trace_context::coordinator(self.channel.clone(), &self.metadata)
    }

    /// The answer, or the error that says what a failure means for this call: unreachable
    /// (nothing happened), outcome unknown (it may have happened), or the coordinator's refusal.
    fn answer<T>(
        &self,
        rpc: Rpc,
        txid: u64,
        result: Result<tonic::Response<T>, Status>,
    ) -> Result<T, ClientError> {
        let status = match result {
            Ok(response) => return Ok(response.into_inner()),
            Err(status) => status,
        };
        let read_only = matches!(rpc, Rpc::GetTransaction);
        let endpoint = self.endpoint.clone();
        Err(match classify(&status) {
            Failure::Answered => ClientError::Rpc {
                rpc,
                endpoint,
                status,
            },
            // Broke after it was sent: a read changed nothing, anything else may have happened.
            Failure::MaybeSent if !read_only => ClientError::OutcomeUnknown {
                rpc,
                txid: Some(txid),
                endpoint,
                source: status,
            },
            Failure::NotSent | Failure::MaybeSent => ClientError::CoordinatorUnreachable {
                rpc,
                txid: Some(txid),
                endpoint,
                source: status,
            },
        })
    }

    pub(crate) async fn get_transaction(&self, txid: u64) -> Result<pb::TransactionInfo, ClientError> {
        let result = self
            .client()
            .get_transaction(pb::GetTransactionRequest { txid })
            .await;
        self.answer(Rpc::GetTransaction, txid, result)
    }

    pub(crate) async fn resolve(
        &self,
        request: pb::ResolveRequest,
    ) -> Result<pb::ResolveResponse, ClientError> {
        let txid = request.txid;
        let result = self.client().resolve(request).await;
        self.answer(Rpc::Resolve, txid, result)
    }
}

/// The coordinator running in this process, when the client is [`crate::Client::embedded`].
#[cfg(feature = "embedded")]
pub(crate) type Local = std::sync::Arc<treaty_coordinator::Embedded>;

/// An in-process call's answer. Nothing crossed a network, but the coordinator itself answers
/// some calls with "the outcome is unknown" (`UNAVAILABLE` when a commit's answer was lost or
/// another request is still deciding it): those are [`ClientError::OutcomeUnknown`], as over
/// gRPC, so that nobody runs a transaction again that may have committed. Lookups and `Begin`
/// change nothing that matters, so their errors are the coordinator's answer.
#[cfg(feature = "embedded")]
pub(crate) fn local_answer<T>(
    rpc: Rpc,
    txid: Option<u64>,
    endpoint: &str,
    result: Result<T, Status>,
) -> Result<T, ClientError> {
    result.map_err(|status| {
        let endpoint = endpoint.to_owned();
        let safe = matches!(rpc, Rpc::Begin | Rpc::GetTransaction);
        match classify(&status) {
            Failure::NotSent | Failure::MaybeSent if !safe => ClientError::OutcomeUnknown {
                rpc,
                txid,
                endpoint,
                source: status,
            },
            _ => ClientError::Rpc {
                rpc,
                endpoint,
                status,
            },
        }
    })
}

/// A transaction begun by [`crate::Client::begin`]. Every call goes to the coordinator instance
/// that began it (see the crate docs); none is ever sent twice.
#[derive(Debug, Clone)]
pub struct Transaction {
    txid: u64,
    owner: Pinned,
    /// Set when the owner runs in this process: the calls go to it directly.
    #[cfg(feature = "embedded")]
    local: Option<Local>,
}

impl Transaction {
    pub(crate) fn new(txid: u64, endpoint: String, channel: Channel, metadata: CallMetadata) -> Self {
        Self {
            txid,
            owner: Pinned::new(endpoint, channel, metadata),
            #[cfg(feature = "embedded")]
            local: None,
        }
    }

    /// The same transaction, its calls handed to the coordinator in this process.
    #[cfg(feature = "embedded")]
    pub(crate) fn on(mut self, local: Local) -> Self {
        self.local = Some(local);
        self
    }

    pub fn txid(&self) -> u64 {
        self.txid
    }

    /// The coordinator that runs this transaction.
    pub fn endpoint(&self) -> &str {
        &self.owner.endpoint
    }

    /// Runs one statement on `shard` (the branch opens on first use). A statement error aborts
    /// the whole transaction: the coordinator answers with the SQLSTATE in the status.
    pub async fn execute(
        &self,
        shard: impl Into<String>,
        sql: impl Into<String>,
        params: Vec<pb::Value>,
    ) -> Result<pb::ExecuteResult, ClientError> {
        self.run(shard.into(), sql.into(), params, false).await
    }

    /// [`Transaction::execute`] for the shard's last statement in this transaction: under
    /// two-phase commit its branch votes in the same round trip, so `commit` has one round trip
    /// less to wait for on that shard. A later statement on the shard is refused
    /// (`FAILED_PRECONDITION`; the transaction carries on). See `ExecuteRequest.last`.
    pub async fn execute_last(
        &self,
        shard: impl Into<String>,
        sql: impl Into<String>,
        params: Vec<pb::Value>,
    ) -> Result<pb::ExecuteResult, ClientError> {
        self.run(shard.into(), sql.into(), params, true).await
    }

    async fn run(
        &self,
        shard: String,
        sql: String,
        params: Vec<pb::Value>,
        last: bool,
    ) -> Result<pb::ExecuteResult, ClientError> {
        let request = pb::ExecuteRequest {
            txid: self.txid,
            shard,
            sql,
            params,
            last,
        };
        #[cfg(feature = "embedded")]
        if let Some(local) = &self.local {
            let result = local.execute(request).await;
            return local_answer(Rpc::Execute, Some(self.txid), &self.owner.endpoint, result);
        }
        let result = self.owner.client().execute(request).await;
        self.owner.answer(Rpc::Execute, self.txid, result)
    }

    /// Commits. With `wait_for_apply`, answers only once every participant applied the commit.
    /// A broken call is [`ClientError::OutcomeUnknown`]: ask [`Transaction::status`].
    pub async fn commit(&self, wait_for_apply: bool) -> Result<pb::Outcome, ClientError> {
        #[cfg(feature = "embedded")]
        if let Some(local) = &self.local {
            let outcome = local.commit(self.txid, wait_for_apply).await;
            return local_answer(Rpc::Commit, Some(self.txid), &self.owner.endpoint, outcome);
        }
        let request = pb::CommitRequest {
            txid: self.txid,
            wait_for_apply,
        };
        let result = self.owner.client().commit(request).await;
        self.owner.answer(Rpc::Commit, self.txid, result)
    }

    /// Aborts (the outcome says ABORTED, cause CLIENT_ROLLBACK).
    pub async fn rollback(&self) -> Result<pb::Outcome, ClientError> {
        #[cfg(feature = "embedded")]
        if let Some(local) = &self.local {
            let outcome = local.rollback(self.txid).await;
            return local_answer(Rpc::Rollback, Some(self.txid), &self.owner.endpoint, outcome);
        }
        let request = pb::RollbackRequest { txid: self.txid };
        let result = self.owner.client().rollback(request).await;
        self.owner.answer(Rpc::Rollback, self.txid, result)
    }

    /// What the owning coordinator knows of this transaction: its state and, once decided, its
    /// outcome.
    pub async fn status(&self) -> Result<pb::TransactionInfo, ClientError> {
        #[cfg(feature = "embedded")]
        if let Some(local) = &self.local {
            let info = local.transaction(self.txid).await;
            return local_answer(Rpc::GetTransaction, Some(self.txid), &self.owner.endpoint, info);
        }
        self.owner.get_transaction(self.txid).await
    }
}

#[cfg(all(test, feature = "embedded"))]
mod tests {
    use super::*;

    #[test]
    fn an_outcome_the_coordinator_in_process_calls_unknown_is_never_a_refusal() {
        let unknown = || Status::unavailable("the commit's answer was lost, so its outcome is unknown");
        let error = local_answer::<()>(Rpc::Commit, Some(7), "http://127.0.0.1:7600", Err(unknown()));
        assert!(
            matches!(error, Err(ClientError::OutcomeUnknown { txid: Some(7), .. })),
            "{error:?}"
        );
        let error = local_answer::<()>(Rpc::Submit, None, "http://127.0.0.1:7600", Err(unknown()));
        assert!(
            matches!(error, Err(ClientError::OutcomeUnknown { txid: None, .. })),
            "{error:?}"
        );
        // A refusal is the coordinator's answer.
        let refused = Status::failed_precondition("already voted");
        let error = local_answer::<()>(Rpc::Execute, Some(7), "http://127.0.0.1:7600", Err(refused));
        assert!(matches!(error, Err(ClientError::Rpc { .. })), "{error:?}");
        // Begin and lookups change nothing: their errors are answers whatever the code.
        let error = local_answer::<()>(Rpc::Begin, None, "http://127.0.0.1:7600", Err(unknown()));
        assert!(matches!(error, Err(ClientError::Rpc { .. })), "{error:?}");
        assert!(local_answer(Rpc::Commit, Some(7), "http://127.0.0.1:7600", Ok(5)).is_ok_and(|v| v == 5));
    }
}
