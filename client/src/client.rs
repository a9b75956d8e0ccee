//! `Client`: the endpoint list, the current coordinator, and the one loop that fails a call over
//! (the rules are in the crate docs).

use std::future::Future;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::trace_context::{self, CallMetadata, Coordinator};
use tonic::Status;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use treaty_proto::pb;

use crate::error::{ClientError, EndpointFailure, Failure, Rpc, chain_text, classify, status_text};
use crate::transaction::{Pinned, Transaction};

/// How long opening a connection to one endpoint may take before the next is tried.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a call may wait for its answer. Above the coordinator's default transaction timeout
/// (60 s), so a slow transaction is ended by the coordinator, with a known outcome.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(75);

/// Options for [`Client`]; `Client::connect` uses the defaults.
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    connect_timeout: Duration,
    request_timeout: Duration,
    tls: Option<ClientTlsConfig>,
    metadata: CallMetadata,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        Self {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            tls: None,
            metadata: CallMetadata::default(),
        }
    }
}

impl ClientBuilder {
    /// TLS for `https://` endpoints: the CA that signs the coordinators' certificates and, for a
    /// coordinator that requires one, this client's certificate (`ClientTlsConfig::identity`).
    /// An `https://` endpoint without it is refused as invalid.
    pub fn tls(mut self, tls: ClientTlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Authenticate every call with this bearer token (for a coordinator whose access file names
    /// the token's hash; a client certificate does the same through [`ClientBuilder::tls`]). Send
    /// it over `https://` only: anyone who reads it can act as this client.
    pub fn bearer_token(mut self, token: &str) -> Result<Self, ClientError> {
        self.metadata = CallMetadata::with_token(token).ok_or(ClientError::InvalidToken)?;
        Ok(self)
    }

    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// A call that has no answer by then fails: a safe call moves to the next endpoint, any other
    /// returns [`ClientError::OutcomeUnknown`].
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Connects to the first endpoint that answers, in order; fails naming every endpoint when
    /// none does.
    pub async fn connect(
        self,
        endpoints: impl IntoIterator<Item = impl Into<String>>,
    ) -> Result<Client, ClientError> {
        let endpoints = self.endpoints(endpoints)?;
        let mut failures = Vec::new();
        for index in 0..endpoints.len() {
            match open(&endpoints[index], self.connect_timeout).await {
                Ok(channel) => return Ok(Client::new(self, endpoints, index, channel)),
                Err(error) => failures.push(EndpointFailure {
                    endpoint: endpoints[index].url.clone(),
                    error,
                }),
            }
        }
        Err(ClientError::NoCoordinator { failures })
    }

    /// A client of the coordinator running in this process: submits and transactions are handed
    /// to it directly; the other calls (`info`, `list_*`, `resolve`, `transaction_on`) go to its
    /// gRPC listener (`Embedded::endpoint`, with this builder's token and TLS settings). Nothing
    /// fails over: there is one coordinator. Errors mean what they mean over gRPC: an outcome the
    /// coordinator says is unknown is [`ClientError::OutcomeUnknown`], never a refusal.
    #[cfg(feature = "embedded")]
    pub fn embedded(
        self,
        coordinator: std::sync::Arc<treaty_coordinator::Embedded>,
    ) -> Result<Client, ClientError> {
        let endpoints = self.endpoints([coordinator.endpoint().to_owned()])?;
        let channel = endpoints[0].tonic.connect_lazy();
        let mut client = Client::new(self, endpoints, 0, channel);
        client.local = Some(coordinator);
        Ok(client)
    }

    /// A client that connects on its first call (to the first endpoint, failing over from there):
    /// for programs that start before their coordinators.
    pub fn connect_lazy(
        self,
        endpoints: impl IntoIterator<Item = impl Into<String>>,
    ) -> Result<Client, ClientError> {
        let endpoints = self.endpoints(endpoints)?;
        let channel = endpoints[0].tonic.connect_lazy();
        Ok(Client::new(self, endpoints, 0, channel))
    }

    fn endpoints(
        &self,
        endpoints: impl IntoIterator<Item = impl Into<String>>,
    ) -> Result<Vec<Target>, ClientError> {
        let endpoints: Vec<Target> = endpoints
            .into_iter()
            .map(|url| Target::new(url.into(), self))
            .collect::<Result<_, _>>()?;
        if endpoints.is_empty() {
            return Err(ClientError::NoEndpoints);
        }
        Ok(endpoints)
    }
}

/// One coordinator endpoint: the URL as given (with `http://` added when it had no scheme) and
/// its tonic settings.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) url: String,
    tonic: Endpoint,
}

impl Target {
    fn new(given: String, options: &ClientBuilder) -> Result<Self, ClientError> {
        let trimmed = given.trim();
        let url = if trimmed.contains("://") {
            trimmed.to_owned()
        } else {
            format!("http://{trimmed}")
        };
        let mut tonic = Endpoint::from_shared(url.clone())
            .map_err(|error| ClientError::InvalidEndpoint {
                endpoint: given.clone(),
                reason: chain_text(&error),
            })?
            .connect_timeout(options.connect_timeout)
            .timeout(options.request_timeout);
        if url.starts_with("https://") {
            let tls = options.tls.clone().ok_or_else(|| ClientError::InvalidEndpoint {
                endpoint: given.clone(),
                reason: "https:// needs TLS settings: the CA that signs the coordinator's certificate (ClientBuilder::tls; `treaty --tls-ca`)".into(),
            })?;
            tonic = tonic
                .tls_config(tls)
                .map_err(|error| ClientError::InvalidEndpoint {
                    endpoint: given.clone(),
                    reason: chain_text(&error),
                })?;
        }
        Ok(Self { url, tonic })
    }
}

/// Opens a connection, the HTTP/2 handshake included, within `timeout`.
async fn open(target: &Target, timeout: Duration) -> Result<Channel, String> {
    match tokio::time::timeout(timeout, target.tonic.connect()).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(error)) => Err(chain_text(&error)),
        Err(_) => Err(format!("no connection within {} ms", timeout.as_millis())),
    }
}

/// Whether a call may be sent again after it may have reached a coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Repeat {
    /// Read-only, or `Begin`: repeating it elsewhere changes nothing that matters.
    Safe,
    /// Only when it was not sent: it may have been carried out.
    OnlyIfNotSent,
}

#[derive(Debug)]
struct Current {
    index: usize,
    channel: Channel,
}

/// A client of one Treaty deployment: a list of coordinator endpoints, one of which is current.
/// Cheap to share: every method takes `&self`.
#[derive(Debug)]
pub struct Client {
    options: ClientBuilder,
    endpoints: Vec<Target>,
    current: Mutex<Current>,
    /// The coordinator in this process ([`ClientBuilder::embedded`]).
    #[cfg(feature = "embedded")]
    local: Option<crate::transaction::Local>,
}

impl Client {
    /// [`ClientBuilder::connect`] with the default timeouts.
    pub async fn connect(
        endpoints: impl IntoIterator<Item = impl Into<String>>,
    ) -> Result<Client, ClientError> {
        ClientBuilder::default().connect(endpoints).await
    }

    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    fn new(options: ClientBuilder, endpoints: Vec<Target>, index: usize, channel: Channel) -> Self {
        Self {
            options,
            endpoints,
            current: Mutex::new(Current { index, channel }),
            #[cfg(feature = "embedded")]
            local: None,
        }
    }

    /// [`ClientBuilder::embedded`] with the default options.
    #[cfg(feature = "embedded")]
    pub fn embedded(
        coordinator: std::sync::Arc<treaty_coordinator::Embedded>,
    ) -> Result<Client, ClientError> {
        ClientBuilder::default().embedded(coordinator)
    }

    /// The endpoints, in the order given.
    pub fn endpoints(&self) -> Vec<String> {
        self.endpoints.iter().map(|e| e.url.clone()).collect()
    }

    /// The endpoint calls go to now: the last one that answered.
    pub fn current_endpoint(&self) -> String {
        let index = self.lock().index;
        self.endpoints[index].url.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Current> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn current(&self) -> (usize, Channel) {
        let current = self.lock();
        (current.index, current.channel.clone())
    }

    /// Calls bound to the current endpoint's instance, on the current connection.
    fn pinned_current(&self) -> Pinned {
        let (index, channel) = self.current();
        Pinned::new(
            self.endpoints[index].url.clone(),
            channel,
            self.options.metadata.clone(),
        )
    }

    /// A one-shot transaction: every op, then commit, in one call. Failed over only when it was
    /// not sent; else [`ClientError::OutcomeUnknown`] (the txid is not known: the coordinator
    /// allocates it).
    pub async fn submit(&self, request: pb::SubmitRequest) -> Result<pb::SubmitResponse, ClientError> {
        #[cfg(feature = "embedded")]
        if let Some(local) = &self.local {
            let endpoint = &self.endpoints[0].url;
            let response = local.submit(request).await;
            return crate::transaction::local_answer(Rpc::Submit, None, endpoint, response);
        }
        let (response, _, _) = self
            .call(
                Rpc::Submit,
                Repeat::OnlyIfNotSent,
                request,
                |mut c, r| async move { c.submit(r).await },
            )
            .await?;
        Ok(response)
    }

    /// Begins an interactive transaction, pinned to the instance that began it. Failed over (a
    /// begun transaction nobody uses is aborted by the idle timeout).
    pub async fn begin(&self, options: Option<pb::TransactionOptions>) -> Result<Transaction, ClientError> {
        #[cfg(feature = "embedded")]
        if let Some(local) = &self.local {
            let endpoint = self.endpoints[0].url.clone();
            let begun = local.begin(options).await;
            let txid = crate::transaction::local_answer(Rpc::Begin, None, &endpoint, begun)?;
            let (_, channel) = self.current();
            let transaction = Transaction::new(txid, endpoint, channel, self.options.metadata.clone());
            return Ok(transaction.on(local.clone()));
        }
        let request = pb::BeginRequest { options };
        let (response, index, channel) = self
            .call(Rpc::Begin, Repeat::Safe, request, |mut c, r| async move {
                c.begin(r).await
            })
            .await?;
        Ok(Transaction::new(
            response.txid,
            self.endpoints[index].url.clone(),
            channel,
            self.options.metadata.clone(),
        ))
    }

    /// What the current coordinator knows of its transaction `txid`. Not failed over: a txid
    /// names a transaction of one instance only (see [`Client::transaction_on`]).
    pub async fn transaction(&self, txid: u64) -> Result<pb::TransactionInfo, ClientError> {
        self.pinned_current().get_transaction(txid).await
    }

    /// What the coordinator at `endpoint` knows of its transaction `txid`: the way to look up a
    /// call that ended in [`ClientError::OutcomeUnknown`]. Uses the current connection when
    /// `endpoint` is the current one, else opens one.
    pub async fn transaction_on(
        &self,
        endpoint: &str,
        txid: u64,
    ) -> Result<pb::TransactionInfo, ClientError> {
        let (index, channel) = self.current();
        let pinned = if self.endpoints[index].url == endpoint {
            Pinned::new(endpoint.to_owned(), channel, self.options.metadata.clone())
        } else {
            let target = self
                .endpoints
                .iter()
                .find(|e| e.url == endpoint)
                .cloned()
                .map_or_else(|| Target::new(endpoint.to_owned(), &self.options), Ok)?;
            Pinned::new(
                target.url.clone(),
                target.tonic.connect_lazy(),
                self.options.metadata.clone(),
            )
        };
        pinned.get_transaction(txid).await
    }

    /// An operator's heuristic decision on the current coordinator's transaction `txid`
    /// (`treaty resolve`). Not failed over: the txid is that instance's.
    pub async fn resolve(&self, request: pb::ResolveRequest) -> Result<pb::ResolveResponse, ClientError> {
        self.pinned_current().resolve(request).await
    }

    /// The coordinator's id, shards and txid bounds. Failed over.
    pub async fn info(&self) -> Result<pb::InfoResponse, ClientError> {
        let (response, _, _) = self
            .call(
                Rpc::Info,
                Repeat::Safe,
                pb::InfoRequest {},
                |mut c, r| async move { c.info(r).await },
            )
            .await?;
        Ok(response)
    }

    /// The transactions the coordinator that answers tracks (each instance lists its own).
    /// Failed over.
    pub async fn list_transactions(
        &self,
        request: pb::ListTransactionsRequest,
    ) -> Result<pb::ListTransactionsResponse, ClientError> {
        let (response, _, _) = self
            .call(
                Rpc::ListTransactions,
                Repeat::Safe,
                request,
                |mut c, r| async move { c.list_transactions(r).await },
            )
            .await?;
        Ok(response)
    }

    /// Prepared branches on every shard, with the answering coordinator's view. Failed over.
    pub async fn list_in_doubt(
        &self,
        request: pb::ListInDoubtRequest,
    ) -> Result<pb::ListInDoubtResponse, ClientError> {
        let (response, _, _) = self
            .call(Rpc::ListInDoubt, Repeat::Safe, request, |mut c, r| async move {
                c.list_in_doubt(r).await
            })
            .await?;
        Ok(response)
    }

    /// Sends `request` to the current endpoint, then round-robin to the others (each at most once)
    /// while the rules allow; the endpoint that answers becomes current. Returns the answer with
    /// the endpoint's index and channel.
    async fn call<Req, Resp, F, Fut>(
        &self,
        rpc: Rpc,
        repeat: Repeat,
        request: Req,
        send: F,
    ) -> Result<(Resp, usize, Channel), ClientError>
    where
        Req: Clone,
        F: Fn(Coordinator, Req) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        let (start, current) = self.current();
        let count = self.endpoints.len();
        let mut failures = Vec::new();
        for step in 0..count {
            let index = (start + step) % count;
            let target = &self.endpoints[index];
            let channel = if step == 0 {
                current.clone()
            } else {
                match open(target, self.options.connect_timeout).await {
                    Ok(channel) => channel,
                    Err(error) => {
                        failures.push(EndpointFailure {
                            endpoint: target.url.clone(),
                            error,
                        });
                        continue;
                    }
                }
            };
            let status = match send(
                trace_context::coordinator(channel.clone(), &self.options.metadata),
                request.clone(),
            )
            .await
            {
                Ok(response) => {
                    self.make_current(index, &channel);
                    return Ok((response.into_inner(), index, channel));
                }
                Err(status) => status,
            };
            match (classify(&status), repeat) {
                (Failure::NotSent, _) | (Failure::MaybeSent, Repeat::Safe) => {
                    failures.push(EndpointFailure {
                        endpoint: target.url.clone(),
                        error: status_text(&status),
                    })
                }
                (Failure::MaybeSent, Repeat::OnlyIfNotSent) => {
                    return Err(ClientError::OutcomeUnknown {
                        rpc,
                        txid: None,
                        endpoint: target.url.clone(),
                        source: status,
                    });
                }
                (Failure::Answered, _) => {
                    self.make_current(index, &channel);
                    return Err(ClientError::Rpc {
                        rpc,
                        endpoint: target.url.clone(),
                        status,
                    });
                }
            }
        }
        Err(ClientError::NoCoordinator { failures })
    }

    fn make_current(&self, index: usize, channel: &Channel) {
        let mut current = self.lock();
        if current.index != index {
            *current = Current {
                index,
                channel: channel.clone(),
            };
        }
    }
}
