//! `ptth_server`: offers local TCP services through a relay.
//!
//! For each configured port it keeps a small pool of `listen` long-polls open at the relay.
//! When one returns a connection ID, a task connects to the local service and carries the
//! bytes: `accept` (its answer's body is the client's bytes) and then `downstream` (its
//! request body is the service's bytes). See [`run`].

use std::sync::Arc;
use std::time::Duration;

use ptth_common::Backoff;
use ptth_common::client::{
    RelayClient, carry, error_chain, error_text, from_relay, front_problem, http_client,
};
use ptth_common::config::ServerConfig;
use ptth_common::keys::PrivateKey;
use ptth_common::protocol::{
    ACCEPT_ERROR_HEADER, ACCEPT_ERROR_REFUSED, CONNECTION_ID_HEADER, ConnId, accept_path,
    downstream_path, listen_path,
};
use reqwest::StatusCode;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

/// Errors that stop the server proxy from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The HTTP client could not be set up (for example a bad `ca_file`).
    #[error(transparent)]
    Client(#[from] ptth_common::client::ClientError),
}

/// Upper bound on a `listen` call, above any sane relay `listen_timeout`, so that a relay that
/// vanished without closing the connection is noticed.
const LISTEN_REQUEST_TIMEOUT: Duration = Duration::from_secs(90);
/// Upper bound on waiting for the answer headers of `accept`.
const ACCEPT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug)]
struct Ctx {
    relay: RelayClient,
    config: ServerConfig,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    slots: Arc<Semaphore>,
}

/// Runs the server proxy until `shutdown` is cancelled. Open tunnels are then closed.
pub async fn run(
    config: ServerConfig,
    key: PrivateKey,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let http = http_client(config.ca_file.as_deref())?;
    let relay = RelayClient::new(http, config.relay_url.clone(), key);
    info!(
        relay = %config.relay_url,
        server = %config.name,
        ports = ?config.ports.keys().collect::<Vec<_>>(),
        "server proxy started"
    );
    let ctx = Arc::new(Ctx {
        relay,
        slots: Arc::new(Semaphore::new(config.max_connections)),
        config,
        shutdown,
        tracker: TaskTracker::new(),
    });
    for (port, target) in &ctx.config.ports {
        for slot in 0..ctx.config.listen_pool {
            let span = info_span!("listen", port = %port, slot);
            ctx.tracker.spawn(
                listen_loop(
                    ctx.clone(),
                    port.as_str().to_owned(),
                    target.as_str().to_owned(),
                )
                .instrument(span),
            );
        }
    }
    ctx.shutdown.cancelled().await;
    info!("server proxy shutting down");
    ctx.tracker.close();
    ctx.tracker.wait().await;
    Ok(())
}

async fn listen_loop(ctx: Arc<Ctx>, port: String, target: String) {
    let path = listen_path(ctx.config.name.as_str(), &port);
    let mut backoff = Backoff::new(ctx.config.max_backoff);
    let mut failing = false;
    let mut need_warm_up = true;
    loop {
        let problem = match listen_once(&ctx, &path, need_warm_up).await {
            None => return,
            Some(Ok(id)) => {
                if failing {
                    info!("connected to the relay again");
                }
                failing = false;
                need_warm_up = false;
                backoff.reset();
                if let Some(id) = id {
                    spawn_tunnel(&ctx, &port, &target, id);
                }
                continue;
            }
            Some(Err(problem)) => problem,
        };
        need_warm_up = true;
        let delay = backoff.next_delay();
        if failing {
            debug!(retry_in = ?delay, "{problem}");
        } else {
            warn!(retry_in = ?delay, "{problem}");
            failing = true;
        }
        tokio::select! {
            () = ctx.shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// One `listen` (after opening the connection first when `warm_up`): `None` on shutdown,
/// `Ok(Some(id))` for a client, `Ok(None)` for an empty answer, `Err` with what went wrong.
async fn listen_once(
    ctx: &Ctx,
    path: &str,
    warm_up: bool,
) -> Option<Result<Option<ConnId>, String>> {
    if warm_up {
        // One connection first, then every listen shares it (HTTP/2).
        let warm = tokio::select! {
            () = ctx.shutdown.cancelled() => return None,
            r = ctx.relay.warm_up() => r,
        };
        if let Err(problem) = warm {
            return Some(Err(problem));
        }
    }
    let request = ctx.relay.post(path).timeout(LISTEN_REQUEST_TIMEOUT).send();
    let result = tokio::select! {
        () = ctx.shutdown.cancelled() => return None,
        r = request => r,
    };
    Some(match result {
        // Checked first: a front that answers 200 to anything must not make us spin.
        Ok(r) if !from_relay(&r) => Err(front_problem(r.status())),
        Ok(r) if r.status() == StatusCode::OK => r
            .headers()
            .get(CONNECTION_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<ConnId>().ok())
            .map(Some)
            .ok_or_else(|| "relay answered listen without a valid connection id".to_owned()),
        Ok(r) if r.status() == StatusCode::NO_CONTENT => Ok(None),
        Ok(r) => {
            let status = r.status();
            Err(format!("relay answered {status}: {}", error_text(r).await))
        }
        Err(e) => Err(format!("cannot reach the relay: {}", error_chain(&e))),
    })
}

fn spawn_tunnel(ctx: &Arc<Ctx>, port: &str, target: &str, id: ConnId) {
    let span = info_span!("conn", conn = %id, port = %port);
    let permit = ctx.slots.clone().try_acquire_owned();
    let ctx2 = ctx.clone();
    let target = target.to_owned();
    ctx.tracker.spawn(
        async move {
            let Ok(_permit) = permit else {
                warn!("too many open tunnels (max_connections); refusing");
                refuse(&ctx2, id).await;
                return;
            };
            serve(&ctx2, id, &target).await;
        }
        .instrument(span),
    );
}

async fn refuse(ctx: &Ctx, id: ConnId) {
    let request = ctx
        .relay
        .post(&accept_path(ctx.config.name.as_str(), id))
        .header(ACCEPT_ERROR_HEADER, ACCEPT_ERROR_REFUSED)
        .timeout(ACCEPT_REQUEST_TIMEOUT)
        .send();
    let r = tokio::select! {
        () = ctx.shutdown.cancelled() => return,
        r = request => r,
    };
    if let Err(e) = r {
        debug!(error = %error_chain(&e), "could not report the refusal to the relay");
    }
}

async fn serve(ctx: &Ctx, id: ConnId, target: &str) {
    let connect = tokio::time::timeout(ctx.config.connect_timeout, TcpStream::connect(target));
    let connected = tokio::select! {
        () = ctx.shutdown.cancelled() => return,
        r = connect => r,
    };
    let stream = match connected {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            warn!(%target, error = %e, "cannot connect to the local service");
            return refuse(ctx, id).await;
        }
        Err(_) => {
            warn!(%target, timeout = ?ctx.config.connect_timeout, "connecting to the local service timed out");
            return refuse(ctx, id).await;
        }
    };
    let _ = stream.set_nodelay(true);
    // Until the tunnel is open (`carry` undoes this), any way out of here is a failure: the
    // service then sees a reset, not a client that connected and said nothing.
    ptth_common::tunnel::reset(&stream);
    let name = ctx.config.name.as_str();
    let accepted = tokio::select! {
        () = ctx.shutdown.cancelled() => return,
        r = tokio::time::timeout(ACCEPT_REQUEST_TIMEOUT, ctx.relay.post(&accept_path(name, id)).send()) => r,
    };
    let resp = match accepted {
        Ok(Ok(r)) if r.status() == StatusCode::OK && from_relay(&r) => r,
        Ok(Ok(r)) if !from_relay(&r) => {
            warn!("accept failed: {}", front_problem(r.status()));
            return;
        }
        Ok(Ok(r)) => {
            let status = r.status();
            let reason = error_text(r).await;
            warn!(%status, %reason, "relay refused accept");
            return;
        }
        Ok(Err(e)) => {
            warn!(error = %error_chain(&e), "accept failed");
            return;
        }
        Err(_) => {
            warn!("accept timed out");
            return;
        }
    };
    debug!("tunnel open");
    let upload_path = downstream_path(name, id);
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
