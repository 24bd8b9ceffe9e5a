//! `ptth_proxy`: forwards local TCP ports to services offered through a relay.
//!
//! Each accepted local connection becomes `connect` (its answer brings the connection ID and
//! then the service's bytes) and `upstream` (its request body is the user's bytes). See [`run`].

use std::sync::Arc;
use std::time::Duration;

use ptth_common::client::{
    RelayClient, carry, error_chain, error_text, from_relay, front_problem, http_client,
};
use ptth_common::config::{Forward, ProxyConfig};
use ptth_common::keys::PrivateKey;
use ptth_common::protocol::{CONNECTION_ID_HEADER, ConnId, connect_path, upstream_path};
use reqwest::StatusCode;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, info_span, warn};

/// Errors that stop the proxy from starting.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The HTTP client could not be set up (for example a bad `ca_file`).
    #[error(transparent)]
    Client(#[from] ptth_common::client::ClientError),
}

/// Upper bound on waiting for the answer headers of `connect` (the relay answers within its
/// `accept_timeout`, at most 60 s).
const CONNECT_REQUEST_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Debug)]
struct Ctx {
    relay: RelayClient,
    config: ProxyConfig,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    slots: Arc<Semaphore>,
}

/// Runs the proxy on already bound listeners, one per forward, until `shutdown` is cancelled.
pub async fn run(
    listeners: Vec<(TcpListener, Forward)>,
    config: ProxyConfig,
    key: PrivateKey,
    shutdown: CancellationToken,
) -> Result<(), ProxyError> {
    let http = http_client(config.ca_file.as_deref())?;
    let relay = RelayClient::new(http, config.relay_url.clone(), key);
    let ctx = Arc::new(Ctx {
        relay,
        slots: Arc::new(Semaphore::new(config.max_connections)),
        config,
        shutdown,
        tracker: TaskTracker::new(),
    });
    // Open the connection to the relay before the first user does, so that tunnels opened
    // at once share it (HTTP/2); a failure here is only logged: each connect retries.
    let warm = ctx.relay.clone();
    let stop = ctx.shutdown.clone();
    ctx.tracker.spawn(async move {
        tokio::select! {
            () = stop.cancelled() => {}
            r = warm.warm_up() => if let Err(problem) = r {
                warn!("{problem}");
            }
        }
    });
    for (listener, fwd) in listeners {
        let local = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        info!(listen = %local, server = %fwd.server, port = %fwd.port, relay = %ctx.config.relay_url, "forwarding");
        let span = info_span!("forward", listen = %local, server = %fwd.server, port = %fwd.port);
        ctx.tracker
            .spawn(accept_loop(ctx.clone(), listener, fwd).instrument(span));
    }
    ctx.shutdown.cancelled().await;
    info!("proxy shutting down");
    ctx.tracker.close();
    ctx.tracker.wait().await;
    Ok(())
}

async fn accept_loop(ctx: Arc<Ctx>, listener: TcpListener, fwd: Forward) {
    let fwd = Arc::new(fwd);
    loop {
        let (stream, peer) = tokio::select! {
            () = ctx.shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = ctx.slots.clone().try_acquire_owned() else {
            warn!(%peer, "too many open tunnels (max_connections); resetting the new connection");
            ptth_common::tunnel::reset(&stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let span = info_span!("conn", %peer, conn = tracing::field::Empty);
        let ctx2 = ctx.clone();
        let fwd = fwd.clone();
        ctx.tracker.spawn(
            async move {
                let _permit = permit;
                serve(&ctx2, &fwd, stream).await;
            }
            .instrument(span),
        );
    }
}

fn explain(status: StatusCode) -> &'static str {
    match status {
        StatusCode::SERVICE_UNAVAILABLE => "server offline (or relay busy)",
        StatusCode::NOT_FOUND => "unknown port: the server does not offer it",
        StatusCode::BAD_GATEWAY => "the server could not connect to its target (refused)",
        StatusCode::FORBIDDEN => "not allowed: this client's allow list does not grant the port",
        StatusCode::GATEWAY_TIMEOUT => "the server did not take the connection in time",
        StatusCode::UNAUTHORIZED => {
            "the relay refused our signature (key not configured there, or clocks differ)"
        }
        _ => "unexpected answer from the relay",
    }
}

async fn serve(ctx: &Ctx, fwd: &Forward, stream: TcpStream) {
    // Until the tunnel is open (`carry` undoes this), any way out of here is a failure: the
    // local socket is then reset, as a refused connection would be, rather than closed as if
    // the service had nothing to say.
    ptth_common::tunnel::reset(&stream);
    let path = connect_path(fwd.server.as_str(), fwd.port.as_str());
    let request = tokio::time::timeout(CONNECT_REQUEST_TIMEOUT, ctx.relay.post(&path).send());
    let result = tokio::select! {
        () = ctx.shutdown.cancelled() => return,
        r = request => r,
    };
    let resp = match result {
        Ok(Ok(r)) if r.status() == StatusCode::OK => r,
        Ok(Ok(r)) if !from_relay(&r) => {
            error!(
                "connect to {}/{} failed: {}",
                fwd.server,
                fwd.port,
                front_problem(r.status())
            );
            return;
        }
        Ok(Ok(r)) => {
            let status = r.status();
            let reason = error_text(r).await;
            error!(
                %status,
                %reason,
                "connect to {}/{} failed: {}",
                fwd.server,
                fwd.port,
                explain(status)
            );
            return;
        }
        Ok(Err(e)) => {
            error!(error = %error_chain(&e), "connect to {}/{} failed: cannot reach the relay", fwd.server, fwd.port);
            return;
        }
        Err(_) => {
            error!(
                "connect to {}/{} failed: the relay did not answer in time",
                fwd.server, fwd.port
            );
            return;
        }
    };
    let id = resp
        .headers()
        .get(CONNECTION_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<ConnId>().ok());
    let Some(id) = id else {
        error!("relay answered connect without a valid connection id");
        return;
    };
    tracing::Span::current().record("conn", tracing::field::display(id));
    debug!("tunnel open");
    let upload_path = upstream_path(fwd.server.as_str(), id);
    carry(
        &ctx.relay,
        &upload_path,
        resp,
        stream,
        ctx.config.heartbeat_interval,
        &ctx.shutdown,
    )
    .await;
}
