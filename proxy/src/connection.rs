//! The way of one connection: admit, read and check the request, choose and try upstreams,
//! forward the 101, relay.
//!
//! Every refusal leaves through [`refuse`], which writes the answer, logs it and closes politely;
//! every handshake outcome is logged once, with client, upstream, status and duration.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::cluster::Lease;
use crate::config::UnderscoreHeaders;
use crate::handshake::{self, Rejection};
use crate::limits::{Refusal, Slot};
use crate::log_limit::Throttle;
use crate::metrics::{HandshakeOutcome, Metrics, Scoped};
use crate::service::Service;
use crate::socket_options::Inherited;
use crate::stream::{Prefixed, Stream};
use crate::upgrade::PairState;
use crate::upstream::{self, Upgraded, UpstreamError};
use crate::{Shared, access, config, headers, proxy_protocol, relay, socket_options, tls};

/// A refused client gets this long to read the answer (and close) before the socket is closed:
/// closing with unread input would send a reset that can destroy the answer in flight.
const LINGER: Duration = Duration::from_secs(1);
/// Most bytes read and discarded from a refused client while lingering.
const LINGER_BYTES: usize = 64 * 1024;

/// Refusals are caused by clients, as are the upstream's answers to their requests (a 404 for a
/// path, a 403 for an Origin): bounded, so that nobody can fill the log.
static REFUSAL_LINES: Throttle = Throttle::new(20);
static UPSTREAM_ANSWER_LINES: Throttle = Throttle::new(20);

/// Serves one connection, accepted on the listener configured as `listen`, with the socket
/// options it `inherited` from it, holding `permit` (its place under the listeners' cap) until
/// it ends. `shutdown` is cancelled when the listener's drain is over: a handshake in progress
/// is abandoned, a relayed connection is cut and still logged and counted.
///
/// Not an `async fn`: its future would keep each argument twice, as the argument and as the
/// body's own binding, for the connection's whole life (a parked connection's memory is made
/// of this future).
#[allow(clippy::manual_async_fn)]
pub(crate) fn serve(
    client: TcpStream,
    peer: SocketAddr,
    listen: SocketAddr,
    inherited: Inherited,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> impl Future<Output = ()> {
    // Each phase in a box of its own, freed when it ends: inline, both would stay allocated for
    // the connection's whole life (a task is as large as its largest state, and the compiler
    // does not overlap these), some 40 KB per connection. The handshake's box is made here and
    // takes what only the handshake needs (the client socket, the addresses, the inherited
    // options: 136 B), so that the connection's future does not keep room for them after it.
    let handshake = {
        let shared = Arc::clone(&shared);
        Box::pin(async move { handshake_phase(client, peer, listen, &inherited, &shared).await })
    };
    async move {
        // Held to the end (named so that the block takes it; see `Relayable::run`).
        let _held = &permit;
        let relayable = tokio::select! {
            r = handshake => r,
            _ = shutdown.cancelled() => None,
        };
        relay_to_end(relayable, &shared, &shutdown).await;
    }
}

/// Relays a connection to its end. Each run of its relay, and each wait while the kernel relay
/// has the pair parked (`relay.park_after`), is boxed, freed when it returns: a parked
/// connection keeps only its record and what wakes it. Not an `async fn`, and the connection is kept in `next` alone,
/// moved whole into each run: a future keeps room for every binding it holds across a wait.
#[allow(clippy::manual_async_fn)]
fn relay_to_end<'a>(
    mut next: Option<Relayable>,
    shared: &'a Shared,
    shutdown: &'a CancellationToken,
) -> impl Future<Output = ()> + 'a {
    async move {
        loop {
            // (`let else`, not `while let`, whose taken value would live through the body.)
            let Some(r) = next.take() else {
                return;
            };
            next = Box::pin(r.run(shared, shutdown)).await;
            if let Some(parked) = &next {
                // Boxed too: a connection that never parks (the userspace relay's) keeps no
                // room for the wait.
                Box::pin(parked.wait(shared, shutdown)).await;
            }
        }
    }
}

/// Admits a connection a predecessor process handed over again under its service (its slot, no
/// token: it was admitted once), with what is left of its lifetime. Done at once, before the
/// connection's task runs, so that the per-client counts hold as soon as the predecessor has
/// handed everything over.
pub(crate) fn adopt(state: PairState, moved: relay::Moved, shared: &Shared) -> Resumed {
    let rt = shared.runtime.load_full();
    let svc = match rt.services.iter().find(|s| s.name() == state.service) {
        Some(s) => Arc::clone(s),
        None => {
            // Its service is gone from this configuration: it is relayed with the first
            // service's settings rather than cut.
            warn!(service = %state.service, request_id = %state.request_id, "handover: a connection of a service this configuration lacks; relayed with the first service's settings");
            Arc::clone(&rt.services[0])
        }
    };
    drop(rt);
    let ip = state.client.ip().to_canonical();
    let admission = Admission {
        _slot: svc.state.limiter.adopt(ip),
        _lease: svc
            .state
            .cluster
            .adopt(&svc.config.limits, svc.name(), ip, &shared.metrics),
    };
    let tracked = (svc.config.upstreams.balance == config::Balance::LeastConnections)
        .then(|| svc.state.load.track(state.upstream));
    let r = Relayable {
        pair: Pair::Moved(moved),
        conn: Conn {
            client: state.client,
            addr: state.upstream,
            request_id: state.request_id,
            started: Instant::now() - Duration::from_millis(state.age_ms),
            deadline: state
                .lifetime_left_ms
                .map(|ms| tokio::time::Instant::now() + Duration::from_millis(ms)),
            svc,
            _admission: admission,
            _tracked: tracked,
        },
    };
    Resumed(r)
}

/// A handed-over connection, admitted here ([`adopt`]).
pub(crate) struct Resumed(Relayable);

impl Resumed {
    /// Carries the connection on to its end.
    pub(crate) async fn run(self, shared: Arc<Shared>, shutdown: CancellationToken) {
        relay_to_end(Some(self.0), &shared, &shutdown).await;
    }
}

/// The two ends of a relayable connection.
enum Pair {
    /// Just upgraded here.
    Fresh(Stream, Stream),
    /// Handed over by a predecessor process, where it was relayed.
    Moved(relay::Moved),
    /// Parked by the kernel relay, waiting to run again.
    Parked(relay::Parked),
}

/// A connection whose handshake succeeded, ready to be relayed.
struct Relayable {
    pair: Pair,
    conn: Conn,
}

/// A relayed connection's own state besides its sockets: what its limits, lifetime and log
/// line need, the same whichever relay carries it and whether it is parked.
struct Conn {
    /// The client's address (its PROXY protocol source behind an L4 layer).
    client: SocketAddr,
    addr: SocketAddr,
    request_id: String,
    started: Instant,
    /// When its maximum lifetime ends.
    deadline: Option<tokio::time::Instant>,
    /// The service as it was when the connection started: a reload does not change it.
    svc: Arc<Service>,
    _admission: Admission,
    /// Counts the connection against its upstream (least-connections) until it ends.
    _tracked: Option<crate::balance::Tracked>,
}

impl Relayable {
    /// Relays the connection to its end, or until the kernel relay parks it: then the
    /// connection as it is now, for [`Relayable::wait`]. Not an `async fn`: its future would
    /// hold `self` and the fields taken out of it both, for as long as the relay runs.
    fn run<'a>(
        self,
        shared: &'a Shared,
        shutdown: &'a CancellationToken,
    ) -> impl Future<Output = Option<Relayable>> + 'a {
        let Relayable { pair, conn } = self;
        async move {
            // `conn` is held whole to the end, or to a park: the admission's slot and lease, the
            // upstream's count with it (moved into locals, its fields would take room twice).
            let Conn {
                client,
                addr,
                request_id,
                started,
                deadline,
                svc,
                ..
            } = &conn;
            let ip = client.ip().to_canonical();
            let cfg = &svc.config.relay;
            let stop = stop_of(shared, shutdown, *deadline, request_id);
            let metrics = shared.metrics.of_service(&svc.series);
            let kernel = shared.kernel.as_ref();
            let relayed = match pair {
                Pair::Fresh(client, upstream) => relay::relay(client, upstream, kernel, cfg, metrics, stop).await,
                Pair::Moved(moved) => relay::resume(moved, kernel, cfg, metrics, stop).await,
                Pair::Parked(parked) => relay::unpark(parked, kernel, cfg, metrics, stop).await,
            };
            let o = match relayed {
                relay::Relayed::Ended(o) => o,
                relay::Relayed::Moved(moved) => {
                    let state = PairState {
                        service: svc.name().to_string(),
                        client: *client,
                        upstream: *addr,
                        request_id: request_id.clone(),
                        age_ms: started.elapsed().as_millis() as u64,
                        lifetime_left_ms: deadline
                            .map(|d| d.saturating_duration_since(tokio::time::Instant::now()).as_millis() as u64),
                        client_to_upstream: moved.client_to_upstream,
                        upstream_to_client: moved.upstream_to_client,
                        kernel: moved.kernel,
                    };
                    crate::upgrade::hand_over(shared, state, moved);
                    return None;
                }
                relay::Relayed::Parked(parked) => {
                    return Some(Relayable {
                        pair: Pair::Parked(parked),
                        conn,
                    });
                }
            };
            info!(
                service = %svc.name(), client = %ip, upstream = %addr, %request_id, relay = %o.mode.as_str(), end = %o.end.as_str(),
                client_to_upstream = o.client_to_upstream, upstream_to_client = o.upstream_to_client,
                repeated_cut = o.repeated_cut, passed = o.passed, duration_ms = started.elapsed().as_millis() as u64, "connection closed"
            );
            None
        }
    }

    /// Waits until a parked connection must run again (at once for any other). Not an `async
    /// fn`, for the reason `run` gives.
    #[allow(clippy::manual_async_fn)]
    fn wait<'a>(&'a self, shared: &'a Shared, shutdown: &'a CancellationToken) -> impl Future<Output = ()> + 'a {
        async move {
            if let Pair::Parked(p) = &self.pair {
                let c = &self.conn;
                let stop = stop_of(shared, shutdown, c.deadline, &c.request_id);
                p.wait(&c.svc.config.relay, stop).await;
            }
        }
    }
}

/// What ends or moves a connection's relay from outside (see [`relay::Stop`]).
fn stop_of<'a>(
    shared: &'a Shared,
    shutdown: &'a CancellationToken,
    deadline: Option<tokio::time::Instant>,
    request_id: &str,
) -> relay::Stop<'a> {
    relay::Stop {
        shutdown,
        deadline,
        handover: &shared.handover,
        close_delay: share_of(shared.runtime.load().config.close_spread, request_id),
    }
}

/// A connection's share of `spread`, fixed by its request id (random hex): when, within the
/// window, a drain's end closes it.
fn share_of(spread: Duration, request_id: &str) -> Duration {
    let ms = spread.as_millis() as u64;
    if ms == 0 {
        return Duration::ZERO;
    }
    let random = request_id
        .get(16..)
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .unwrap_or(0);
    Duration::from_millis(random % ms)
}

/// How long a relayed connection may stay open: `max_lifetime` and a share of the jitter fixed
/// by the request id (random hex), so that one connection's lifetime is the same in every log.
fn lifetime(cfg: &config::Relay, request_id: &str) -> Option<Duration> {
    let base = cfg.max_lifetime?;
    let jitter_ms = cfg.max_lifetime_jitter.as_millis() as u64;
    let random = request_id
        .get(..16)
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .unwrap_or(0);
    Some(base + Duration::from_millis(random % (jitter_ms + 1)))
}

/// A service's admission: its client networks, then its limiter (rate, per-client and
/// per-network caps, its total cap), then the limits its fleet shares (`[cluster]`: one call
/// to the store, within `cluster.timeout`), only for a client this node admitted: one over the
/// node's own limits costs no call. Cluster refusals are the node's 429s (rate, connections;
/// `on_store_error = "deny"`: 503). The slot and the cluster lease are held until the
/// connection ends.
async fn admit(svc: &Service, ip: IpAddr, now: Instant, metrics: &Metrics) -> Result<Admission, Answer> {
    if !access::client_allowed(&svc.config.access, ip) {
        return Err(Answer::Rejected(Rejection::Forbidden("client network")));
    }
    let slot = svc.state.limiter.admit(ip, now).map_err(Answer::Limited)?;
    // A refusal by the fleet drops the slot: the node's counts go back.
    let lease = svc
        .state
        .cluster
        .admit(&svc.config.limits, svc.name(), ip, metrics)
        .await
        .map_err(Answer::Limited)?;
    Ok(Admission {
        _slot: slot,
        _lease: lease,
    })
}

/// A client admitted by a service: the service (its index in the runtime), and what it holds.
type Admitted = (usize, Arc<Service>, Admission);

/// What an admitted connection holds until it ends: its slot in the service's limiter and, with
/// cluster limits, its lease in the fleet's store (dropping either gives it back).
struct Admission {
    _slot: Slot,
    _lease: Option<Lease>,
}

/// Admission, TLS, request, routing, upstream handshake and the 101's delivery. `None`: the
/// connection ended here (refused, failed, or the client left), already answered, logged and
/// counted.
async fn handshake_phase(
    mut client: TcpStream,
    peer: SocketAddr,
    listen: SocketAddr,
    inherited: &Inherited,
    shared: &Arc<Shared>,
) -> Option<Relayable> {
    let started = Instant::now();
    // This connection keeps the configuration it started with, whatever a reload does meanwhile.
    let rt = shared.runtime.load_full();
    // None: a reload removed the listener after this connection was queued; it is closed.
    let routes = rt.routes.listener(listen)?;
    let unrouted = shared.metrics.of("");
    // Behind an L4 layer the client is the one its PROXY protocol header names; the bytes read
    // past the header are the request's start (or the ClientHello's).
    let (client_addr, early) = match &routes.proxy_protocol {
        None => (peer, Vec::new()),
        Some(pp) => match proxy_protocol::read_header(&mut client, peer, pp).await {
            Ok(read) => read,
            Err(refusal) => {
                shared.metrics.proxy_protocol_refused(refusal);
                if let Some(suppressed) = REFUSAL_LINES.admit(Instant::now()) {
                    info!(peer = %peer, reason = refusal.as_str(), suppressed, "PROXY protocol header refused; connection closed");
                }
                return None;
            }
        },
    };
    let ip = client_addr.ip().to_canonical();
    // A listener of one service: its admission rules apply before a byte of the request (or of
    // the TLS handshake) is read.
    let mut admitted: Option<Admitted> = None;
    if let Some(i) = routes.only {
        let svc = &rt.services[i];
        match admit(svc, ip, started, &shared.metrics).await {
            Ok(slot) => {
                socket_options::client(&client, inherited, &svc.config.keepalive);
                admitted = Some((i, Arc::clone(svc), slot));
            }
            Err(answer) if routes.tls => {
                // Nothing can be said to a TLS client before its handshake, and a handshake is
                // what a refusal must not cost: closed unanswered, counted and logged.
                refused_unanswered(ip, &answer, started, shared.metrics.of_service(&svc.series));
                return None;
            }
            Err(answer) => {
                refuse(
                    Stream::plain(client, Vec::new()),
                    ip,
                    answer,
                    started,
                    shared.metrics.of_service(&svc.series),
                )
                .await;
                return None;
            }
        }
    }
    let mut client = if routes.tls {
        // The ClientHello's name picks the service (and its certificate); on a shared listener
        // its admission comes here, before any cryptography.
        let hello_started = tokio::time::Instant::now();
        let read_metrics = admitted
            .as_ref()
            .map_or(unrouted, |(_, svc, _)| shared.metrics.of_service(&svc.series));
        let hello = match tls::Hello::read(Prefixed::new(early, client), hello_started + routes.tls_timeout).await {
            Ok(h) => h,
            Err(failure) => {
                tls_failed(ip, failure, started, read_metrics);
                return None;
            }
        };
        let name = hello.server_name();
        let Some(i) = routes.certificate_for(name.as_deref()) else {
            tls_failed(ip, tls::Failure::NoCertificate, started, read_metrics);
            return None;
        };
        let svc = Arc::clone(&rt.services[i]);
        let m = shared.metrics.of_service(&svc.series);
        if admitted.is_none() {
            match admit(&svc, ip, started, &shared.metrics).await {
                Ok(slot) => {
                    socket_options::client(&hello.socket(), inherited, &svc.config.keepalive);
                    admitted = Some((i, Arc::clone(&svc), slot));
                }
                Err(answer) => {
                    refused_unanswered(ip, &answer, started, m);
                    return None;
                }
            }
        }
        let (Some(config), Some(t)) = (&svc.tls, &svc.config.tls) else {
            unreachable!("a TLS listener's services have TLS");
        };
        match hello
            .finish(Arc::clone(config), hello_started + t.handshake_timeout)
            .await
        {
            Ok(stream) => stream,
            Err(failure) => {
                tls_failed(ip, failure, started, m);
                return None;
            }
        }
    } else {
        Stream::plain(client, early)
    };
    let (bounds, underscore, read_metrics) = match &admitted {
        Some((_, svc, _)) => (
            &svc.config.handshake,
            svc.config.headers.underscore_headers,
            shared.metrics.of_service(&svc.series),
        ),
        // Before its service is known, a request is read with the most any service of the
        // listener allows, and checked against its own service's bounds once routed.
        None => (&routes.read, UnderscoreHeaders::Keep, unrouted),
    };
    let read = handshake::read_request(&mut client, bounds, underscore);
    let request = match tokio::time::timeout(bounds.header_timeout, read).await {
        Ok(Ok(Some(r))) => r,
        Ok(Ok(None)) => {
            debug!(client = %ip, "closed before sending a complete request");
            read_metrics.handshake(HandshakeOutcome::ClientGone, secs(started));
            return None;
        }
        Ok(Err(rejection)) => {
            refuse(client, ip, Answer::Rejected(rejection), started, read_metrics).await;
            return None;
        }
        Err(_) => {
            refuse(client, ip, Answer::Rejected(Rejection::Timeout), started, read_metrics).await;
            return None;
        }
    };
    let routed = routes.route(request.host());
    // No service of the listener has the host; or the client was admitted before the request by
    // another service (a Host other than the TLS name's is misdirected too).
    let misdirected = match &admitted {
        Some((i, ..)) => routed != Some(*i),
        None => routed.is_none(),
    };
    if misdirected {
        refuse(
            client,
            ip,
            Answer::Rejected(Rejection::UnknownHost),
            started,
            read_metrics,
        )
        .await;
        return None;
    }
    let (svc, slot) = match (admitted, routed) {
        (Some((_, svc, slot)), _) => (svc, slot),
        (None, None) => unreachable!("misdirected"),
        (None, Some(i)) => {
            let svc = Arc::clone(&rt.services[i]);
            let m = shared.metrics.of_service(&svc.series);
            let cfg = &svc.config;
            let admitted = match request.conforms(&cfg.handshake, cfg.headers.underscore_headers) {
                Ok(()) => admit(&svc, ip, started, &shared.metrics).await,
                Err(r) => Err(Answer::Rejected(r)),
            };
            match admitted {
                Ok(slot) => {
                    socket_options::client(client.tcp(), inherited, &cfg.keepalive);
                    (svc, slot)
                }
                Err(answer) => {
                    refuse(client, ip, answer, started, m).await;
                    return None;
                }
            }
        }
    };
    drop(rt);
    let cfg = &svc.config;
    let metrics = shared.metrics.of_service(&svc.series);
    let service = svc.name();

    if !access::origin_allowed(&cfg.access, &request) {
        refuse(
            client,
            ip,
            Answer::Rejected(Rejection::Forbidden("origin")),
            started,
            metrics,
        )
        .await;
        return None;
    }

    let request_id = uuid::Uuid::new_v4().simple().to_string();
    let mut forwarded = headers::forwarded_request(&request, ip, &request_id, &cfg.headers);
    if cfg.upstreams.send_proxy_protocol {
        // Sent with the request, in one write: the upstream reads the header first.
        let local = client.tcp().local_addr().unwrap_or(client_addr);
        let mut with_header = proxy_protocol::v2_header(client_addr, local, &request_id);
        with_header.extend_from_slice(&forwarded);
        forwarded = with_header;
    }
    let state = &svc.state;
    let (mut attempts, mut timeouts) = (0, 0);
    let mut upgraded = None;
    for addr in state.health.filter(svc.balancer.choose(ip, &state.load), started) {
        attempts += 1;
        metrics.upstream_attempt(addr);
        // Counted for least-connections from the attempt on, so that a burst of handshakes
        // spreads before any of them is relayed; other methods take no lock for it. (A reload
        // that switches to least-connections starts from the connections opened after it.)
        let tracked = (cfg.upstreams.balance == config::Balance::LeastConnections).then(|| state.load.track(addr));
        let up = &cfg.upstreams;
        let keep_answer = up.on_refusal == config::OnRefusal::Forward;
        match upstream::handshake(
            addr,
            upstream::tls_for(up, addr),
            &forwarded,
            &request.key,
            up.timeout,
            up.max_head_bytes,
            keep_answer,
        )
        .await
        {
            Ok(u) => {
                state.health.success(addr, &shared.metrics);
                upgraded = Some((addr, u, tracked));
                break;
            }
            Err(e) => {
                metrics.upstream_failure(addr, e.reason());
                if e.counts_against_health(&up.health) {
                    state.health.failure(addr, Instant::now(), &shared.metrics);
                }
                if !e.retryable() {
                    // `on_refusal = "forward"`: the upstream's own answer, else nothing.
                    let answer = match &e {
                        UpstreamError::Status(_, Some(a)) => crate::plain_http::passed_on(&a.head, &a.body),
                        _ => None,
                    };
                    upstream_refused(service, ip, addr, &request_id, e, &up.health, started);
                    metrics.handshake(HandshakeOutcome::UpstreamError, secs(started));
                    if let Some(answer) = answer
                        && tokio::time::timeout(LINGER, client.write_all(&answer)).await.is_err()
                    {
                        return None;
                    }
                    close_politely(client).await;
                    return None;
                }
                timeouts += usize::from(matches!(e, UpstreamError::Timeout(_)));
                warn!(service, client = %ip, upstream = %addr, %request_id, error = %e, "upstream failed, trying the next one");
            }
        }
    }
    let Some((
        addr,
        Upgraded {
            stream: mut upstream,
            response,
        },
        tracked,
    )) = upgraded
    else {
        warn!(service, client = %ip, %request_id, attempts, "no upstream answered");
        let answer = if attempts > 0 && timeouts == attempts {
            Answer::UpstreamTimeout
        } else {
            Answer::NoUpstream
        };
        refuse(client, ip, answer, started, metrics).await;
        return None;
    };
    socket_options::keepalive(upstream.tcp(), &cfg.keepalive);
    info!(
        service, client = %ip, upstream = %addr, %request_id, status = 101,
        duration_ms = started.elapsed().as_millis() as u64, "handshake"
    );

    // The 101 and whatever the upstream sent behind it go first, byte for byte; then the bytes the
    // client sent behind its request. Only then does the relay take over, so nothing overtakes.
    if let Err(e) = client.write_all(&response.buf).await {
        debug!(service, client = %ip, %request_id, error = %e, "client gone before the 101 was delivered");
        metrics.handshake(HandshakeOutcome::ClientGone, secs(started));
        return None;
    }
    metrics.handshake(HandshakeOutcome::Upgraded, secs(started));
    if let Err(e) = upstream.write_all(request.rest()).await {
        debug!(service, client = %ip, %request_id, error = %e, "upstream gone before the client's first bytes");
        return None;
    }
    drop(request);
    Some(Relayable {
        pair: Pair::Fresh(client, upstream),
        conn: Conn {
            client: client_addr,
            addr,
            deadline: lifetime(&svc.config.relay, &request_id).map(|t| tokio::time::Instant::now() + t),
            request_id,
            started,
            _admission: slot,
            _tracked: tracked,
            svc,
        },
    })
}

fn secs(since: Instant) -> f64 {
    since.elapsed().as_secs_f64()
}

/// An upstream that answered, but not with a valid 101: both connections are closed and nothing
/// is forwarded to the client (it learns only that the connection closed). A failure of the
/// upstream's own is a warning; an answer any client can provoke is information, rate-limited.
fn upstream_refused(
    service: &str,
    ip: IpAddr,
    addr: SocketAddr,
    request_id: &str,
    e: UpstreamError,
    health: &config::Health,
    started: Instant,
) {
    let status = match e {
        UpstreamError::Status(s, _) => Some(s),
        _ => None,
    };
    let duration_ms = started.elapsed().as_millis() as u64;
    if e.counts_against_health(health) {
        warn!(
            service, client = %ip, upstream = %addr, %request_id, upstream_status = status, error = %e,
            duration_ms, "upstream refused the handshake"
        );
    } else if let Some(suppressed) = UPSTREAM_ANSWER_LINES.admit(Instant::now()) {
        info!(
            service, client = %ip, upstream = %addr, %request_id, upstream_status = status, error = %e,
            duration_ms, suppressed, "upstream refused the handshake"
        );
    }
}

/// What a refused client is told.
enum Answer {
    Limited(Refusal),
    Rejected(Rejection),
    /// Every upstream tried timed out: 400.
    UpstreamTimeout,
    /// No upstream answered: 400.
    NoUpstream,
}

impl Answer {
    fn status(&self) -> u16 {
        match self {
            Answer::Limited(Refusal::ServiceFull | Refusal::StoreUnavailable) => 503,
            Answer::Limited(_) => 429,
            Answer::Rejected(r) => r.status(),
            Answer::UpstreamTimeout | Answer::NoUpstream => 400,
        }
    }

    fn outcome(&self) -> HandshakeOutcome {
        match self {
            Answer::Limited(Refusal::RateLimited { .. }) => HandshakeOutcome::RateLimited,
            Answer::Limited(Refusal::ServiceFull) => HandshakeOutcome::ServiceFull,
            Answer::Limited(Refusal::StoreUnavailable) => HandshakeOutcome::StoreUnavailable,
            Answer::Limited(_) => HandshakeOutcome::ConnectionLimited,
            Answer::Rejected(r) => HandshakeOutcome::Refused(r.status()),
            Answer::UpstreamTimeout => HandshakeOutcome::UpstreamTimeout,
            Answer::NoUpstream => HandshakeOutcome::NoUpstream,
        }
    }

    fn reason(&self) -> String {
        match self {
            Answer::UpstreamTimeout => "no upstream available (timeout)".into(),
            Answer::NoUpstream => "no upstream available".into(),
            Answer::Limited(Refusal::RateLimited { .. }) => "request rate limit".into(),
            Answer::Limited(Refusal::TooManyConnections) => "connection limit".into(),
            Answer::Limited(Refusal::TooManyFromNetwork) => "network connection limit".into(),
            Answer::Limited(Refusal::TableFull) => "client table full".into(),
            Answer::Limited(Refusal::ServiceFull) => "service connection limit".into(),
            Answer::Limited(Refusal::StoreUnavailable) => "cluster limits unavailable".into(),
            Answer::Rejected(r) => r.to_string(),
        }
    }

    /// The whole HTTP response: small, plain text, and always closing the connection.
    fn response(&self) -> Vec<u8> {
        let mut extra = String::new();
        match self {
            Answer::Limited(Refusal::RateLimited { retry_after }) => {
                extra = format!("Retry-After: {}\r\n", retry_after.as_secs_f64().ceil().max(1.0) as u64);
            }
            Answer::Limited(_) => extra.push_str("Retry-After: 1\r\n"),
            Answer::Rejected(Rejection::UnsupportedVersion) => extra.push_str("Sec-WebSocket-Version: 13\r\n"),
            Answer::Rejected(_) | Answer::UpstreamTimeout | Answer::NoUpstream => {}
        }
        crate::plain_http::closing_answer(self.status(), &extra, "text/plain", &format!("{}\n", self.reason()))
    }
}

/// A client refused before its TLS handshake: counted and logged as any refusal, and closed
/// without an answer (none can be given before the handshake).
fn refused_unanswered(ip: IpAddr, answer: &Answer, started: Instant, metrics: Scoped<'_>) {
    metrics.handshake(answer.outcome(), secs(started));
    if let Some(suppressed) = REFUSAL_LINES.admit(Instant::now()) {
        info!(
            service = metrics.service(), client = %ip, status = answer.status(), reason = %answer.reason(),
            duration_ms = started.elapsed().as_millis() as u64, suppressed, "handshake refused before TLS; closed unanswered"
        );
    }
}

/// A failed TLS handshake: counted by reason and logged (bounded); the connection is closed.
fn tls_failed(ip: IpAddr, failure: tls::Failure, started: Instant, metrics: Scoped<'_>) {
    metrics.tls_failed(failure);
    if let Some(suppressed) = REFUSAL_LINES.admit(Instant::now()) {
        info!(
            service = metrics.service(), client = %ip, reason = failure.as_str(),
            duration_ms = started.elapsed().as_millis() as u64, suppressed, "TLS handshake failed; connection closed"
        );
    }
}

/// Answers a refused client, logs it, and closes after a bounded linger.
async fn refuse(mut client: Stream, ip: IpAddr, answer: Answer, started: Instant, metrics: Scoped<'_>) {
    metrics.handshake(answer.outcome(), secs(started));
    if let Some(suppressed) = REFUSAL_LINES.admit(Instant::now()) {
        info!(
            service = metrics.service(), client = %ip, status = answer.status(), reason = %answer.reason(),
            duration_ms = started.elapsed().as_millis() as u64, suppressed, "handshake refused"
        );
    }
    if tokio::time::timeout(LINGER, client.write_all(&answer.response()))
        .await
        .is_ok_and(|r| r.is_ok())
    {
        close_politely(client).await;
    }
}

/// Sends a FIN, then reads and discards what the client still sends (bounded in bytes and
/// time) before closing: closing with unread input would send a reset instead, which can destroy
/// an answer still in flight and turns an orderly close into an abort.
async fn close_politely(mut client: Stream) {
    let _ = tokio::time::timeout(LINGER, async {
        client.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut drained = 0;
        while drained < LINGER_BYTES {
            let n = client.read(&mut sink).await?;
            if n == 0 {
                break;
            }
            drained += n;
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_carry_their_headers() {
        let r = String::from_utf8(
            Answer::Limited(Refusal::RateLimited {
                retry_after: Duration::from_millis(1500),
            })
            .response(),
        )
        .unwrap();
        assert!(
            r.starts_with("HTTP/1.1 429 Too Many Requests\r\nRetry-After: 2\r\n"),
            "{r}"
        );
        let r = String::from_utf8(Answer::Rejected(Rejection::UnsupportedVersion).response()).unwrap();
        assert!(
            r.starts_with("HTTP/1.1 426 Upgrade Required\r\nSec-WebSocket-Version: 13\r\n"),
            "{r}"
        );
        let r = String::from_utf8(Answer::Rejected(Rejection::HeadTooLarge("x")).response()).unwrap();
        assert!(r.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\nrequest head too large: x\n"), "{r}");
    }
}
