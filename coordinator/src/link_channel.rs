//! What a participant link runs on: the HTTP/2 connection to an agent (`h2_channel`), or, for a
//! shard the coordinator drives itself (`--shard NAME=postgres://...`), the participant's own
//! services called in this process (`treaty_participant::InProcess`). Both carry the same gRPC
//! calls, so `participants.rs` has one code path for both kinds, and a transaction may mix them.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use tonic::Status;
use tower_service::Service;
use treaty_participant::InProcess;

use crate::h2_channel::{H2Channel, ResponseBody};

#[derive(Clone)]
pub enum LinkChannel {
    /// A participant agent over the network.
    Remote(H2Channel),
    /// A participant running inside the coordinator.
    Local(InProcess),
}

impl LinkChannel {
    pub fn is_local(&self) -> bool {
        matches!(self, LinkChannel::Local(_))
    }
}

type Boxed<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

/// The answer of either kind of link, without a second allocation per call: both inner futures
/// are already boxed (and so `Unpin`).
pub enum LinkFuture {
    Remote(Boxed<Response<ResponseBody>, Status>),
    Local(Boxed<Response<tonic::body::Body>, Infallible>),
}

impl Future for LinkFuture {
    type Output = Result<Response<LinkBody>, Status>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            LinkFuture::Remote(future) => future
                .as_mut()
                .poll(cx)
                .map_ok(|response| response.map(LinkBody::Remote)),
            LinkFuture::Local(future) => future.as_mut().poll(cx).map(|answer| match answer {
                Ok(response) => Ok(response.map(LinkBody::Local)),
                Err(never) => match never {},
            }),
        }
    }
}

impl Service<Request<tonic::body::Body>> for LinkChannel {
    type Response = Response<LinkBody>;
    type Error = Status;
    type Future = LinkFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        // Both kinds are always ready: readiness is awaited inside the call.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<tonic::body::Body>) -> LinkFuture {
        match self {
            LinkChannel::Remote(channel) => LinkFuture::Remote(channel.call(request)),
            LinkChannel::Local(service) => LinkFuture::Local(service.call(request)),
        }
    }
}

/// A response body of either kind of link.
pub enum LinkBody {
    Remote(ResponseBody),
    Local(tonic::body::Body),
}

impl Body for LinkBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        match self.get_mut() {
            LinkBody::Remote(body) => Pin::new(body).poll_frame(cx),
            LinkBody::Local(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            LinkBody::Remote(body) => body.is_end_stream(),
            LinkBody::Local(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            LinkBody::Remote(body) => body.size_hint(),
            LinkBody::Local(body) => body.size_hint(),
        }
    }
}
