//! The participant's lazily connected gRPC clients to its coordinators, used by recovery: `Info`
//! (who each one is, and which run of it is live) and `QueryDecision`. Wire types stay in this
//! module.
//!
//! Several coordinator instances may serve the same shards (`--coordinator` takes a list). A GID
//! that names a decision shard (`treaty:<id>:<txid>@<shard>`) is answered by any of them from its
//! row, so recovery asks whichever answers, sticking with the one that last worked. A plain GID
//! (file decision store) is known only to the coordinator whose id it names: it is asked of the
//! instance whose `Info` named that id, or, while that is not known, of each in turn, an
//! UNSPECIFIED answer ("not my GID") meaning "ask the next".

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use treaty_proto::pb::coordinator_client::CoordinatorClient;
use treaty_proto::{CoordinatorId, Gid, TxId, pb};

/// Largest batch the coordinator accepts in one `QueryDecision`.
pub const MAX_GIDS_PER_QUERY: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("--coordinator {url:?} is not a usable address ({reason}); use http://HOST:PORT")]
    BadUrl { url: String, reason: String },
    #[error("coordinator at {url} is unreachable: {message}")]
    Unreachable { url: String, message: String },
    #[error("coordinator at {url} sent an invalid answer: {message}")]
    BadAnswer { url: String, message: String },
    #[error("no coordinator is configured")]
    NoCoordinator,
    #[error(
        "--coordinator {url:?} is https:// but no --link-tls-ca is given (the CA that signs the coordinators' certificates)"
    )]
    NoTls { url: String },
    #[error("--coordinator {url:?}: TLS settings not usable: {reason}")]
    Tls { url: String, reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoordinatorInfo {
    pub id: CoordinatorId,
    pub next_txid: TxId,
    /// The coordinator process's run: higher at every start (0 from a coordinator too old to say).
    pub incarnation: u64,
    /// The first txid this run hands out; every lower txid of `id` belongs to an earlier run.
    pub first_txid: TxId,
    /// Every lower txid of `id` has finished at its coordinator and is never sent a statement, a
    /// vote request or a commit decision again (`None`: not known right now).
    pub open_from: Option<TxId>,
}

/// The coordinator's answer about one GID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Still in flight: ask again later.
    Pending,
    Commit,
    Abort,
    /// Not one of the coordinator's GIDs (or an answer this version does not know): leave it.
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub gid: String,
    pub decision: Decision,
    /// The coordinator may still send phase two for it: keep its marker row.
    pub tracked: bool,
}

/// Checks that `url` can be dialled (an `http`/`https` URL with a host), naming it if not.
pub fn check_url(url: &str) -> Result<(), LinkError> {
    let bad = |reason: String| LinkError::BadUrl {
        url: url.to_owned(),
        reason,
    };
    let uri: tonic::codegen::http::Uri = url.parse().map_err(|e| bad(format!("{e}")))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(bad("it needs an http:// or https:// scheme".into())),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("it names no host".into()));
    }
    Ok(())
}

/// One coordinator instance.
#[derive(Clone)]
pub struct CoordinatorLink {
    url: String,
    client: CoordinatorClient<Channel>,
}

impl CoordinatorLink {
    /// Builds the channel; nothing connects until the first call.
    pub fn new(url: &str, tls: Option<&ClientTlsConfig>) -> Result<Self, LinkError> {
        check_url(url)?;
        let mut endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| LinkError::BadUrl {
                url: url.to_owned(),
                reason: e.to_string(),
            })?
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        if url.starts_with("https://") {
            let tls = tls.ok_or_else(|| LinkError::NoTls { url: url.to_owned() })?;
            endpoint = endpoint.tls_config(tls.clone()).map_err(|e| LinkError::Tls {
                url: url.to_owned(),
                reason: e.to_string(),
            })?;
        }
        Ok(Self {
            url: url.to_owned(),
            client: CoordinatorClient::new(endpoint.connect_lazy()),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn unreachable(&self, status: &tonic::Status) -> LinkError {
        LinkError::Unreachable {
            url: self.url.clone(),
            message: status.message().to_owned(),
        }
    }

    pub async fn info(&self) -> Result<CoordinatorInfo, LinkError> {
        let response = self
            .client
            .clone()
            .info(pb::InfoRequest {})
            .await
            .map_err(|status| self.unreachable(&status))?
            .into_inner();
        let id = CoordinatorId::new(&response.coordinator_id).map_err(|e| LinkError::BadAnswer {
            url: self.url.clone(),
            message: e.to_string(),
        })?;
        Ok(CoordinatorInfo {
            id,
            next_txid: response.next_txid,
            incarnation: response.incarnation,
            first_txid: response.first_txid,
            open_from: (response.open_from > 0).then_some(response.open_from),
        })
    }

    /// Asks about up to `MAX_GIDS_PER_QUERY` GIDs.
    pub async fn query_decision(&self, gids: Vec<String>) -> Result<Vec<Answer>, LinkError> {
        let response = self
            .client
            .clone()
            .query_decision(pb::QueryDecisionRequest { gids })
            .await
            .map_err(|status| self.unreachable(&status))?
            .into_inner();
        Ok(response
            .answers
            .into_iter()
            .map(|answer| Answer {
                decision: match pb::Decision::try_from(answer.decision) {
                    Ok(pb::Decision::Pending) => Decision::Pending,
                    Ok(pb::Decision::Commit) => Decision::Commit,
                    Ok(pb::Decision::Abort) => Decision::Abort,
                    Ok(pb::Decision::Unspecified) | Err(_) => Decision::Unknown,
                },
                gid: answer.gid,
                tracked: answer.tracked,
            })
            .collect())
    }
}

/// Every configured coordinator instance, in the configured order.
pub struct Coordinators {
    links: Vec<CoordinatorLink>,
    /// The instance that last answered a `QueryDecision`: asked first next time.
    preferred: AtomicUsize,
    /// The id each instance last answered `Info` with (`None` until it has).
    ids: Mutex<Vec<Option<CoordinatorId>>>,
}

impl Coordinators {
    /// Builds a link per URL; nothing connects until the first call.
    pub fn new(urls: &[String], tls: Option<&ClientTlsConfig>) -> Result<Self, LinkError> {
        if urls.is_empty() {
            return Err(LinkError::NoCoordinator);
        }
        let links = urls
            .iter()
            .map(|url| CoordinatorLink::new(url, tls))
            .collect::<Result<Vec<_>, _>>()?;
        let ids = Mutex::new(vec![None; links.len()]);
        Ok(Self {
            links,
            preferred: AtomicUsize::new(0),
            ids,
        })
    }

    fn ids(&self) -> std::sync::MutexGuard<'_, Vec<Option<CoordinatorId>>> {
        self.ids.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Every id an instance has answered `Info` with.
    pub fn known_ids(&self) -> Vec<CoordinatorId> {
        let mut ids: Vec<CoordinatorId> = self.ids().iter().flatten().cloned().collect();
        ids.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
        ids.dedup();
        ids
    }

    /// Asks every instance's `Info` at once, bounded by `within` each; remembers their ids.
    pub async fn info_all(&self, within: Duration) -> Vec<Result<CoordinatorInfo, LinkError>> {
        let asks = self.links.iter().map(|link| async move {
            match tokio::time::timeout(within, link.info()).await {
                Ok(result) => result,
                Err(_) => Err(LinkError::Unreachable {
                    url: link.url().to_owned(),
                    message: format!("no answer to Info within {} ms", within.as_millis()),
                }),
            }
        });
        let results = futures::future::join_all(asks).await;
        let mut ids = self.ids();
        for (at, result) in results.iter().enumerate() {
            if let (Ok(info), Some(slot)) = (result, ids.get_mut(at)) {
                *slot = Some(info.id.clone());
            }
        }
        results
    }

    /// The instances in the order to try them: the one that last worked, then the others as
    /// configured.
    fn order(&self) -> Vec<usize> {
        let preferred = self.preferred.load(Ordering::Relaxed);
        let mut order: Vec<usize> = (0..self.links.len()).collect();
        if preferred < order.len() {
            order.remove(preferred);
            order.insert(0, preferred);
        }
        order
    }

    /// Whether instance `at` may know `gid`: any instance for a GID that names a decision shard,
    /// else the one whose `Info` named the GID's coordinator, or any whose id is not known yet
    /// when no instance is known to be that coordinator.
    fn may_answer(ids: &[Option<CoordinatorId>], at: usize, gid: &str) -> bool {
        let Ok(parsed) = Gid::parse(gid) else {
            // Not for us to judge: the coordinator answers UNSPECIFIED for what it cannot parse.
            return true;
        };
        if parsed.decision_shard().is_some() {
            return true;
        }
        let owner_known = ids.iter().flatten().any(|id| id == parsed.coordinator());
        match ids.get(at).and_then(Option::as_ref) {
            Some(id) => id == parsed.coordinator(),
            None => !owner_known,
        }
    }

    /// Asks about up to `MAX_GIDS_PER_QUERY` GIDs, failing over from an instance that does not
    /// answer to the next, and asking the next about GIDs one answered UNSPECIFIED. Answers each
    /// GID at most once; a GID nobody could answer is left out (or answered `Unknown` when every
    /// instance that may know it said so). Fails only when no instance answered at all.
    pub async fn query_decision(&self, gids: Vec<String>) -> Result<Vec<Answer>, LinkError> {
        let mut answers = Vec::with_capacity(gids.len());
        let mut pending: HashMap<String, bool> = gids.into_iter().map(|gid| (gid, false)).collect();
        let mut last_error = None;
        let mut anyone_answered = false;
        let mut anyone_asked = false;
        for at in self.order() {
            if pending.is_empty() {
                break;
            }
            let ask: Vec<String> = {
                let ids = self.ids();
                pending
                    .keys()
                    .filter(|gid| Self::may_answer(&ids, at, gid))
                    .cloned()
                    .collect()
            };
            if ask.is_empty() {
                continue;
            }
            let Some(link) = self.links.get(at) else { continue };
            anyone_asked = true;
            match link.query_decision(ask).await {
                Ok(got) => {
                    anyone_answered = true;
                    self.preferred.store(at, Ordering::Relaxed);
                    for answer in got {
                        if answer.decision == Decision::Unknown {
                            // "Not my GID": the next instance may know it.
                            if let Some(asked) = pending.get_mut(&answer.gid) {
                                *asked = true;
                            }
                        } else if pending.remove(&answer.gid).is_some() {
                            answers.push(answer);
                        }
                    }
                }
                Err(error) => {
                    tracing::debug!("{error}; asking the next coordinator");
                    last_error = Some(error);
                }
            }
        }
        // Nobody asked: no instance may know these GIDs (recovery filters such GIDs out first).
        if anyone_asked && !anyone_answered {
            return Err(last_error.unwrap_or(LinkError::NoCoordinator));
        }
        answers.extend(
            pending
                .into_iter()
                .filter(|(_, asked)| *asked)
                .map(|(gid, _)| Answer {
                    gid,
                    decision: Decision::Unknown,
                    tracked: false,
                }),
        );
        Ok(answers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str) -> Option<CoordinatorId> {
        Some(CoordinatorId::new(name).unwrap())
    }

    #[test]
    fn urls_are_checked_and_named() {
        assert!(check_url("http://127.0.0.1:7600").is_ok());
        assert!(check_url("https://coordinator.example:443").is_ok());
        for bad in ["127.0.0.1:7600", "ftp://h:1", "http://", "not a url"] {
            let error = check_url(bad).unwrap_err().to_string();
            assert!(error.contains(bad), "{error}");
        }
    }

    #[test]
    fn a_decision_shard_gid_goes_to_anyone_and_a_plain_one_to_its_coordinator() {
        let ids = vec![id("c1"), None, id("c2")];
        let row = "treaty:c9:5@s0";
        assert!((0..3).all(|at| Coordinators::may_answer(&ids, at, row)));
        // c1's own GID: only the instance known to be c1.
        let plain = "treaty:c1:5";
        assert!(Coordinators::may_answer(&ids, 0, plain));
        assert!(!Coordinators::may_answer(&ids, 1, plain));
        assert!(!Coordinators::may_answer(&ids, 2, plain));
        // Nobody known to be c3: try those whose id is not known yet.
        let unknown_owner = "treaty:c3:5";
        assert!(!Coordinators::may_answer(&ids, 0, unknown_owner));
        assert!(Coordinators::may_answer(&ids, 1, unknown_owner));
    }

    #[tokio::test]
    async fn the_order_starts_with_the_instance_that_last_worked() {
        let urls: Vec<String> = ["http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"]
            .map(String::from)
            .to_vec();
        let coordinators = Coordinators::new(&urls, None).unwrap();
        assert_eq!(coordinators.order(), vec![0, 1, 2]);
        coordinators.preferred.store(2, Ordering::Relaxed);
        assert_eq!(coordinators.order(), vec![2, 0, 1]);
        assert!(matches!(
            Coordinators::new(&[], None),
            Err(LinkError::NoCoordinator)
        ));
    }

    #[tokio::test]
    async fn nobody_answering_is_an_error_naming_the_last_tried() {
        // Ports nobody listens on (bound, then released).
        let ports: Vec<u16> = (0..2)
            .map(|_| {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port()
            })
            .collect();
        let urls: Vec<String> = ports.iter().map(|p| format!("http://127.0.0.1:{p}")).collect();
        let coordinators = Coordinators::new(&urls, None).unwrap();
        let error = coordinators
            .query_decision(vec!["treaty:c1:1@s0".into()])
            .await
            .unwrap_err();
        assert!(
            matches!(&error, LinkError::Unreachable { url, .. } if url == &urls[1]),
            "{error}"
        );
    }
}
